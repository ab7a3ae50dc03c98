"""Do TUNA's image-aware tag tokens look like the place word of their object's column?

For every tag of a several-object quickstart eval image whose object has one known column (from the
identification questions), compare the connector's output for the tag's image-grounded token with the
LLM's embeddings of " left", " middle" and " right", and count how often the nearest is the right one
(chance: 1/3).

    python scripts/tag_token_places.py --quickstart runs/quickstart
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

PLACES = ("left", "middle", "right")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, help="a finished `tuna quickstart --out` directory")
    args = parser.parse_args()
    root = Path(args.quickstart)

    import torch
    from PIL import Image
    from transformers import AutoTokenizer

    from tuna.modeling_tuna import TunaForCausalLM

    model_dir = root / "models" / "tuna-stage2"
    predictions = root / "eval" / "tuna" / "synth_open" / "predictions.jsonl"
    for path in (model_dir, predictions):
        if not path.exists():
            raise SystemExit(f"error: {path} not found (run `tuna quickstart --out {root}` first)")
    model = TunaForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    table = model.get_input_embeddings().weight
    place_embeds = torch.stack([table[tok(" " + p, add_special_tokens=False).input_ids].mean(0) for p in PLACES])

    scenes: dict[str, dict] = collections.defaultdict(lambda: {"where": {}, "row": None})
    for line in predictions.open():
        r = json.loads(line)
        places = [p for p in PLACES if p in r["text"]]
        if r["category"] == "identification" and places:
            scene = scenes[r["image"]]
            scene["where"].setdefault(r["answers"][0], set()).add(places[0])
            scene["row"] = r
    hits: collections.Counter = collections.Counter()
    for image, scene in scenes.items():
        r = scene["row"]
        tags = [t["tag"] for t in r["tags"]]
        if not tags:
            continue
        pixels = model.vision.clip.preprocess(Image.open(root / "world" / "images" / image).convert("RGB"))[None]
        with torch.no_grad():
            mask = torch.ones(1, len(tags), dtype=torch.bool)
            encoded = model.tag_encoder(model._tag_text_embeddings([tags], mask), model.vision(pixels).patches, mask)
            tokens = model.connector(encoded.reshape(len(tags), -1))  # (T, H): the first query per tag
            sims = torch.nn.functional.cosine_similarity(tokens[:, None], place_embeds[None], dim=-1)  # (T, 3)
        for tag, sim in zip(tags, sims):
            where = scene["where"].get(tag.split()[-1], set())
            if len(where) == 1:
                hits[r["novelty"], "n"] += 1
                hits[r["novelty"], "hit"] += PLACES[int(sim.argmax())] in where
    for novelty in ("seen", "novel"):
        n = hits[novelty, "n"]
        if n:
            print(f"{novelty}: {n} tags, nearest place word is their object's column for "
                  f"{100 * hits[novelty, 'hit'] / n:.1f} % (chance 33.3 %)")


if __name__ == "__main__":
    main()
