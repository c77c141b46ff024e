"""perf/bench_step.py runs end to end on CPU (tiny model) and leaves its CSV + RESULTS.md table."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cpu_run_writes_csv_and_table(tmp_path):
    csv_path, md = tmp_path / "bench_step.csv", tmp_path / "RESULTS.md"
    md.write_text("# Performance results\n\nintro kept\n")
    # a CSV from before the micro_batch column: rewritten with it, the old row kept
    old_cols = ["date", "commit", "device", "torch", "model", "config", "batch", "precision", "step_ms_median",
                "step_ms_p20", "step_ms_p80", "img_per_s", "tflops", "mfu", "peak_mem_gb", "speedup_vs_baseline",
                "command"]
    old_row = ["cpu (old)" if c == "device" else "old" for c in old_cols]
    csv_path.write_text(",".join(old_cols) + "\n" + ",".join(old_row) + "\n")
    cmd = [sys.executable, "-m", "perf.bench_step", "--quick", "--device", "cpu", "--models", "SiT-Tiny/2",
           "--steps", "2", "--warmup", "1", "--csv", str(csv_path), "--results", str(md)]
    proc = subprocess.run(cmd + ["--configs", "eager,compile+fused"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skip SiT-Tiny/2 compile+fused" in proc.stdout  # CUDA-only configurations are skipped, not faked
    # gradient accumulation over micro-batches (what SiT-XL/2 at 256 needs on one 80 GB GPU)
    proc = subprocess.run(cmd + ["--configs", "eager", "--micro_batch", "4"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a case that fails (here: nothing fits a 1 KiB budget) is reported, the others still run, exit != 0
    proc = subprocess.run(cmd + ["--configs", "eager", "--memory_budget_gib", str(2.0 ** -20)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "FAILED SiT-Tiny/2 eager: MemoryError" in proc.stdout + proc.stderr
    # --plan_only: the planner's choice per case, nothing timed or written
    size = csv_path.stat().st_size
    proc = subprocess.run(cmd + ["--configs", "eager", "--plan_only"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0 and "SiT-Tiny/2 eager: micro-batch 8 of 8" in proc.stdout, proc.stderr[-2000:]
    assert csv_path.stat().st_size == size
    rows = list(csv.DictReader(open(csv_path)))
    assert rows[0]["date"] == "old" and rows[0]["micro_batch"] == ""
    rows = rows[1:]
    assert [(r["config"], r["micro_batch"]) for r in rows] == [("eager", "8"), ("eager", "4")]
    r = rows[0]
    assert r["device"].startswith("cpu") and r["commit"] and r["date"] and "perf.bench_step" in r["command"]
    assert float(r["img_per_s"]) > 0 and float(r["tflops"]) > 0 and r["mfu"] == ""
    text = md.read_text()
    assert "intro kept" in text and "<!-- bench_step:begin -->" in text and "| SiT-Tiny/2 | eager |" in text
    assert "No GPU run recorded yet" in text
