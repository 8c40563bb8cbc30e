"""phitune: from a small causal LM checkpoint to a fast, fine-tuned, on-device model."""

__version__ = "0.2.0"
