"""What every tab of the UI shares: the folder runs live under and where background jobs are kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UIContext:
    runs: Path  # run folders (one per training / compare) are created under it

    @property
    def jobs(self) -> Path:
        """Background jobs' records and logs (jobs.py); under the runs folder so reopening the UI finds them."""
        return self.runs / ".ui-jobs"
