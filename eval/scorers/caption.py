"""Caption metrics through pycocoevalcap: PTB tokenization (Java), CIDEr-D and BLEU-1..4, as COCO reports them."""

from __future__ import annotations

import logging
import shutil
from typing import Any, Mapping, Sequence

from eval.scorers.records import check_records

logger = logging.getLogger(__name__)


def score_caption(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict]:
    """CIDEr and BLEU of predicted captions against reference captions.

    Args:
        records: {"prediction": str, "references": [str, ...]} per image (question_id optional).

    Returns:
        Per-record CIDEr (×100) and {"cider", "bleu_1".."bleu_4" (corpus-level, ×100), "n"}.

    Raises:
        ValueError: no records, a non-str prediction, or a record without references.
        RuntimeError: no ``java`` on PATH (the official PTB tokenizer is a Java program).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    check_records(records, "score_caption", str_lists=("references",))
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need Java on PATH (pycocoevalcap's PTB tokenizer runs java)")
    keys = [str(i) for i in range(len(records))]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in r["references"]] for k, r in zip(keys, records)})
    res = tokenizer.tokenize({k: [{"caption": r["prediction"]}] for k, r in zip(keys, records)})
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = {"cider": 100 * float(cider), "n": len(records)}
    metrics.update({f"bleu_{n + 1}": 100 * float(b) for n, b in enumerate(bleu)})
    return [100 * float(s) for s in per_image], metrics
