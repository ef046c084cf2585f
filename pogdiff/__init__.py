"""PoGDiff Studio: fine-tune text-to-image diffusion models on imbalanced image-text data."""

__version__ = "0.1.0"
