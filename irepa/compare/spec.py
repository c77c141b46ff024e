"""What a comparison trains and how it evaluates: recipes x seeds, evaluated at fixed steps.

A `Recipe` is a preset with overrides (dotted config keys) under a short name. Every recipe
runs once per seed with the same data, the same step budget (the last evaluation step)
and the same evaluation: `num_samples` class-balanced samples from one fixed noise batch
(`eval_seed`, the same for every run and step), decoded, scored by the metric
(irepa.compare.evaluate). `common` overrides apply to every recipe (e.g. a device).

The spec is written to the comparison folder as spec.json; a rerun continues only with
an equal spec (recipes and seeds may be added), so results never mix settings.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from irepa.metrics.classifier_fd import ClassifierSettings

METRICS = ("auto", "inception", "classifier")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Recipe:
    name: str
    """short label: plot legend, table row, run folder prefix"""
    preset: str
    overrides: dict = field(default_factory=dict)
    sample_method: str | None = None
    """this recipe's evaluation sampler; None: the spec's, or when that is None too the run's own
    (the preset's train.sample_method: MeanFlow's presets sample with its 1-step euler)"""
    sample_steps: int | None = None

    def __post_init__(self):
        if not _NAME_RE.match(self.name):
            raise ValueError(f"recipe name {self.name!r}: use letters, digits and _.+- (it names folders)")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"recipe {self.name!r}: overrides must be a mapping of config keys, got "
                             f"{type(self.overrides).__name__}")


class JsonSpec:
    """A dataclass spec kept as JSON: to_dict / from_dict (unknown keys refused) / load (any problem
    is a ValueError naming the file). `KIND` names the spec in messages."""

    KIND = "spec"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"{cls.KIND}: unknown key(s) {bad}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a {cls.KIND} ({e})") from None

    @classmethod
    def load_or_default(cls, path: str | Path | None, default, **changes):
        """The spec at `path` (else `default()`) with the changes that are not None applied
        (a command line's overrides); any problem is a ValueError."""
        spec = cls.load(path) if path else default()
        changes = {k: v for k, v in changes.items() if v is not None}
        return cls.from_dict({**spec.to_dict(), **changes}) if changes else spec


@dataclass
class CompareSpec(JsonSpec):
    KIND = "comparison spec"

    recipes: list[Recipe]
    seeds: list[int]
    eval_steps: list[int]
    """training steps at which every run's EMA model is evaluated; the last is the step budget"""
    common: dict = field(default_factory=dict)
    """overrides applied to every recipe (before its own)"""
    num_samples: int = 500
    sample_method: str | None = None
    """evaluation sampler of every recipe that does not name its own; None: each run's own
    (its preset's train.sample_method / sample_steps)"""
    sample_steps: int | None = None
    eval_seed: int = 1234
    """noise and labels of the evaluation samples (the same for every run and step)"""
    metric: str = "auto"
    """auto (Inception FID when the ADM weights are found, else the classifier distance) | inception | classifier"""
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)

    def __post_init__(self):
        self.recipes = [r if isinstance(r, Recipe) else Recipe(**r) for r in self.recipes]
        if isinstance(self.classifier, dict):
            self.classifier = ClassifierSettings(**self.classifier)
        self.seeds = [int(s) for s in ([self.seeds] if isinstance(self.seeds, int) else self.seeds)]
        self.eval_steps = [int(s) for s in ([self.eval_steps] if isinstance(self.eval_steps, int)
                                            else self.eval_steps)]
        names = [r.name for r in self.recipes]
        if not self.recipes or len(set(names)) != len(names):
            raise ValueError(f"recipes must be a non-empty list with distinct names, got {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers, got {self.seeds}")
        if not self.eval_steps or self.eval_steps != sorted(set(self.eval_steps)) or self.eval_steps[0] <= 0:
            raise ValueError(f"eval_steps must be positive and strictly increasing, got {self.eval_steps}")
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (a covariance needs two samples), got {self.num_samples}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        from irepa.sampling import check_settings
        for r in self.recipes:  # a half given here is checked with the preset's other half in backend.run_config
            s = self.sampler(r)
            if len(s) == 2:
                check_settings(s["train.sample_method"], s["train.sample_steps"])

    def sampler(self, recipe: Recipe) -> dict:
        """The train.sample_method / sample_steps overrides of `recipe`'s runs (empty: the preset's)."""
        out = {}
        method = recipe.sample_method or self.sample_method
        steps = recipe.sample_steps or self.sample_steps
        if method is not None:
            out["train.sample_method"] = method
        if steps is not None:
            out["train.sample_steps"] = int(steps)
        return out

    @property
    def steps(self) -> int:
        return self.eval_steps[-1]

    def runs(self) -> list[tuple[Recipe, int]]:
        """Every (recipe, seed), seeds outermost: with one run per rank, each seed's recipes run side by side."""
        return [(r, s) for s in self.seeds for r in self.recipes]

    def incompatible_with(self, old: "CompareSpec") -> list[str]:
        """What differs from the spec a comparison folder was started with, beyond added recipes/seeds."""
        a, b = old.to_dict(), self.to_dict()
        diff = [k for k in a if k not in ("recipes", "seeds") and a[k] != b[k]]
        olds = {r["name"]: r for r in a["recipes"]}
        diff += [f"recipe {r['name']}" for r in b["recipes"] if r["name"] in olds and olds[r["name"]] != r]
        return diff


def digits_default() -> CompareSpec:
    """The embedded default: the digits presets (SiT-Tiny/2, 800 steps), no alignment vs REPA (MLP,
    raw HOG) vs iREPA (conv, spatial norm, HOG), three seeds, evaluated over the presets' whole run.
    A run's 800 steps take about 100 s of process CPU at one thread, an evaluation about 5 s
    (measured for the presets, docs/study-spatial-vs-global.md): about 10 minutes as
    `torchrun --nproc_per_node=2 launch/compare.py` on 2 free cores (an estimate from those parts).
    Before the presets were retuned (SiT-T/2, 500 steps, 6685bbd) its 45 segments took 2,681 s."""
    return CompareSpec(
        recipes=[Recipe("none", "digits-sit-irepa", {"align.encoders": []}),
                 Recipe("repa", "digits-sit-repa"),
                 Recipe("irepa", "digits-sit-irepa")],
        seeds=[0, 1, 2],
        eval_steps=[200, 400, 600, 800],
        num_samples=500, sample_method="heun", sample_steps=10)
