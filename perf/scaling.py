"""Multi-node scaling of a training step, on paper: communication bytes, time and overlap.

    python -m perf.scaling                                  # SiT-XL/2 + iREPA head, 8 / 32 / 128 H100s
    python -m perf.scaling --gpus 8,16,64 --per_gpu 32      # weak scaling at 32 images per GPU
    python -m perf.scaling --write                          # also record it in perf/RESULTS.md

For each GPU count and parallel mode (DDP: fp32 gradient all-reduce; FSDP2 as the trainer
shards, MixedPrecisionPolicy(param bf16, reduce fp32), parameters re-gathered for the
backward; `--reduce bf16` for bf16 reductions), the bytes each GPU moves per step, the time
of each collective on a two-level network and how much of it the compute hides:

- the network: 8 GPUs per node on NVLink (900 GB/s per GPU both ways: 450 GB/s each way),
  nodes on InfiniBand at 400 Gb/s per GPU (one NIC per GPU: 50 GB/s each way). A collective
  over N = 8n GPUs is NCCL's hierarchical form: its intra-node part moves (8-1)/8 of the
  data over NVLink, its inter-node part 1/8 of it per GPU over that GPU's NIC, with the
  ring factor (n-1)/n; the two parts are added (no pipelining between them: conservative).
- the compute: the roofline's predicted time per image of the step (perf/results/roofline.csv,
  the configuration named by --config on --device) times the images per GPU, one third
  forward and two thirds backward; `--mfu` replaces it with FLOPs / (peak x MFU).
- overlap: DDP all-reduces buckets during the backward, so only what outlasts the backward
  is exposed (plus the last 25 MB bucket); FSDP2 prefetches each block's all-gather during
  the previous block's compute (forward: the gathers against the forward; backward: the
  re-gathers and the reduce-scatters against the backward).

Scaling efficiency = throughput per GPU at N against the same per-GPU work with no
communication. A prediction: the measured figures replace it when several GPUs are lent.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

from perf.common import read_csv, rewrite_block

HERE = Path(__file__).resolve().parent
GPUS_PER_NODE = 8
NVLINK_GBS = 450.0   # per GPU, each way (900 GB/s both ways, H100 SXM NVLink 4)
IB_GBS = 50.0        # per GPU, each way (400 Gb/s NIC per GPU)
DDP_BUCKET_BYTES = 25 * 2**20


def collective_seconds(nbytes: float, gpus: int, kind: str, nvlink_gbs: float = NVLINK_GBS,
                       ib_gbs: float = IB_GBS) -> float:
    """Time of one collective over `gpus` GPUs moving a buffer of `nbytes` (the full, unsharded
    size). kind: all_reduce (2 passes over the data), all_gather / reduce_scatter (1 pass)."""
    passes = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}[kind]
    if gpus <= 1:
        return 0.0
    local = min(gpus, GPUS_PER_NODE)
    nodes = max(1, gpus // GPUS_PER_NODE)
    intra = passes * (local - 1) / local * nbytes / (nvlink_gbs * 1e9)
    inter = passes * (nodes - 1) / nodes * (nbytes / local) / (ib_gbs * 1e9) if nodes > 1 else 0.0
    return intra + inter


@dataclass
class Case:
    gpus: int
    mode: str
    per_gpu: int
    compute_s: float
    comm_bytes: float   # what one GPU sends per step
    comm_s: float
    exposed_s: float

    @property
    def efficiency(self) -> float:
        return self.compute_s / (self.compute_s + self.exposed_s)


def step_case(params: int, gpus: int, mode: str, per_gpu: int, s_per_image: float, reduce_bytes: int = 4) -> Case:
    """One step of `per_gpu` images per GPU on `gpus` GPUs: communication and what stays exposed."""
    compute = per_gpu * s_per_image
    fwd, bwd = compute / 3, 2 * compute / 3
    grads = params * reduce_bytes
    share = (gpus - 1) / gpus if gpus > 1 else 0.0
    if mode == "ddp":
        comm = collective_seconds(grads, gpus, "all_reduce")
        sent = 2 * share * grads
        last_bucket = collective_seconds(min(DDP_BUCKET_BYTES, grads), gpus, "all_reduce")
        exposed = max(comm - bwd, 0.0) + (last_bucket if gpus > 1 else 0.0)
    elif mode == "fsdp":
        gather = collective_seconds(params * 2, gpus, "all_gather")  # bf16 parameters
        scatter = collective_seconds(grads, gpus, "reduce_scatter")
        comm = 2 * gather + scatter
        sent = share * (2 * params * 2 + grads)
        exposed = max(gather - fwd, 0.0) + max(gather + scatter - bwd, 0.0)
    else:
        raise ValueError(f"mode must be ddp or fsdp, got {mode!r}")
    return Case(gpus, mode, per_gpu, compute, sent, comm, exposed)


def roofline_seconds_per_image(model: str, device: str, config: str, path: Path = HERE / "results" / "roofline.csv"):
    """The roofline's predicted step time per image (newest row for model/device/config), or None."""
    best = None
    for r in read_csv(path):
        if r["model"] == model and r["device_model"] == device and r["config"] == config:
            best = float(r["pred_ms"]) / 1e3 / int(r["batch"])
    return best


