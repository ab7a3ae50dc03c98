"""tuna datastore: synthetic world, CLIP embedding, caption tags, FAISS index, retrieval."""

__version__ = "0.1.0"
