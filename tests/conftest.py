"""Session fixtures shared by the train and eval tests: a small synthetic world with datastore, cache, tiny LLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    """Paths of a 200-image world: llava JSONs, images, datastore, retrieval cache, tiny LLM + tokenizer."""
    from transformers import AutoTokenizer

    from datastore.build import BuildConfig, build
    from datastore.cache import CacheConfig, build_cache
    from datastore.clip import ClipSpec
    from datastore.index import IndexConfig
    from datastore.reader import ReaderConfig
    from pipeline.tiny import save_hf_tokenizer, save_tiny_llm, train_tokenizer

    root = tmp_path_factory.mktemp("world")
    subprocess.run([sys.executable, "-m", "datastore.synth.cli", "--out", str(root / "w"), "--n-corpus", "200",
                    "--n-instruct", "48", "--n-eval", "10", "--image-size", "64", "--shard-size", "100"],
                   check=True, stdout=subprocess.DEVNULL)
    w = root / "w"
    build(BuildConfig(inputs=[str(w / "corpus" / "corpus-{000000..000001}.tar")], out=str(root / "ds"),
                      clip=ClipSpec(model="tuna-tiny-clip"), reader=ReaderConfig(batch_size=64, num_workers=0),
                      index=IndexConfig(n_eval_queries=20)), show_progress=False)
    llava = [str(w / "llava" / "instruct.json"), str(w / "llava" / "pretrain.json")]
    build_cache(CacheConfig(datastore=str(root / "ds"), out=str(root / "cache.parquet"), llava_json=llava,
                            image_folder=str(w / "images"), k_images=3, num_workers=0), show_progress=False)
    lines = [turn["value"] for path in llava for rec in json.loads(Path(path).read_text())
             for turn in rec["conversations"]]
    lines += ["A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT: Tags:"]
    llm = root / "llm"
    save_hf_tokenizer(train_tokenizer(lines, "bytelevel", vocab_size=600), llm)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    save_tiny_llm(llm, vocab_size=len(tokenizer), hidden_size=64, num_layers=2)
    return {"root": root, "data_root": w, "images": w / "images", "instruct": llava[0], "pretrain": llava[1],
            "cache": root / "cache.parquet", "datastore": root / "ds", "llm": llm}
