"""tuna benchmark evaluation harness."""
