"""DRUM: a demonstration retriever fine-tuned with the scoring model's own feedback (arXiv 2412.07619)."""
