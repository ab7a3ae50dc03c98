"""The demo pipeline: ``tuna quickstart`` (the whole TUNA pipeline on the synthetic world), the tiny
models it trains (a text-only LLM with a copy prior, :mod:`pipeline.tiny`), and its report.

The top layer: it runs ``train`` and ``eval`` (as a user would, through their command lines) and nothing
below imports it (tests/test_layering.py).
"""
