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
(irepa.sampling.jit_interval converts). Each recipe guides as its release does (its
interval_rule, irepa.sampling.guidance_schedule): SiT models on the closed interval, decided
at each step's start time (Heun's corrector included); JiT models on the JiT release's
interval, open at both ends in JiT time (closed at t = 1 when HIGH = 1), decided at every call.

Sampling is the run's recipe's (irepa.recipes: the SiT/JiT samplers of irepa.sampling).
Decoding (irepa.codec): pixel-space recipes (JiT) give pixels; digits runs use the pixel
codec with the statistics of their prepared data when it is on this machine; latent models need a VAE
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

--quantize auto (default) turns decoded images into uint8 as the recipe's release writes its
FID samples (Recipe.sample_quantize): SiT, REPA-E truncate (clamp(255 x).to(uint8), iREPA
ldm/generate.py), JiT and MeanFlow round; --quantize round|truncate forces one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from irepa import codec, recipes
from irepa.dist import barrier, setup, teardown
from irepa import generate as gen


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
    return path, json.loads(path.read_text())


def load_model(path: str, which: str, model_name: str | None, device):
    """-> (model, its recipe, info dict with num_classes / data folder / builtin / source [/ release])."""
    p = Path(path)
    if p.is_file():  # a released SiT + REPA/iREPA state dict: the SiT recipe
        from irepa.models.convert import load_reference_checkpoint
        model, _, info = load_reference_checkpoint(p, which=which, name=model_name, head=False)
        return model.to(device), recipes.get("sit")(), {"num_classes": info["num_classes"], "data": None,
                                                        "builtin": None, "source": str(p.resolve()),
                                                        "release": info["release"]}
    from irepa.train.build import dataset_dir
    from irepa.train.export import load_for_inference
    from irepa.train.export import find_checkpoint
    model, cfg = load_for_inference(p, which=which, device=device)
    recipe = recipes.for_config(cfg)
    recipe.checkpoint = find_checkpoint(p)  # a decoder that is a trained part (REPA-E's VAE) is read from it
    builtin = cfg.data.source if cfg.data.source == "digits" else None
    return model, recipe, {"num_classes": cfg.model.num_classes, "data": str(dataset_dir(cfg, recipe.data_kind)),
                           "builtin": builtin, "source": str(p.resolve())}


def release_latent_scaling(info: dict, channels: int, latent_stats: str | None,
                           latent_scale: float | None) -> tuple[codec.LatentScaling, str]:
    """The latent scaling of a released .pt checkpoint (info["release"], irepa.models.convert):
    the iREPA release's checkpoints need its per-channel statistics file, REPA's default to
    0.18215, and one that shows neither needs the user's choice."""
    src, stats = info["source"], codec.OFFICIAL_LATENT_STATS
    if info["release"] == "irepa":
        if not latent_stats:
            given = f" (--latent_scale {latent_scale} is not how it was trained)" if latent_scale else ""
            raise ValueError(f"{src} was trained by the iREPA release's code (its projector layout or training "
                             f"args say so), which scales SD-VAE latents per channel: pass --latent_stats "
                             f"{stats} (the release's pretrained_models/ file; .pt, .npz or .json){given}")
        return codec.LatentScaling.from_file(latent_stats), f"stats:{latent_stats}"
    if latent_stats:
        return codec.LatentScaling.from_file(latent_stats), f"stats:{latent_stats}"
    if latent_scale:
        return codec.LatentScaling.factor(latent_scale, channels), f"scale:{latent_scale}"
    if info["release"] == "repa":  # the REPA release scales by the SD factor
        return codec.LatentScaling.factor(0.18215, channels), "scale:0.18215"
    raise ValueError(f"{src} does not show which release trained it (no projectors, no training args), so its "
                     f"latent scaling is unknown: pass --latent_stats {stats} (iREPA release) or --latent_scale "
                     f"0.18215 (SiT and REPA releases)")


