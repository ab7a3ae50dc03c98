#!/usr/bin/env bash
# Create or reuse the tuna virtualenv and install the package with the pinned versions in
# constraints.txt. Idempotent: a second run only checks a stamp (and re-points the editable install
# when the venv is shared between clones, as CI does). Venv: $TUNA_VENV, default <repo>/.venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TUNA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.tuna-lock-sha256"
LOCK_HASH="$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$LOCK_HASH" ]; then
    # from / : run from the clone, `import eval` would find the clone's own folder and hide an install
    # that still points at an older clone (console scripts like tuna-eval would then run the old code)
    where="$(cd / && "$VENV/bin/python" -c 'import eval, os; print(os.path.dirname(os.path.dirname(eval.__file__)))' 2>/dev/null || true)"
    if [ "$where" != "$ROOT" ]; then
        echo "[bootstrap] pointing $VENV at $ROOT" >&2
        "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" >&2
    fi
    exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "tuna needs Python >= 3.10 (set PYTHON=...)")'
echo "[bootstrap] creating virtualenv $VENV (first run: ~3 GB of wheels, about 80 s with uv)" >&2
start=$(date +%s)
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >&2
# uv fetches and unpacks the ~3 GB of wheels in parallel: the whole bootstrap takes 82 s against pip's 142 s
# on a 2-core VM with empty caches (bench/bench_bootstrap.py, docs/benchmarks.md). It does not read pip's
# config, so an index set only there (a private mirror) makes it fail; pip then installs as before.
# TUNA_NO_UV=1 skips uv. --compile-bytecode: pip writes the .pyc files at install, uv only when asked;
# without them every process compiles torch's modules again where PYTHONDONTWRITEBYTECODE is set
# (+12 s per training run measured).
if [ -z "${TUNA_NO_UV:-}" ] && "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" uv >&2 \
        && "$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python" -c "$ROOT/constraints.txt" -e "$ROOT[test]" >&2; then
    :
else
    [ -n "${TUNA_NO_UV:-}" ] || echo "[bootstrap] uv could not install; installing with pip" >&2
    "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" -e "$ROOT[test]" >&2
fi
# DeepSpeed JIT-compiles its CPU shared-memory communication op at the first training run (~30 s, g++);
# do it now, so the first `tuna quickstart` does not pay for it (cached in ~/.cache/torch_extensions)
echo "[bootstrap] compiling DeepSpeed's CPU communication op (once, ~30 s)" >&2
# with the venv's ninja first on PATH, as the training runs have it (pipeline.processes.subprocess_env):
# another ninja version reads this build's log as stale and compiles again
PATH="$VENV/bin:$PATH" "$VENV/bin/python" -c 'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()' \
    >/dev/null 2>&1 || echo "[bootstrap] warning: could not pre-build it (is g++ installed?); the first training run will build it" >&2
echo "$LOCK_HASH" > "$STAMP"
echo "[bootstrap] virtualenv ready in $(( $(date +%s) - start ))s" >&2
