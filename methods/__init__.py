"""Training methods: one plugin file each, all driven by the one trainer (harness/train/trainer.py)."""
from methods.base import Method, TrainContext, build_method

__all__ = ["Method", "TrainContext", "build_method"]
