"""The prepared GPU call: every headline figure in one call of at most 7 minutes (start-up
excluded), one process per part, the baseline before our configurations.

    python -m perf.common.provenance --write     # here, before the call: COMMIT travels with the tree
    bash perf/gpu_suite.sh quick OUT             # there (the suite makes irepa importable, then runs this)
    python -m perf.gpu_call OUT --device cpu     # the practice run: same parts, tiny models, CPU limits

Parts, in order (limits in seconds, GPU / CPU practice):
  preflight       versions, GPU, measured GEMM / SDPA / copy rates (perf/preflight.py)   30 / 60
  kernels         the kernel tests with compiled Triton on CUDA (interpreted on CPU)     50 / 300
  alignment       fused alignment loss vs eager and compile, CUDA graphs, contiguous
                  and the conv projector's [B, E, T] layout, E 768 and 1024              25 / 240
  <model> ref     the eager step 0 at the fixed seed: the correctness gate's reference  20 / 60
  <model> <cfg>   one bench_step process per configuration: timing, gate, one profiled
                  step (time per op class beside the roofline's), device state    gpu_step_limit / 300-420
  loader          memmap loader on this host's cores, records built in seconds           15 / 60
A failed preflight or kernel test skips every later part (the call ends early with what
failed); so does a preflight that runs out of time (a hung GPU), not kernel tests that do (slow
compiles are no wrong result). Each part's limit is the smaller of its own and what the call's total has left.
Rows land in OUT as they are measured (OUT_FILES: the 8 files a device call can return);
OUT/parts.csv says how each part ended; OUT/summary.md (rewritten after every part) puts each
figure beside its target and prediction, with the gate's verdicts and the time per op class;
OUT/call.log holds all output. Here, afterwards:
    python -m perf.roofline --measured OUT/preflight.json --record   # predictions at the measured rates
    python -m perf.suite_report --merge OUT                          # rows -> perf/results, RESULTS.md

Step limits (gpu_step_limit). A limit is build + compile + steps (3 warm-up, 8 timed, 1
profiled). Compile dominates and no GPU compile time has been seen. What the CPU practice
measures is the ratio of compile times: the same Inductor front-end compiles the same graphs of
a tiny model (bench_step's warmup_s, PRACTICE_WARMUP_S), and the baseline's whole-network
compile took about twice our per-block compile there. The absolute scale is an assumption
(GPU_BLOCK_COMPILE_S: a cold per-block compile, forward and backward, on an H200's 16 cores);
the baseline gets it times the practice's ratio. The fused-adaLN configuration reuses the
Triton kernels the compile+fusedloss part compiled (one cache) and compiles the rest.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from perf.common import commit
from perf.common.provenance import utc_now
from perf.runner import Part, run_parts

GPU_TOTAL_S, CPU_TOTAL_S = 420, 2100
# everything the call leaves in OUT: a device call returns at most 8 files
OUT_FILES = ("call.log", "parts.csv", "summary.md", "preflight.json", "bench_alignment.csv", "bench_step.csv",
             "step_profile.csv", "bench_loader.csv")
# CPU practice warm-up (compile) seconds of the tiny models (2 shared cores; perf/RESULTS.md): the ratio of a
# whole-network compile (baseline) to a per-block compile (ours) is what carries over to the GPU
PRACTICE_WARMUP_S = {"baseline": 125.3, "compile": 57.4}  # SiT-Tiny/2, 2026-12-06, commit 248c0b1
GPU_BLOCK_COMPILE_S = 33.0  # assumed: a cold per-block compile (fwd + bwd) of SiT-XL/2 on an H200
BUILD_S = {"SiT-XL/2": 15.0, "JiT-B/16": 10.0}  # imports, CUDA start, building the run, ungating
STEPS_S = 10.0  # 12 steps of ~0.35 s (the roofline's SiT-XL/2 step on an H200) and the profiler


def gpu_step_limit(model: str, config: str, reused: float = 0.0) -> float:
    """Seconds for one step part on the GPU; reused: the share of its compile already in the cache."""
    ratio = PRACTICE_WARMUP_S["baseline"] / PRACTICE_WARMUP_S["compile"] if config == "baseline" else 1.0
    return round(BUILD_S[model] + GPU_BLOCK_COMPILE_S * ratio * (1.0 - reused) + STEPS_S)


# (model, config, limit): the baseline first, then ours by importance
STEPS_GPU = [("SiT-XL/2", "baseline", gpu_step_limit("SiT-XL/2", "baseline")),
             ("SiT-XL/2", "compile+fusedloss", gpu_step_limit("SiT-XL/2", "compile+fusedloss")),
             ("SiT-XL/2", "compile+fused", gpu_step_limit("SiT-XL/2", "compile+fused", reused=0.3)),
             ("JiT-B/16", "compile+fusedloss", gpu_step_limit("JiT-B/16", "compile+fusedloss"))]
STEPS_CPU = [("SiT-Tiny/2", "baseline", 420), ("SiT-Tiny/2", "compile", 300), ("JiT-Tiny/4", "compile", 300)]
REF_LIMIT = {"cuda": 20, "cpu": 60}


def step_part(py: list[str], out: Path, device: str, model: str, config: str, limit: float, ref: bool = False,
              grads: Path | None = None) -> Part:
    quick = ["--quick", "--device", "cpu"] if device == "cpu" else []
    steps = ["--steps", "3", "--warmup", "1"] if device == "cpu" else ["--steps", "8", "--warmup", "3"]
    args = [*py, "-m", "perf.bench_step", *quick, "--models", model, "--configs", "eager" if ref else config,
            "--csv", str(out / "bench_step.csv"), "--no_update", "--gate_ref", str(out / "bench_step.csv"),
            "--gate_grads", str(grads or out.parent / f"{out.name}.grads.json")]
    args += ["--gate_only"] if ref else [*steps, "--profile", str(out / "step_profile.csv")]
    return Part(f"{model} {'ref' if ref else config}", args, limit)


def plan(out: Path, device: str, py: list[str], scratch: Path | None = None) -> list[Part]:
    """The parts of the call; scratch: where what must not come back in OUT goes (the gate's
    per-parameter gradient norms: OUT holds the 8 files a device call returns)."""
    grads = (scratch or out.parent) / "gate_grads.json"
    cpu = device == "cpu"
    kt_env = {"IREPA_KERNEL_TEST_DEVICE": device, **({"TRITON_INTERPRET": "1"} if cpu else {})}
    parts = [Part("preflight", [*py, "-m", "perf.preflight", str(out), "--device", device], 60 if cpu else 30,
                  gate=True),
             Part("kernels", [*py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "tests/test_kernel_alignment.py",
                              "tests/test_kernel_adaln.py"], 300 if cpu else 50, gate=True, gate_on_timeout=False,
                  env=kt_env),
             Part("alignment", [*py, "-m", "perf.bench_alignment", "--layout", "both", "--csv",
                                str(out / "bench_alignment.csv"),
                                *(["--device", "cpu", "--quick", "--shapes", "2x16x64,2x16x96"] if cpu else
                                  ["--shapes", "256x256x768,256x256x1024"])], 240 if cpu else 25)]
    seen = []
    for model, config, limit in STEPS_CPU if cpu else STEPS_GPU:
        if model not in seen:
            seen.append(model)
            parts.append(step_part(py, out, device, model, config, REF_LIMIT[device], ref=True, grads=grads))
        parts.append(step_part(py, out, device, model, config, limit, grads=grads))
    loader = ["--n", "256", "--batch", "32", "--steps", "16"] if cpu else ["--n", "1024", "--batch", "256", "--steps", "40"]
    parts.append(Part("loader", [*py, "-m", "perf.bench_loader", *loader, "--loaders", "memmap", "--csv",
                                 str(out / "bench_loader.csv")], 60 if cpu else 15))
    return parts


def call_env(cache: Path) -> dict:
    """One Inductor / Triton cache for every part (later parts reuse earlier compiles); perf importable
    in parts started with -P (its folder last on the path: an installed or linked irepa stays first)."""
    import perf
    here = str(Path(perf.__file__).parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(cache),
               PYTHONPATH=path if here in path.split(os.pathsep) else os.pathsep.join(filter(None, [path, here])),
               TRITON_CACHE_DIR=str(cache / "triton"), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    env.pop("TRITON_INTERPRET", None)  # only the CPU kernel tests and benchmarks ask for it themselves
    return env


def rewrite_summary(out: Path) -> None:
    from perf.suite_report import summary
    try:
        summary(out)
    except Exception as e:  # the report must never cost the call its next part
        print(f"[call] summary.md not rewritten: {type(e).__name__}: {e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--total_s", type=float, default=None, help=f"the call's budget (default {GPU_TOTAL_S} on CUDA, "
                                                               f"{CPU_TOTAL_S} on CPU)")
    p.add_argument("--only", default="", help="comma list of part names to run (the rest are left out)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for f in OUT_FILES[1:]:  # one call per OUT: no rows of an earlier one mix in (call.log: the suite's report)
        (a.out / f).unlink(missing_ok=True)
    py = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else [])]
    total = a.total_s or (CPU_TOTAL_S if a.device == "cpu" else GPU_TOTAL_S)
    sha = commit()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="irepa-call-") as scratch:
        parts = plan(a.out, a.device, py, Path(scratch))
        if a.only:
            parts = [x for x in parts if x.name in a.only.split(",")]
        print(f"[call] {len(parts)} parts, {total:.0f} s in all, commit {sha}, device {a.device}", flush=True)
        env = {**call_env(Path(scratch) / "inductor"), "IREPA_CALL_ID": f"{utc_now()} {sha}"}  # rows of one call
        done = run_parts(parts, a.out, total, a.device, sha, env, after_each=rewrite_summary)
    print((a.out / "summary.md").read_text() if (a.out / "summary.md").is_file() else "", flush=True)
    print(f"[call] {time.monotonic() - t0:.0f} s; " + ", ".join(f"{pt.name} {o.status} {o.seconds:.0f}s"
                                                               for pt, o in done), flush=True)
    return 0 if all(o.status == "ok" for _, o in done) else 1


if __name__ == "__main__":
    sys.exit(main())
