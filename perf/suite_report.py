"""The headline figures of a GPU suite run against their targets, with the roofline prediction beside each.

    python -m perf.suite_report OUT            # (re)write OUT/summary.md from OUT's CSVs (the suite does this
                                               # after every part; no torch needed)
    python -m perf.suite_report --merge OUT    # here, after a device run: append OUT's rows to perf/results/*.csv,
                                               # rewrite the bench_step tables and the targets table of RESULTS.md
    python -m perf.suite_report --update       # rewrite the targets table of RESULTS.md from perf/results

Targets (issue 20), each measured in the same run as its baseline:
  SiT-XL/2 + iREPA, batch 256, bf16, one H100/H200: >= 50% MFU and >= 1.5x the reference-style baseline
  JiT-B/16 + iREPA, batch 256: >= 45% MFU
  fused alignment loss fwd+bwd (B=256, T=256, bf16): >= 85% of the measured copy bandwidth (over the
    bytes the kernels move by design, bench_alignment's kernel_frac_copy), >= 2x torch.compile of the
    reference, >= 4x eager
  loader: >= 20,000 samples/s of SiT-B/2 + DINOv2-B records on 16 cores
A figure is 'open' until a GPU (or a 16-core host, for the loader) measured it. Predictions come
from perf/results/roofline.csv (python -m perf.roofline --record), matched by device model. A
step row that failed the correctness gate (perf/gate.py) never counts as a speed figure.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from perf.common import read_csv, rewrite_block, write_rows
from perf.gate import counted

HERE = Path(__file__).resolve().parent
OURS = ("compile+fusedloss", "compile+fused", "compile+fused+flash", "compile", "eager")
CSVS = ("bench_step.csv", "bench_alignment.csv", "bench_loader.csv", "tune_kernels.csv", "step_profile.csv")


def device_model(name: str) -> str | None:
    """The roofline's device model for a CUDA device name (None: no prediction for it)."""
    if "H200" in name:
        return "h200"
    if "H100" in name and "PCIe" not in name and "NVL" not in name:
        return "h100-sxm"
    return None


