"""tuna training entry points (DeepSpeed / torchrun)."""
