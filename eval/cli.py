"""``tuna-eval``: run benchmarks on a TUNA model (retrieval on/off, swappable datastores); compare runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from common.distributed import finish_distributed, init_distributed, resolve_device
from common.log import error_line, setup_logging

EPILOG = """examples:
  tuna-eval --model runs/tuna --bench synth_open,synth_pope,synth_mc --data-root world --datastore ds --out ev/tuna
  tuna-eval --model runs/baseline --bench synth_open --data-root world --no-tags --out ev/base
  tuna-eval --model runs/tuna --bench synth_open --data-root world --datastore ds --ablation uniform_weights --out ev/u
  torchrun --nproc_per_node 8 $(which tuna-eval) --model runs/tuna --bench synth_open ... --out ev/tuna
  tuna-eval --model runs/tuna --bench synth_open --data-root world --datastore ds --out ev/kshot \\
      --shots 0,1,2,4,8 --demo-pool pools/world --retriever sit
  tuna-eval compare ev/base ev/tuna ev/u
  tuna-eval report ev/base ev/tuna --datastore ds --out report.html   # one HTML page, sample by sample
"""


def _parser() -> argparse.ArgumentParser:
    from eval.benchmarks import BENCHMARKS
    from eval.runner import DEFAULT_BATCH_SIZE
    from tuna.configuration_tuna import ABLATIONS

    p = argparse.ArgumentParser(prog="tuna-eval", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                                description="Evaluate a TUNA model on benchmarks from local files; writes per-sample "
                                            "predictions, results.json and results.md to --out. Benchmarks: "
                                            + ", ".join(sorted(BENCHMARKS)) + ". 'tuna-eval compare RUN ...' "
                                            "prints runs side by side.")
    p.add_argument("--model", required=True, help="TUNA model directory (with its tokenizer)")
    p.add_argument("--bench", required=True, help="comma-separated benchmark names")
    p.add_argument("--data-root", required=True, help="root of the benchmark files (layout per benchmark)")
    p.add_argument("--out", required=True, help="output directory")
    tags = p.add_mutually_exclusive_group()
    tags.add_argument("--no-tags", action="store_true", help="no retrieval (plain LLaVA behaviour)")
    p.add_argument("--datastore", help="datastore for live retrieval (swap in another world's to test transfer)")
    p.add_argument("--retrieval-cache", help="retrieval cache parquet keyed by the questions' image field")
    tags.add_argument("--ablation", choices=ABLATIONS, help="override the model's ablation switch")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="questions per generate call (answers do not depend on it)")
    p.add_argument("--limit", type=int, help="first N questions of each benchmark (smoke runs)")
    p.add_argument("--on-bad-sample", default="error", choices=["error", "skip"],
                   help="a question whose image is missing, unreadable or over the pixel cap (all are checked "
                        "before the model loads): error = stop naming it; skip = drop it, counted per reason in "
                        "results.json")
    p.add_argument("--k-images", type=int, default=5, help="neighbours per live retrieval")
    p.add_argument("--min-tag-support", type=float, default=0.0,
                   help="read only tags whose entity neighbours holding at least this share of the neighbours' "
                        "summed similarity name (0.5: a majority vote; 0: every retrieved tag, the default)")
    p.add_argument("--random-tags-vocab", metavar="FILE",
                   help="with --ablation random_tags: draw the random tags from this file (one tag per line) instead "
                        "of the datastore's tags; a small datastore names few entities, so its random blocks hold the "
                        "right one by chance")
    icl = p.add_argument_group("k-shot evaluation (demonstrations from a tuna-icl pool)")
    icl.add_argument("--shots", default="0", help="comma-separated shot counts, one pass each, e.g. 0,1,2,4,8")
    icl.add_argument("--demo-pool", help="demonstration pool directory (tuna-icl pool build)")
    icl.add_argument("--retriever", default="siir", help="random, siir, sttr, sitr, sit, oracle, or PREFIX:PATH")
    icl.add_argument("--demo-order", default="similar-last", choices=["similar-last", "similar-first", "shuffled"],
                     help="prompt order of the demonstrations (similar-last: the most similar next to the question)")
    icl.add_argument("--no-demo-tags", action="store_true", help="no retrieved tags for the demonstrations' images")
    icl.add_argument("--seed", type=int, default=0, help="seed of the random retriever and of shuffled orders")
    p.add_argument("--judge-url", help="OpenAI-compatible API base (e.g. https://api.openai.com/v1) for LLaVA-W and "
                                      "MM-Vet; key from $OPENAI_API_KEY. Without it they are 'not scored: no judge'")
    p.add_argument("--judge-model", default="gpt-4-0613", help="judge model name")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda:LOCAL_RANK when available)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def compare(runs: list[str]) -> str:
    """Markdown table of several runs' results.json side by side."""
    from eval.kshot import kshot_table
    from eval.runner import markdown_table

    results = []
    for run in runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"no results.json in {run}")
        results.append(json.loads(path.read_text()))
    names = [Path(r).name for r in runs]
    return markdown_table(results, names) + kshot_table(results, names)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from eval.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["compare"]:
        if len(argv) < 2:
            print("tuna-eval compare: error: give one or more run directories", file=sys.stderr)
            return 2
        try:
            print(compare(argv[1:]), end="")
        except (OSError, ValueError, KeyError) as exc:
            print(f"tuna-eval compare: error: {exc}", file=sys.stderr)
            return 1
        return 0
    args = _parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    from eval.kshot import KShotSettings
    from eval.runner import EvalConfig, evaluate

    code = 0
    try:
        init_distributed()
        shots = [int(k) for k in args.shots.split(",") if k.strip()]
        kshot = None if args.demo_pool is None else KShotSettings(
            pool=args.demo_pool, retriever=args.retriever, order=args.demo_order, demo_tags=not args.no_demo_tags,
            seed=args.seed)
        config = EvalConfig(model=args.model, benches=[b for b in args.bench.split(",") if b], data_root=args.data_root,
                            out=args.out, datastore=args.datastore, retrieval_cache=args.retrieval_cache,
                            no_tags=args.no_tags, ablation=args.ablation, batch_size=args.batch_size, limit=args.limit,
                            k_images=args.k_images, min_tag_support=args.min_tag_support,
                            random_tags_vocab=args.random_tags_vocab,
                            device=resolve_device(args.device), judge_url=args.judge_url,
                            judge_model=args.judge_model, shots=shots, kshot=kshot, on_bad_sample=args.on_bad_sample)
        results = evaluate(config)
        if results is not None:
            print((Path(args.out) / "results.md").read_text(), end="")
            print(f"per-sample predictions, results.json and results.md in {args.out}")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"tuna-eval: error: {error_line(exc)}", file=sys.stderr)
        code = 1
    finish_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
