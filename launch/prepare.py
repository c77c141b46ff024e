"""Prepare a dataset once: crop, VAE latents (or pixels), encoder tokens for both flips.

  python launch/prepare.py digits data/digits-hog-patch --resolution 128 --encoders hog-patch
  torchrun --nproc_per_node=8 launch/prepare.py /datasets/imagenet/train data/in256-dinov2 \\
      --vae /models/sd-vae-ft-mse --encoders dinov2-vit-b --storage bf16 --batch_size 64
  python launch/prepare.py /datasets/imagenet/train data/in256-px --kind pixels --encoders '[]'

Writes OUT/manifest.json plus OUT/data.beton (FFCV) and/or OUT/memmap/*.npy (--formats).
Interrupted? Run the same command again: it continues from OUT.partial. A complete OUT is
kept when the command asks for what it holds and refused otherwise (--overwrite replaces
it). Library code and the format: irepa.data.prepare, data/format.py.
"""
from __future__ import annotations

from irepa.data.prepare import prepare
from irepa.dist import env, rank_world, setup, teardown


def main(source: str, out: str, resolution: int = 256, vae: str | None = None, encoders=("hog-patch",),
         storage="bf16", kind: str = "latent", store_images: bool = False, formats=("ffcv", "memmap"),
         batch_size: int = 32, device: str = "auto", num_threads: int = 4, full_checksum: bool = False,
         overwrite: bool = False) -> None:
    """SOURCE: "digits" or an ImageFolder / ImageNet-train folder. OUT: the dataset folder.

    --vae: local diffusers AutoencoderKL folder ("digits-codec" is the default for digits).
    --encoders: names from irepa.encoders.names(). --storage: bf16 | fp8 (or a list, one
    per encoder). --kind pixels stores uint8 crops for JiT. --store_images keeps the crop
    beside latents for online encoders. --formats: ffcv, memmap or both.
    """
    if env()[2] > 1:  # under torchrun: one shard per rank; the group only synchronizes them
        setup(device, backend="gloo")
    encoders = [encoders] if isinstance(encoders, str) else list(encoders)
    formats = [formats] if isinstance(formats, str) else list(formats)
    storage = storage if isinstance(storage, str) else list(storage)
    try:
        done = prepare(source, out, resolution=resolution, vae=vae, encoders=encoders, storage=storage, kind=kind,
                       store_images=store_images, formats=formats, batch_size=batch_size, device=device,
                       num_threads=num_threads, full_checksum=full_checksum, overwrite=overwrite)
        if done and rank_world()[0] == 0:
            print(f"prepared {done}")
    finally:
        teardown()


if __name__ == "__main__":
    from irepa.cli import run
    run(main, "prepare.py")
