"""Cross-cutting helpers that every tuna package may use: logging, the distributed environment, the LR
schedule, dataclass-config command-line flags, file helpers and LLaVA's prompt constants.

The bottom layer: it imports nothing of tuna's own (``common`` <- ``datastore`` <- ``tuna`` <- ``icl`` <-
``train``, ``eval`` <- ``pipeline``; tests/test_layering.py).
"""
