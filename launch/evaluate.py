"""ADM evaluation suite (FID, sFID, IS, precision, recall) of a sample batch against a reference.

  python launch/evaluate.py VIRTUAL_imagenet256_labeled.npz samples/xl-400k/samples.npz
  python launch/evaluate.py REF.npz SAMPLES.npz --out results.json --logdir runs/sit-xl2-irepa --step 400000
  python launch/evaluate.py /datasets/photos samples/photos/samples.npz --metric classifier   # offline

SAMPLES is an ADM batch (uint8 [N, H, W, 3] under arr_0, labels under arr_1 as sample.py
writes it). REF is an ADM batch too (it may carry precomputed mu/sigma/mu_s/sigma_s), or
"digits", or an image folder with one sub-folder per class, read as prepare.py reads it
(the same class order and center crop) at the samples' resolution. Inception weights
(pt_inception-2015-12-05-6726825d.pth) are read from --weights, $IREPA_INCEPTION_WEIGHTS or
the local caches, never downloaded.

--metric classifier works without them: the Frechet distance in the features of a small
CNN trained (once, cached in --cache_dir) on half of REF's labelled images, against the
other half, as compare.py scores recipes without Inception (irepa.metrics.classifier_fd).
The network sees every image shrunk to --classifier_resolution px (default 32; images
smaller than that stay as they are), so values depend on REF, that resolution and the
classifier; they are comparable with each other, not with FID. The result also gives the
real-data floor (as many real images, not in the reference, scored the same way) and the
classifier's accuracy on the samples' labels.

Results are printed, written as JSON (default: next to the samples, <name>.eval.json) and,
with --logdir, logged to TensorBoard under eval/* at --step.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np

from irepa.dist import pick_device
from irepa.errors import InputError, InputNotFound
from irepa.metrics import fid
from irepa.metrics.reference import RealImages, is_batch

CLASSIFIER_RESOLUTION = 32
LOGGED = ("fid", "sfid", "inception_score", "precision", "recall", "fd_classifier", "class_accuracy")


def main(ref: str, samples: str, out: str | None = None, weights: str | None = None, batch: int = 100,
         logdir: str | None = None, step: int = 0, device: str = "auto",
         metric: Literal["inception", "classifier"] = "inception", cache_dir: str | None = None,
         classifier_resolution: int | None = None, pr_dtype: Literal["float16", "float32"] | None = None):
    """Score SAMPLES against REF.

    REF: the real images: an ADM .npz batch, "digits", or an image folder (one sub-folder per class).
    SAMPLES: the ADM .npz batch to score (sample.py's OUT/samples.npz).
    --out: the result's JSON file (default: SAMPLES with the suffix .eval.json).
    --weights: the Inception weights file (default: $IREPA_INCEPTION_WEIGHTS, then ~/.cache/irepa/
    and the torch hub cache).
    --batch: images per Inception (or reference-reading) batch.
    --logdir: also log the results to TensorBoard there, under eval/*.
    --step: the TensorBoard step of those values.
    --device: auto, cpu, cuda or cuda:N.
    --metric: inception (the ADM suite) or classifier (offline: a classifier-feature Frechet
    distance, not comparable with FID).
    --cache_dir: where --metric classifier keeps its trained network (default ~/.cache/irepa/classifiers).
    --classifier_resolution: the side in px the classifier sees (default 32; never enlarged).
    --pr_dtype: the arithmetic of precision/recall's k-NN distances: float16 (default, as ADM's
    evaluator computes them) or float32.
    """
    _check_options(metric, weights, cache_dir, classifier_resolution, pr_dtype)
    device = str(pick_device(device))
    out_path = Path(out) if out else Path(samples).with_suffix(".eval.json")
    real = _check_inputs(ref, samples, out_path, metric)  # before minutes of network passes, not after
    t0 = time.time()
    if metric == "classifier":
        res = _classifier(real, samples, batch, cache_dir, classifier_resolution or CLASSIFIER_RESOLUTION)
    else:
        res = _inception(real, samples, weights, batch, device, pr_dtype or "float16")
    res.update(ref=str(Path(ref).resolve()) if ref != "digits" else ref, samples=str(Path(samples).resolve()),
               seconds=round(time.time() - t0, 1))
    text = json.dumps(res, indent=2)
    print(text)
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, out_path)
    if logdir:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(logdir) as w:
            for key in LOGGED:
                if key in res:
                    w.add_scalar(f"eval/{key}", res[key], step)
    return res


def _check_options(metric: str, weights, cache_dir, classifier_resolution, pr_dtype) -> None:
    """Refuse options the chosen metric would ignore."""
    unused = {"inception": {"--cache_dir": cache_dir, "--classifier_resolution": classifier_resolution},
              "classifier": {"--weights": weights, "--pr_dtype": pr_dtype}}[metric]
    given = [k for k, v in unused.items() if v is not None]
    if given:
        raise InputError(f"{' and '.join(given)} do{'es' * (len(given) == 1)} not apply to --metric {metric}")
    if classifier_resolution is not None and classifier_resolution < 4:
        raise InputError(f"--classifier_resolution {classifier_resolution}: expected at least 4 px")


def _check_inputs(ref: str, samples: str, out_path: Path, metric: str) -> RealImages:
    """Both inputs readable in the layout the metric needs, and the result writable; -> REF's images."""
    for role, path in (("reference batch", ref if is_batch(ref) else None), ("sample batch", samples)):
        if path is not None and not Path(path).is_file():
            raise InputNotFound(f"{role} not found: {path}")
    shape = fid.check_images(samples)
    real = RealImages(ref, shape[1])
    if metric == "classifier":
        real.require_labelled_images("--metric classifier")
        if is_batch(ref):
            fid.check_images(ref)
    elif is_batch(ref):
        fid.check_reference(ref)
    if out_path.resolve() in (Path(ref).resolve(), Path(samples).resolve()):
        raise InputError(f"--out {out_path} would overwrite an input batch")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return real


def _inception(real: RealImages, samples: str, weights: str | None, batch: int, device: str, pr_dtype: str) -> dict:
    try:
        net = fid.load_inception(weights, device)
    except InputNotFound as e:
        raise InputNotFound(f"{e} Without them, --metric classifier scores offline (a classifier-feature "
                            f"distance, not comparable with FID).") from None
    if is_batch(real.ref):
        reference = fid.load_reference(net, real.ref, batch, device)
    else:
        acts = fid.activations(net, real.batches(batch), device)
        reference = fid.Reference(fid.Stats.of(acts["pool"]), fid.Stats.of(acts["spatial"]), acts["pool"])
    return {"metric": "fid_inception", "pr_dtype": pr_dtype,
            **fid.evaluate(reference, fid.npz_activations(net, samples, batch, device), device=device,
                           pr_dtype=pr_dtype)}


def _classifier(real: RealImages, samples: str, batch: int, cache_dir: str | None, resolution: int) -> dict:
    import torch

    from irepa.metrics import classifier_fd as cfd
    from irepa.metrics.npz import iter_npz_array, npz_keys

    shape = fid.check_images(samples)
    side = cfd.metric_side(resolution, *shape[1:3], real.side)
    ref_images = cfd.metric_images(real.batches(batch), side)
    labels = torch.from_numpy(real.require_labelled_images("--metric classifier"))
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "irepa" / "classifiers"
    metric = cfd.load_or_train(ref_images, labels, cache, log=lambda m: print(m, flush=True))
    images = cfd.metric_images(iter_npz_array(samples, "arr_0", batch), side)
    sample_labels = None
    if "arr_1" in npz_keys(samples):
        with np.load(samples) as z:
            sample_labels = torch.from_numpy(np.asarray(z["arr_1"], dtype=np.int64))
    return {"metric": "fd_classifier", "resolution": side,
            "classifier": str(cache / f"classifier-{metric.key}.safetensors"), **cfd.score(metric, images, sample_labels),
            "note": "Frechet distance in a small CNN's features trained on REF; not comparable with FID"}


def _cli(*args, **kw) -> None:
    main(*args, **kw)


if __name__ == "__main__":
    from irepa.cli import run
    run(_cli, "evaluate.py", signature=main)
