"""Do TUNA's image-aware tag tokens look like the place word of their object's column?

For every tag of a several-object quickstart eval image that names an object standing in one column
(ground truth re-derived from the world, ``datastore.synth.layout.World.scenes``), compare the connector's output for the tag's image-grounded token with the
LLM's embeddings of " left", " middle" and " right", and count how often the nearest is the right one
(chance: 1/3).

    python experiments/tag_token_places.py --quickstart runs/quickstart
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, help="a finished `tuna quickstart --out` directory")
    args = parser.parse_args()
    root = Path(args.quickstart)

    import torch
    from PIL import Image
    from transformers import AutoTokenizer

    from datastore.synth.layout import World
    from datastore.synth.scene import POSITION_PHRASES
    from tuna.modeling_tuna import TunaForCausalLM

    places = list(POSITION_PHRASES)  # the world's columns: left, middle, right

    model_dir = root / "models" / "tuna-stage2"
    predictions = root / "eval" / "tuna" / "synth_open" / "predictions.jsonl"
    for path in (model_dir, predictions):
        if not path.exists():
            raise SystemExit(f"error: {path} not found (run `tuna quickstart --out {root}` first)")
    model = TunaForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    table = model.get_input_embeddings().weight
    place_embeds = torch.stack([table[tok(" " + p, add_special_tokens=False).input_ids].mean(0) for p in places])

    rows = {}  # image -> one prediction row (its tags and novelty are the image's)
    for line in predictions.open():
        r = json.loads(line)
        if r["category"] == "identification" and r["tags"]:
            rows.setdefault(r["image"], r)
    hits: collections.Counter = collections.Counter()
    for (image, r), scene in zip(rows.items(), World.open(root / "world").scenes(list(rows))):
        if len(scene.objects) < 2:
            continue
        columns: dict[str, set[str]] = {}  # category name -> the columns it stands in
        for obj in scene.objects:
            columns.setdefault(obj.category.name, set()).add(obj.position)
        tags = [t["tag"] for t in r["tags"]]
        pixels = model.vision.clip.preprocess(Image.open(root / "world" / "images" / image).convert("RGB"))[None]
        with torch.no_grad():
            mask = torch.ones(1, len(tags), dtype=torch.bool)
            encoded = model.tag_encoder(model._tag_text_embeddings([tags], mask), model.vision(pixels).patches, mask)
            tokens = model.connector(encoded[0, :, 0])  # (T, H): each tag's first image-aware token
            sims = torch.nn.functional.cosine_similarity(tokens[:, None], place_embeds[None], dim=-1)  # (T, 3)
        for tag, sim in zip(tags, sims):
            where = columns.get(tag.split()[-1], set())
            if len(where) == 1:
                hits[r["novelty"], "n"] += 1
                hits[r["novelty"], "hit"] += places[int(sim.argmax())] in where
    for novelty in ("seen", "novel"):
        n = hits[novelty, "n"]
        if n:
            print(f"{novelty}: {n} tags, nearest place word is their object's column for "
                  f"{100 * hits[novelty, 'hit'] / n:.1f} % (chance 33.3 %)")


if __name__ == "__main__":
    main()
