"""Distillation methods for classification."""
