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
from typing import Literal

import torch

from irepa import codec, filekind, recipes
from irepa.dist import barrier, setup, teardown
from irepa.errors import InputError, InputNotFound
from irepa import generate as gen
from irepa.grid import QUANTIZE
from irepa.sampling import METHODS


def _interval(v) -> tuple[float, float]:
    parts = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, (tuple, list)) else [v]
    try:
        lo, hi = (float(x) for x in parts)
    except ValueError:
        raise InputError(f"--interval must be two SiT times LOW,HIGH (e.g. 0,0.7), got {v!r}") from None
    return lo, hi


def _manifest(data: str | None) -> tuple[Path | None, dict | None]:
    """The run's data manifest (path, content), or (path or None, None) when it is not here."""
    if not data:
        return None, None
    path = Path(data) / "manifest.json"
    if not path.is_file():
        return path, None
    return path, json.loads(path.read_text())


MODEL_KINDS = "a run folder, a checkpoint folder (RUN/checkpoints/step-N) or a released SiT .pt state dict"


def check_model_file(p: Path) -> None:
    """A MODEL that is a file must be a torch file (a released .pt); anything else is named as what it
    is before torch.load sees it (a checkpoint's own .safetensors: its folder is the MODEL)."""
    kind = filekind.sniff(p)
    if kind in ("torch", "pickle"):
        return
    if kind == "safetensors" and (p.parent / "manifest.json").is_file():
        raise InputError(f"{p} is one file of the checkpoint {p.parent}: pass that folder (or the run folder "
                         f"{p.parent.parent.parent}) as MODEL")
    raise InputError(f"{p}: {filekind.DESCRIPTIONS[kind]}, not a model; MODEL is {MODEL_KINDS}")


def load_model(path: str, which: str, model_name: str | None, device):
    """-> (model, its recipe, info dict with num_classes / data folder / builtin / source [/ release])."""
    p = Path(path)
    if not p.exists():
        raise InputNotFound(f"MODEL {p}: not found (expected {MODEL_KINDS})")
    if p.is_file():  # a released state dict: the recipe its release trained with (irepa.models.convert)
        from irepa.models.convert import load_reference_checkpoint
        check_model_file(p)
        model, _, info = load_reference_checkpoint(p, which=which, name=model_name, head=False)
        return model.to(device), recipes.get(info["recipe"])(), {"num_classes": info["num_classes"], "data": None,
                                                                 "builtin": None, "source": str(p.resolve()),
                                                                 "release": info["release"]}
    from irepa.train.build import dataset_dir
    from irepa.train.export import find_checkpoint, load_for_inference
    ckpt = find_checkpoint(p)
    # the run's config.json builds the model: another --model_name is refused before any weight is read
    model, cfg = load_for_inference(ckpt, which=which, device=device, model_name=model_name)
    recipe = recipes.for_config(cfg)
    builtin = cfg.data.source if cfg.data.source == "digits" else None
    # "checkpoint": where a decoder that is a trained part (REPA-E's VAE) is read from
    return model, recipe, {"num_classes": cfg.model.num_classes, "data": str(dataset_dir(cfg, recipe.data_kind)),
                           "builtin": builtin, "source": str(p.resolve()), "checkpoint": ckpt}


def release_latent_scaling(info: dict, channels: int, latent_stats: str | None,
                           latent_scale: float | None) -> tuple[codec.LatentScaling, str]:
    """The latent scaling of a released .pt checkpoint (info["release"], irepa.models.convert):
    the iREPA release's checkpoints need its per-channel statistics file, REPA's default to
    0.18215, and one that shows neither needs the user's choice."""
    src, stats = info["source"], codec.OFFICIAL_LATENT_STATS
    if info["release"] == "irepa":
        if not latent_stats:
            given = f" (--latent_scale {latent_scale} is not how it was trained)" if latent_scale else ""
            raise InputError(f"{src} was trained by the iREPA release's code (its projector layout or training "
                             f"args say so), which scales SD-VAE latents per channel: pass --latent_stats "
                             f"{stats} (the release's pretrained_models/ file; .pt, .npz or .json){given}")
        return codec.LatentScaling.from_file(latent_stats), f"stats:{latent_stats}"
    if latent_stats:
        return codec.LatentScaling.from_file(latent_stats), f"stats:{latent_stats}"
    if latent_scale:
        return codec.LatentScaling.factor(latent_scale, channels), f"scale:{latent_scale}"
    if info["release"] == "repa":  # the REPA release scales by the SD factor
        return codec.LatentScaling.factor(0.18215, channels), "scale:0.18215"
    raise InputError(f"{src} does not show which release trained it (no projectors, no training args), so its "
                     f"latent scaling is unknown: pass --latent_stats {stats} (iREPA release) or --latent_scale "
                     f"0.18215 (SiT and REPA releases)")


