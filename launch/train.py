"""Train a recipe (irepa.recipes: SiT flow matching, JiT, ...) with REPA/iREPA.

  torchrun launch/train.py                                  # embedded default (digits, CPU, minutes)
  torchrun --nproc_per_node=8 launch/train.py --preset sit-xl2-irepa --data.source /data/in256
  python launch/train.py --preset sit-b2-repa --train.batch_size 128 --lr 2e-4

Overrides are dotted (--train.steps 1000) or unique field names (--steps 1000).
`--list_presets` prints the presets; `--help` every config key with its value in the preset
(`--help --preset NAME`) and what it does.
"""
from __future__ import annotations


import sys

from irepa.recipes import DEFAULT_PRESET, describe, presets, resolve


def main(preset: str = DEFAULT_PRESET, list_presets: bool = False, **overrides):
    if overrides.pop("help", False) or overrides.pop("h", False):
        print(__doc__)
        print(describe(preset))
        return
    if list_presets:
        for name in sorted(presets()):
            print(name)
        return
    from irepa.train.trainer import train
    try:
        cfg = resolve(preset, overrides)
    except ValueError as e:  # a bad preset, key or value: the message says which; no traceback
        sys.exit(f"launch/train.py: {e}")
    train(cfg)


if __name__ == "__main__":
    from irepa.cli import run
    run(main, "train.py")
