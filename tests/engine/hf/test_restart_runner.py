"""A restarted engine builds its runner on the already-loaded model the same way.

The second start builds a new runner (fresh KV pool) on the model loaded by the first:
whatever the first runner did to the model (prepacked linear weights) must be recognised,
so both runners pad steps alike. Tensor-parallel ranks rely on it: rank 0 restarted and a
fresh worker must run the same step shapes, or their collectives mismatch.
"""

from __future__ import annotations

from typing import Any

from .conftest import make_request, run


def test_restart_keeps_the_prepacked_fast_path_and_the_tokens(
    tiny_llama: str, engine_factory: Any
) -> None:
    from sagellm_backend.engine.runners.paged import prepack_available

    engine = engine_factory(tiny_llama, prepack_weights=True)

    async def cycle() -> tuple[bool, list[int]]:
        await engine.start()
        prepacked = bool(engine._runner.prepacked)
        out = await engine.execute(make_request("restart keeps the same shapes", 6))
        await engine.stop()
        return prepacked, list(out.output_tokens)

    first = run(cycle())
    second = run(cycle())
    assert first[0] == prepack_available()
    assert second == first