def _f(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if v != v else v  # NaN counts as missing


def _mib(x) -> str:
    v = _f(x)
    return "n/a" if v is None else f"{v:,.0f} MiB"


def _is_gpu(name: str) -> bool:
    return bool(name) and not name.lower().startswith("cpu")


def step_figures(rows: list[dict], model: str, mfu_target: float, ratio_target: float | None, preds: dict,
                 gpu_only: bool = True) -> list[dict]:
    """Our best configuration and the baseline of the newest bench_step run of `model` at batch 256."""
    runs: dict[tuple, list[dict]] = {}
    for r in rows:  # rows that failed the correctness gate are no speed result; --gate_only rows have no speed
        if r.get("model") == model and (not gpu_only or _is_gpu(r.get("device", ""))) and counted(r) \
                and r.get("img_per_s"):
            # one run: the rows of one GPU call (its `call` id: one process per configuration), else of one command
            key = (r["device"], r["call"]) if r.get("call") else (r["device"], r["date"], r["command"])
            runs.setdefault(key, []).append(r)
    batches = sorted({r["batch"] for rs in runs.values() for r in rs}) or ["256"]
    label = f"{model} + iREPA, batch {'/'.join(batches)}"
    if not runs:
        return [dict(figure=f"{label}: MFU (our best)", measured="open", target=f">= {mfu_target:.0%}", met="open",
                     predicted=_pred_step(preds, None, model, "mfu"))] + (
            [dict(figure=f"{label}: speed-up over the reference-style baseline", measured="open",
                  target=f">= {ratio_target}x", met="open", predicted=_pred_step(preds, None, model, "ratio"))]
            if ratio_target else [])
    rs = max(runs.values(), key=lambda rows: max(r["date"] for r in rows))
    dev, date = rs[0]["device"], max(r["date"] for r in rs)
    dm = device_model(dev)
    ours = [r for r in rs if r["config"].split("[")[0] in OURS and _f(r.get("img_per_s"))]
    base = next((r for r in rs if r["config"] == "baseline" and _f(r.get("img_per_s"))), None)
    best = max(ours, key=lambda r: _f(r["img_per_s"])) if ours else None
    out = []
    if best:
        mfu = _f(best.get("mfu"))
        measured = (f"{best['config']}: {float(best['img_per_s']):.0f} img/s, MFU "
                    f"{f'{mfu:.1%}' if mfu is not None else 'n/a'}, peak {best.get('peak_mem_gb') or 'n/a'} GB, "
                    f"micro-batch {best.get('micro_batch') or best['batch']}")
        met = "n/a" if mfu is None else ("yes" if mfu >= mfu_target else "no")
    else:
        measured, met = "open (no configuration of ours finished)", "open"
    out.append(dict(figure=f"{label}: MFU (our best)", measured=measured, target=f">= {mfu_target:.0%}", met=met,
                    predicted=_pred_step(preds, dm, model, "mfu"), device=dev, date=date,
                    commit=(best or base or rs[0]).get("commit", "")))
    if ratio_target:
        if best and base:
            ratio = float(best["img_per_s"]) / float(base["img_per_s"])
            measured = f"{ratio:.2f}x ({float(best['img_per_s']):.0f} vs {float(base['img_per_s']):.0f} img/s)"
            met = "yes" if ratio >= ratio_target else "no"
        else:
            measured, met = "open (" + ("baseline" if best else "our configuration") + " did not finish)", "open"
        out.append(dict(figure=f"{label}: speed-up over the reference-style baseline", measured=measured,
                        target=f">= {ratio_target}x", met=met, predicted=_pred_step(preds, dm, model, "ratio"),
                        device=dev, date=date, commit=(best or base or rs[0]).get("commit", "")))
    return out


def _pred_step(preds: dict, dm: str | None, model: str, what: str) -> str:
    dms = [dm] if dm else sorted({k[0] for k in preds})
    parts = []
    for d in dms:
        ours = {c: preds[(d, model, c)] for c in OURS if (d, model, c) in preds}
        if not ours:
            continue
        best_c = max(ours, key=lambda c: float(ours[c]["pred_img_per_s"]))
        best = ours[best_c]
        if what == "mfu":
            parts.append(f"{d}: {best_c} {float(best['pred_mfu']):.1%} ({float(best['pred_img_per_s']):.0f} img/s)")
        elif (d, model, "baseline") in preds:
            base = preds[(d, model, "baseline")]
            parts.append(f"{d}: {float(best['pred_img_per_s']) / float(base['pred_img_per_s']):.2f}x")
    return "; ".join(parts) or "none recorded"


def alignment_figures(rows: list[dict], preds: dict, gpu_only: bool = True) -> list[dict]:
    """Per E and layout of the newest bench_alignment run: fused fwd+bwd against copy bandwidth, compile, eager."""
    timed = [r for r in rows if r.get("mode") == "full" and (not gpu_only or _is_gpu(r.get("device_name", "")))]
    out = []
    def lay(r):
        return r.get("layout") or "contiguous"
    shapes = sorted({(r["B"], r["T"], r["E"], lay(r)) for r in timed},
                    key=lambda s: (*(int(v) for v in s[:3]), s[3] != "contiguous")) or \
        [("256", "256", "768", "contiguous"), ("256", "256", "1024", "contiguous")]
    for B, T, E, layout in shapes:
        rs = [r for r in timed if (r["B"], r["T"], r["E"], lay(r)) == (B, T, E, layout)]
        key = f"alignment-loss {B}x{T}x{E}"
        dm = None
        by = {}
        if rs:
            date = max(r["date"] for r in rs)
            by = {r["provider"]: r for r in rs if r["date"] == date}
            dm = device_model(rs[0]["device_name"])
        fused, comp, eager = (by.get(p) for p in ("fused", "compile", "eager"))
        label = f"fused alignment loss fwd+bwd, B={B} T={T} E={E} bf16" + (
            "" if layout == "contiguous" else f", {layout} (the conv projector's [B, E, T] output)")
        pr = {p: preds.get((d, key, p)) for d in ([dm] if dm else sorted({k[0] for k in preds})) for p in
              ("fused", "compile", "eager")}
        pf, pc, pe = (_f(pr[p]["pred_ms"]) if pr.get(p) else None for p in ("fused", "compile", "eager"))
        if fused:
            frac = _f(fused.get("kernel_frac_copy"))
            measured = (f"{float(fused['ms_median']):.3f} ms, {frac:.0%} of copy bandwidth "
                        f"({fused.get('copy_gbps')} GB/s) over the kernels' bytes, {float(fused['frac_copy']):.0%} over "
                        f"the minimum bytes; peak {_mib(fused.get('peak_mem_mib'))}" if frac is not None else
                        f"{float(fused['ms_median']):.3f} ms")
            met = "n/a" if frac is None else ("yes" if frac >= 0.85 else "no")
        else:
            measured, met = "open", "open"
        out.append(dict(figure=f"{label}: bandwidth", measured=measured, target=">= 85% of copy", met=met,
                        predicted=f"{pf:.3f} ms at the copy bandwidth" if pf else "none recorded"))
        for name, other, target, pother in (("torch.compile of the reference", comp, 2.0, pc), ("eager", eager, 4.0, pe)):
            if fused and other:
                ratio = float(other["ms_median"]) / float(fused["ms_median"])
                measured = f"{ratio:.2f}x ({float(other['ms_median']):.3f} ms, peak {_mib(other.get('peak_mem_mib'))})"
                met = "yes" if ratio >= target else "no"
            else:
                measured, met = "open", "open"
            out.append(dict(figure=f"{label}: speed-up over {name}", measured=measured, target=f">= {target:g}x",
                            met=met, predicted=f"{pother / pf:.1f}x" if pf and pother else "none recorded"))
    return out


def loader_figures(rows: list[dict]) -> list[dict]:
    rs = [r for r in rows if r.get("loader") in ("memmap", "ffcv") and (_f(r.get("cpus")) or 0) >= 16]
    if not rs:
        return [dict(figure="loader, SiT-B/2 + DINOv2-B records, 16 cores", measured="open", target=">= 20,000 samples/s",
                     met="open", predicted="n/a")]
    best = max(rs, key=lambda r: float(r["samples_per_s"]))
    sps = float(best["samples_per_s"])
    return [dict(figure=f"loader, SiT-B/2 + DINOv2-B records, {best['cpus']} cores", target=">= 20,000 samples/s",
                 measured=f"{best['loader']}: {sps:,.0f} samples/s (n={best['n']}, batch {best['batch']}, "
                          f"{best['workers']} workers)", met="yes" if sps >= 20000 else "no", predicted="n/a")]


def kernel_figure(parts: list[dict]) -> list[dict]:
    r = next((p for p in parts if p.get("part") == "kernels"), None)
    if r is None:
        return [dict(figure="kernel tests on CUDA (compiled Triton)", measured="open", target="all pass", met="open",
                     predicted="n/a")]
    return [dict(figure="kernel tests (" + ("compiled Triton on CUDA" if r.get("device") == "cuda" else
                                             "Triton interpreter on CPU") + ")",
                 measured=f"{r['status']}: {r.get('note', '')}", target="all pass",
                 met="yes" if r["status"] == "ok" else "no", predicted="n/a")]


def table(figs: list[dict]) -> str:
    lines = ["| figure | measured | target | met | roofline prediction |", "|---|---|---|---|---|"]
    lines += [f"| {f['figure']} | {f['measured']} | {f['target']} | {f['met']} | {f['predicted']} |" for f in figs]
    return "\n".join(lines)


def load_preds(root: Path) -> dict:
    return {(r["device_model"], r["model"], r["config"]): r for r in read_csv(root / "perf/results/roofline.csv")}


def summary(out: Path, root: Path = HERE.parent) -> str:
    """OUT/summary.md: this run's figures (any device: a CPU practice run shows its own rows)."""
    preds = load_preds(root)
    steps = read_csv(out / "bench_step.csv")
    parts = read_csv(out / "parts.csv")
    gpu = any(_is_gpu(r.get("device", "")) for r in steps) or any(p.get("device") == "cuda" for p in parts)
    figs = kernel_figure(parts)
    figs += alignment_figures(read_csv(out / "bench_alignment.csv"), preds, gpu_only=gpu)
    names = list(dict.fromkeys(r["model"] for r in steps)) or ["SiT-XL/2", "JiT-B/16"]
    for m in names:  # SiT: the SiT-XL/2 targets; JiT: JiT-B/16's (the CPU practice runs tiny ones)
        sit = m.startswith("SiT")
        figs += step_figures(steps, m, 0.50 if sit else 0.45, 1.5 if sit else None, preds, gpu_only=gpu)
    loader_rows = read_csv(out / "bench_loader.csv")
    figs += loader_figures(loader_rows) if gpu or not loader_rows else [dict(
        figure=f"loader ({r['loader']}, {r['cpus']} cores)", measured=f"{float(r['samples_per_s']):,.0f} samples/s",
        target=">= 20,000 samples/s on 16 cores", met="n/a (not 16 cores)", predicted="n/a") for r in loader_rows]
    lines = [f"# GPU suite summary ({out.name})", ""]
    if parts:
        lines += ["| part | device | status | seconds | limit | note |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['part']} | {p.get('device', '')} | {p['status']} | {p['seconds']} | "
                  f"{p.get('limit') or p.get('budget', '')} | "
                  f"{p.get('note', '')} |" for p in parts]
        lines.append("")
    lines += preflight_lines(out) + [table(figs), ""] + gate_lines(steps) + attribution_lines(out)
    if not gpu:
        lines.append("CPU practice run: tiny models and shapes; these rows prove the suite, not a performance figure.")
    text = "\n".join(lines) + "\n"
    tmp = out / "summary.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "summary.md")
    return text


def preflight_row(path: Path) -> dict | None:
    """OUT/preflight.json (perf/preflight.py) as one row: versions, GPU, measured rates, failures."""
    if not path.is_file():
        return None
    pre = json.loads(path.read_text())
    v, g, m = pre["versions"], pre["gpu"], pre["measured"]
    return {"date": pre["date"], "commit": pre["commit"], "device_name": g["name"], "python": v["python"],
            "torch": v["torch"], "triton": v["triton"], "cuda": v["cuda"], "driver": v["driver"],
            "gemm_tflops": f"{m.get('gemm_tflops', float('nan')):.4g}", "sdpa_ms": f"{m.get('sdpa_ms', float('nan')):.4g}",
            "sdpa_backend": m.get("sdpa_backend", ""), "copy_tbs": f"{m.get('copy_tbs', float('nan')):.4g}",
            "sm_clock_mhz": g.get("sm_clock_mhz", ""), "max_sm_clock_mhz": g.get("max_sm_clock_mhz", ""),
            "throttle": g.get("throttle", ""), "failures": "; ".join(pre["failures"])}


def preflight_lines(out: Path) -> list[str]:
    r = preflight_row(out / "preflight.json")
    if r is None:
        return []
    return [f"Preflight on {r['device_name']}: python {r['python']}, torch {r['torch']}, triton {r['triton']}, "
            f"cuda {r['cuda'] or '-'}, driver {r['driver'] or '-'}; measured GEMM (SiT-XL/2 shapes) "
            f"{r['gemm_tflops']} TFLOP/s, copy {r['copy_tbs']} TB/s, SDPA fwd+bwd {r['sdpa_ms']} ms "
            f"({r['sdpa_backend']}); {('FAILED: ' + r['failures']) if r['failures'] else 'ok'}.", ""]


def gate_lines(steps: list[dict]) -> list[str]:
    """Each step row's correctness verdict; a FAIL row is left out of every figure above."""
    rows = [r for r in steps if r.get("gate")]
    if not rows:
        return []
    lines = ["Correctness gate (step 0 at a fixed seed against eager; perf/gate.py):", "",
             "| model | config | loss0 | grad norm0 | gate |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['config']} | {r.get('loss0', '')} | {r.get('grad_norm0', '')} | {r['gate']} |"
              for r in rows]
    return lines + [""]


def attribution_lines(out: Path) -> list[str]:
    """Measured time per op class of one profiled step beside the roofline's prediction."""
    rows = read_csv(out / "step_profile.csv")
    if not rows:
        return []
    lines = ["Time per op class, one profiled step (measured) beside the roofline (predicted; device model "
             "in brackets):", "", "| model | config | op class | measured ms | predicted ms |", "|---|---|---|---|---|"]
    for r in rows:
        dm = f" ({r['prediction_device']})" if r.get("prediction_device") else ""
        lines.append(f"| {r['model']} | {r['config']} | {r['op_class']} | {r['measured_ms']} | "
                     f"{r['predicted_ms'] or 'n/a'}{dm} |")
    return lines + [""]


def targets_markdown(root: Path) -> str:
    res = root / "perf/results"
    preds = load_preds(root)
    steps = read_csv(res / "bench_step.csv")
    figs = kernel_figure([])
    figs[0]["measured"] = "see the kernel_tests line of the newest GPU suite log"
    figs += alignment_figures(read_csv(res / "bench_alignment.csv"), preds)
    figs += step_figures(steps, "SiT-XL/2", 0.50, 1.5, preds)
    figs += step_figures(steps, "JiT-B/16", 0.45, None, preds)
    figs += loader_figures(read_csv(res / "bench_loader.csv"))
    return table(figs[1:])


def update_targets(root: Path) -> None:
    rewrite_block(root / "perf/RESULTS.md", "targets", targets_markdown(root), "Targets")


def merge(out: Path, root: Path) -> None:
    """Append OUT's rows that perf/results does not hold yet; then rewrite RESULTS.md's tables."""
    for name in CSVS:
        new = read_csv(out / name)
        if not new:
            continue
        dest = root / "perf/results" / name
        have = {tuple(sorted((k, v) for k, v in r.items() if v)) for r in read_csv(dest)}
        rows = [r for r in new if tuple(sorted((k, v) for k, v in r.items() if v)) not in have]
        if name == "bench_step.csv":
            from perf.bench_step import FIELDS, update_results
            write_rows(dest, rows, FIELDS, quiet=True)
            update_results(root / "perf/RESULTS.md", dest)
        elif rows:
            write_rows(dest, rows)
        print(f"{name}: {len(rows)} new rows -> {dest}")
    pre = preflight_row(out / "preflight.json")
    have = {(r["date"], r["device_name"]) for r in read_csv(root / "perf/results/preflight.csv")}
    if pre is not None and (pre["date"], pre["device_name"]) not in have:
        write_rows(root / "perf/results/preflight.csv", [pre], quiet=True)
        print(f"preflight.json -> {root / 'perf/results/preflight.csv'}")
    update_targets(root)
    print(f"targets table rewritten in {root / 'perf/RESULTS.md'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", type=Path, help="a suite OUT folder")
    p.add_argument("--merge", action="store_true", help="append OUT's rows to perf/results and update RESULTS.md")
    p.add_argument("--update", action="store_true", help="rewrite RESULTS.md's targets table from perf/results")
    p.add_argument("--root", type=Path, default=HERE.parent)
    a = p.parse_args(argv)
    if a.update:
        update_targets(a.root)
        return
    if a.out is None:
        raise SystemExit("give an OUT folder (or --update)")
    if not a.out.is_dir():
        raise SystemExit(f"{a.out}: no such folder")
    if a.merge:
        merge(a.out, a.root)
    else:
        print(summary(a.out, a.root))


if __name__ == "__main__":
    main()
