"""Evaluation: metrics (pure functions) and task runners."""
