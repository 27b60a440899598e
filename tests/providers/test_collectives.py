"""Collectives of the torch providers on torch.distributed (gloo on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from sagellm_backend.errors import CapabilityNotSupportedError, ConfigError  # noqa: E402
from sagellm_backend.providers.cpu import CPUBackendProvider  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed has no gloo"
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_env(port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",  # keep gloo's traffic on the loopback interface
        OMP_NUM_THREADS="1",
        PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from sagellm_backend.providers.cpu import create_cpu_backend

    mode, rank, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    p = create_cpu_backend()
    if mode == "env":
        p.init_distributed(timeout_s=60)  # RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    else:
        p.init_distributed(rank=rank, world_size=2, init_method=url, timeout_s=60)
    r = p.rank
    out = {"rank": r, "world": p.world_size, "distributed": p.is_distributed}
    for op in ("sum", "avg", "max", "min", "product"):
        t = torch.tensor([r + 1.0, 2.0 * (r + 1), -(r + 1.0)])
        before = t.data_ptr()
        assert p.all_reduce(t, op) is None
        out[op] = t.tolist()
        out[op + "_in_place"] = t.data_ptr() == before
    ti = torch.tensor([r + 1, 10 * (r + 1)], dtype=torch.int64)
    p.all_reduce(ti, "max")
    out["int_max"] = ti.tolist()
    tb = torch.tensor([r + 0.5], dtype=torch.bfloat16)
    p.all_reduce(tb, "sum")
    out["bf16_sum"] = tb.float().tolist()
    out["gather"] = p.all_gather(torch.tensor([[r, r + 10]])).tolist()
    out["gather_scalar"] = p.all_gather(torch.tensor(float(r))).tolist()
    host = [[r + 1, 2 * (r + 1)], [3, 4]]
    p.all_reduce(host, "sum")
    out["host_sum"] = host
    host_avg = [r + 1, 4]
    p.all_reduce(host_avg, "avg")
    out["host_avg"] = host_avg
    out["host_gather"] = p.all_gather([r, r + 0.5])
    out["host_gather_scalar"] = p.all_gather(r)
    try:
        p.all_reduce((1.0,), "sum")
    except TypeError as exc:
        out["host_tuple"] = str(exc)
    try:
        p.all_reduce([1, [2, 3]], "sum")
    except ValueError as exc:
        out["host_ragged"] = str(exc)
    try:
        p.all_reduce(torch.ones(1), "median")
    except ValueError as exc:
        out["bad_op"] = str(exc)
    p.close()
    out["initialized_after_close"] = torch.distributed.is_initialized()
    print("RESULT " + json.dumps(out), flush=True)
    """
)


