"""Generate N samples (default 50,000) as an ADM .npz batch plus a PNG grid.

  torchrun --nproc_per_node=8 launch/sample.py runs/sit-xl2-irepa --out samples/xl-400k \\
      --num_samples 50000 --vae /models/sd-vae-ft-mse --cfg 1.8 --interval 0,0.7
  python launch/sample.py runs/digits-sit-irepa --out samples/digits --num_samples 1000 --method heun --steps 40
  torchrun --nproc_per_node=8 launch/sample.py SiT-XL-2-iREPA.pt --model_name SiT-XL/2 \\
      --vae /models/sd-vae-ft-mse --latent_stats sdvae-ft-mse-f8d4-latents-stats.pt --out samples/ref

MODEL is a run folder (newest checkpoint), a checkpoint folder (checkpoints/step-N), or a
released reference .pt state dict (read with weights_only=True). Shards already in
OUT/shards are skipped, so re-running the same command resumes. The result is
OUT/samples.npz (arr_0 uint8 [N, H, W, 3], arr_1 labels) and OUT/grid.png.

--num_samples (alias --n, which torchrun cannot pass on: it takes it for one of its own
options) sets N.

--interval LOW,HIGH is in SiT time (t = 1 is noise) for every model, JiT included: the
JiT release's interval (0.1, 1.0) in its own time (t = 1 is data) is 0,0.9 here
(irepa.sampling.jit_interval converts). Each model kind is guided as its release guides
(irepa.sampling.guidance_schedule): SiT models on the closed interval, decided at each
step's start time (Heun's corrector included); JiT models on the JiT release's interval,
open at both ends in JiT time (closed at t = 1 when HIGH = 1), decided at every call.

Decoding: digits runs use the pixel codec, JiT runs plain pixels; latent models need a VAE
(--vae, a local diffusers AutoencoderKL folder; default: the folder the run's data manifest
names, when it is on this machine) and the latent scaling the model was trained with:
--latent_stats FILE (per-channel statistics: the releases' sdvae-ft-mse-f8d4-latents-stats.pt,
read as plain tensors with weights_only=True, or .npz/.json with latents_scale/latents_bias or
mean/std; default for run folders: the run's data manifest, DATA/manifest.json) or
--latent_scale 0.18215 (one factor, as SD and the REPA release).

Released .pt checkpoints (`release_latent_scaling` decides): the iREPA release's code scales
latents per channel, so a checkpoint it trained (projector keys projectors.K.projection_layer.*,
a conv head, or its training args) is refused without --latent_stats
sdvae-ft-mse-f8d4-latents-stats.pt; a REPA-release checkpoint (projectors.K.{0,2,4}, or REPA's
args) decodes with 0.18215 unless told otherwise; a checkpoint that shows neither (no
projectors, no args, e.g. the SiT release) needs one of the two flags.

Model calls run in fp32 unless --precision bf16; the time grid and the state are float64
(irepa.sampling).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from irepa.metrics import generate as gen
from irepa.sampling import model_velocity_fn, sample, velocity_from_x_prediction


def _interval(v) -> tuple[float, float]:
    parts = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, (tuple, list)) else [v]
    try:
        lo, hi = (float(x) for x in parts)
    except ValueError:
        raise ValueError(f"--interval must be two SiT times LOW,HIGH (e.g. 0,0.7), got {v!r}") from None
    return lo, hi


def _manifest(data: str | None) -> tuple[Path | None, dict | None]:
    """The run's data manifest (path, content), or (path or None, None) when it is not here."""
    if not data:
        return None, None
    path = Path(data) / "manifest.json"
    if not path.is_file():
        return path, None
    import json
    return path, json.loads(path.read_text())


def load_model(path: str, which: str, model_name: str | None, device):
    """-> (model, info dict with kind/objective/num_classes/data source)."""
    p = Path(path)
    if p.is_file():
        from irepa.models.convert import load_reference_checkpoint
        model, _, info = load_reference_checkpoint(p, which=which, name=model_name, head=False)
        return model.to(device), {"objective": "sit", "num_classes": info["num_classes"], "data": None,
                                  "source": str(p.resolve()), "release": info["release"]}
    from irepa.train.checkpoint import load_for_inference
    model, cfg = load_for_inference(p, which=which, device=device)
    return model, {"objective": cfg.train.objective, "num_classes": cfg.model.num_classes,
                   "data": cfg.data.source, "source": str(p.resolve())}


def release_latent_scaling(info: dict, channels: int, latent_stats: str | None,
                           latent_scale: float | None) -> tuple[gen.LatentScaling, str]:
    """The latent scaling of a released .pt checkpoint (info["release"], irepa.models.convert):
    the iREPA release's checkpoints need its per-channel statistics file, REPA's default to
    0.18215, and one that shows neither needs the user's choice."""
    src, stats = info["source"], gen.OFFICIAL_LATENT_STATS
    if info["release"] == "irepa":
        if not latent_stats:
            given = f" (--latent_scale {latent_scale} is not how it was trained)" if latent_scale else ""
            raise ValueError(f"{src} was trained by the iREPA release's code (its projector layout or training "
                             f"args say so), which scales SD-VAE latents per channel: pass --latent_stats "
                             f"{stats} (the release's pretrained_models/ file; .pt, .npz or .json){given}")
        return gen.LatentScaling.from_file(latent_stats), f"stats:{latent_stats}"
    if latent_stats:
        return gen.LatentScaling.from_file(latent_stats), f"stats:{latent_stats}"
    if latent_scale:
        return gen.LatentScaling.factor(latent_scale, channels), f"scale:{latent_scale}"
    if info["release"] == "repa":  # the REPA release scales by the SD factor
        return gen.LatentScaling.factor(0.18215, channels), "scale:0.18215"
    raise ValueError(f"{src} does not show which release trained it (no projectors, no training args), so its "
                     f"latent scaling is unknown: pass --latent_stats {stats} (iREPA release) or --latent_scale "
                     f"0.18215 (SiT and REPA releases)")