def build_decoder(recipe, info: dict, channels: int, vae: str | None, latent_stats: str | None,
                  latent_scale: float | None, device):
    """-> (model outputs -> images in [0, 1], a description recorded in plan.json)."""
    check_decoder_options(recipe, info, vae, latent_stats, latent_scale)
    manifest_path, manifest = _manifest(info["data"])
    if recipe.data_kind == "pixels":  # pixels, or images through the run's own VAE (REPA-E; --vae: an export of it)
        ckpt = info.get("checkpoint")
        return recipe.decoder(manifest, device, vae=vae, checkpoint=ckpt), recipe.decoder_tag(ckpt)
    name = vae or latent_codec(info, manifest_path, manifest)
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
        raise InputError(f"latent scaling unknown: the run's data manifest {manifest_path} is not on this machine; "
                         f"pass --latent_stats FILE (e.g. a copy of that manifest.json) or --latent_scale 0.18215")
    decode = recipe.decoder(manifest, device, vae=name, scaling=scaling)
    if name == codec.DIGITS_CODEC:
        return decode, "pixel-codec" + (f":{how}" if how else "")
    return decode, f"vae:{Path(name).resolve()}:{how}"


def check_decoder_options(recipe, info: dict, vae: str | None, latent_stats: str | None,
                          latent_scale: float | None) -> None:
    """Refuse a decoding option that would not act on this model's samples, and a --vae that is not there."""
    given = {"--vae": vae, "--latent_stats": latent_stats, "--latent_scale": latent_scale}
    if recipe.data_kind == "pixels":
        own_vae = recipe.trains_decoder  # REPA-E decodes with its trained VAE
        unused = [k for k, v in given.items() if v is not None and not (k == "--vae" and own_vae)]
        if unused:
            what = "decodes with its own trained VAE (--vae: an export of it)" if own_vae else "generates pixels"
            raise InputError(f"{' and '.join(unused)} do{'es' * (len(unused) == 1)} not apply: a {recipe.name} "
                             f"model {what}")
    elif vae is not None and info.get("builtin") == "digits" and vae != codec.DIGITS_CODEC:
        raise InputError(f"--vae {vae} does not apply: this run's latents are the digits codec's "
                         f"(data.source digits), not a VAE's")
    if vae is not None and vae != codec.DIGITS_CODEC and not Path(vae).is_dir():
        raise InputNotFound(f"--vae {vae}: no such folder (expected a local diffusers AutoencoderKL folder "
                            f"saved with save_pretrained, e.g. sd-vae-ft-mse)")


def latent_codec(info: dict, manifest_path: Path | None, manifest: dict | None) -> str:
    """The VAE folder (or the digits codec) a latent model decodes with when --vae is not given."""
    recorded = ((manifest or {}).get("latent") or {}).get("vae")
    if recorded == codec.DIGITS_CODEC or (recorded is None and info.get("builtin") == "digits"):
        return codec.DIGITS_CODEC
    if recorded is not None:
        if not Path(recorded).is_dir():
            raise InputError(f"a latent model needs --vae DIR: {manifest_path} names {recorded}, which is not on "
                             f"this machine")
        return recorded
    if manifest_path is not None:  # a run folder whose dataset is not where its config.json says
        raise InputError(f"the run's data manifest {manifest_path} is not on this machine (the dataset was moved "
                         f"or prepared elsewhere); it names the VAE and the latent statistics: pass --vae DIR "
                         f"and --latent_stats FILE (a copy of that manifest.json) or --latent_scale 0.18215")
    raise InputError("a latent model needs --vae DIR (local diffusers AutoencoderKL folder, e.g. sd-vae-ft-mse)")