@pytest.mark.parametrize("mode", ["env", "tcp"])
def test_two_gloo_processes_all_ops(mode: str) -> None:
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    procs = []
    for rank in range(2):
        env = _loopback_env(port)
        if mode == "env":
            env.update(RANK=str(rank), WORLD_SIZE="2")
        else:
            env.pop("RANK", None)
            env.pop("WORLD_SIZE", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, mode, str(rank), url],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"worker failed (rc={proc.returncode}):\n{err[-3000:]}"
            line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
            results.append(json.loads(line[len("RESULT ") :]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["world"] == 2 and r["distributed"]
        # rank 0 contributes [1, 2, -1], rank 1 [2, 4, -2]
        assert r["sum"] == [3.0, 6.0, -3.0]
        assert r["avg"] == [1.5, 3.0, -1.5]
        assert r["max"] == [2.0, 4.0, -1.0]
        assert r["min"] == [1.0, 2.0, -2.0]
        assert r["product"] == [2.0, 8.0, 2.0]
        assert all(r[op + "_in_place"] for op in ("sum", "avg", "max", "min", "product"))
        assert r["int_max"] == [2, 20]
        assert r["bf16_sum"] == [2.0]
        assert r["gather"] == [[0, 10], [1, 11]]  # rank order, concatenated along dim 0
        assert r["gather_scalar"] == [0.0, 1.0]
        assert "valid ops: sum, avg, max, min, product" in r["bad_op"]
        assert r["host_sum"] == [[3, 6], [6, 8]]  # ints stay ints, in place
        assert r["host_avg"] == [1.5, 4.0]
        assert r["host_gather"] == [0.0, 0.5, 1.0, 1.5]
        assert r["host_gather_scalar"] == [0, 1]
        assert "works in place" in r["host_tuple"]
        assert "must be rectangular" in r["host_ragged"]
        assert r["initialized_after_close"] is False


def test_single_rank_identity_without_process_group() -> None:
    p = CPUBackendProvider()
    assert not p.is_distributed and p.rank == 0 and p.world_size == 1
    for op in ("sum", "avg", "max", "min", "product", "SUM"):
        t = torch.tensor([1.0, -2.0, 3.5])
        p.all_reduce(t, op)
        assert t.tolist() == [1.0, -2.0, 3.5]
    src = torch.arange(6).reshape(3, 2)
    g = p.all_gather(src)
    assert torch.equal(g, src) and g.data_ptr() != src.data_ptr()
    assert p.all_gather(torch.tensor(4.0)).tolist() == [4.0]


def test_bad_input_is_rejected_clearly() -> None:
    p = CPUBackendProvider()
    with pytest.raises(ValueError, match="unknown collective op 'median'; valid ops: sum, avg"):
        p.all_reduce(torch.ones(2), "median")
    with pytest.raises(ValueError, match="'avg' needs a floating tensor"):
        p.all_reduce(torch.ones(2, dtype=torch.int32), "avg")
    with pytest.raises(ConfigError, match="unknown collective op 'median'"):
        p.all_reduce([1.0], "median")  # the op is checked for host values too
    with pytest.raises(TypeError, match=r"takes a torch\.Tensor, a number or a \(nested\) list"):
        p.all_reduce("12", "sum")
    with pytest.raises(TypeError, match=r"got dict"):
        p.all_gather({"a": 1.0})
    with pytest.raises(TypeError, match=r"got list"):
        p.all_gather([1.0, [2.0, None]])


def test_single_rank_host_values_as_in_0112() -> None:
    """0.1.1.2's cpu provider took plain lists: all_reduce left them, all_gather copied."""
    p = CPUBackendProvider()
    values = [1.0, [2, 3]]
    assert p.all_reduce(values, "sum") is None
    assert values == [1.0, [2, 3]]
    gathered = p.all_gather(values)
    assert gathered == [1.0, [2, 3]] and gathered is not values and gathered[1] is not values[1]
    assert p.all_gather(4.5) == [4.5]
    assert p.all_gather((1, 2)) == [1, 2]


def test_disabled_collectives_are_enforced() -> None:
    p = CPUBackendProvider(enable_collectives=False)
    assert p.capability().has_collective is False
    with pytest.raises(NotImplementedError, match="enable_collectives=False"):
        p.all_reduce(torch.ones(2), "sum")
    with pytest.raises(CapabilityNotSupportedError):
        p.all_gather(torch.ones(2))
    with pytest.raises(CapabilityNotSupportedError):
        p.init_distributed(rank=0, world_size=1, init_method="tcp://127.0.0.1:1")


def test_init_distributed_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    p = CPUBackendProvider()
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="RANK environment variable"):
        p.init_distributed()
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT"):
        p.init_distributed(rank=0, world_size=1)
    with pytest.raises(ConfigError, match="0 <= rank < world_size"):
        p.init_distributed(rank=2, world_size=2, init_method="tcp://127.0.0.1:1")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        p.init_distributed(world_size=1, init_method="tcp://127.0.0.1:1")
    assert not dist.is_initialized()


def test_one_rank_group_in_process_is_created_adopted_and_destroyed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert not dist.is_initialized()
    owner = CPUBackendProvider()
    owner.init_distributed(
        rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}", timeout_s=30
    )
    try:
        assert dist.is_initialized() and owner.is_distributed
        assert owner.world_size == 1
        t = torch.tensor([2.0, 4.0])
        owner.all_reduce(t, "avg")
        assert t.tolist() == [2.0, 4.0]
        assert owner.all_gather(torch.tensor([[1, 2]])).tolist() == [[1, 2]]
        # A second provider adopts the existing group and does not destroy it on close.
        guest = CPUBackendProvider()
        guest.init_distributed()
        assert guest.is_distributed
        guest.close()
        assert dist.is_initialized()
    finally:
        owner.close()
    assert not dist.is_initialized()
    owner.close()  # idempotent
