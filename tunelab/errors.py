"""Errors that are the user's to fix: the CLI prints their message without a traceback."""

from __future__ import annotations

import sys

# Named errors of the heavier packages, by module: counted once their module is imported (nothing else can
# have raised them), so that reporting a config error does not import torch.
_LOADED_ONLY = (
    ("tunelab.methods.base", "MethodError"),
    ("tunelab.export", "ExportError"),
    ("tunelab.export.push", "PushError"),
    ("tunelab.serve.served", "ServeError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    from tunelab.config import ConfigError, OutputWriteError
    from tunelab.data import DataError
    from tunelab.models import ModelError

    named = [ConfigError, DataError, ModelError, FileNotFoundError, FileExistsError, OutputWriteError]
    named += [getattr(sys.modules[m], name) for m, name in _LOADED_ONLY if m in sys.modules]
    return tuple(named)
