"""The ``tuna`` command: ``tuna ask`` (:mod:`tuna.cli`) plus ``tuna quickstart``, the demo pipeline."""

from __future__ import annotations

import argparse
import sys

from common.cli import HelpFormatter, add_config_flags, config_from_args
from tuna.cli import Command
from tuna.cli import main as tuna_main


def _add_quickstart(sub) -> None:
    from pipeline.quickstart import QuickstartConfig

    q = sub.add_parser(
        "quickstart", formatter_class=HelpFormatter,
        help="the whole pipeline on the synthetic world: baseline vs TUNA (about 15 min on 2 CPU cores)",
        description="Synthesize a world with seen and novel object categories; train a tiny CLIP on its corpus "
                    "and a tiny LLM on text only; build the datastore and retrieval caches; train a no-tags "
                    "baseline and TUNA with deepspeed (ZeRO-2, both stages, same data/budget/seed); evaluate "
                    "both plus the random-tags and uniform-weights ablations on seen and novel categories, and "
                    "TUNA with a second world's datastore swapped in. Prints the comparison table and writes "
                    "results.json, results.md and results.png under --out. Re-running continues after the last "
                    "finished stage.")
    add_config_flags(q, QuickstartConfig, skip=("extra",))


def _run_quickstart(args: argparse.Namespace) -> dict:
    from pipeline.quickstart import QuickstartConfig, run_quickstart

    return run_quickstart(config_from_args(QuickstartConfig, args))


def _add_quickstart_icl(sub) -> None:
    from pipeline.icl_suite import ICLSuiteConfig

    q = sub.add_parser(
        "quickstart-icl", formatter_class=HelpFormatter,
        help="in-context learning on a finished quickstart: k-shot accuracy per demonstration retriever",
        description="On a finished `tuna quickstart`: add the synthetic ICL task to its world (a support set of "
                    "every category; queries, half of them with distractors where image similarity picks the "
                    "wrong demonstrations), build demonstration pools with its CLIP, continue its TUNA model with "
                    "in-context tuning (deepspeed), and evaluate k-shot accuracy with each retriever (random, "
                    "SIIR, STTR, SITR, SIT, oracle) on seen and novel categories. Writes results_icl.json/.md/.png "
                    "under --out (default QUICKSTART/icl). Re-running continues after the last finished stage.")
    add_config_flags(q, ICLSuiteConfig)


def _run_quickstart_icl(args: argparse.Namespace) -> dict:
    from pipeline.icl_suite import ICLSuiteConfig, run_icl_suite

    return run_icl_suite(config_from_args(ICLSuiteConfig, args))


COMMANDS = (Command("quickstart", _add_quickstart, _run_quickstart),
            Command("quickstart-icl", _add_quickstart_icl, _run_quickstart_icl))


def main(argv: list[str] | None = None) -> int:
    return tuna_main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
