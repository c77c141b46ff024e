"""Cost of a REPA-E end-to-end step against a latent-only step of the same SiT, side by side.

    python perf/bench_repae.py --device cpu --preset digits        # the digits demo's shapes (CPU)
    python perf/bench_repae.py --preset xl                         # SiT-XL/2 + SD-VAE f8d4 at 256 px (GPU)

end-to-end   irepa.autoencoder.end_to_end.EndToEndStep: VAE forward, VAE update through the
             frozen SiT's first blocks (+ L1, LPIPS, KL, GAN), discriminator update, SiT
             update, EMA; three AdamW optimizers, clipping each
latent-only  the step train_ldm_only / our prepare -> train path runs with an exported VAE:
             z = mean + std * eps from stored posteriors, fixed (eval) latent BatchNorm, SiT
             update (denoise + 0.5 * align), clip, AdamW, EMA
Same SiT, projector, batch, encoder features (random stand-ins: the encoder cost is the
same in both and not part of either step here), precision and device. Weights are random
(the cost does not depend on them). Timing: per-step wall time after warm-up with a device
sync per step, the two kinds interleaved step by step; median and 20/80 % quantiles; one CSV row per step kind in
perf/results/bench_repae.csv (device, commit, date, command).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irepa import models  # noqa: E402
from irepa.align import AlignmentHead  # noqa: E402
from irepa.autoencoder.discriminator import PatchDiscriminator  # noqa: E402
from irepa.autoencoder.end_to_end import EndToEndConfig, EndToEndStep, RepaESiT, VAEAutoencode  # noqa: E402
from irepa.autoencoder.lpips import LPIPS  # noqa: E402
from irepa.autoencoder.sdvae import build_sdvae  # noqa: E402
from irepa.train.ema import EMA  # noqa: E402
from irepa.train.parallelize import clip_grad_norm_  # noqa: E402

# preset -> (SiT, image side, VAE config, discriminator ndf, LPIPS width divisor, encoder dim, align depth)
PRESETS = {
    "digits": ("SiT-T/2", 32, "tiny", 8, 16, 128, 2),
    "b-tiny-vae": ("SiT-B/2", 128, "tiny", 8, 16, 768, 4),
    "b": ("SiT-B/2", 256, "f8d4", 64, 1, 768, 4),
    "xl": ("SiT-XL/2", 256, "f8d4", 64, 1, 768, 8),
}


def build(preset: str, device, batch: int):
    name, res, vae_cfg, ndf, lp_div, enc_dim, depth = PRESETS[preset]
    torch.manual_seed(0)
    sit = models.build(name, input_size=res // 8, in_channels=4, num_classes=1000, align_depth=depth,
                       latent_norm=True, attn_backend="sdpa")
    net = RepaESiT(sit, AlignmentHead(sit.dim, [enc_dim], "conv", 0.6)).to(device)
    vae = VAEAutoencode(build_sdvae(vae_cfg)).to(device)
    disc, lp = PatchDiscriminator(ndf=ndf).to(device), LPIPS(width_div=lp_div).to(device)
    ema = EMA(sit, [0.9999], buffers=True)
    adam = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=device.type == "cuda" or None)  # noqa: E731
    return net, vae, disc, lp, ema, adam, res


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


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=None, help="default: 32 digits, 4 on CPU otherwise, 32 on GPU")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None, help="bf16 | fp32 (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--csv", default=str(ROOT / "perf/results/bench_repae.csv"))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    batch = a.batch or (32 if a.preset == "digits" or device.type == "cuda" else 4)
    prec = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp = torch.bfloat16 if prec == "bf16" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    net, vae, disc, lp, ema, adam, res = build(a.preset, device, batch)
    step = EndToEndStep(vae_train=vae, vae=vae, disc_train=disc, disc=disc, lpips=lp, sit_train=net, sit=net,
                        opt_vae=adam(vae.parameters()), opt_disc=adam(disc.parameters()),
                        opt_sit=adam(net.parameters()), ema=ema, cfg=EndToEndConfig(), amp_dtype=amp)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, 3, res, res, generator=g, device=device) * 2 - 1
    y = torch.randint(0, 1000, (batch,), generator=g, device=device)
    T = (res // 16) ** 2
    feats = [torch.randn(batch, T, net.head.projectors[0].conv.out_channels, generator=g, device=device)]
    e2e_fn = lambda i: step.step(x, y, feats, None, g, i)  # noqa: E731

    # latent-only: stored posteriors of the (fixed) VAE, BatchNorm held in eval
    with torch.no_grad():
        mean, logvar, _, _ = vae(x, g)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    opt = adam(net.parameters())
    params = [p for p in net.parameters() if p.requires_grad]
    ctx = (lambda: torch.autocast(device.type, amp)) if amp else nullcontext

    def latent_step(i):
        net.train()
        net.model.latent_norm.eval()
        z = mean + std * torch.randn(mean.shape, generator=g, device=device)
        t = torch.rand(batch, generator=g, device=device)
        noise = torch.randn(z.shape, generator=g, device=device)
        with ctx():
            d, al = net(z, y, feats, t, noise, None)
        (d + 0.5 * al).backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net.model)

    # interleaved (one of each per round), so a change of machine load hits both kinds alike
    lat, e2e = [], []
    for i in range(a.warmup + a.steps):
        lat += _timed(latent_step, 1, 0, device) if i >= a.warmup else (_timed(latent_step, 0, 1, device) and [])
        e2e += _timed(e2e_fn, 1, 0, device) if i >= a.warmup else (_timed(e2e_fn, 0, 1, device) and [])
    rows = []
    commit = _commit()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({_cpu()})"
    cmd = "python perf/bench_repae.py " + " ".join(shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    base = None
    for kind, ts in (("latent-only", lat), ("end-to-end", e2e)):
        med = _q(ts, 0.5)
        base = base or med
        rows.append({"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "commit": commit, "device": dev_name, "torch": torch.__version__, "preset": a.preset,
                     "model": PRESETS[a.preset][0], "vae": PRESETS[a.preset][2], "image": res, "step": kind,
                     "batch": batch, "precision": prec, "step_ms_median": round(1e3 * med, 2),
                     "step_ms_p20": round(1e3 * _q(ts, 0.2), 2), "step_ms_p80": round(1e3 * _q(ts, 0.8), 2),
                     "img_per_s": round(batch / med, 2), "cost_vs_latent_only": round(med / base, 2),
                     "command": cmd})
    for r in rows:
        print(f"{r['preset']:>10} {r['step']:>11}: {r['step_ms_median']:9.1f} ms/step "
              f"(p20 {r['step_ms_p20']:.1f}, p80 {r['step_ms_p80']:.1f}), {r['img_per_s']:.1f} img/s, "
              f"x{r['cost_vs_latent_only']:.2f} the latent-only step")
    path = Path(a.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return rows


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def _cpu() -> str:
    import os
    import platform
    return f"{platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
