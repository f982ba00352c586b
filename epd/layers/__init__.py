"""Layers every family's language model shares: norms, rotary embeddings, attention, gated MLP."""
