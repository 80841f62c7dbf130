"""Files written whole: a reader (another process, a resumed run, the web UI) sees the old one or the new one."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON, through a temporary file beside `path` renamed over it (atomic on one file system)."""
    path = Path(path)
    # The name is per thread as well as per process: two threads writing one file must not share a temporary.
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
