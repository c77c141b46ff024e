"""The command line of the roofline (python -m perf.roofline; see the package's docstring)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from perf.common import commit
from perf.common.provenance import utc_now
from perf.roofline.hardware import DEVICES, Device, measured
from perf.roofline.report import RESULTS_DIR, predict_device, update_results, write_csv
from perf.roofline.trace import CONFIGS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="SiT-XL/2,JiT-B/16")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--device", default="h200", help=f"device model(s), a comma list of: {', '.join(DEVICES)}")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--micro_batch", type=int, default=None, help="default: the trainer's planner for the device")
    p.add_argument("--matmul_tflops", type=float, default=None)
    p.add_argument("--bandwidth_tbs", type=float, default=None)
    p.add_argument("--memory_gib", type=float, default=None)
    p.add_argument("--measured", type=Path, default=None,
                   help="a preflight.json of the GPU call (perf/preflight.py): predict with the GEMM rate and copy "
                        "bandwidth measured there, for the device model its GPU matches (instead of --device)")
    p.add_argument("--quick", action="store_true", help="bench_step's tiny models (a flow check)")
    p.add_argument("--loss_shapes", default="256x256x768,256x256x1024",
                   help="BxTxE list for the alignment-loss prediction ('' to skip)")
    p.add_argument("--record", action="store_true",
                   help="append rows to perf/results/roofline.csv and rewrite the roofline table in perf/RESULTS.md")
    p.add_argument("--csv", type=Path, default=RESULTS_DIR / "roofline.csv")
    p.add_argument("--results", type=Path, default=RESULTS_DIR.parent / "RESULTS.md")
    a = p.parse_args(argv)
    devices = dict(DEVICES)
    if a.measured is not None:
        key, dev = measured(a.measured)
        a.device, devices[key] = key, dev
    keys = [d for d in a.device.split(",") if d]
    bad = [d for d in keys if d not in devices]
    if bad or not keys:
        raise SystemExit(f"unknown --device {a.device!r}; choose from {list(DEVICES)} (a comma list runs each)")
    over = {k: v for k, v in dict(matmul_tflops=a.matmul_tflops, bandwidth_tbs=a.bandwidth_tbs,
                                   memory_gib=a.memory_gib).items() if v is not None}
    command = "python -m perf.roofline " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    date, sha = utc_now(), commit()
    rows = []
    for key in keys:
        dev = devices[key]
        if over:
            dev = Device(**{**dev.__dict__, **over, "source": dev.source + f"; overridden: {over}"})
        print(f"device model {key}: {dev.source}")
        rows += predict_device(a, key, dev, command, date, sha)
    if a.record and rows:
        write_csv(a.csv, rows)
        update_results(a.results, a.csv)
        print(f"{len(rows)} rows -> {a.csv}, {a.results}")
