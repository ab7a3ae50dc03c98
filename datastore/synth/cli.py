"""``tuna-synth``: generate the embedded synthetic world (thin layer over generate_world)."""

from __future__ import annotations

import argparse
import sys
import time

from common.cli import HelpFormatter, add_config_flags, config_from_args
from common.log import error_line

EPILOG = """outputs (under --out):
  world.json                               categories (seen/novel, confusable pairs), args, counts
  corpus/corpus-NNNNNN.tar                 webdataset shards: {key}.jpg, {key}.txt caption, {key}.json truth
  images/{instruct,eval}/KEY.jpg           LLaVA image folder
  llava/pretrain.json, llava/instruct.json LLaVA-format connector-pretraining and instruction data (seen only)
  eval/{open,pope,mc}/questions.jsonl      eval questions (+ answers.jsonl / annotations.jsonl), novelty-labelled

example:
  tuna-synth --out world --seed 0 --n-corpus 100000 --n-instruct 20000 --n-eval 1000
"""


def main(argv: list[str] | None = None) -> int:
    from datastore.synth.generate import SynthConfig

    parser = argparse.ArgumentParser(
        prog="tuna-synth", formatter_class=HelpFormatter, epilog=EPILOG,
        description="Generate a deterministic synthetic visual world: procedurally rendered images of "
                    "named object categories (shape + pattern) with colour/size/position/count attributes, "
                    "split into seen categories (allowed in instruction data) and novel ones (only in the "
                    "datastore corpus and novel eval questions). Same seed and arguments, same bytes.")
    add_config_flags(parser, SynthConfig)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from datastore.synth.generate import generate_world

    bars: list[tqdm] = []

    def progress(n: int) -> None:  # the bar opens with the first image, after the argument checks
        if not bars:
            bars.append(tqdm(total=config.n_corpus + config.n_instruct + config.n_eval, unit="img",
                             desc="tuna-synth"))
        bars[0].update(n)

    try:
        config = config_from_args(SynthConfig, args)
        start = time.perf_counter()
        try:
            info = generate_world(config, progress=progress)
        finally:
            for bar in bars:
                bar.close()
    except (ValueError, RuntimeError, OSError) as exc:  # the error stays the last line
        print(f"tuna-synth: error: {error_line(exc)}", file=sys.stderr)
        return 1
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in info["seconds"].items())
    counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
    print(f"world written to {args.out} in {time.perf_counter() - start:.1f}s ({stages})\n{counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
