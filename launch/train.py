"""Train SiT/JiT with REPA/iREPA.

  torchrun launch/train.py                                  # embedded default (digits, CPU, minutes)
  torchrun --nproc_per_node=8 launch/train.py --preset sit-xl2-irepa --data.source /data/in256
  python launch/train.py --preset sit-b2-repa --train.batch_size 128 --lr 2e-4

Overrides are dotted (--train.steps 1000) or unique field names (--steps 1000).
`--list_presets` prints the presets.
"""
from __future__ import annotations

import fire

from irepa.config import DEFAULT_PRESET, PRESETS, resolve


def main(preset: str = DEFAULT_PRESET, list_presets: bool = False, **overrides):
    if list_presets:
        resolve()  # loads every preset family
        for name in sorted(PRESETS):
            print(name)
        return
    from irepa.train.trainer import train
    cfg = resolve(preset, overrides)
    train(cfg)


if __name__ == "__main__":
    fire.Fire(main)
