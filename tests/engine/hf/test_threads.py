"""Which threads run torch: the load ends with its thread, the driver's thread steps.

A thread that ran torch on CPU keeps its OpenMP team until it ends; with two teams alive
libgomp stops spin-waiting between parallel regions and the driver's small ops got about
2x slower. So the engine loads in a thread of its own that ends with the load.
"""

from __future__ import annotations

import threading
from typing import Any

from .conftest import make_request, run, wait_until


def test_the_model_loads_in_a_thread_that_ends_with_the_load(
    tiny_gpt2: str, engine_factory: Any
) -> None:
    """After ``start()`` only the driver's thread runs torch (one OpenMP team: see engine.py)."""
    engine = engine_factory(tiny_gpt2)
    loaders: list[threading.Thread] = []
    build = engine._build_serving

    def spy() -> Any:
        loaders.append(threading.current_thread())
        return build()

    engine._build_serving = spy

    async def cycle() -> Any:
        await engine.start()
        await wait_until(lambda: not loaders[0].is_alive())
        out = await engine.execute(make_request("the loader has ended", 4))
        await engine.stop()
        return out

    out = run(cycle())
    assert out.finish_reason == "length" and len(out.output_tokens) == 4
    assert loaders[0] is not threading.main_thread()
    assert loaders[0].name.startswith("sagellm-load-") and not loaders[0].is_alive()
