"""Prepare a dataset once: crop, VAE latents (or pixels), encoder tokens for both flips.

  python launch/prepare.py digits data/digits-hog-patch --resolution 128 --encoders hog-patch
  torchrun --nproc_per_node=8 launch/prepare.py /datasets/imagenet/train data/in256-dinov2 \\
      --vae /models/sd-vae-ft-mse --encoders dinov2-vit-b --storage bf16 --batch_size 64
  python launch/prepare.py /datasets/imagenet/train data/in256-px --kind pixels --encoders '[]'

Writes OUT/manifest.json plus OUT/data.beton (FFCV) and/or OUT/memmap/*.npy (--formats; by
default both where FFCV is installed, memmap alone otherwise). Unreadable or unusable image
files are skipped and listed (manifest "skipped", and on screen); --strict true stops at the
first instead. Images smaller than --resolution are upscaled as ADM's crop does, or left out
with --small_images skip; both are counted. Interrupted? Run the same command again: it
continues from OUT.partial. A complete OUT is kept when the command asks for what it holds
and refused otherwise; --overwrite replaces it, and only a folder prepare made (never the
source, nor a folder holding anything else). Library code and the format:
irepa.data.prepare, data/format.py.
"""
from __future__ import annotations

from datetime import timedelta

from irepa.data.prepare import prepare
from irepa.dist import env, rank_world, setup, teardown


def main(source: str, out: str, resolution: int = 256, vae: str | None = None, encoders=("hog-patch",),
         storage="bf16", kind: str = "latent", store_images: bool = False, formats=None,
         batch_size: int = 32, device: str = "auto", num_threads: int = 4, full_checksum: bool = False,
         overwrite: bool = False, small_images: str = "upscale", strict: bool = False) -> None:
    """SOURCE: "digits" or an ImageFolder / ImageNet-train folder. OUT: the dataset folder.

    --vae: local diffusers AutoencoderKL folder ("digits-codec" is the default for digits).
    --encoders: names from irepa.encoders.names(). --storage: bf16 | fp8 (or a list, one
    per encoder). --kind pixels stores uint8 crops for JiT. --store_images keeps the crop
    beside latents for online encoders. --formats: ffcv, memmap or both (default: both where
    FFCV is installed, else memmap). --small_images: upscale | skip images smaller than
    --resolution. --strict: stop at the first unusable image file instead of skipping it.
    """
    if env()[2] > 1:  # under torchrun: one shard per rank; the group only synchronizes them, and a rank
        # may wait at it for hours (rank 0 writing the FFCV file of ImageNet), so no 30-minute timeout
        setup(device, backend="gloo", timeout=timedelta(days=2))
    encoders = [encoders] if isinstance(encoders, str) else list(encoders)
    storage = storage if isinstance(storage, str) else list(storage)
    try:
        done = prepare(source, out, resolution=resolution, vae=vae, encoders=encoders, storage=storage, kind=kind,
                       store_images=store_images, formats=formats, batch_size=batch_size, device=device,
                       num_threads=num_threads, full_checksum=full_checksum, overwrite=overwrite,
                       small_images=small_images, strict=strict)
        if done and rank_world()[0] == 0:
            print(f"prepared {done}")
    finally:
        teardown()


if __name__ == "__main__":
    from irepa.cli import run
    run(main, "prepare.py")
