"""Tuning methods, one module each; see registry.py for the contract."""

from tunelab.methods.registry import check_model, get, names

__all__ = ["check_model", "get", "names"]
