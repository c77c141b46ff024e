"""The target side of a study: spatial metrics, linear probe and global share of each target.

Each target is measured once on the digits at the runs' data resolution (the token grid the
SiT is aligned on) and kept as OUT/targets/<name>.json with the settings it was measured
with; a rerun with the same settings keeps it.

lds, lds_paper, cds, srss, rmsc, global_share and probe_acc as irepa.analysis.measure_encoders
gives them (SRSS with the digits' ink as foreground; global_share the share of the tokens' energy
in the per-image mean token, 1 for the "+global" controls; the probe is logistic regression on
mean-pooled tokens).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from irepa.compare.layout import write_atomic

COLUMNS = ("lds", "lds_paper", "cds", "srss", "rmsc", "probe_acc", "global_share")


def image_indices(labels: torch.Tensor, which: str, classifier) -> list[int]:
    """'all', or 'metric-train': the metric classifier's training half (irepa.metrics.classifier_fd.split_indices),
    images no learned target was trained on (irepa.encoders.digits_cnn)."""
    if which == "all":
        return list(range(len(labels)))
    from irepa.metrics.classifier_fd import split_indices
    return split_indices(labels, classifier.test_fraction, classifier.seed)[0].tolist()


def measure_target(name: str, resolution: int, which: str, classifier, device="cpu", batch_size: int = 128) -> dict:
    from irepa.analysis import digits_set, measure_encoders, subset
    from irepa.encoders import build

    digits = digits_set(resolution)
    images = subset(digits, image_indices(digits.labels, which, classifier))
    encoder = build(name, device=device)
    t0 = time.perf_counter()
    rows, _ = measure_encoders({name: encoder}, images, batch_size, device)
    return {**rows[0], "seconds": time.perf_counter() - t0}


def settings(resolution: int, which: str, classifier) -> dict:
    return {"resolution": resolution, "images": which, "split_seed": classifier.seed,
            "split_test_fraction": classifier.test_fraction}


def target_path(out: Path, name: str) -> Path:
    return Path(out) / "targets" / f"{name}.json"


def measure_all(out: Path, targets: list[str], resolution: int, which: str, classifier, device="cpu",
                log=print) -> None:
    """OUT/targets/<name>.json for every target that lacks one measured with these settings."""
    want = settings(resolution, which, classifier)
    for name in targets:
        path = target_path(out, name)
        if path.is_file() and json.loads(path.read_text()).get("settings") == want:
            continue
        row = measure_target(name, resolution, which, classifier, device)
        write_atomic(path, (json.dumps({"settings": want, "row": row}, indent=2, sort_keys=True) + "\n").encode())
        log(f"[study] target {name}: " + ", ".join(f"{k} {row[k]:.3f}" for k in COLUMNS if k in row))


def load_rows(out: Path, targets: list[str]) -> dict[str, dict]:
    """target -> its measured row (targets not measured yet are missing)."""
    rows = {}
    for name in targets:
        path = target_path(out, name)
        if path.is_file():
            rows[name] = json.loads(path.read_text())["row"]
    return rows
