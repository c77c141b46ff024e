"""perf/bench_meanflow.py runs end to end on CPU (tiny model): a row per variant with the ratio to
the flow-matching step measured in the same run, in its CSV and its RESULTS.md table."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_cpu_run_writes_rows_and_table(tmp_path):
    csv_path, md = tmp_path / "bench_meanflow.csv", tmp_path / "RESULTS.md"
    md.write_text("# Performance results\n\nintro kept\n")
    cmd = [sys.executable, "-m", "perf.bench_meanflow", "--device", "cpu", "--models", "SiT-Tiny/2",
           "--batch", "4", "--rounds", "1", "--warmup", "1", "--threads", "1", "--variants", "meanflow-joint-cfg",
           "--csv", str(csv_path), "--results", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["variant"] for r in rows] == ["flow-matching", "meanflow-joint-cfg"]
    assert rows[0]["ratio_wall"] == "1.00" and float(rows[1]["ratio_cpu"]) > 0 and rows[1]["threads"] == "1"
    assert rows[1]["device"].startswith("cpu") and rows[1]["commit"] and "perf.bench_meanflow" in rows[1]["command"]
    text = md.read_text()
    assert "intro kept" in text and "<!-- bench_meanflow:begin -->" in text
    assert "| SiT-Tiny/2 | eager | meanflow-joint-cfg | 4 |" in text and "GPU: open" in text
