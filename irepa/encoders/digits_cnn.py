"""A small CNN trained here on digits classification: learned targets with a strong global component.

The spatial-vs-global study (irepa.study) needs targets whose tokens carry the image's class,
not only local shape. No hub weights exist for scikit-learn's digits, so the network is
trained on this machine, once, deterministically (seeded initialisation and batch order, one
thread), and cached as safetensors under $IREPA_ENCODER_DIR/trained/ (default
~/.cache/irepa/encoders/trained) keyed by its settings and the bytes of its training images.

The network works on the token grid itself: the image is turned gray and averaged over each
16 px patch (at 128 px the digits' 8x8 token grid is their native 8x8 pixels), then `depth`
3x3 convolutions with ReLU keep that grid, and the classifier reads the mean over tokens of
the last layer (global average pooling) through one linear layer. Layer k's output map is
the target "digits-cnn-lk": its receptive field is 2k + 1 tokens, so deeper layers see the
whole digit and, trained on classes, carry more of the image's global class information.
"digits-cnn-lk-init" is the same network at its (seeded) initialisation, untrained.

Data split: the comparison metric (irepa.metrics.classifier_fd) trains its own CNN on half of
the digits (split_indices(labels, 0.5, seed 0), the "train" half) and uses the other half as
the reference of its Frechet distance. This network trains on that reference half, so it
shares no training image with the metric's network (it is not the metric's network and does
not learn its features); its held-out accuracy is measured on the metric's train half. The
diffusion models train on all 1797 images either way.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import GRID_PATCH, Encoder, encoder_dir, grid_to_tokens
from .classical import GRAY_WEIGHTS


@dataclass(frozen=True)
class DigitsCNNSettings:
    depth: int = 4
    width: int = 32
    epochs: int = 60
    batch_size: int = 64
    lr: float = 5e-3
    seed: int = 0
    """initialisation and batch order"""
    metric_split_seed: int = 0
    """the metric classifier's split seed (ClassifierSettings.seed): the network trains on its reference half"""
    metric_test_fraction: float = 0.5


class DigitsCNN(nn.Module):
    """gray patch means [B, 1, g, g] -> `depth` 3x3 conv + ReLU maps at the same grid -> mean -> linear."""

    def __init__(self, depth: int = 4, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else width, width, 3, padding=1) for i in range(depth))
        self.head = nn.Linear(width, num_classes)

    @staticmethod
    def grid_input(images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> gray means of the 16 px patches [B, 1, H/16, W/16] in [-1, 1]."""
        w = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return F.avg_pool2d((images * w).sum(1, keepdim=True), GRID_PATCH) * 2 - 1

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output [B, width, g, g] for the grid input x."""
        out = []
        for conv in self.convs:
            x = F.relu(conv(x))
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.maps(x)[-1].mean((2, 3)))


