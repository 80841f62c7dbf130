"""Tuning methods, one module each; see registry.py for the contract."""

from tunelab.methods.registry import get, names

__all__ = ["get", "names"]
