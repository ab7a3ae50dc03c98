"""In-context learning: demonstration pools, retrievers, k-shot prompts, answer-likelihood scoring."""
