"""Run a study: the comparison of every (method, target, seed), the targets' metrics, the report.

OUT/study.json is the spec; OUT/compare/ the comparison (irepa.compare: resumable, refuses other
training settings, one run per rank under torchrun); OUT/targets/<name>.json each target's
metrics, measured by rank 0 once its own runs are done; then rank 0 writes the report
(irepa.study.report). Rerunning the same command continues where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

from irepa.compare.layout import write_atomic
from irepa.compare.runner import Comparison

from .report import write_report
from .spec import StudySpec
from .targets import measure_all


class Study:
    def __init__(self, spec: StudySpec, out: str | Path, cache_dir: str | Path | None = None, device="auto",
                 rank: int = 0, world_size: int = 1, log=print):
        self.spec, self.out, self.rank, self.log = spec, Path(out), rank, log
        self.comparison = Comparison(spec.compare_spec(), self.out / "compare",
                                     cache_dir=cache_dir or self.out / "datasets", device=device, rank=rank,
                                     world_size=world_size, log=log)

    def resolution(self) -> int:
        """The runs' data resolution (the token grid the targets are measured on); the data must be digits."""
        c = self.comparison
        cfg = c.config(c.spec.recipes[0], c.spec.seeds[0], c.spec.steps)
        if cfg.data.source != "digits":
            raise ValueError(f"data.source {cfg.data.source!r}: a study measures its targets on the embedded "
                             f"digits and trains on them (data.source digits)")
        return cfg.data.resolution

    def measure_targets(self) -> None:
        s = self.spec
        measure_all(self.out, s.targets, self.resolution(), s.images, s.classifier, self.comparison.device, self.log)

    def run(self) -> Path | None:
        resolution = self.resolution()  # a bad preset, override or data source fails here, before any work
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / "study.json", (json.dumps(self.spec.to_dict(), indent=2) + "\n").encode())
        self.log(f"[study] {len(self.spec.targets)} targets x {len(self.spec.methods)} methods x "
                 f"{len(self.spec.seeds)} seeds, scored at steps {self.spec.eval_steps}; targets measured at "
                 f"{resolution} px")
        self.comparison.run(while_waiting=self.measure_targets)
        if self.rank != 0:
            return None
        return write_report(self.out, self.spec)
