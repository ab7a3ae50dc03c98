"""Lever-LM: in-context demonstrations chosen by a small language model over the demonstration pool."""
