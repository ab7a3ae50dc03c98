#!/usr/bin/env bash
# README command #1 (until the quickstart lands): synthesize the embedded world, build its
# datastore with the bundled tiny CLIP, and query it with an evaluation image.
# Output under ${OUT:-runs/demo}. Re-running reuses the virtualenv and resumes the build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TUNA_VENV:-$ROOT/.venv}"
OUT="${OUT:-$ROOT/runs/demo}"
N_CORPUS="${N_CORPUS:-5000}"
bash "$ROOT/scripts/bootstrap.sh"
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1

echo "== 1/3 synthesize the world ($N_CORPUS corpus images) -> $OUT/world"
tuna-synth --out "$OUT/world" --seed 0 --n-corpus "$N_CORPUS" --n-instruct 500 --n-eval 200 --overwrite
echo "== 2/3 build the datastore -> $OUT/datastore"
tuna-datastore build --input "$OUT/world/corpus/corpus-*.tar" --out "$OUT/datastore" \
    --model tuna-tiny-clip --device cpu --overwrite
echo "== 3/3 query it with an evaluation image"
images=("$OUT"/world/images/eval/*.jpg)
image="${images[1]}"  # the second eval image: a novel-category one
tuna-datastore query --datastore "$OUT/datastore" --image "$image" -k 5 --device cpu
python - "$OUT/world" "eval/$(basename "$image")" <<'PY'
import json, sys
root, image = sys.argv[1], sys.argv[2]
rows = lambda f: [json.loads(line) for line in open(f"{root}/eval/open/{f}")]
answers = {a["question_id"]: a for a in rows("answers.jsonl")}
for q in rows("questions.jsonl"):
    if q["image"] == image and q["category"] == "identification":
        print(f"ground truth ({q['novelty']}): {q['text']} -> {answers[q['question_id']]['answers'][0]}")
PY
echo "outputs: $OUT/world (synthetic world), $OUT/datastore (datastore + manifest.json)"
