"""The prepared GPU call's pieces, on CPU in seconds: the perf plumbing (commit look-up, CSV rows,
RESULTS.md blocks, quantiles), the process-per-part runner (a part that crashes or runs out of
time loses no other part's rows; a failed gate part ends the call), the correctness gate (a
deliberately wrong step is marked and not counted), the preflight, time attribution's classes
and the roofline taking the preflight's measured rates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perf import gate
from perf.common import quantile, quantiles, read_csv, rewrite_block, write_rows
from perf.common import provenance
from perf.runner import Part, run_parts

PY = [sys.executable, "-c"]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_commit_from_git_then_the_commit_file_then_the_environment(tmp_path, monkeypatch):
    """git wins where the tree is a checkout; a copy without .git (the device machine's) reads the
    COMMIT file written before the call; with neither, $IREPA_COMMIT; else 'unknown'."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("a\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "one")
    sha = _git(repo, "rev-parse", "--short", "HEAD")
    monkeypatch.setenv("IREPA_COMMIT", "from-env")
    assert provenance.commit(repo) == sha
    (repo / "a.txt").write_text("changed\n")
    assert provenance.commit(repo) == sha + "-dirty"
    assert provenance.write_commit_file(repo) == sha + "-dirty"
    copy = tmp_path / "copy"  # what travels: the files, no .git
    copy.mkdir()
    (copy / "COMMIT").write_text((repo / "COMMIT").read_text())
    assert provenance.commit(copy) == sha + "-dirty"
    (copy / "COMMIT").unlink()
    assert provenance.commit(copy) == "from-env"
    monkeypatch.delenv("IREPA_COMMIT")
    assert provenance.commit(copy) == "unknown"
    with pytest.raises(SystemExit, match="not a git checkout"):
        provenance.write_commit_file(copy)


def test_rows_keep_a_fixed_column_order_and_extend_once(tmp_path):
    path = tmp_path / "x.csv"
    write_rows(path, [{"b": 1, "a": 2}], fields=["a", "b"], quiet=True)
    write_rows(path, [{"a": 3, "b": 4, "c": 5}], fields=["a", "b"], quiet=True)
    assert path.read_text().splitlines() == ["a,b,c", "2,1,", "3,4,5"]
    assert [r["c"] for r in read_csv(path)] == ["", "5"] and read_csv(tmp_path / "none.csv") == []


