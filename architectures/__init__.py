"""Architectures: any timm model, wrapped into a `Classifier` (see classifier.py, presets.py)."""
from architectures.classifier import Classifier

__all__ = ["Classifier"]
