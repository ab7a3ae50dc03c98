"""Input checks shared by the scorers, run before any scoring so a bad record fails with its name."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def record_ref(name: str, i: int, rec: Mapping[str, Any]) -> str:
    """Where an error happened, e.g. "score_vqa: record 'q7'": the question id when the record has
    one (runner records do), else its index."""
    return f"{name}: record {rec.get('question_id', i)!r}"


def check_records(records: Sequence[Mapping[str, Any]], name: str, fields: Sequence[str] = (),
                  str_lists: Sequence[str] = ()) -> None:
    """Check scorer input: non-empty, a str "prediction" in every record, the other fields present.

    Args:
        records: the records handed to the scorer.
        name: the scorer's name, which starts every error message.
        fields: required fields besides "prediction" (any value).
        str_lists: required fields that must be non-empty lists of str (human answers, references).
    Raises:
        ValueError: naming the scorer, the record and the missing or malformed field.
    """
    if not records:
        raise ValueError(f"{name}: records is empty")
    for i, rec in enumerate(records):
        where = record_ref(name, i, rec)
        for field in ("prediction", *fields, *str_lists):
            if field not in rec:
                raise ValueError(f"{where} lacks field {field!r}")
        if not isinstance(rec["prediction"], str):
            raise ValueError(f"{where} prediction must be str, got {type(rec['prediction']).__name__}")
        for field in str_lists:
            value = rec[field]
            if isinstance(value, str) or not isinstance(value, Sequence) or not value \
                    or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where} {field} must be a non-empty list of str, got {value!r}")