def build_decoder(recipe, info: dict, channels: int, vae: str | None, latent_stats: str | None,
                  latent_scale: float | None, device):
    """-> (model outputs -> images in [0, 1], a description recorded in plan.json)."""
    manifest_path, manifest = _manifest(info["data"])
    if recipe.data_kind == "pixels":  # pixels, or images through the run's own VAE (REPA-E; --vae: an export of it)
        return recipe.decoder(manifest, device, vae=vae), getattr(recipe, "decoder_tag", "pixels")
    recorded = ((manifest or {}).get("latent") or {}).get("vae")
    name = vae or recorded or (codec.DIGITS_CODEC if info.get("builtin") == "digits" else None)
    if name is None or (name != codec.DIGITS_CODEC and not Path(name).is_dir()):
        where = f" ({manifest_path} names {recorded}, which is not on this machine)" if recorded else ""
        raise ValueError(f"a latent model needs --vae DIR (local diffusers AutoencoderKL folder, e.g. "
                         f"sd-vae-ft-mse){where}")
    if "release" in info:  # a released .pt checkpoint
        scaling, how = release_latent_scaling(info, channels, latent_stats, latent_scale)
    elif latent_stats:
        scaling, how = codec.LatentScaling.from_file(latent_stats), f"stats:{latent_stats}"
    elif latent_scale:
        scaling, how = codec.LatentScaling.factor(latent_scale, channels), f"scale:{latent_scale}"
    elif manifest is not None:
        scaling, how = codec.LatentScaling.from_file(manifest_path), f"stats:{manifest_path}"
    elif info.get("builtin") == "digits":  # the built-in set is re-made in seconds; without it, unscaled
        print(f"[sample] {manifest_path} not found: digits decoded without the latent statistics", flush=True)
        scaling, how = None, None
    else:
        raise ValueError(f"latent scaling unknown: the run's data manifest {manifest_path} is not on this machine; "
                         f"pass --latent_stats FILE (e.g. a copy of that manifest.json) or --latent_scale 0.18215")
    decode = recipe.decoder(manifest, device, vae=name, scaling=scaling)
    if name == codec.DIGITS_CODEC:
        return decode, "pixel-codec" + (f":{how}" if how else "")
    return decode, f"vae:{Path(name).resolve()}:{how}"


def main(model: str, out: str, num_samples: int | None = None, batch: int = 64, method: str = "sde", steps: int = 250,
         cfg: float = 1.0, interval=(0.0, 1.0), labels: str = "random", seed: int = 0, which: str = "ema",
         shard_size: int = 1000, model_name: str | None = None, vae: str | None = None,
         latent_stats: str | None = None, latent_scale: float | None = None, precision: str = "fp32",
         noise_scale: float = 1.0, grid: int = 64, keep_shards: bool = False, device: str = "auto",
         n: int | None = None, quantize: str = "auto"):
    """MODEL: run folder, checkpoint folder or reference .pt. OUT: output folder (resumable).

    --num_samples N (default 50,000; --n is an alias, but torchrun refuses --n as ambiguous).
    """
    if num_samples is not None and n is not None and num_samples != n:
        raise ValueError(f"--num_samples {num_samples} and --n {n} disagree; pass one of them")
    n = num_samples if num_samples is not None else n if n is not None else 50_000
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    env = setup(device)
    rank, world, dev = env.rank, env.world, env.device
    log = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)

    net, recipe, info = load_model(model, which, model_name, dev)
    channels = net.in_channels
    decode, decoder_desc = build_decoder(recipe, info, channels, vae, latent_stats, latent_scale, dev)
    # where CFG is on is the recipe's (its release's rule); it is part of the plan whenever it acts,
    # so shards sampled under another rule are never merged
    guidance = {"cfg_rule": recipe.interval_rule} if cfg != 1.0 else {}
    plan = gen.SamplePlan(num_samples=n, num_classes=info["num_classes"], labels=labels, seed=seed,
                          shard_size=shard_size, batch_size=batch, method=method, steps=steps, cfg=cfg,
                          interval=_interval(interval), latent_shape=(channels, net.input_size, net.input_size),
                          quantize=recipe.sample_quantize if quantize == "auto" else quantize,
                          extra={"model": info["source"], "which": which, "decoder": decoder_desc,
                                 "noise_scale": noise_scale, **guidance})
    out_dir = Path(out)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        gen.check_plan(out_dir, plan)
    barrier()

    use_bf16 = precision == "bf16"  # fp32 (the default) is what published FIDs were sampled with
    null_class = getattr(net, "null_class", info["num_classes"])

    def sample_batch(noise, y, g):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):  # model calls only: the
            x = recipe.sample(net, noise * noise_scale, y, method=method, steps=steps, cfg=cfg,  # sampler's
                              interval=plan.interval, null_class=null_class, generator=g)  # state is float64
        return decode(x)

    final = out_dir / "samples.npz"
    if final.is_file():
        log(f"{final} already exists; nothing to do")
    else:
        gen.generate_shards(plan, out_dir, sample_batch, rank, world, dev,
                            log=lambda m: print(m, flush=True))
        barrier()
        if rank == 0:
            gen.merge_shards(plan, out_dir, grid=grid, keep_shards=keep_shards)
            log(f"wrote {final} and {out_dir / 'grid.png'}")
        barrier()
    teardown()
    return str(final)


if __name__ == "__main__":
    from irepa.cli import run
    run(main, "sample.py")
