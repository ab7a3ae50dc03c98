#!/usr/bin/env bash
# README command #1: the whole TUNA pipeline on the embedded synthetic world (tuna quickstart):
# world -> tiny CLIP -> text-pretrained tiny LLM -> datastores + retrieval caches -> deepspeed training of
# the no-tags baseline and TUNA -> evaluation with ablations and a datastore swap -> table, JSON, chart.
# Output under ${OUT:-runs/quickstart}; extra arguments go to `tuna quickstart` (see --help).
# Re-running resumes after the last finished stage; --overwrite starts again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TUNA_VENV:-$ROOT/.venv}"
OUT="${OUT:-$ROOT/runs/quickstart}"
bash "$ROOT/scripts/bootstrap.sh"
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
exec tuna quickstart --out "$OUT" "$@"
