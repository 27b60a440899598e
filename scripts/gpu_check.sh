#!/usr/bin/env bash
# GPU check of sagellm-backend: the CUDA test subset and a short provider smoke.
#
# The GPU machine has Python 3.12 with torch, transformers and accelerate, no network and
# no sagellm_protocol for 3.12, so this follows ../shared/device/README.md: the protocol
# stand-in and its pydantic wheels travel with the run in the ignored folder .gpu/.
#
#   1. here, once (needs ../shared/device and a package registry):
#        bash scripts/gpu_check.sh --prepare
#      copies ../shared/device to .gpu/ and downloads the pure-Python test wheels
#      (pytest and its plugins, hypothesis) for Python 3.12 into .gpu/wheels/.
#   2. on the GPU machine, from the repository root, with .gpu carried along:
#        bash scripts/gpu_check.sh            # tests + smoke (+ hooks below)
#      Environment knobs:
#        GPU_CHECK_PYTHON    interpreter (default python3)
#        GPU_CHECK_SITE      where the wheels are unpacked (default /tmp/site)
#        GPU_CHECK_TESTS     test paths for the CUDA subset (default: tests/providers
#                            tests/kv tests/integration, those that exist)
#        GPU_CHECK_BENCH     an optional benchmark command run last (eval'd), e.g.
#                            'python benchmarks/bench_engine.py --device cuda:0 --quick'
#        GPU_CHECK_SECTION_TIMEOUT  seconds per section (default 240)
#
# Exit status: 0 when every section passed, 1 otherwise (each section still runs), 2 when
# the environment cannot be set up.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${GPU_CHECK_PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
SECTION_TIMEOUT=${GPU_CHECK_SECTION_TIMEOUT:-240}
# Pure-Python wheels the GPU machine lacks (pytest is not preinstalled there).
TEST_WHEELS=(pytest pluggy iniconfig packaging pygments pytest-timeout pytest-asyncio hypothesis attrs sortedcontainers)

if [[ "${1:-}" == "--prepare" ]]; then
    if [[ ! -d ../shared/device ]]; then
        echo "gpu_check: ../shared/device not found; run --prepare in the sageLLM workspace" >&2
        exit 2
    fi
    rm -rf .gpu && cp -r ../shared/device .gpu && chmod -R u+w .gpu
    # .gitignore already lists .gpu/; fall back to the README's local exclude otherwise
    git check-ignore -q .gpu 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation py --platform any -d .gpu/wheels "${TEST_WHEELS[@]}" || exit 2
    echo "gpu_check: prepared .gpu/ ($(du -sh .gpu | cut -f1)); carry '.gpu' to the GPU run"
    exit 0
fi

# ----------------------------------------------------------------------------- setup
if [[ ! -d .gpu/wheels || ! -d .gpu/py312 ]]; then
    echo "gpu_check: .gpu/ is missing; run 'bash scripts/gpu_check.sh --prepare' first and" \
        "carry .gpu to this machine" >&2
    exit 2
fi
mkdir -p "$SITE"
if ! "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl 2>/dev/null; then
    echo "gpu_check: pip unavailable, unpacking the wheels instead"
    for w in .gpu/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || exit 2; done
fi
export PYTHONPATH="$SITE:$ROOT/.gpu/py312:$ROOT/src"
export PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'EOF' || exit 2
import sys
import pydantic
import sagellm_protocol
import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}),"
      f" pydantic {pydantic.VERSION}, protocol {sagellm_protocol.__version__}"
      f" from {sagellm_protocol.__file__}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False on this machine")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} sm{p.major}{p.minor} {p.total_memory / 2**30:.1f} GiB")
EOF

FAILED=()
section() {  # section NAME COMMAND...
    local name=$1
    shift
    echo
    echo "=== $name ==="
    local start=$SECONDS
    timeout --kill-after=10 "$SECTION_TIMEOUT" "$@"
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start)) s ==="
    [[ $rc -eq 0 ]] || FAILED+=("$name (rc=$rc)")
}

# ----------------------------------------------------------------------------- CUDA tests
if [[ -n "${GPU_CHECK_TESTS:-}" ]]; then
    read -r -a TEST_PATHS <<<"$GPU_CHECK_TESTS"
else
    TEST_PATHS=()
    for p in tests/providers tests/kv tests/integration; do [[ -d $p ]] && TEST_PATHS+=("$p"); done
fi
section "pytest -m cuda ${TEST_PATHS[*]}" \
    "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider "${TEST_PATHS[@]}"

# ----------------------------------------------------------------------------- provider smoke
SMOKE=$(mktemp --suffix=.py)
trap 'rm -f "$SMOKE"' EXIT
cat >"$SMOKE" <<'EOF'
import time

import torch

from sagellm_backend import DType
from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.providers.cuda import create_cuda_backend

p = create_cuda_backend({"device": "cuda:0", "kv_memory_bytes": 256 << 20})
cap = p.capability()
print("capability:", cap.device_name, "sm", cap.compute_capability,
      [d.value for d in cap.supported_dtypes], [k.value for k in cap.supported_kernels],
      f"stream={cap.has_stream} event={cap.has_event} collective={cap.has_collective}"
      f" graph={cap.has_graph_exec} total={cap.total_memory_bytes >> 20} MiB"
      f" free={cap.available_memory_bytes >> 20} MiB")

# streams/events: device time of a matmul loop vs host wall time around it
s, e0, e1 = p.create_stream(), p.create_event(), p.create_event()
a = torch.randn(4096, 4096, device=p.device, dtype=torch.float16) / 64
p.synchronize()  # a is made on the default stream; s must not race it
t0 = time.perf_counter()
with s:
    s.record_event(e0)
    for _ in range(20):
        a = (a @ a).clamp_(-1, 1)
    s.record_event(e1)
