"""Evaluation of a trained model: clean and robust accuracy, integrity flags, per-sample results, analyses."""
