"""Compatibility helpers for TF1- and PyTorch-style APIs and foreign weight layouts."""
