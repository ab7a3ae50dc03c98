"""LLM-judge scoring (LLaVA-Bench-in-the-wild, MM-Vet) through any OpenAI-compatible chat endpoint.

Without a judge these benchmarks are reported as "not scored: no judge", never as a number.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

logger = logging.getLogger(__name__)

NOT_SCORED = "not scored: no judge"


@dataclass
class JudgeConfig:
    """An OpenAI-compatible endpoint: ``url`` is the API base (``.../v1``), ``model`` the judge model name."""

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_retries: int = 3
    prompts: dict[str, str] | None = None  # overrides of PROMPTS

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must be http(s)://..., got {self.url!r}")
        if not self.model:
            raise ValueError("judge model name is empty")


class Judge:
    """Sends chat completions (temperature 0) and returns the reply text."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.prompts = {**PROMPTS, **(config.prompts or {})}

    def complete(self, system: str, prompt: str) -> str:
        body = json.dumps({"model": self.config.model, "temperature": 0.0,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]})
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.config.url.rstrip("/") + "/chat/completions"
        for attempt in range(1, self.config.max_retries + 1):
            request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
            except (urllib.error.URLError, TimeoutError, KeyError, json.JSONDecodeError) as exc:
                if attempt == self.config.max_retries:
                    raise RuntimeError(f"judge {url} failed after {attempt} attempts: {exc}") from exc
                logger.warning("judge request failed (%s); retry %d", exc, attempt)
                time.sleep(2 ** attempt)
        raise AssertionError("unreachable")


def not_scored(records: Sequence[dict]) -> tuple[list[None], dict[str, Any]]:
    return [None] * len(records), {"status": NOT_SCORED, "n": len(records)}


# ---------------------------------------------------------------- LLaVA-Bench-in-the-wild
# Our own wording of the judging instructions; to reproduce a paper's numbers exactly, pass its
# original prompts with JudgeConfig.prompts (keys "llava_wild_system", "llava_wild_rule",
# "mmvet_system", "mmvet_rule").
PROMPTS = {
    "llava_wild_system": "You judge answers to questions about images, carefully and impartially.",
    "llava_wild_rule": (
        "Two assistants answered the question above about an image; the context describes the image. Rate each "
        "answer from 1 to 10 for helpfulness, relevance, accuracy and detail. On the first line write only the "
        "two scores, Assistant 1 first, separated by a space; then explain briefly."),
    "mmvet_system": "You grade answers against a ground truth, strictly and consistently.",
    "mmvet_rule": (
        "Give the prediction a correctness score from 0.0 to 1.0 in steps of 0.1 against the ground truth. "
        "In the ground truth, <AND> means every listed element must appear for full credit and <OR> means any "
        "one of them suffices. Reply with the number only."),
}


def parse_score_pair(review: str) -> tuple[float, float] | None:
    """The two scores on the review's first line ("8 7" or "8, 7"), or None."""
    first = review.strip().split("\n")[0].replace(",", " ").split()
    try:
        return (float(first[0]), float(first[1])) if len(first) == 2 else None
    except ValueError:
        return None


def score_llava_wild(records: list[dict], judge: Judge | None) -> tuple[list, dict[str, Any]]:
    """Relative score: mean judge score of the model / of the GPT-4 reference answer × 100, per category."""
    if judge is None:
        return not_scored(records)
    pairs = []
    for r in records:
        prompt = (f"[Context]\n{r['context']}\n\n[Question]\n{r['text']}\n\n[Assistant 1]\n{r['reference']}\n\n"
                  f"[End of Assistant 1]\n\n[Assistant 2]\n{r['prediction']}\n\n[End of Assistant 2]\n\n"
                  f"[System]\n{judge.prompts['llava_wild_rule']}\n\n")
        pairs.append(parse_score_pair(judge.complete(judge.prompts["llava_wild_system"], prompt)))
    valid = [(r, p) for r, p in zip(records, pairs) if p is not None]
    if not valid:
        return [None] * len(records), {"status": "judge replies unparseable", "n": len(records)}

    def relative(items: list) -> float:
        ref = sum(p[0] for _, p in items) / len(items)
        return 100 * (sum(p[1] for _, p in items) / len(items)) / ref if ref else 0.0

    per_category = {c: relative([(r, p) for r, p in valid if r.get("category") == c])
                    for c in sorted({r.get("category") for r, _ in valid})}
    scores = [None if p is None else p[1] for p in pairs]
    return scores, {"relative_score": relative(valid), "per_category": per_category, "n": len(records),
                    "unparsed": len(records) - len(valid)}


# ---------------------------------------------------------------- MM-Vet
def score_mmvet(records: list[dict], judge: Judge | None) -> tuple[list, dict[str, Any]]:
    """Mean judge correctness (0-1) × 100, overall and per capability."""
    if judge is None:
        return not_scored(records)
    scores = []
    for r in records:
        reply = judge.complete(judge.prompts["mmvet_system"], f"{judge.prompts['mmvet_rule']}\n\nQuestion: {r['text']}\nGround truth: {r['answer']}\n"
                                              f"Prediction: {r['prediction']}\nCorrectness:")
        match = re.search(r"\d+(?:\.\d+)?", reply)
        scores.append(min(max(float(match.group()), 0.0), 1.0) if match else 0.0)
    capabilities = sorted({c for r in records for c in r.get("capability", [])})
    per_capability = {c: 100 * _mean([s for r, s in zip(records, scores) if c in r.get("capability", [])])
                      for c in capabilities}
    return scores, {"total": 100 * _mean(scores), "per_capability": per_capability, "n": len(records)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
