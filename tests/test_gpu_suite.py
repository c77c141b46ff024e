"""perf/gpu_suite.sh quick and perf/suite_report.py: skipping when the total budget is spent,
importing the package from a checkout that was never installed (as on the device machine), and
the headline figures computed from rows of a (synthetic) GPU run against their targets and the
roofline predictions. The call's real CPU practice run (about 15 minutes) is not part of CI; these
tests and tests/test_gpu_call.py check its mechanics in seconds."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perf import suite_report as S

ROOT = Path(__file__).resolve().parents[1]

def suite(out: Path, env: dict, cwd: Path = ROOT, *args) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(cwd / "perf/gpu_suite.sh"), "quick", str(out), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=240, cwd=cwd, env=e)


def parts(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "parts.csv")))


def test_parts_are_skipped_when_the_total_budget_is_spent_and_a_fresh_checkout_imports(tmp_path):
    """A copy of the tracked files (no .git, never installed, like the tree on the device machine):
    the package is imported from it through the suite's temporary links, perf through its own link;
    without a COMMIT file the missing commit is named, with one every row carries it; with a
    5-second total every part is skipped rather than started (the per-part limits and crashes:
    tests/test_gpu_call.py)."""
    from perf import gpu_call
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "perf").rglob("*.py")]  # new files not yet committed
    tree = tmp_path / "tree"
    for f in files:
        if (ROOT / f).is_file():
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tree / f)
    out = tmp_path / "out"
    env = {"QUICK_TOTAL_S": "5", "IREPA_COMMIT": ""}
    p = suite(out, env, tree)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]  # nothing ran: not a success
    log = (out / "call.log").read_text()
    irepa_line = next(line for line in log.splitlines() if line.strip().startswith("irepa "))
    assert "irepa-suite." in irepa_line and "/path/irepa/__init__.py" in irepa_line, irepa_line
    assert "IREPA_COMMIT unset" in p.stdout + p.stderr
    n = len(gpu_call.plan(out, "cpu", ["python"]))
    assert [r["status"] for r in parts(out)] == ["skipped"] * n and parts(out)[0]["commit"] == "unknown"
    assert {f.name for f in out.iterdir()} <= set(gpu_call.OUT_FILES)  # a device call returns 8 files at most
    (tree / "COMMIT").write_text("abc1234-dirty\n")
    p = suite(out, env, tree)
    assert "IREPA_COMMIT unset" not in p.stdout + p.stderr
    assert {r["commit"] for r in parts(out)} == {"abc1234-dirty"}


def test_usage_errors():
    for args in (["bogus", "/tmp/x"], ["quick", "/tmp/x", "--device", "tpu"], ["quick", "/tmp/x", "--fast"]):
        p = subprocess.run(["bash", str(ROOT / "perf/gpu_suite.sh"), *args], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2 and ("usage" in p.stdout or "--device must be" in p.stdout), p.stdout


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _step(config, img_s, mfu, model="SiT-XL/2", date="2026-12-02 10:00 UTC"):
    return dict(date=date, commit="abc1234", device="NVIDIA H200", torch="2.11.0", model=model, config=config,
                batch="256", micro_batch="256", precision="bf16", step_ms_median="1", step_ms_p20="1", step_ms_p80="1",
                img_per_s=str(img_s), tflops="1", mfu=str(mfu), peak_mem_gb="100.0", speedup_vs_baseline="",
                command=f"python -m perf.bench_step --models {model}")


def _align(provider, ms, E="768", frac="", kfrac=""):
    return dict(date="2026-12-02T10:00:00", commit="abc1234", device_name="NVIDIA H200", torch="2.11.0",
                bench="alignment", B="256", T="256", E=E, dtype="bf16", gamma="0.6", layout="contiguous", quick="False",
                copy_gbps="4300.0", provider=provider, mode="full", ms_median=str(ms), ms_p20=str(ms), ms_p80=str(ms),
                gbps="1", frac_copy=frac, kernel_frac_copy=kfrac, peak_mem_mib="300.0", saved_bytes="")


def _pred(model, config, img_s=None, mfu=None, ms=None):
    return dict(device_model="h200", model=model, config=config, pred_img_per_s=str(img_s or ""),
                pred_mfu=str(mfu or ""), pred_ms=str(ms or ""))


def synthetic_run(out: Path, root: Path) -> None:
    """A GPU run: XL ours 700 img/s (MFU 0.52) vs baseline 400; JiT 0.40; loss 0.2 ms fused vs 0.5
    compile and 1.0 eager at 90% of copy; the loader at 25,000 samples/s on 16 cores."""
    _write(out / "bench_step.csv", [_step("compile+fusedloss", 700, 0.52), _step("baseline", 400, 0.3),
                                    _step("compile+fused", 650, 0.48),
                                    _step("compile+fusedloss", 2500, 0.40, "JiT-B/16"),
                                    _step("baseline", 2000, 0.33, "JiT-B/16")])
    _write(out / "bench_alignment.csv", [_align("fused", 0.2, frac="0.45", kfrac="0.9"), _align("eager", 1.0),
                                         _align("compile", 0.5)])
    _write(out / "bench_loader.csv", [dict(host="h", cpus="16", commit="abc1234", date="d", loader="memmap", n="2048",
                                           batch="256", workers="16", steps="40", samples_per_s="25000.0",
                                           mb_per_s="1", seconds="1", note="")])
    _write(out / "parts.csv", [dict(part="kernels", device="cuda", status="ok", seconds="40", budget="50",
                                    note="44 passed in 39s")])
    _write(root / "perf/results/roofline.csv", [
        _pred("SiT-XL/2", "compile+fusedloss", 768, 0.562), _pred("SiT-XL/2", "baseline", 724, 0.53),
        _pred("JiT-B/16", "compile+fusedloss", 2800, 0.455), _pred("alignment-loss 256x256x768", "fused", ms=0.14),
        _pred("alignment-loss 256x256x768", "compile", ms=0.7), _pred("alignment-loss 256x256x768", "eager", ms=2.0)])


def test_summary_of_a_gpu_run(tmp_path):
    out, root = tmp_path / "out", tmp_path / "root"
    synthetic_run(out, root)
    text = S.summary(out, root)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    xl = rows["SiT-XL/2 + iREPA, batch 256: MFU (our best)"]
    assert "compile+fusedloss: 700 img/s, MFU 52.0%" in xl and "| yes |" in xl and "h200: compile+fusedloss 56.2%" in xl
    ratio = rows["SiT-XL/2 + iREPA, batch 256: speed-up over the reference-style baseline"]
    assert "1.75x (700 vs 400 img/s)" in ratio and "| yes |" in ratio and "h200: 1.06x" in ratio
    jit = rows["JiT-B/16 + iREPA, batch 256: MFU (our best)"]
    assert "MFU 40.0%" in jit and "| no |" in jit
    bw = rows["fused alignment loss fwd+bwd, B=256 T=256 E=768 bf16: bandwidth"]
    assert "90% of copy" in bw and "| yes |" in bw and "0.140 ms" in bw
    vs_compile = rows["fused alignment loss fwd+bwd, B=256 T=256 E=768 bf16: speed-up over torch.compile of the reference"]
    assert "2.50x" in vs_compile and "| yes |" in vs_compile and "5.0x" in vs_compile
    vs_eager = rows["fused alignment loss fwd+bwd, B=256 T=256 E=768 bf16: speed-up over eager"]
    assert "5.00x" in vs_eager and "| yes |" in vs_eager
    loader = rows["loader, SiT-B/2 + DINOv2-B records, 16 cores"]
    assert "25,000 samples/s" in loader and "| yes |" in loader
    assert (out / "summary.md").read_text() == text


def test_merge_into_results_once(tmp_path):
    """--merge appends the run's rows to perf/results (a second merge adds nothing), rewrites the
    bench_step tables and writes the targets table with the prediction beside each figure."""
    out, root = tmp_path / "out", tmp_path / "root"
    synthetic_run(out, root)
    (root / "perf/RESULTS.md").write_text("# Performance results\n\nkept\n")
    S.merge(out, root)
    S.merge(out, root)
    res = root / "perf/results"
    assert len(list(csv.DictReader(open(res / "bench_step.csv")))) == 5
    assert len(list(csv.DictReader(open(res / "bench_alignment.csv")))) == 3
    text = (root / "perf/RESULTS.md").read_text()
    assert "kept" in text and text.count("<!-- targets:begin -->") == 1 and "<!-- bench_step:begin -->" in text
    assert "| SiT-XL/2 | compile+fusedloss | 256 |" in text and "1.75x (700 vs 400 img/s)" in text


@pytest.mark.parametrize("name,model", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100-sxm"),
                                        ("NVIDIA H100 PCIe", None), ("cpu (x86_64, 2 cores)", None)])
def test_device_model(name, model):
    assert S.device_model(name) == model


def test_kernel_sweep_flow(tmp_path):
    """perf/tune_kernels.py --quick on CPU (Triton interpreter): every variant, the heuristic's own
    included, is checked against the float64 reference and gets its CSV row as it is measured."""
    from perf import tune_kernels
    path = tmp_path / "tune.csv"
    tune_kernels.main(["--device", "cpu", "--quick", "--csv", str(path)])
    rows = list(csv.DictReader(open(path)))
    assert {r["kernel"] for r in rows} == {"alignment", "adaln"}
    assert all(r["correct"] == "True" and float(r["ms_fwd_bwd"]) > 0 for r in rows), rows
    assert sum(r["heuristic"] == "True" for r in rows) == 2 and len(rows) >= 3


def test_rows_with_new_columns_extend_the_file(tmp_path):
    """bench_alignment.write_rows (all perf CSVs but bench_step's): rows with a column the file's
    header lacks rewrite it once with the union of columns; old rows keep their values."""
    from perf.common import write_rows
    path = tmp_path / "x.csv"
    write_rows(path, [{"a": 1, "b": 2}])
    write_rows(path, [{"a": 3, "b": 4}])
    write_rows(path, [{"a": 5, "c": 6}])
    assert open(path).read().splitlines() == ["a,b,c", "1,2,", "3,4,", "5,,6"]


def test_alignment_figures_per_layout(tmp_path):
    """The conv projector's layout is a figure of its own, not mixed into the contiguous one."""
    rows = [_align("fused", 0.2, frac="0.45", kfrac="0.9"), _align("eager", 1.0), _align("compile", 0.5)]
    rows += [{**r, "layout": "transposed", "ms_median": str(2 * float(r["ms_median"])), "kernel_frac_copy": "0.45"
              if r["provider"] == "fused" else ""} for r in rows]
    figs = {f["figure"]: f for f in S.alignment_figures(rows, {})}
    plain = figs["fused alignment loss fwd+bwd, B=256 T=256 E=768 bf16: bandwidth"]
    conv = figs["fused alignment loss fwd+bwd, B=256 T=256 E=768 bf16, transposed (the conv projector's [B, E, T] "
                "output): bandwidth"]
    assert plain["measured"].startswith("0.200 ms, 90%") and plain["met"] == "yes"
    assert conv["measured"].startswith("0.400 ms, 45%") and conv["met"] == "no"
