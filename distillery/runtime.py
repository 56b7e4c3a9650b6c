"""What every stage task gets besides its config: where to write, and which MLflow run is its parent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillery.tracking import NullTracker, Tracker


@dataclass(frozen=True)
class RunContext:
    pipeline: str
    run_dir: str  # this pipeline run's artifact folder; each stage writes <run_dir>/<stage>
    parent_run_id: str
    experiment: str
    tracking_uri: str  # "none" turns tracking off
    reuse: bool = True  # take a stage another run finished with the same key (distillery.stagecache)

    def tracker(self) -> Tracker | NullTracker:
        return NullTracker() if self.tracking_uri == "none" else Tracker(self.experiment, self.tracking_uri)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.run_dir) / stage
