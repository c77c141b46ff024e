"""Frechet distance in the feature space of a small classifier trained on the real data.

FID needs the ADM Inception weights and is built for 299 px natural images. Where the
weights are missing, or the data is far from ImageNet (16 x 16 digits), generated images
are compared in the feature space of a small CNN trained on the real images of the same
data set, at the resolution and in the space the samples decode to:

- the labelled real images are split once, stratified and seeded, into a train part (the
  classifier learns on it) and a held-out test part (its accuracy is measured there, and
  its features are the reference the samples are compared with);
- features are the penultimate layer (before its ReLU) of the trained net, `FEATURE_DIM`
  numbers per image; the distance is `irepa.metrics.fid.frechet_distance` between Gaussians
  fitted to the test features and the sample features, exactly as FID does on pool_3;
- the class accuracy of class-conditional samples (argmax of the net == the label the
  sample was drawn for) measures whether samples look like their class;
- `floor(n)`: the distance of `n` held-out-from-the-test real images (from the train part)
  to the test part: what a perfect generator scores with `n` samples (the estimator is
  biased upward at small n, so compare values at the same n only).

Training is deterministic (seeded initialisation, order and augmentation; no batch
statistics, so a feature does not depend on the batch it is computed in), runs once per
(data, seed, settings), and is cached as safetensors with its accuracies in the metadata.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .fid import Stats

FEATURE_DIM = 64


class FeatureClassifier(nn.Module):
    """Conv w -> conv 2w -> 2x2 max pool (sides >= 8) -> conv 4w -> adaptive avg pool 4x4 -> fc
    `feature_dim` (the features) -> ReLU -> fc classes. No batch norm: eval features do not
    depend on the batch."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.fc = nn.Linear(4 * width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] -> [N, feature_dim] (penultimate layer, before its ReLU)."""
        h = F.relu(self.conv2(F.relu(self.conv1(x * 2 - 1))))
        h = F.relu(self.conv3(F.max_pool2d(h, 2) if min(h.shape[-2:]) >= 8 else h))
        return self.fc(F.adaptive_avg_pool2d(h, 4).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


@dataclass
class ClassifierSettings:
    seed: int = 0
    """split, initialisation, batch order and augmentation"""
    test_fraction: float = 0.5
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 16
    shift: int = 1
    """random translation of +-shift pixels per training image (per 16 px of image side)"""

    def __post_init__(self):
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"classifier test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.epochs <= 0 or self.batch_size <= 0 or self.width <= 0 or self.lr <= 0 or self.shift < 0:
            raise ValueError(f"classifier settings must be positive (shift >= 0): {self}")


def split_indices(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded split -> (train indices, test indices), each sorted."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = max(1, round(len(idx) * test_fraction))
        if n_test >= len(idx):
            raise ValueError(f"class {c} has {len(idx)} image(s): too few to hold out a test part")
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _check_images(images: torch.Tensor, where: str) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(f"{where}: expected float images [N, 1|3, H, W] in [0, 1], got "
                         f"{images.dtype} {tuple(images.shape)}")
    if images.shape[0] and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f"{where}: images must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")


def _shifted(x: torch.Tensor, shift: int, g: torch.Generator) -> torch.Tensor:
    """Each image translated by its own random (dy, dx) in [-shift, shift], zero fill."""
    if shift == 0:
        return x
    H, W = x.shape[-2:]
    padded = F.pad(x, (shift,) * 4)
    d = torch.randint(0, 2 * shift + 1, (x.shape[0], 2), generator=g)
    return torch.stack([padded[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(d.tolist())])


@torch.no_grad()
def _predict(net: FeatureClassifier, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    for i in range(0, len(images), batch):
        f = net.features(images[i:i + batch].float())
        feats.append(f)
        logits.append(net.head(F.relu(f)))
    return torch.cat(feats).double(), torch.cat(logits)


@contextmanager
def one_thread():
    """Train on one thread: the same weights on every machine whatever its core count, and on
    a 2-core CPU faster than two threads for these small convolutions (0.018 s vs 0.23 s of
    CPU per batch of 64 at 16 px, measured on the shared 2-core development machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, settings: ClassifierSettings,
                     num_classes: int | None = None) -> tuple[FeatureClassifier, dict]:
    """Train on the train part of a seeded split; -> (net in eval mode, report with accuracies)."""
    _check_images(images, "train_classifier")
    with one_thread():
        return _train(images, labels, settings, num_classes)


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float,
        generator: torch.Generator, augment=None) -> nn.Module:
    """Cross-entropy training of `net` on (x, y): Adam with a cosine schedule over `epochs` passes,
    each in a random order drawn from `generator` (which `augment(batch, generator)` may draw from
    too); -> net in eval mode, frozen. Deterministic given the generator's seed on one thread."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for b in range(0, len(x), batch_size):
            idx = order[b:b + batch_size]
            xb = x[idx] if augment is None else augment(x[idx], generator)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def _train(images, labels, settings, num_classes):
    s = settings
    num_classes = num_classes or int(labels.max()) + 1
    tr, te = split_indices(labels, s.test_fraction, s.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = FeatureClassifier(images.shape[1], num_classes, s.width)
    shift = s.shift * max(1, images.shape[-1] // 16)
    fit(net, images[tr].float(), labels[tr], s.epochs, s.batch_size, s.lr, torch.Generator().manual_seed(s.seed + 1),
        lambda xb, g: _shifted(xb, shift, g))
    acc = {name: float((_predict(net, images[i])[1].argmax(1) == labels[i]).double().mean())
           for name, i in (("train_accuracy", tr), ("test_accuracy", te))}
    return net, {**acc, "num_train": len(tr), "num_test": len(te), "num_classes": num_classes}


def data_key(images: torch.Tensor, labels: torch.Tensor, settings: ClassifierSettings) -> str:
    """Hex digest of the images' bytes, the labels and the settings: the cache key."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().long().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    return h.hexdigest()[:20]


class ClassifierMetric:
    """A trained FeatureClassifier with the reference statistics of its held-out test part."""

    name = "fd_classifier"

    def __init__(self, net: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor,
                 settings: ClassifierSettings, report: dict, key: str):
        self.net, self.settings, self.report, self.key = net, settings, report, key
        tr, te = split_indices(labels, settings.test_fraction, settings.seed)
        self._train_feats = _predict(net, images[tr])[0].numpy()
        self.reference = Stats.of(_predict(net, images[te])[0].numpy())
        self._floor_order = torch.randperm(len(tr), generator=torch.Generator().manual_seed(settings.seed + 2))

    @property
    def test_accuracy(self) -> float:
        return self.report["test_accuracy"]

    def features(self, images: torch.Tensor) -> np.ndarray:
        _check_images(images, "classifier features")
        return _predict(self.net, images)[0].numpy()

    def frechet(self, images: torch.Tensor) -> float:
        return self.reference.fd(Stats.of(self.features(images)))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of `images` the classifier assigns to `labels` (class-conditional samples)."""
        _check_images(images, "classifier accuracy")
        return float((_predict(self.net, images)[1].argmax(1) == labels.cpu()).double().mean())

    def floor(self, n: int) -> float:
        """Distance of n real train-part images (seeded draw; all if fewer) to the test part."""
        idx = self._floor_order[:n].numpy()
        return self.reference.fd(Stats.of(self._train_feats[idx]))


def load_or_train(images: torch.Tensor, labels: torch.Tensor, cache_dir: str | Path,
                  settings: ClassifierSettings | None = None, log=print) -> ClassifierMetric:
    """The classifier for (images, labels, settings) from `cache_dir`, trained and cached if absent."""
    from safetensors.torch import load_file, save_file

    settings = settings or ClassifierSettings()
    _check_images(images, "classifier data")
    images, labels = images.detach().float().cpu(), labels.detach().long().cpu()
    key = data_key(images, labels, settings)
    path = Path(cache_dir) / f"classifier-{key}.safetensors"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        report = json.loads(meta_path.read_text())["report"]
        net = FeatureClassifier(images.shape[1], report["num_classes"], settings.width)
        try:
            net.load_state_dict(load_file(str(path)))
        except Exception as e:  # a truncated file: say which, retrain over it
            log(f"[classifier] {path}: unreadable ({type(e).__name__}: {e}); training it again")
        else:
            net.eval().requires_grad_(False)
            return ClassifierMetric(net, images, labels, settings, report, key)
    log(f"[classifier] training the metric classifier on {len(labels)} real images {tuple(images.shape[1:])} "
        f"(cached as {path})")
    net, report = train_classifier(images, labels, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    tmp_meta = meta_path.with_name(f"{meta_path.name}.tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps({"key": key, "settings": asdict(settings), "report": report}, indent=2))
    os.replace(tmp_meta, meta_path)
    log(f"[classifier] test accuracy {100 * report['test_accuracy']:.2f}% on {report['num_test']} held-out images")
    return ClassifierMetric(net, images, labels, settings, report, key)


def metric_images(batches, side: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] batches -> float [N, 3, side, side] in [0, 1]: what the metric network sees of
    images of any resolution. Larger images are shrunk with antialiased bilinear resampling (a box
    average at integer factors), a non-square one squashed to the square; none is enlarged, so
    `side` must not exceed the images' own side (metric_side picks it)."""
    out = []
    for b in batches:
        x = torch.from_numpy(np.array(b)).permute(0, 3, 1, 2).float().div(255)  # a copy: npz blocks are read-only
        if x.shape[-2:] != (side, side):
            if min(x.shape[-2:]) < side:
                raise ValueError(f"images of {tuple(x.shape[-2:])} px are smaller than the metric side {side}")
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        out.append(x)
    return torch.cat(out)


def metric_side(resolution: int, *sides: int) -> int:
    """The side the metric network sees: `resolution`, or the smallest image side when that is smaller."""
    return min(resolution, *sides)


def score(metric: ClassifierMetric, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """The classifier distance of `images` to the metric's held-out real images, the real-data floor
    at the same count, and (given labels in the metric's classes) the class accuracy."""
    n_floor = min(len(images), int(metric.report["num_train"]))
    res = {"fd_classifier": metric.frechet(images), "real_floor": metric.floor(n_floor), "floor_images": n_floor,
           "classifier_test_accuracy": metric.test_accuracy, "num_samples": int(len(images)),
           "num_reference_test": int(metric.report["num_test"])}
    if labels is not None and len(labels) == len(images) and int(labels.max()) < metric.report["num_classes"]:
        res["class_accuracy"] = metric.accuracy(images, labels)
    return res
