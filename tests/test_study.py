"""The spatial-vs-global study (irepa.study, launch/analyze.py study): its statistics against
scipy and direct computations, and its resume."""
import itertools
import json
import math
import os
import signal

import numpy as np
import pytest
from scipy import stats as sp

from irepa.compare import backend
from irepa.metrics import classifier_fd
from irepa.study import StudySpec, digits_default
from irepa.study import stats
from irepa.study.runner import Study

from interrupts import Interrupt

X = np.array([0.12, 0.40, 0.33, 0.05, 0.71, 0.52, 0.33])
Y = np.array([140.0, 101.0, 120.0, 150.0, 90.0, 130.0, 111.0])


def test_coefficients_match_scipy():
    out = stats.correlate(X, Y, resamples=200, permutations=200)
    assert out["n"] == 7
    assert out["pearson"] == pytest.approx(sp.pearsonr(X, Y)[0], abs=1e-12)
    assert out["spearman"] == pytest.approx(sp.spearmanr(X, Y)[0], abs=1e-12)  # X has a tie: average ranks
    rows = stats.pearson_rows(np.stack([X, X[::-1]]), np.stack([Y, Y]))
    assert rows[1] == pytest.approx(sp.pearsonr(X[::-1], Y)[0], abs=1e-12)
    assert math.isnan(stats.pearson_rows(np.ones(5), np.arange(5.0)))  # constant x: no r


def test_permutation_p_is_the_exact_share_of_pairings():
    """n = 7: 5040 pairings <= permutations, so every one is counted; compared with a direct loop."""
    for method, fn in (("pearson", lambda a, b: sp.pearsonr(a, b)[0]),
                       ("spearman", lambda a, b: sp.spearmanr(a, b)[0])):
        p, exact = stats.permutation_p(X, Y, method, permutations=5040)
        obs = abs(fn(X, Y))
        hits = sum(abs(fn(X, Y[list(o)])) >= obs - 1e-9 for o in itertools.permutations(range(7)))
        assert exact and p == hits / 5040, method


def test_random_permutation_p_is_close_to_the_exact_one():
    p_exact, _ = stats.permutation_p(X, Y, "pearson", permutations=5040)
    p_mc, exact = stats.permutation_p(X, Y, "pearson", permutations=4000, seed=3)
    assert not exact and p_mc > 0
    assert abs(p_mc - p_exact) < 4 * math.sqrt(p_exact * (1 - p_exact) / 4000) + 1 / 4000


def test_bootstrap_interval_is_the_percentiles_of_resampled_r():
    lo, hi = stats.bootstrap_interval(X, Y, "spearman", resamples=300, alpha=0.1, seed=5)
    idx = np.random.default_rng(5).integers(0, 7, (300, 7))
    rs = []
    for i in idx:
        if np.ptp(X[i]) > 0 and np.ptp(Y[i]) > 0:
            rs.append(sp.spearmanr(X[i], Y[i])[0])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(rs, [5, 95])), abs=1e-12)
    assert lo < stats.correlate(X, Y)["spearman"] < hi


def test_spec_refuses_what_it_cannot_run():
    d = digits_default().to_dict()
    with pytest.raises(ValueError, match="at least 3 distinct targets"):
        StudySpec.from_dict({**d, "targets": ["hog", "sift"]})
    with pytest.raises(ValueError, match="unknown encoder 'hogg'"):
        StudySpec.from_dict({**d, "targets": ["hog", "sift", "hogg"]})
    with pytest.raises(ValueError, match="align.encoders"):
        StudySpec.from_dict({**d, "common": {"align.encoders": ["hog"]}})
    with pytest.raises(ValueError, match="unknown key"):
        StudySpec.from_dict({**d, "target": ["hog"]})
    labels = [r.name for r in digits_default().compare_spec().recipes]
    assert labels[0] == "none" and "irepa_digits-cnn-l4+perm" in labels


TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 8, "model.align_depth": 1, "data.resolution": 64,
        "train.batch_size": 16, "train.log_every": 1, "train.ckpt_every": 100, "train.ema_decays": [0.9],
        "optim.warmup_steps": 3}
TINY_STUDY = {"targets": ["hog-patch", "raw-patch", "hog-patch+perm"], "seeds": [0], "eval_steps": [2],
              "baseline": False, "common": TINY, "num_samples": 20, "sample_steps": 2, "classifier": {"epochs": 2},
              "bootstrap": 200, "permutations": 200}
OUTPUTS = ("targets.csv", "correlation.csv", "summary.md")


def _study(out, cache):
    return Study(StudySpec.from_dict(TINY_STUDY), out, cache_dir=cache, device="cpu", log=lambda m: None).run()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_cache):
    out = tmp_path_factory.mktemp("study")
    with classifier_fd.one_thread():
        _study(out, digits_cache)
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def test_interrupted_study_resumes_to_the_same_tables(tmp_path, digits_cache, one_thread, monkeypatch, reference):
    """Compared against: the same study run without interruption. A SIGINT in the third run's
    training stops the study; rerunning the same command must keep what was finished (the
    first runs' evaluations) and write the tables byte for byte as the uninterrupted run."""
    from irepa.train import trainer as trainer_mod

    def train(cfg):
        tr = trainer_mod.Trainer(cfg)
        if cfg.train.run_name == "repa_raw-patch-s0":
            tr.run.data.loader = Interrupt(tr.run.data.loader, 0, lambda: os.kill(os.getpid(), signal.SIGINT))
        return tr.train()

    out = tmp_path / "study"
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "train", train)
        with pytest.raises(backend.Interrupted):
            _study(out, digits_cache)
    done = sorted(p.parent.name for p in (out / "compare" / "evals").rglob("step-*.json"))
    assert done == ["irepa_hog-patch-s0", "repa_hog-patch-s0"] and not (out / "summary.md").exists()
    mtime = (out / "compare" / "evals" / "repa_hog-patch-s0" / "step-0000002.json").stat().st_mtime_ns
    _study(out, digits_cache)
    assert (out / "compare" / "evals" / "repa_hog-patch-s0" / "step-0000002.json").stat().st_mtime_ns == mtime
    for name in OUTPUTS:
        assert (out / name).read_bytes() == reference[name], name
    table = (out / "targets.csv").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("target,lds,lds_paper,cds,srss,rmsc,probe_acc,global_share")
    corr = (out / "correlation.csv").read_text().splitlines()
    assert len(corr) == 1 + 2 * 2 * 7  # methods x qualities x metrics at the one eval step
    assert (out / "scatter.png").stat().st_size > 1000
    assert json.loads((out / "targets" / "hog-patch+perm.json").read_text())["row"]["lds"] < 0.05


def _analyze_cli():
    import importlib.util
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("launch_analyze", root / "launch" / "analyze.py")
    mod = sys.modules["launch_analyze"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_prints_the_spec_and_refuses_bad_input(tmp_path, capsys):
    from irepa.errors import InputError, InputNotFound

    cli = _analyze_cli()
    cli.main(["study", "--print_spec", "--targets", "hog,sift-upright,raw-patch", "--seeds", "3,4"])
    d = json.loads(capsys.readouterr().out)
    assert d["targets"] == ["hog", "sift-upright", "raw-patch"] and d["seeds"] == [3, 4]
    assert d["eval_steps"] == digits_default().eval_steps
    with pytest.raises(InputError, match="unknown encoder 'nope'"):
        cli.main(["study", "--targets", "hog,sift,nope", "--out", str(tmp_path / "s")])
    with pytest.raises(InputNotFound, match="no study here"):
        cli.main(["study", "--report_only", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()  # nothing written by a refused command
