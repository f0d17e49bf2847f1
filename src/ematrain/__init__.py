"""ematrain: timm-style image classification training with model-weight EMA done right."""
__version__ = "0.1.0"
