"""A synthetic world's files on disk (what ``tuna-synth --out ROOT`` writes), and the one reader of them.

```
ROOT/world.json                                   args, categories (name, novelty), counts
ROOT/corpus/corpus-NNNNNN.tar                     webdataset shards: KEY.jpg, KEY.txt caption, KEY.json truth
ROOT/images/{instruct,eval}/KEY.jpg               LLaVA image folder (ROOT/images)
ROOT/llava/{pretrain,instruct}.json               LLaVA-format training data (seen categories only)
ROOT/eval/{open,pope,mc}/questions.jsonl          eval questions, with answers.jsonl / annotations.jsonl
```

Sample keys name their stream and index ("c000000007": corpus, "i...": instruct, "e...": eval); every
sample's scene is a pure function of the world's arguments, so :meth:`World.scenes` re-samples the ground
truth of any key without rendering it.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

WORLD_JSON = "world.json"
CORPUS_DIR = "corpus"
IMAGES_DIR = "images"
LLAVA_DIR = "llava"
EVAL_DIR = "eval"
EVAL_TASKS = ("open", "pope", "mc")
KEY_PATTERN = re.compile(r"^([cie])(\d+)$")
STREAM_OF_PREFIX = {"c": "corpus", "i": "instruct", "e": "eval"}


def corpus_shard_name(shard: int) -> str:
    return f"{CORPUS_DIR}/corpus-{shard:06d}.tar"


@dataclass(frozen=True)
class World:
    """A tuna-synth output folder. Paths are plain properties; readers raise ValueError naming the file
    that is missing or wrong."""

    root: Path

    @classmethod
    def open(cls, root: str | Path) -> World:
        """The world at ``root``; raises ValueError when ``root/world.json`` is missing."""
        world = cls(Path(root))
        if not world.world_json.is_file():
            raise ValueError(f"{world.world_json} not found: {root} is not a tuna-synth output folder")
        return world

    # ---------------------------------------------------------------- paths
    @property
    def world_json(self) -> Path:
        return self.root / WORLD_JSON

    @property
    def images(self) -> Path:
        """The LLaVA image folder (instruction and eval images, paths relative to it)."""
        return self.root / IMAGES_DIR

    @property
    def pretrain_json(self) -> Path:
        return self.root / LLAVA_DIR / "pretrain.json"

    @property
    def instruct_json(self) -> Path:
        return self.root / LLAVA_DIR / "instruct.json"

    def eval_questions(self, task: str = "open") -> Path:
        if task not in EVAL_TASKS:
            raise ValueError(f"eval task {task!r}: expected one of {EVAL_TASKS}")
        return self.root / EVAL_DIR / task / "questions.jsonl"

    def eval_question_files(self) -> list[Path]:
        return [self.eval_questions(task) for task in EVAL_TASKS]

    def corpus_shards(self) -> list[str]:
        """The corpus shards, in order; raises ValueError when there are none."""
        shards = sorted(str(p) for p in (self.root / CORPUS_DIR).glob("corpus-*.tar"))
        if not shards:
            raise ValueError(f"no corpus shards (corpus-*.tar) under {self.root / CORPUS_DIR}")
        return shards

    # ---------------------------------------------------------------- world.json
    @cached_property
    def info(self) -> dict[str, Any]:
        """world.json's content."""
        if not self.world_json.is_file():
            raise ValueError(f"{self.world_json} not found: {self.root} is not a tuna-synth output folder")
        return json.loads(self.world_json.read_text())

    @property
    def args(self) -> dict[str, Any]:
        """The generator arguments the world is a function of (seed, sizes, category range)."""
        return self.info["args"]

    def names(self, novelty: str | None = None) -> list[str]:
        """Category names in catalogue order, all or those of one novelty ("seen" / "novel")."""
        return [c["name"] for c in self.info["categories"] if novelty is None or c["novelty"] == novelty]

    # ---------------------------------------------------------------- contents
    def captions(self, limit: int | None = None) -> list[str]:
        """Corpus captions (the shards' ``*.txt`` members) in shard order, at most ``limit``."""
        captions: list[str] = []
        for shard in self.corpus_shards():
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.name.endswith(".txt"):
                        captions.append(tar.extractfile(member).read().decode("utf-8"))
                        if limit is not None and len(captions) >= limit:
                            return captions
        return captions

    def eval_images(self, task: str = "open") -> list[str]:
        """The distinct images of an eval task's questions, in question order."""
        rows = [json.loads(line) for line in self.eval_questions(task).read_text().splitlines() if line.strip()]
        return list(dict.fromkeys(row["image"] for row in rows))

    def scenes(self, keys: Sequence[str]) -> list:
        """The scenes (``datastore.synth.scene.Scene``) of sample keys ("c000000007", "e000000001", or
        image paths ending in them), re-sampled from the world's arguments.

        Raises:
            ValueError: a key that is not a synthetic-world key.
        """
        from datastore.synth.scene import sample_pool, sample_rng, sample_scene
        from datastore.synth.world import WorldCatalogue

        args = self.args
        catalogue = WorldCatalogue(args["n_seen"], args["n_novel"], args["category_offset"])
        scenes = []
        for key in keys:
            match = KEY_PATTERN.match(Path(str(key)).stem)
            if match is None:
                raise ValueError(f"{key!r} is not a synthetic-world key (expected c/i/e + digits, e.g. e000000001)")
            stream, index = STREAM_OF_PREFIX[match.group(1)], int(match.group(2))
            pool, first = sample_pool(catalogue, stream, index)
            scenes.append(sample_scene(pool, args["image_size"], sample_rng(args["seed"], stream, index), first))
        return scenes

    def categories(self, keys: Sequence[str]) -> tuple[list[frozenset[str]], list[str]]:
        """Ground-truth category-name sets and novelty ("seen", "novel" or "mixed") of sample keys."""
        scenes = self.scenes(keys)
        return [frozenset(o.category.name for o in s.objects) for s in scenes], [s.novelty for s in scenes]
