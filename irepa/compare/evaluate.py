"""The comparison's metric: Inception FID when the ADM weights are here, else the classifier distance.

Both compare decoded samples with the held-out part of the real data (the same seeded,
stratified split either way; irepa.metrics.classifier_fd), decoded exactly like samples.
The small classifier is trained (once, cached) in both cases: its accuracy on
class-conditional samples is reported next to the distance. `describe()` says which metric
was used; every result row carries the metric's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from irepa.metrics.classifier_fd import ClassifierMetric, ClassifierSettings, load_or_train, split_indices
from irepa.metrics.inception import find_weights

METRIC_LABELS = {"fid_inception": "FID (ADM Inception-v3 pool_3)",
                 "fd_classifier": "Frechet distance in the metric classifier's features"}


@dataclass
class Evaluator:
    classifier: ClassifierMetric
    metric: str
    """fid_inception | fd_classifier"""
    inception: object = None
    reference: object = None
    """Inception pool statistics of the held-out real images (fid_inception)"""
    real_train: torch.Tensor | None = None
    device: str = "cpu"

    @torch.no_grad()
    def _pool(self, images: torch.Tensor, quantize: str = "round", batch: int = 100) -> np.ndarray:
        """Inception pool features of images in [0, 1], made uint8 values by `quantize` first
        (irepa.grid.quantize_unit) as a sample batch on disk would be."""
        from irepa.grid import quantize_unit
        out = []
        for i in range(0, len(images), batch):
            x = quantize_unit(images[i:i + batch].to(self.device).float(), quantize).float()
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                out.append(self.inception(x)["pool"].double().cpu().numpy())
        return np.concatenate(out)

    def distance(self, images: torch.Tensor, quantize: str = "round") -> float:
        """quantize: how generated images become uint8 for Inception (the recipe's release rule,
        Recipe.sample_quantize); the classifier distance scores the float images."""
        if self.metric == "fd_classifier":
            return self.classifier.frechet(images)
        from irepa.metrics.fid import Stats
        return self.reference.fd(Stats.of(self._pool(images, quantize)))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, quantize: str = "round") -> dict:
        return {"metric": self.metric, "value": self.distance(images, quantize),
                "class_acc": self.classifier.accuracy(images, labels), "num_samples": int(len(labels))}

    def floor(self, n: int) -> float:
        """The metric of n real images that are not in the reference (what a perfect generator scores)."""
        if self.metric == "fd_classifier":
            return self.classifier.floor(n)
        g = torch.Generator().manual_seed(self.classifier.settings.seed + 2)
        pick = torch.randperm(len(self.real_train), generator=g)[:n]
        return self.distance(self.real_train[pick])

    def describe(self) -> str:
        r = self.classifier.report
        acc = (f"metric classifier: small CNN trained on {r['num_train']} real images, test accuracy "
               f"{100 * r['test_accuracy']:.2f}% on {r['num_test']} held-out ones")
        return f"{METRIC_LABELS[self.metric]} against the {r['num_test']} held-out real images; {acc}"


def build_evaluator(images: torch.Tensor, labels: torch.Tensor, metric: str, settings: ClassifierSettings,
                    cache_dir: str | Path, inception_weights: str | Path | None = None, device="cpu",
                    log=print) -> Evaluator:
    """metric: auto | inception | classifier (irepa.compare.spec.METRICS)."""
    classifier = load_or_train(images, labels, cache_dir, settings, log=log)
    weights = find_weights(inception_weights)
    if metric == "inception" and weights is None:
        from irepa.metrics.inception import load_inception
        load_inception(inception_weights)  # raises, naming where the weights were looked for
    if metric == "classifier" or (metric == "auto" and weights is None):
        if metric == "auto":
            log("[compare] no ADM Inception weights found: the metric is the classifier Frechet distance")
        return Evaluator(classifier, "fd_classifier", device=str(device))
    from irepa.metrics.fid import Stats
    from irepa.metrics.inception import load_inception
    train_idx, test_idx = split_indices(labels, settings.test_fraction, settings.seed)
    ev = Evaluator(classifier, "fid_inception", inception=load_inception(weights, device), device=str(device),
                   real_train=images[train_idx])
    ev.reference = Stats.of(ev._pool(images[test_idx]))
    log(f"[compare] metric: FID with {weights}")
    return ev
