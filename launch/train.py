"""Train a recipe (irepa.recipes: SiT flow matching, JiT, ...) with REPA/iREPA.

  torchrun launch/train.py                                  # embedded default (digits, CPU, minutes)
  torchrun --nproc_per_node=8 launch/train.py --preset sit-xl2-irepa --data.source /data/in256
  python launch/train.py --preset sit-b2-repa --train.batch_size 128 --lr 2e-4

Overrides are dotted (--train.steps 1000) or unique field names (--steps 1000); each is
converted to its field's type (--train.resume false, --betas 0.9,0.95, --align.encoders '[]')
or refused with one line naming the key, the value and the type.
SIGTERM / SIGINT / SIGUSR1 stop the run after the current step with a checkpoint and exit status 75
(irepa.train.preemption.PREEMPTED): rerun the same command (or requeue the job) to resume.
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
    from irepa.train.preemption import PREEMPTED
    from irepa.train.trainer import train
    last = train(resolve(preset, overrides))  # a bad preset, key or value: a ConfigError, printed by irepa.cli.run
    if last.get("stopped_by"):
        print(f"train.py: stopped by signal {last['stopped_by']} after the checkpoint of step {last['stopped_at']}; "
              f"exit status {PREEMPTED}: run the same command again to resume", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED)


if __name__ == "__main__":
    from irepa.cli import run
    run(main, "train.py")
