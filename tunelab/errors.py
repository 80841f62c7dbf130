"""Errors that are the user's to fix: the CLI prints their message without a traceback."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from tunelab.config import ConfigError, OutputWriteError
    from tunelab.data import DataError
    from tunelab.models import ModelError

    return (ConfigError, DataError, ModelError, FileNotFoundError, FileExistsError, OutputWriteError)
