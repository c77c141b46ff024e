"""Export an end-to-end (REPA-E) run's VAE with its latent statistics, for latent-only training.

  python launch/export_vae.py runs/repae-sit-xl2-irepa exports/e2e-vae
  torchrun --nproc_per_node=8 launch/prepare.py /datasets/imagenet/train data/in256-e2evae \\
      --vae exports/e2e-vae --encoders dinov2-vit-b
  torchrun --nproc_per_node=8 launch/train.py --preset sit-xl2-irepa --data.source data/in256-e2evae

RUN is a run folder (newest checkpoint) or a checkpoint folder. OUT gets the diffusers VAE
(the raw trained weights: REPA-E keeps no VAE EMA), latent_stats.json (the EMA SiT's
BatchNorm statistics: prepare records them as the dataset's fixed normalization, so the
latent-only SiT trains with the BatchNorm held fixed, as REPA-E's train_ldm_only), and
REPA-E's own files (sdvae-f8d4.pt, -latents-stats.pt, -discriminator-ckpt.pt).
A sharded (FSDP) checkpoint is first turned into single files: python -m irepa.train.export RUN.
"""
from __future__ import annotations

from pathlib import Path

from irepa.errors import InputError


def main(run: str, out: str, overwrite: bool = False) -> str:
    """Export the VAE of a REPA-E run.

    RUN: a repae run folder (its newest checkpoint) or a checkpoint folder RUN/checkpoints/step-N.
    OUT: the folder to write (a diffusers AutoencoderKL folder plus latent_stats.json and REPA-E's files).
    --overwrite: replace OUT when it already holds an export.
    """
    from irepa import recipes
    from irepa.autoencoder.discriminator import build_discriminator
    from irepa.autoencoder.export import check_export_target, export_vae
    from irepa.autoencoder.sdvae import VAEAutoencode, build_sdvae
    from irepa.models.latent_norm import BN_EPS
    from irepa.train import checkpoint
    from irepa.train.export import find_checkpoint, run_config

    check_export_target(out, overwrite)  # before reading the checkpoint
    ckpt = find_checkpoint(run)
    cfg = run_config(ckpt)
    recipe = recipes.for_config(cfg)
    if not recipe.trains_decoder:
        raise InputError(f"{ckpt}: a {cfg.train.recipe!r} run; only end-to-end (repae) runs train a VAE")
    if checkpoint.read_manifest(ckpt).get("sharded"):
        raise InputError(f"{ckpt}: a sharded (FSDP) checkpoint; first: python -m irepa.train.export {run}")
    checkpoint.verify_checkpoint(ckpt)
    ae = VAEAutoencode(build_sdvae(recipe.options.vae))
    ae.load_state_dict(checkpoint.read_tensors(ckpt / "vae.safetensors"))
    ema = checkpoint.read_tensors(ckpt / "ema.safetensors")
    disc = build_discriminator(tiny=recipe.options.vae != "f8d4", pretrained=False)
    disc.load_state_dict(checkpoint.read_tensors(ckpt / "disc.safetensors"))
    dst = export_vae(ae.vae, ema["latent_norm.bn.running_mean"], ema["latent_norm.bn.running_var"], Path(out),
                     eps=BN_EPS, discriminator=disc, overwrite=overwrite)
    print(f"[irepa] exported the VAE of {ckpt} to {dst}", flush=True)
    return str(dst)


if __name__ == "__main__":
    from irepa.cli import run
    run(main, "export_vae.py")
