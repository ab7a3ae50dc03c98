"""tuna: the TUNA model (frozen CLIP, connector, image-aware tag encoder, adaptive weight tuner)."""

__version__ = "0.1.0"