s.synchronize()
host_ms = (time.perf_counter() - t0) * 1e3
dev_ms = e1.elapsed_ms(e0)
print(f"events: 20 fp16 4096^2 matmuls {dev_ms:.2f} ms device, {host_ms:.2f} ms host"
      f" ({20 * 2 * 4096**3 / dev_ms / 1e9:.1f} TFLOP/s)")
assert 0 < dev_ms <= host_ms + 1, (dev_ms, host_ms)

# KV on the GPU, migrate cuda:0 -> cpu -> cuda:0 with the bytes checked
blk = p.kv_block_alloc(100, DType.FP16)
pages = p.get_kv_tensor(blk)
for pg in pages:
    pg.copy_(torch.randn(pg.shape, device=pg.device).to(pg.dtype))
payload = torch.stack(pages).cpu()
t0 = time.perf_counter()
host = p.kv_block_migrate(blk, "cpu")
p.synchronize()
off_ms = (time.perf_counter() - t0) * 1e3
t0 = time.perf_counter()
back = p.kv_block_migrate(host, p.device)
p.synchronize()
on_ms = (time.perf_counter() - t0) * 1e3
same = torch.equal(torch.stack(p.get_kv_tensor(back)).cpu(), payload)
mib = blk.num_bytes / 2**20
print(f"kv: block of {mib:.0f} MiB on {blk.device} -> {host.device} ({off_ms:.1f} ms)"
      f" -> {back.device} ({on_ms:.1f} ms), bytes equal: {same}")
assert same and all(pg.device.type == "cuda" for pg in p.get_kv_tensor(back))
p.kv_block_free(back)
del pages, payload

# paged attention on the GPU vs dense SDPA on the same data
spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=DType.FP16)
mgr = p.create_kv_manager(spec, num_pages=64)
k_cache, v_cache = mgr.storage.layer_kv(0)
k_cache.normal_(); v_cache.normal_()
lens = [5, 40, 77]
tables = []
for i, n in enumerate(lens):
    mgr.allocate(f"s{i}", list(range(1000 * i, 1000 * i + n)))
    tables.append(mgr.block_table(f"s{i}"))
width = max(map(len, tables))
bt = torch.tensor([r + [-1] * (width - len(r)) for r in tables], device=p.device)
ctx = torch.tensor(lens, device=p.device)
q = torch.randn(len(lens), 8, 64, device=p.device, dtype=torch.float16)
out = p.get_kernel("paged_attention")(q, k_cache, v_cache, bt, ctx, 16)
err = 0.0
for b, n in enumerate(lens):
    slots = torch.tensor([tables[b][i // 16] * 16 + i % 16 for i in range(n)], device=p.device)
    k = k_cache[slots].transpose(0, 1)[None].float().repeat_interleave(4, 1)
    v = v_cache[slots].transpose(0, 1)[None].float().repeat_interleave(4, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q[b][None, :, None].float(), k, v)
    err = max(err, (out[b].float() - ref[0, :, 0]).abs().max().item())
print(f"kernels: paged_attention fp16 vs dense SDPA max abs err {err:.2e}")
assert err < 1e-2
low = torch.bfloat16 if DType.BF16 in cap.supported_dtypes else torch.float16
x = torch.randn(64, 512, device=p.device)
w = torch.randn(512, device=p.device)
checks = {
    "matmul": (p.get_kernel("matmul")(x.to(low), x.t().to(low)), x @ x.t()),
    "softmax": (p.get_kernel("softmax")(x.to(low)), torch.softmax(x, -1)),
    "rms_norm": (
        p.get_kernel("rms_norm")(x.to(low), w.to(low)),
        x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
    ),
}
for name, (got, ref) in checks.items():
    e = ((got.float() - ref).abs().max() / ref.abs().max()).item()
    print(f"kernels: {name} {low} vs fp32 reference, max error / max |ref| = {e:.2e}")
    assert e < 2e-2, name
for i in range(len(lens)):
    mgr.free(f"s{i}")
del k_cache, v_cache, out
p.release_kv_manager(mgr)
del mgr

stats = p.memory_stats()
print("memory:", {k: (v >> 20 if abs(v) >= 1 << 20 else v) for k, v in stats.items()}, "(MiB)")
reserved = stats["reserved"]
del a
p.clear_cache()
print(f"clear_cache: reserved {reserved >> 20} -> {p.memory_stats()['reserved'] >> 20} MiB")
p.close()
print("smoke: OK")
EOF
section "provider smoke" "$PY" "$SMOKE"

# ----------------------------------------------------------------------------- HF engine hook
# The HF-engine CUDA tests run here once tests/engine/hf has them; more engine checks can be
# appended below this line as further `section` calls.
if compgen -G "tests/engine/hf/test_*.py" >/dev/null; then
    section "pytest -m cuda tests/engine/hf" \
        "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/engine/hf
else
    echo
    echo "=== tests/engine/hf: no tests yet, skipped ==="
fi

# ----------------------------------------------------------------------------- benchmark hook
if [[ -n "${GPU_CHECK_BENCH:-}" ]]; then
    section "benchmark: $GPU_CHECK_BENCH" bash -c "$GPU_CHECK_BENCH"
fi

echo
if ((${#FAILED[@]})); then
    echo "gpu_check: FAILED: ${FAILED[*]}"
    exit 1
fi
echo "gpu_check: all sections passed"
