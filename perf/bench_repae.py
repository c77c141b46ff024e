"""Cost of a REPA-E end-to-end step against a latent-only step of the same SiT, side by side.

    python -m perf.bench_repae --device cpu --preset digits        # the digits demo's shapes (CPU)
    python -m perf.bench_repae --preset xl                         # SiT-XL/2 + SD-VAE f8d4 at 256 px (GPU)

end-to-end   irepa.recipes.repae.RepaEStep in the run the trainer builds (irepa.train.assemble.build_run):
             VAE forward, VAE update through the
             frozen SiT's first blocks (+ L1, LPIPS, KL, GAN), discriminator update, SiT
             update, EMA; three AdamW optimizers, clipping each
latent-only  the step train_ldm_only / our prepare -> train path runs with an exported VAE:
             z = mean + std * eps from stored posteriors, fixed (eval) latent BatchNorm, SiT
             update (denoise + 0.5 * align), clip, AdamW, EMA
Same SiT, projector, batch, encoder features (random stand-ins: the encoder cost is the
same in both and not part of either step here), precision and device. Weights are random
(the cost does not depend on them). Timing: per-step wall time after warm-up with a device
sync per step, the two kinds interleaved step by step; median and 20/80 % quantiles; FLOPs of
one step of each kind counted by torch.utils.flop_counter (matmuls and convolutions); one CSV row per step kind in
perf/results/bench_repae.csv (device, commit, date, command).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from irepa import recipes
from irepa.train.assemble import build_run
from irepa.train.build import DataBundle
from perf.common import ROOT, commit, device_name, quantile, write_rows
from perf.common.provenance import utc_now

# bench preset -> (recipe preset, overrides): random weights everywhere (no files needed); LPIPS at the
# recipe's width (the digits demo's tiny one, else VGG16's at random init)
PRESETS = {
    "digits": ("digits-repae-irepa", {}),  # 32 px, batch 32
    "b": ("repae-sit-b2-irepa", {"repae.lpips": "vgg-random"}),
    "xl": ("repae-sit-xl2-irepa", {"repae.lpips": "vgg-random"}),
}


def build(preset: str, device, batch: int, precision: str):
    """The REPA-E run the trainer would build (irepa.train.assemble.build_run), with random weights and
    random stand-ins for the encoder features: -> (run, a batch of its data)."""
    name, over = PRESETS[preset]
    cfg = recipes.resolve(name, {**over, "repae.vae_weights": "random", "repae.disc_weights": "random",
                                 "repae.latent_stats": "estimate", "repae.recon_every": 0, "train.batch_size": batch,
                                 "train.precision": precision, "train.parallel": "none", "model.num_classes": 1000})
    enc_dim = 128 if preset == "digits" else 768
    run = build_run(cfg, device=device, data=DataBundle(loader=None, encoder_dims=[enc_dim], manifest={}))
    g = torch.Generator(device=device).manual_seed(0)
    res, T = cfg.data.resolution, (cfg.data.resolution // 16) ** 2
    data = {"x": torch.rand(batch, 3, res, res, generator=g, device=device) * 2 - 1,
            "y": torch.randint(0, 1000, (batch,), generator=g, device=device),
            "feats": [torch.randn(batch, T, enc_dim, generator=g, device=device)]}
    return run, data


def _timed(fn, steps: int, warmup: int, device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=None, help="default: 32 digits, 2 on CPU otherwise, 32 on GPU")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None, help="bf16 | fp32 (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--csv", default=str(ROOT / "perf/results/bench_repae.csv"))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    batch = a.batch or (32 if a.preset == "digits" or device.type == "cuda" else 2)
    prec = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run, data = build(a.preset, device, batch, prec)
    r, st, res = run.recipe, run.default_step, run.cfg.data.resolution
    e2e_fn = lambda i: run.step_fn(data, i)  # noqa: E731

    # latent-only: stored posteriors of the (fixed) VAE, the latent BatchNorm held in eval, SiT update + EMA
    part = run.model
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        mean, logvar, _, _ = run.parts["vae"].module(data["x"], g)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))

    def latent_step(i):
        part.module.train()
        part.module.model.latent_norm.eval()
        gi = st.generator(i)
        z = mean + std * torch.randn(mean.shape, generator=gi, device=device)
        t = torch.rand(batch, generator=gi, device=device)
        noise = torch.randn(z.shape, generator=gi, device=device)
        with st.autocast():
            d, al, _ = part.train_module(data, {"x": z, "t": t, "noise": noise}, data["feats"])
        st.backward(d + st.align_weight * al)
        st.optimizer_step(part, i)

    # FLOPs of one step of each kind (torch's FlopCounterMode: matmuls and convolutions, forward and backward)
    from torch.utils.flop_counter import FlopCounterMode
    flops = {}
    for kind, fn in (("latent-only", latent_step), ("end-to-end", e2e_fn)):
        with FlopCounterMode(display=False) as fc:
            fn(10_000)  # an index past step 0 (no statistics init), outside the timed ones
        flops[kind] = fc.get_total_flops()
    # interleaved (one of each per round), so a change of machine load hits both kinds alike
    lat, e2e = [], []
    for i in range(a.warmup + a.steps):
        lat += _timed(latent_step, 1, 0, device) if i >= a.warmup else (_timed(latent_step, 0, 1, device) and [])
        e2e += _timed(e2e_fn, 1, 0, device) if i >= a.warmup else (_timed(e2e_fn, 0, 1, device) and [])
    rows = []
    name = r.cfg.model.name
    sha, dev_name = commit(), device_name(device)
    cmd = "python -m perf.bench_repae " + " ".join(shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    base = None
    for kind, ts in (("latent-only", lat), ("end-to-end", e2e)):
        med = quantile(ts, 0.5)
        base = base or med
        rows.append({"date": utc_now(), "commit": sha, "device": dev_name, "torch": torch.__version__, "preset": a.preset,
                     "model": name, "vae": r.options.vae, "image": res, "step": kind,
                     "batch": batch, "precision": prec, "step_ms_median": round(1e3 * med, 2),
                     "step_ms_p20": round(1e3 * quantile(ts, 0.2), 2), "step_ms_p80": round(1e3 * quantile(ts, 0.8), 2),
                     "img_per_s": round(batch / med, 2), "cost_vs_latent_only": round(med / base, 2),
                     "gflop_per_step": round(flops[kind] / 1e9, 3),
                     "flop_ratio": round(flops[kind] / flops["latent-only"], 2),
                     "command": cmd})
    for r in rows:
        print(f"{r['preset']:>10} {r['step']:>11}: {r['step_ms_median']:9.1f} ms/step "
              f"(p20 {r['step_ms_p20']:.1f}, p80 {r['step_ms_p80']:.1f}), {r['img_per_s']:.1f} img/s, "
              f"x{r['cost_vs_latent_only']:.2f} the latent-only step; {r['gflop_per_step']} GFLOP "
              f"(x{r['flop_ratio']})")
    write_rows(Path(a.csv), rows, quiet=True)
    return rows


if __name__ == "__main__":
    main()
