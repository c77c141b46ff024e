"""Train several recipes on the same data with the same seeds and plot quality against steps.

  torchrun --nproc_per_node=2 launch/compare.py          # embedded default: digits, none vs REPA vs iREPA
  python launch/compare.py                               # the same, one run after another
  python launch/compare.py --spec my_comparison.json --out runs/compare/mine
  python launch/compare.py --seeds '[0,1]' --eval_steps '[100,200]' --out runs/compare/short
  python launch/compare.py --print_spec > my.json        # the default spec, to edit
  python launch/compare.py --report_only --out runs/compare/digits

A spec (json) lists recipes ({"name", "preset", "overrides"}, optionally "sample_method" /
"sample_steps"), seeds, eval_steps, common overrides and the evaluation settings
(irepa/compare/spec.py). Any recipe (sit, jit, meanflow, repae) is sampled and decoded through
the recipe itself; without a sampler in the spec each uses its preset's (MeanFlow: 1-step). Every run is trained to each
eval step in turn, its EMA model sampled and scored; rerunning the same command continues
an interrupted comparison. Under torchrun each rank trains whole runs (one process each).
Output in OUT: results.csv, summary.md, convergence.png, tb/ (TensorBoard), setup.json
(which metric was used), runs/ and evals/.

The metric is FID with the ADM Inception weights when they are found ($IREPA_INCEPTION_WEIGHTS,
~/.cache/irepa, torch hub cache; --inception_weights), else the Frechet distance in the
features of a small CNN trained on the real data (cached in CACHE_DIR/classifiers), plus
that CNN's accuracy on class-conditional samples. --metric auto|inception|classifier.
--eval_noise K scores every run's last checkpoint with K more evaluation noise batches, so
summary.md can set the metric's sampling noise beside the spread over seeds (done runs are
not retrained).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Literal

from irepa.errors import InputError


def main(spec: str | None = None, out: str = "runs/compare/digits", seeds: list[int] | None = None,
         eval_steps: list[int] | None = None, num_samples: int | None = None,
         metric: Literal["auto", "inception", "classifier"] | None = None, cache_dir: str | None = None,
         device: str = "auto", inception_weights: str | None = None, eval_noise: int = 0, report_only: bool = False,
         print_spec: bool = False):
    """Train and score the spec's recipes x seeds; write the report into OUT.

    --spec: a comparison spec (.json; default: the embedded digits comparison, --print_spec shows it).
    --out: the comparison folder; rerunning the same command continues it.
    --seeds: training seeds, A,B or [A, B] (replaces the spec's).
    --eval_steps: training steps at which every run is evaluated, strictly increasing, A,B or [A, B].
    --num_samples: samples per evaluation (replaces the spec's).
    --metric: auto (FID when the Inception weights are found, else the classifier distance), inception
    or classifier.
    --cache_dir: prepared data and the metric classifier (default: OUT/datasets).
    --device: auto, cpu, cuda or cuda:N.
    --inception_weights: the Inception weights file (default: $IREPA_INCEPTION_WEIGHTS, then the caches).
    --eval_noise: score every run's last checkpoint with K more noise batches.
    --report_only: rewrite the report from the results already in OUT.
    --print_spec: print the spec (with these options applied) as JSON and stop.
    """
    from irepa.compare.spec import CompareSpec, digits_default

    try:
        s = CompareSpec.load_or_default(spec, digits_default, seeds=seeds, eval_steps=eval_steps,
                                        num_samples=num_samples, metric=metric)
    except ValueError as e:
        raise InputError(str(e)) from None
    if print_spec:
        print(json.dumps(s.to_dict(), indent=2))
        return
    if report_only:
        from irepa.compare.report import write_report
        print(write_report(out, s).read_text())
        return
    from irepa.compare.backend import Interrupted
    from irepa.compare.runner import Comparison

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else \
        (lambda m: print(f"[rank {rank}] {m}", file=sys.stderr, flush=True))
    try:
        summary = Comparison(s, out, cache_dir=cache_dir, device=device, rank=rank, world_size=world,
                             inception_weights=inception_weights, log=log).run(eval_noise=int(eval_noise))
    except (Interrupted, KeyboardInterrupt) as e:
        sys.exit(f"compare.py: interrupted ({e or 'SIGINT'}); finished evaluations are kept in {out}: "
                 f"run the same command again to continue")
    except (ValueError, FileNotFoundError) as e:  # a bad spec, preset, override, folder or missing weights
        raise InputError(str(e)) from None
    if summary is not None:
        print(summary.read_text())
        print(f"report: {out}/summary.md, {out}/results.csv, {out}/convergence.png, tensorboard --logdir {out}/tb")


if __name__ == "__main__":
    from irepa.cli import run
    run(main, "compare.py")
