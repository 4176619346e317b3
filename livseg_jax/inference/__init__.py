"""Inference: sliding-window prediction and the two-stage pipeline."""
