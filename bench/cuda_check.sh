#!/usr/bin/env bash
# The CUDA checks of issue 30 for a session with a GPU (none of them runs in CI): the CUDA tests,
# then bench_sampler, bench_fused (with TRL's kernel, Triton path), bench_trl and the drop-in
# bench on CUDA, each under its own timeout so the whole script stays under 8 minutes.
# Tables go to stdout and to $OUT (default results/cuda/); record them in docs/benchmarks.md
# and docs/fused-kl.md with the GPU's name, which the first line prints.
#
#   bash bench/cuda_check.sh            # PY=path/to/python to use another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/cuda}
export PYTHONPATH=$PWD
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 2
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a timeout, keep its output, remember failures
    local name=$1 seconds=$2
    shift 2
    echo "== $name (<= ${seconds} s)"
    timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; failed=1; }
}
step tests 150 "$PY" -m pytest -q -rs -k "cuda" tests/test_agents_device.py tests/test_agents_cli.py tests/test_sampler.py tests/test_kl_fused_peers.py
step sampler 45 "$PY" bench/bench_sampler.py --device cuda --rounds 6
step fused 120 "$PY" bench/bench_fused.py --device cuda --modes unfused fused fused-bf16 trl --kl-only --lengths 256 1024 --repeats 3 --max-gb 100
step trl_bf16 60 "$PY" bench/bench_trl.py --device cuda --precision bf16 --rounds 4
step trl_fp32 45 "$PY" bench/bench_trl.py --device cuda --precision fp32 --rounds 4
step dropin_bf16 45 "$PY" bench/bench_trl_dropin.py --device cuda --precision bf16 --rounds 4
exit $failed