def test_results_block_rewritten_in_place_or_appended(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nbefore\n\n<!-- x:begin -->\nold\n<!-- x:end -->\n\nafter\n")
    rewrite_block(md, "x", "new", "X")
    assert md.read_text() == "# Results\n\nbefore\n\n<!-- x:begin -->\nnew\n<!-- x:end -->\n\nafter\n"
    rewrite_block(md, "y", "first", "Why")
    rewrite_block(md, "y", "second", "Why")
    text = md.read_text()
    assert text.count("## Why") == 1 and "second" in text and "first" not in text and text.startswith("# Results")
    assert not list(tmp_path.glob("*.tmp"))


def test_quantiles_are_measured_values():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert quantile(xs, 0.5) == 3.0 and quantiles(xs) == (3.0, 2.0, 4.0) and quantile([7.0], 0.8) == 7.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_a_crash_or_a_timeout_loses_no_other_part(tmp_path):
    """Three parts: one dies by a signal (as a CUDA fault would end a process), one outlives its
    limit and is stopped, one writes its row: parts.csv says so for each, the third's row is there."""
    out = tmp_path
    parts = [Part("crash", PY + ["import os; print('about to crash', flush=True); os.abort()"], 30),
             Part("hang", PY + ["import time; print('working', flush=True); time.sleep(60)"], 2),
             Part("rows", PY + [f"open({str(out / 'rows.csv')!r}, 'w').write('a\\n1\\n'); print('1 passed')"], 30)]
    done = run_parts(parts, out, 100, "cpu", "abc", env=dict(os.environ))
    rows = read_csv(out / "parts.csv")
    assert [(r["part"], r["status"]) for r in rows] == [("crash", "failed"), ("hang", "timeout"), ("rows", "ok")]
    assert int(rows[1]["seconds"]) < 20 and rows[1]["limit"] == "2" and "working" in rows[1]["note"]
    assert rows[2]["note"] == "1 passed" and rows[0]["commit"] == "abc"
    assert (out / "rows.csv").read_text() == "a\n1\n" and "about to crash" in (out / "call.log").read_text()
    assert [o.status for _, o in done] == ["failed", "timeout", "ok"]


def test_a_failed_gate_part_ends_the_call_and_the_total_budget_skips(tmp_path):
    """A failed preflight skips the rest; kernel tests stopped at their limit do not; a part with
    less than 10 s of the total left is skipped, not started."""
    parts = [Part("preflight", PY + ["print('preflight: FAILED: gemm_tflops not measured'); raise SystemExit(1)"], 30,
                  gate=True), Part("later", PY + ["print('ran')"], 30)]
    run_parts(parts, tmp_path, 100, "cpu", "abc", env=dict(os.environ))
    rows = read_csv(tmp_path / "parts.csv")
    assert [r["status"] for r in rows] == ["failed", "skipped"]
    assert "gemm_tflops not measured" in rows[0]["note"] and rows[1]["note"].startswith("preflight failed")
    slow = tmp_path / "slow"  # kernel tests that run out of time are slow, not wrong: the call goes on
    slow.mkdir()
    run_parts([Part("kernels", PY + ["import time; time.sleep(30)"], 1, gate=True, gate_on_timeout=False),
               Part("later", PY + ["print('ran')"], 30)], slow, 100, "cpu", "abc", env=dict(os.environ))
    assert [r["status"] for r in read_csv(slow / "parts.csv")] == ["timeout", "ok"]
    out2 = tmp_path / "b"
    out2.mkdir()
    run_parts([Part("late", PY + ["print('ran')"], 30)], out2, 3, "cpu", "abc", env={})
    assert read_csv(out2 / "parts.csv")[0]["status"] == "skipped"


def test_gate_verdicts():
    assert gate.verdict(1.0, 2.0, 1.005, 2.02).startswith("pass")
    assert gate.verdict(1.1, 2.0, 1.0, 2.0).startswith("FAIL")  # loss 10% off
    assert gate.verdict(1.0, 2.5, 1.0, 2.0).startswith("FAIL")  # grad norm 25% off
    assert gate.verdict(float("nan"), 2.0, 1.0, 2.0).startswith("FAIL (non-finite")
    row = {"config": "compile", "loss0": "1.0", "grad_norm0": "2.0"}
    assert gate.gate_row({**row, "config": "baseline"}, None) == gate.NOT_COMPARABLE
    assert gate.gate_row({**row, "config": "eager"}, None) == "ref"
    assert gate.gate_row(row, None) == "no reference"
    ref = {"model": "m", "batch": "8", "gate": "ref", "loss0": "1.0", "grad_norm0": "2.0"}
    assert gate.reference([ref, {**ref, "model": "other"}], "m", 8) is ref
    assert not gate.counted({"gate": "FAIL (loss 1e-1)"}) and gate.counted({"gate": "pass"}) and gate.counted({})


def test_a_wrong_step_is_marked_and_never_counted(tmp_path, monkeypatch):
    """The eager reference at the fixed seed, then the same step with attention made wrong (its
    output scaled, as a broken fused kernel might): its row says FAIL, and the report's figures
    take the correct row only."""
    import torch.nn.functional as F

    from perf import bench_step, suite_report
    csv_path = tmp_path / "bench_step.csv"
    args = ["--quick", "--device", "cpu", "--models", "SiT-Tiny/2", "--configs", "eager", "--batch", "4",
            "--steps", "1", "--warmup", "1", "--csv", str(csv_path), "--no_update", "--gate_ref", str(csv_path)]
    bench_step.main(args + ["--gate_only"])
    bench_step.main(args)  # the same step again: passes against its reference
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: 1.5 * real(q, k, v, **kw))
    bench_step.main(args)
    ref, good, wrong = read_csv(csv_path)
    assert ref["gate"] == "ref" and ref["step_ms_median"] == "" and good["gate"].startswith("pass")
    assert wrong["gate"].startswith("FAIL") and wrong["loss0"] != ref["loss0"]
    for r, speed in ((good, "10.0"), (wrong, "99.0")):  # the wrong row would be the best if it counted
        r["img_per_s"] = speed
    figs = suite_report.step_figures([ref, good, wrong], "SiT-Tiny/2", 0.5, None, {}, gpu_only=False)
    assert "10 img/s" in figs[0]["measured"] and "99" not in figs[0]["measured"]


