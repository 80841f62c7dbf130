"""Background jobs: `tunelab` CLI commands started from the UI, in their own detached processes.

A job is a folder under `ctx.jobs` holding job.json (the argv, the run folder it writes, when it started),
log.txt (the command's stdout and stderr) and, once it ends, rc.json (its exit status). The process is the
small runner in this module (`python -m tunelab.ui.jobs JOB_DIR`) in a new session: it runs the command,
and writes rc.json when the command ends, so the record is complete even when the UI that started it is
gone. Stopping sends SIGINT to the session, which is what Ctrl-C does in a terminal: `tunelab train`
writes a checkpoint and exits 130, and `tunelab train --resume` continues it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tunelab.files import write_json_atomic


@dataclass
class Job:
    dir: Path
    argv: list[str]  # after `tunelab`
    run_dir: str | None
    started: float
    pid: int

    @property
    def log(self) -> Path:
        return self.dir / "log.txt"

    @property
    def id(self) -> str:
        return self.dir.name

    def returncode(self) -> int | None:
        """The command's exit status, None while it runs (or was killed before the runner could record it)."""
        rc = self.dir / "rc.json"
        return json.loads(rc.read_text())["returncode"] if rc.exists() else None

    def running(self) -> bool:
        return self.returncode() is None and _alive(self.pid)

    def state(self) -> str:
        rc = self.returncode()
        if rc is None:
            return "running" if _alive(self.pid) else "lost"
        return {0: "finished", 130: "stopped"}.get(rc, f"failed (exit {rc})")

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:  # the end only: a long run's log can be large
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * lines))
            text = f.read().decode("utf-8", "replace")
        # progress bars redraw with \r: show the last state of each line
        # (split on \n only: splitlines() would also split at each \r and keep every redraw)
        shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")]
        return "\n".join(shown[-lines:])

    def stop(self) -> None:
        """SIGINT to the job's session (Ctrl-C): training checkpoints and exits 130."""
        if self.running():
            try:
                os.killpg(self.pid, signal.SIGINT)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")  # a zombie is not running (Linux; elsewhere trust kill(0))
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def start(jobs_dir: Path, argv: list[str], run_dir: str | None = None, env: dict[str, str] | None = None) -> Job:
    """Run `tunelab *argv` in the background; returns at once with the job's record."""
    job_dir = Path(jobs_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    job_dir.mkdir(parents=True)
    record = {"argv": list(argv), "run_dir": run_dir, "started": time.time()}
    (job_dir / "job.json").write_text(json.dumps(record, indent=2))
    with open(job_dir / "log.txt", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunelab.ui.jobs", str(job_dir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
    record["pid"] = proc.pid
    write_json_atomic(job_dir / "job.json", record)
    return Job(job_dir, list(argv), run_dir, record["started"], proc.pid)


def load(job_dir: Path) -> Job | None:
    try:
        r = json.loads((Path(job_dir) / "job.json").read_text())
    except (OSError, ValueError):
        return None
    if "pid" not in r:  # written before the process started: wait for the second write
        return None
    return Job(Path(job_dir), r["argv"], r.get("run_dir"), r["started"], r["pid"])


def list_jobs(jobs_dir: Path) -> list[Job]:
    """Every job under the folder, newest first."""
    root = Path(jobs_dir)
    found = [load(d) for d in sorted(root.iterdir(), reverse=True)] if root.is_dir() else []
    return [j for j in found if j is not None]


def _run(job_dir: Path) -> int:
    """The runner: the command as a child (its output goes to our stdout, the log), then rc.json."""
    record = json.loads((job_dir / "job.json").read_text())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the session's SIGINT is for the command; we wait for it
    child = subprocess.Popen([sys.executable, "-m", "tunelab", *record["argv"]], stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    rc = child.wait()
    write_json_atomic(job_dir / "rc.json", {"returncode": rc, "ended": time.time()})
    return rc


if __name__ == "__main__":
    sys.exit(_run(Path(sys.argv[1])))
