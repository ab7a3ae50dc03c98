"""Official-equivalent benchmark scorers (pure functions over per-sample records)."""