def model_params(name: str, projector: str, encoder_dim: int) -> int:
    """Trained parameters of the diffusion model and its alignment head (built on the meta device)."""
    import torch

    from irepa.align import AlignmentHead
    from irepa.models import build

    with torch.device("meta"):
        model = build(name, input_size=32, num_classes=1000)
        head = AlignmentHead(model.dim, [encoder_dim], projector, 0.6, 2048)
    return sum(p.numel() for m in (model, head) for p in m.parameters() if p.requires_grad)


def table(cases: list[Case], params: int, s_per_image: float, source: str) -> str:
    lines = [f"{params / 1e6:.1f}M trained parameters; compute {1e3 * s_per_image:.3f} ms per image ({source}).",
             "", "| GPUs | mode | images/GPU | compute ms | sent GB/GPU | comm ms | exposed ms | efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c.gpus} | {c.mode} | {c.per_gpu} | {1e3 * c.compute_s:.1f} | {c.comm_bytes / 1e9:.2f} | "
                     f"{1e3 * c.comm_s:.1f} | {1e3 * c.exposed_s:.1f} | {100 * c.efficiency:.0f}% |")
    return "\n".join(lines)


def write_results(md: Path, text: str, command: str) -> None:
    body = f"Prediction written by `{command}` on {datetime.date.today()} (no multi-GPU measurement yet).\n\n{text}"
    rewrite_block(md, "scaling", body, "Multi-node scaling, predicted (perf/scaling.py)")


def seconds_per_image(a) -> tuple[float, str]:
    s_img = None if a.mfu else roofline_seconds_per_image(a.model, a.device, a.config)
    if s_img is not None:
        return s_img, f"roofline {a.device} {a.config}"
    import torch

    from irepa.align import AlignmentHead
    from irepa.models import build
    from irepa.train.flops import train_flops_per_image
    mfu = a.mfu or 0.5
    with torch.device("meta"):
        m = build(a.model, input_size=32, num_classes=1000)
        flops = train_flops_per_image(m, AlignmentHead(m.dim, [a.encoder_dim], a.projector, 0.6, 2048))
    return flops / (989e12 * mfu), f"{flops / 1e9:.0f} GFLOP per image at {100 * mfu:.0f}% of 989 TFLOP/s"


def scenario(a, params: int, s_img: float, source: str, per_gpu: int | None, reduce: str) -> str:
    cases = []
    for n in (int(g) for g in a.gpus.split(",")):
        images = per_gpu or a.global_batch // n
        if images < 1 or (per_gpu is None and a.global_batch % n):
            sys.exit(f"scaling.py: --global_batch {a.global_batch} does not split over {n} GPUs")
        for mode in a.modes.split(","):
            cases.append(step_case(params, n, mode, images, s_img, 2 if reduce == "bf16" else 4))
    return table(cases, params, s_img, source + f", {reduce} gradient reduction")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--projector", default="conv", choices=["conv", "mlp"])
    p.add_argument("--encoder_dim", type=int, default=768)
    p.add_argument("--gpus", default="8,32,128")
    p.add_argument("--global_batch", type=int, default=256, help="strong scaling: fixed global batch")
    p.add_argument("--per_gpu", type=int, default=None, help="weak scaling: fixed images per GPU instead")
    p.add_argument("--modes", default="ddp,fsdp")
    p.add_argument("--reduce", default="fp32", choices=["fp32", "bf16"], help="gradient reduction dtype")
    p.add_argument("--device", default="h100-sxm", help="roofline device row (h100-sxm, h200)")
    p.add_argument("--config", default="compile+fusedloss", help="roofline configuration row")
    p.add_argument("--mfu", type=float, default=None, help="compute from FLOPs at this MFU instead of the roofline")
    p.add_argument("--write", action="store_true",
                   help="record the standard report in perf/RESULTS.md: the global batch, fp32 and bf16 "
                        "reductions, and 32 images per GPU")
    a = p.parse_args(argv)
    params = model_params(a.model, a.projector, a.encoder_dim)
    s_img, source = seconds_per_image(a)
    if not a.write:
        text = scenario(a, params, s_img, source, a.per_gpu, a.reduce)
        print(text)
        return text
    parts = [(f"Strong scaling, global batch {a.global_batch}, fp32 reduction (the trainer's FSDP2 policy):",
              scenario(a, params, s_img, source, None, "fp32")),
             (f"Strong scaling, global batch {a.global_batch}, bf16 reduction:",
              scenario(a, params, s_img, source, None, "bf16")),
             ("Weak scaling, 32 images per GPU (global batch 32 x GPUs), fp32 reduction:",
              scenario(a, params, s_img, source, 32, "fp32"))]
    text = "\n\n".join(f"{title}\n\n{body}" for title, body in parts)
    print(text)
    write_results(HERE / "RESULTS.md", text, "python -m perf.scaling " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:]))
    return text


if __name__ == "__main__":
    main()
