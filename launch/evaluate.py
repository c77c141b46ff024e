"""ADM evaluation suite (FID, sFID, IS, precision, recall) of a sample batch against a reference.

  python launch/evaluate.py VIRTUAL_imagenet256_labeled.npz samples/xl-400k/samples.npz
  python launch/evaluate.py REF.npz SAMPLES.npz --out results.json --logdir runs/sit-xl2-irepa --step 400000

Both files are ADM batches (uint8 [N, H, W, 3] under arr_0); the reference may carry
precomputed mu/sigma/mu_s/sigma_s. Inception weights (pt_inception-2015-12-05-6726825d.pth)
are read from --weights, $IREPA_INCEPTION_WEIGHTS or the local caches, never downloaded.
Results are printed, written as JSON (default: next to the samples, <name>.eval.json) and,
with --logdir, logged to TensorBoard under eval/* at --step.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


from irepa.dist import pick_device
from irepa.errors import InputError, InputNotFound
from irepa.metrics import fid


def main(ref: str, samples: str, out: str | None = None, weights: str | None = None, batch: int = 100,
         logdir: str | None = None, step: int = 0, device: str = "auto"):
    device = str(pick_device(device))
    out_path = Path(out) if out else Path(samples).with_suffix(".eval.json")
    _check_inputs(ref, samples, out_path)  # before minutes of Inception passes, not after
    t0 = time.time()
    net = fid.load_inception(weights, device)
    reference = fid.load_reference(net, ref, batch, device)
    acts = fid.npz_activations(net, samples, batch, device)
    res = fid.evaluate(reference, acts, device=device)
    res.update(ref=str(Path(ref).resolve()), samples=str(Path(samples).resolve()), seconds=round(time.time() - t0, 1))
    text = json.dumps(res, indent=2)
    print(text)
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, out_path)
    if logdir:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(logdir) as w:
            for key in ("fid", "sfid", "inception_score", "precision", "recall"):
                if key in res:
                    w.add_scalar(f"eval/{key}", res[key], step)
    return res


def _check_inputs(ref: str, samples: str, out_path: Path) -> None:
    """Both batches readable in the layout evaluation needs, and the result writable."""
    for role, path in (("reference batch", ref), ("sample batch", samples)):
        if not Path(path).is_file():
            raise InputNotFound(f"{role} not found: {path}")
    fid.check_reference(ref)
    fid.check_images(samples)
    if out_path.resolve() in (Path(ref).resolve(), Path(samples).resolve()):
        raise InputError(f"--out {out_path} would overwrite an input batch")
    out_path.parent.mkdir(parents=True, exist_ok=True)


def _cli(*args, **kw) -> None:
    main(*args, **kw)


if __name__ == "__main__":
    from irepa.cli import run
    run(_cli, "evaluate.py", signature=main)