def grid_digits(resolution: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as the network sees them at `resolution` (the diffusion presets' 128 px):
    grid inputs [N, 1, R/16, R/16], labels [N]."""
    from irepa.digits import load_digits_images
    images, labels = load_digits_images(resolution)
    return DigitsCNN.grid_input(images), labels


def split(labels: torch.Tensor, s: DigitsCNNSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(this network's training indices, its held-out indices): the metric classifier's reference
    half and its train half (irepa.metrics.classifier_fd.split_indices)."""
    from irepa.metrics.classifier_fd import split_indices
    metric_train, metric_test = split_indices(labels, s.metric_test_fraction, s.metric_split_seed)
    return metric_test, metric_train


def initial(s: DigitsCNNSettings) -> DigitsCNN:
    """The seeded initialisation (what training starts from, and the "-init" targets)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        return DigitsCNN(s.depth, s.width)


def train(s: DigitsCNNSettings, x: torch.Tensor, labels: torch.Tensor) -> tuple[DigitsCNN, dict]:
    """Train on the settings' split of (grid inputs x [N, 1, g, g], labels) as the metric classifier
    trains (irepa.metrics.classifier_fd.fit, one thread: the same weights whatever the core count);
    -> (net in eval mode, report)."""
    from irepa.metrics.classifier_fd import fit, one_thread

    tr, te = split(labels, s)
    with one_thread():
        net = fit(initial(s), x[tr], labels[tr], s.epochs, s.batch_size, s.lr, torch.Generator().manual_seed(s.seed + 1))
        with torch.no_grad():
            acc = {k: float((net(x[i]).argmax(1) == labels[i]).double().mean())
                   for k, i in (("train_accuracy", tr), ("heldout_accuracy", te))}
    return net, {**acc, "num_train": len(tr), "num_heldout": len(te)}


def cache_key(s: DigitsCNNSettings, x: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode())
    h.update(x.float().contiguous().numpy().tobytes())
    h.update(labels.long().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    return encoder_dir() / "trained"


def load_or_train(s: DigitsCNNSettings = DigitsCNNSettings(), log=print) -> tuple[DigitsCNN, dict]:
    """The trained network of settings `s` from the cache, trained (a few seconds) and cached if absent."""
    from safetensors.torch import load_file, save_file

    x, labels = grid_digits()
    key = cache_key(s, x, labels)
    path = cache_dir() / f"digits-cnn-{key}.safetensors"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        net = DigitsCNN(s.depth, s.width)
        try:
            net.load_state_dict(load_file(str(path)))
            return net.eval().requires_grad_(False), json.loads(meta.read_text())["report"]
        except Exception as e:  # a truncated file: say which, train it again
            log(f"[digits-cnn] {path}: unreadable ({type(e).__name__}: {e}); training it again")
    log(f"[digits-cnn] training the digits CNN target (depth {s.depth}, width {s.width}) on "
        f"{len(split(labels, s)[0])} images; cached as {path}")
    net, report = train(s, x, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp_meta = meta.with_name(f"{meta.name}.tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps({"key": key, "settings": asdict(s), "report": report}, indent=2))
    os.replace(tmp, path)  # the weights first: a json beside them means both are complete
    os.replace(tmp_meta, meta)
    log(f"[digits-cnn] held-out accuracy {100 * report['heldout_accuracy']:.2f}% on {report['num_heldout']} images")
    return net, report


class DigitsCNNTarget(Encoder):
    """Layer `layer` of a DigitsCNN as tokens [B, (H/16)^2, width] (post-ReLU, row-major)."""

    mean = None
    std = None

    def __init__(self, name: str, net: DigitsCNN, layer: int, report: dict | None = None):
        super().__init__()
        if not 1 <= layer <= len(net.convs):
            raise ValueError(f"{name}: layer {layer} outside the network's 1..{len(net.convs)}")
        self.name, self.net, self.layer, self.report = name, net, layer, report
        self.dim = net.convs[0].out_channels
        self.freeze()

    def preprocess(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return images.float()  # the net pools its own 16 px patches

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        w = self.net.convs[0].weight
        h = DigitsCNN.grid_input(x.to(w.dtype))
        for conv in self.net.convs[:self.layer]:
            h = F.relu(conv(h))
        return grid_to_tokens(h)


def build_digits_cnn(spec, tiny: bool = False) -> DigitsCNNTarget:
    """spec.arch "<layer>" (trained) or "<layer>-init" (the seeded initialisation). tiny: an untrained
    narrow network (tests of the registry; nothing trained or cached)."""
    layer_text, _, state = spec.arch.partition("-")
    layer = int(layer_text)
    s = DigitsCNNSettings()
    if tiny:
        return DigitsCNNTarget(spec.name, initial(DigitsCNNSettings(width=8)), layer)
    if state == "init":
        return DigitsCNNTarget(spec.name, initial(s).eval().requires_grad_(False), layer)
    net, report = load_or_train(s)
    return DigitsCNNTarget(spec.name, net, layer, report)