def build_decoder(info: dict, channels: int, vae: str | None, latent_stats: str | None,
                  latent_scale: float | None, device):
    if info["data"] == "digits":
        return gen.pixel_codec_decoder, "pixel-codec"
    if info["objective"] == "jit":
        return gen.pixels_decoder, "pixels"
    manifest_path, manifest = _manifest(info["data"])
    if vae is None:
        recorded = ((manifest or {}).get("latent") or {}).get("vae")
        if recorded and Path(recorded).is_dir():  # the VAE the data was prepared (and the grid decoded) with
            vae = recorded
        else:
            where = f" ({manifest_path} names {recorded}, which is not on this machine)" if recorded else ""
            raise ValueError(f"a latent model needs --vae DIR (local diffusers AutoencoderKL folder, e.g. "
                             f"sd-vae-ft-mse){where}")
    if "release" in info:  # a released .pt checkpoint
        scaling, how = release_latent_scaling(info, channels, latent_stats, latent_scale)
    elif latent_stats:
        scaling, how = gen.LatentScaling.from_file(latent_stats), f"stats:{latent_stats}"
    elif latent_scale:
        scaling, how = gen.LatentScaling.factor(latent_scale, channels), f"scale:{latent_scale}"
    elif manifest is not None:
        scaling, how = gen.LatentScaling.from_file(manifest_path), f"stats:{manifest_path}"
    else:
        raise ValueError(f"latent scaling unknown: the run's data manifest {manifest_path} is not on this machine; "
                         f"pass --latent_stats FILE (e.g. a copy of that manifest.json) or --latent_scale 0.18215")
    return gen.VAEDecoder(vae, scaling, device), f"vae:{Path(vae).resolve()}:{how}"


def main(model: str, out: str, num_samples: int | None = None, batch: int = 64, method: str = "sde", steps: int = 250,
         cfg: float = 1.0, interval=(0.0, 1.0), labels: str = "random", seed: int = 0, which: str = "ema",
         shard_size: int = 1000, model_name: str | None = None, vae: str | None = None,
         latent_stats: str | None = None, latent_scale: float | None = None, precision: str = "fp32",
         noise_scale: float = 1.0, grid: int = 64, keep_shards: bool = False, device: str = "auto",
         n: int | None = None):
    """MODEL: run folder, checkpoint folder or reference .pt. OUT: output folder (resumable).

    --num_samples N (default 50,000; --n is an alias, but torchrun refuses --n as ambiguous).
    """
    if num_samples is not None and n is not None and num_samples != n:
        raise ValueError(f"--num_samples {num_samples} and --n {n} disagree; pass one of them")
    n = num_samples if num_samples is not None else n if n is not None else 50_000
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    log = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)

    net, info = load_model(model, which, model_name, dev)
    channels = net.in_channels
    decode, decoder_desc = build_decoder(info, channels, vae, latent_stats, latent_scale, dev)
    interval_rule = "jit" if info["objective"] == "jit" else "sit"  # where CFG is on, as each release decides
    # the rule is part of the plan whenever it acts, so shards sampled under another rule are never merged
    guidance = {"cfg_rule": interval_rule} if cfg != 1.0 else {}
    plan = gen.SamplePlan(num_samples=n, num_classes=info["num_classes"], labels=labels, seed=seed,
                          shard_size=shard_size, batch_size=batch, method=method, steps=steps, cfg=cfg,
                          interval=_interval(interval), latent_shape=(channels, net.input_size, net.input_size),
                          extra={"model": info["source"], "which": which, "decoder": decoder_desc,
                                 "noise_scale": noise_scale, **guidance})
    out_dir = Path(out)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        gen.check_plan(out_dir, plan)
    if world > 1:
        dist.barrier()

    use_bf16 = precision == "bf16"  # fp32 (the default) is what published FIDs were sampled with
    vfn = velocity_from_x_prediction(net) if info["objective"] == "jit" else model_velocity_fn(net, channels)

    def velocity_fn(x, t, y):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            return vfn(x, t, y).float()

    def sample_batch(noise, y, g):
        x = sample(velocity_fn, noise * noise_scale, y, method, steps, cfg, plan.interval,
                   null_class=getattr(net, "null_class", info["num_classes"]), generator=g,
                   interval_rule=interval_rule)
        return decode(x)

    final = out_dir / "samples.npz"
    if final.is_file():
        log(f"{final} already exists; nothing to do")
    else:
        gen.generate_shards(plan, out_dir, sample_batch, rank, world, dev,
                            log=lambda m: print(m, flush=True))
        if world > 1:
            dist.barrier()
        if rank == 0:
            gen.merge_shards(plan, out_dir, grid=grid, keep_shards=keep_shards)
            log(f"wrote {final} and {out_dir / 'grid.png'}")
        if world > 1:
            dist.barrier()
    if world > 1:
        dist.destroy_process_group()
    return str(final)


if __name__ == "__main__":
    from irepa.cli import run
    run(main, "sample.py")