def test_preflight_on_cpu(tmp_path, monkeypatch):
    """Every check runs at tiny shapes on CPU; a check that breaks is named and the exit code says so."""
    from perf import preflight
    assert preflight.main([str(tmp_path), "--device", "cpu"]) == 0
    pre = json.loads((tmp_path / "preflight.json").read_text())
    assert set(pre["versions"]) >= {"python", "torch", "triton", "cuda", "driver"} and pre["failures"] == []
    assert all(pre["measured"][k] > 0 for k in ("gemm_tflops", "sdpa_tflops", "copy_tbs"))
    from perf.suite_report import preflight_row
    assert pre["measured"]["sdpa_backend"] and preflight_row(tmp_path / "preflight.json")["failures"] == ""

    def broken(device, quick):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(preflight, "copy_rate", broken)
    assert preflight.main([str(tmp_path), "--device", "cpu"]) == 1
    pre = json.loads((tmp_path / "preflight.json").read_text())
    assert any("copy: RuntimeError: CUDA error: an illegal memory access" in f for f in pre["failures"])


def test_the_roofline_takes_the_preflights_measured_rates(tmp_path):
    from perf.roofline import DEVICES, measured
    pre = {"commit": "abc", "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1},
           "measured": {"gemm_tflops": 701.26, "copy_tbs": 2.91}}
    (tmp_path / "preflight.json").write_text(json.dumps(pre))
    key, dev = measured(tmp_path / "preflight.json")
    assert key == "h100-sxm" and (dev.matmul_tflops, dev.bandwidth_tbs) == (701.3, 2.91)
    assert dev.peak_tflops == DEVICES["h100-sxm"].peak_tflops and "measured by the preflight" in dev.source
    assert DEVICES["h100-sxm"].bandwidth_tbs == 3.0  # this workplace's H100s, measured (not the nominal 3.35)
    pre["gpu"]["name"] = "NVIDIA A100"
    (tmp_path / "preflight.json").write_text(json.dumps(pre))
    with pytest.raises(SystemExit, match="matches no device model"):
        measured(tmp_path / "preflight.json")


@pytest.mark.parametrize("name,update,cls", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", False, "GEMM"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNN", False, "GEMM"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128, 64, 4>>", False, "attention"),
    ("_token_fwd_kernel", False, "alignment loss"), ("_adaln_fwd_kernel", False, "norms+modulation"),
    ("triton_per_fused_native_layer_norm_0", False, "norms+modulation"),
    ("triton_poi_fused_add_mul_silu_3", False, "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4>", True, "optimizer+EMA"),
    ("aten::addmm", False, "GEMM"), ("aten::mul", False, "elementwise"), ("some_kernel", False, "other")])
def test_profiled_kernels_fall_in_the_roofline_classes(name, update, cls):
    from perf.op_classes import op_class
    assert op_class(name, update) == cls


def test_call_plan_puts_the_baseline_and_the_reference_first():
    """GPU plan: preflight and kernel tests gate the call; per model the eager reference, then the
    baseline, then ours; every step part gated against the call's own reference rows and profiled;
    the parts' limits fit the 7 minutes."""
    from perf import gpu_call
    out = Path("/tmp/o")
    parts = gpu_call.plan(out, "cuda", ["python3"])
    names = [p.name for p in parts]
    assert names[:3] == ["preflight", "kernels", "alignment"] and names[-1] == "loader"
    assert names[3:5] == ["SiT-XL/2 ref", "SiT-XL/2 baseline"] and "JiT-B/16 compile+fusedloss" in names
    assert [p.gate for p in parts[:3]] == [True, True, False]
    steps = [p for p in parts if " " in p.name and not p.name.endswith("ref")]
    assert all("--gate_ref" in p.cmd and "--profile" in p.cmd for p in steps)
    assert sum(p.limit_s for p in parts) <= gpu_call.GPU_TOTAL_S
    assert [p.name for p in gpu_call.plan(out, "cpu", ["python3"])][3:5] == ["SiT-Tiny/2 ref", "SiT-Tiny/2 baseline"]