def check_out(out: str) -> Path:
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"OUT {out}: {filekind.describe(out_dir)}, not a folder; sample.py writes a folder "
                         f"(samples.npz, grid.png, plan.json): name a new or existing folder")
    return out_dir


def main(model: str, out: str, num_samples: int | None = None, batch: int = 64,
         method: Literal[METHODS] = "sde", steps: int = 250, cfg: float = 1.0, interval=(0.0, 1.0),
         labels: Literal["random", "balanced"] = "random", seed: int = 0, which: str = "ema",
         shard_size: int = 1000, model_name: str | None = None, vae: str | None = None,
         latent_stats: str | None = None, latent_scale: float | None = None,
         precision: Literal["fp32", "bf16"] = "fp32", noise_scale: float = 1.0, grid: int = 64,
         keep_shards: bool = False, device: str = "auto", n: int | None = None,
         quantize: Literal[("auto", *QUANTIZE)] = "auto", progress: Literal["auto", "bar", "off"] = "auto"):
    """Sample a trained model into OUT (samples.npz, grid.png; resumable).

    MODEL: a run folder (its newest checkpoint), a checkpoint folder (RUN/checkpoints/step-N) or a
    released SiT + REPA/iREPA .pt state dict.
    OUT: the output folder; running the same command again resumes it.
    --num_samples: how many images (default 50,000; --n is an alias that torchrun cannot pass on).
    --batch: images per model call per rank (CFG doubles it inside the sampler).
    --method: the sampler: sde (Euler-Maruyama), euler or heun (ODE); MeanFlow's euler is its N-step sampler.
    --steps: sampler steps (sde needs at least 2).
    --cfg: classifier-free guidance scale (1: none).
    --interval: LOW,HIGH in SiT time (t = 1 noise), 0 <= LOW <= HIGH <= 1: where CFG acts.
    --labels: random (uniform, as ADM) or balanced (N / classes per class).
    --seed: labels and noise (the output does not depend on the number of ranks).
    --which: ema (the first EMA), ema-1, ... or model (the raw trained weights).
    --shard_size: images per shard file (the unit of resuming).
    --model_name: SiT size of a released .pt whose depth and width fit several sizes; run folders
    fix their model and refuse another name.
    --vae: local diffusers AutoencoderKL folder for latent models (default: the one the run's data
    manifest names); for REPA-E runs an export of its VAE (launch/export_vae.py).
    --latent_stats: per-channel latent statistics (.pt, .npz, .json; default for runs: the data manifest).
    --latent_scale: one latent factor instead (0.18215: the SiT and REPA releases).
    --precision: fp32 (as published FIDs were sampled) or bf16 model calls.
    --noise_scale: multiplies the initial noise.
    --grid: images in grid.png (0: none).
    --keep_shards: keep OUT/shards after merging.
    --device: auto, cpu, cuda or cuda:N.
    --n: an alias of --num_samples.
    --quantize: how decoded images become uint8: auto (the recipe's release rule), round or truncate.
    --progress: a progress bar on rank 0 (images, img/s, time left): auto shows it when stderr is a
    terminal; each finished shard is also logged as one line with the same numbers.
    """
    if num_samples is not None and n is not None and num_samples != n:
        raise InputError(f"--num_samples {num_samples} and --n {n} disagree; pass one of them")
    n = num_samples if num_samples is not None else n if n is not None else 50_000
    from irepa.sampling import check_settings
    check_settings(method, steps, _interval(interval))  # before loading the model, not after
    out_dir = check_out(out)
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
                            log=lambda m: print(m, flush=True), bar=gen.show_bar(progress, rank))
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
