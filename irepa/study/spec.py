"""What a spatial-vs-global study measures and trains.

For every target (an encoder name, irepa.encoders) the study measures its spatial metrics and
linear-probe accuracy on the digits, and trains the same SiT with each alignment method
(REPA's and iREPA's presets, only `align.encoders` set to the target) for every seed, scored
at fixed steps; optionally also without alignment ("none", the reference line of the plots).
The training half is an irepa.compare comparison: `compare_spec()` builds it, so resume, the
metric and the per-rank split of runs are the comparison's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from irepa.compare.spec import CompareSpec, JsonSpec, Recipe
from irepa.metrics.classifier_fd import ClassifierSettings

BASELINE = "none"
IMAGE_SETS = ("metric-train", "all")


def run_label(method: str, target: str) -> str:
    """The comparison recipe name of (method, target), e.g. irepa_hog-patch+perm."""
    return f"{method}_{target}"


@dataclass
class StudySpec(JsonSpec):
    KIND = "study spec"

    targets: list[str]
    seeds: list[int]
    eval_steps: list[int]
    """training steps at which every run is scored; correlations are reported at each (the last first)"""
    methods: dict = field(default_factory=lambda: {"repa": "digits-sit-repa", "irepa": "digits-sit-irepa"})
    """alignment method -> its preset (trained with align.encoders = [target])"""
    baseline: bool = True
    """also train the first method's preset without alignment (the plots' reference line)"""
    common: dict = field(default_factory=dict)
    """overrides of every run (not align.encoders)"""
    num_samples: int = 500
    sample_method: str | None = None
    """evaluation sampler; None: each preset's own"""
    sample_steps: int | None = None
    eval_seed: int = 1234
    metric: str = "classifier"
    """the comparison's metric (irepa.compare.spec.METRICS); classifier: the same on every machine"""
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    images: str = "metric-train"
    """images the target metrics and probe are measured on: metric-train (the metric classifier's
    training half, which no learned target was trained on) or all"""
    bootstrap: int = 10_000
    """bootstrap resamples of the targets for each interval"""
    permutations: int = 20_000
    """random pairings for the permutation p-value (every pairing when n! is not larger)"""
    stats_seed: int = 0

    def __post_init__(self):
        if isinstance(self.classifier, dict):
            self.classifier = ClassifierSettings(**self.classifier)
        self.targets = [str(t) for t in ([self.targets] if isinstance(self.targets, str) else self.targets)]
        if len(self.targets) < 3 or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: a correlation needs at least 3 distinct targets, got {self.targets}")
        if not self.methods or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.methods.items()):
            raise ValueError(f"methods must map method names to presets, got {self.methods!r}")
        if BASELINE in self.methods:
            raise ValueError(f"method name {BASELINE!r} is the no-alignment baseline's")
        if any(k.startswith(("align.encoders", "encoders")) for k in self.common):
            raise ValueError("common overrides may not set align.encoders: the study sets each run's target")
        if self.images not in IMAGE_SETS:
            raise ValueError(f"images must be one of {IMAGE_SETS}, got {self.images!r}")
        if self.bootstrap < 100 or self.permutations < 100:
            raise ValueError(f"bootstrap and permutations must be >= 100, got {self.bootstrap}, {self.permutations}")
        from irepa.encoders import get_spec
        for t in self.targets:
            get_spec(t)  # an unknown name is refused here, before anything runs
        self.compare_spec()  # seeds, steps, sampler and names checked by the comparison's own rules

    def compare_spec(self) -> CompareSpec:
        recipes = [Recipe(BASELINE, next(iter(self.methods.values())), {"align.encoders": []})] if self.baseline else []
        recipes += [Recipe(run_label(m, t), preset, {"align.encoders": [t]})
                    for t in self.targets for m, preset in self.methods.items()]
        return CompareSpec(recipes=recipes, seeds=list(self.seeds), eval_steps=list(self.eval_steps),
                           common=dict(self.common), num_samples=self.num_samples, sample_method=self.sample_method,
                           sample_steps=self.sample_steps, eval_seed=self.eval_seed, metric=self.metric,
                           classifier=self.classifier)


DEFAULT_TARGETS = [
    "hog-patch", "hog", "sift-upright", "raw-patch",              # weight free
    "digits-cnn-l2", "digits-cnn-l4", "digits-cnn-l4-init",      # learned, and the same net untrained
    "digits-cnn-l4+global", "digits-cnn-l4+perm", "hog-patch+perm",  # controls
]


def digits_default() -> StudySpec:
    """The embedded default: ten targets on the digits, REPA and iREPA and no alignment, two seeds,
    scored at steps 300 and 600 of the digits presets (mid-training, where alignment changes the
    most), 500 samples with heun 10 (docs/study-spatial-vs-global.md). 42 runs of 600 steps: about
    35 minutes on 2 idle cores as `torchrun --nproc_per_node=2 launch/analyze.py study`."""
    return StudySpec(targets=list(DEFAULT_TARGETS), seeds=[0, 1], eval_steps=[300, 600],
                     sample_method="heun", sample_steps=10)
