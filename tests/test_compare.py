"""Recipe comparisons (irepa.compare, launch/compare.py) on tiny digits runs."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from irepa.compare import backend
from irepa.compare.layout import eval_path
from irepa.compare.report import steps_to_reach, write_report
from irepa.compare.runner import Comparison, check_spec
from irepa.compare.spec import CompareSpec, Recipe, digits_default
from irepa.train import checkpoint as ckpt_io

from interrupts import Crash, Interrupt, crash

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 8, "data.resolution": 64, "train.batch_size": 16,
        "train.log_every": 1, "train.ckpt_every": 100, "train.ema_decays": [0.9], "optim.warmup_steps": 3}
TINY_SPEC = {"recipes": [{"name": "none", "preset": "digits-sit-irepa", "overrides": {"align.encoders": []}},
                         {"name": "irepa", "preset": "digits-sit-irepa"}],
             "seeds": [0], "eval_steps": [2, 4], "common": TINY, "num_samples": 20, "sample_steps": 2,
             "classifier": {"epochs": 2}}


@pytest.fixture
def cache(digits_cache, one_thread):
    """Prepared digits and metric classifiers shared by the session; one intra-op thread."""
    return digits_cache


def test_segmented_training_is_bit_identical_to_one_run(tmp_path, cache):
    """Compared against: one uninterrupted 6-step run. Training the same run folder to 2, then 4,
    then 6 steps (how the comparison evaluates at fixed steps, warm-up crossing the boundaries)
    must leave the same model, EMA, optimizer state and RNG, bit for bit."""
    def cfg(steps, name):
        return backend.run_config("digits-sit-irepa", TINY, seed=3, steps=steps, out_dir=tmp_path, run_name=name,
                                  cache_dir=cache)
    straight = ckpt_io.read_checkpoint(backend.train_to(cfg(6, "straight")))
    for s in (2, 4, 6):
        last = backend.train_to(cfg(s, "segmented"))
    segmented = ckpt_io.read_checkpoint(last)
    for part in ("model", "rng"):
        assert straight[part].keys() == segmented[part].keys()
        assert all(torch.equal(straight[part][k], segmented[part][k]) for k in straight[part]), part
    for a, b in zip(straight["ema"], segmented["ema"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = straight["optimizer"]["state"], segmented["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert straight["trainer"]["data"] == segmented["trainer"]["data"]
    logged = [json.loads(line)["step"] for line in (tmp_path / "segmented" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # each step trained once: the segments resumed, none restarted


def _interrupt(monkeypatch, run: str, steps: int, at: int, action):
    """Make the training segment of `run` that ends at `steps` meet `action` before its batch `at`."""
    from irepa.train import trainer as trainer_mod

    def train(cfg):
        tr = trainer_mod.Trainer(cfg)
        if cfg.train.run_name == run and cfg.train.steps == steps:
            tr.run.data.loader = Interrupt(tr.run.data.loader, at, action)
        return tr.train()
    monkeypatch.setattr(trainer_mod, "train", train)


def _compare(out, cache, spec=TINY_SPEC):
    return Comparison(CompareSpec.from_dict(spec), out, cache_dir=cache, device="cpu", log=lambda m: None).run()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_cache):
    """results.csv of the tiny comparison run once, uninterrupted, in this process on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference")
        _compare(out, digits_cache)
    finally:
        torch.set_num_threads(n)
    csv = (out / "results.csv").read_bytes()
    assert b"fd_classifier" in csv and len(csv.splitlines()) == 5
    return csv


def test_interrupted_comparison_resumes_to_the_same_csv(tmp_path, cache, monkeypatch, reference):
    """Compared against: the same comparison run without interruption. A SIGINT inside the first
    run's second segment (the trainer checkpoints step 3 and returns; the comparison stops), then a
    crash inside the second run's second segment (nothing saved after step 2), then a plain
    rerun: results.csv must be byte for byte the uninterrupted one."""
    ref_csv = reference
    s = CompareSpec.from_dict(TINY_SPEC)
    none, irepa = s.recipes
    out = tmp_path / "cut"

    with monkeypatch.context() as m:
        _interrupt(m, "none-s0", 4, 0, lambda: os.kill(os.getpid(), signal.SIGINT))
        with pytest.raises(backend.Interrupted, match="stopped at step 3 before step 4"):
            _compare(out, cache)
    assert eval_path(out, none, 0, 2).is_file() and not eval_path(out, none, 0, 4).exists()
    assert backend.latest_step(out / "runs" / "none-s0") == 3
    with monkeypatch.context() as m:
        _interrupt(m, "irepa-s0", 4, 1, crash)
        with pytest.raises(Crash):
            _compare(out, cache)
    assert eval_path(out, none, 0, 4).is_file() and eval_path(out, irepa, 0, 2).is_file()
    assert not eval_path(out, irepa, 0, 4).exists() and not (out / "results.csv").exists()
    assert backend.latest_step(out / "runs" / "irepa-s0") == 2
    _compare(out, cache)
    assert (out / "results.csv").read_bytes() == ref_csv
    assert (out / "convergence.png").stat().st_size > 0 and list((out / "tb" / "irepa" / "mean").glob("events.*"))
    assert "Frechet distance in the metric classifier's features" in (out / "summary.md").read_text()
    # --eval_noise: the last checkpoints scored again with another noise batch, nothing retrained
    Comparison(s, out, cache_dir=cache, device="cpu", log=lambda m: None).run(eval_noise=1)
    noise = (out / "eval_noise.csv").read_text().splitlines()
    assert len(noise) == 3 and noise[1].startswith(f"none,0,4,{s.eval_seed + 1},fd_classifier,")
    assert (out / "results.csv").read_bytes() == ref_csv and backend.latest_step(out / "runs" / "none-s0") == 4
    summary = (out / "summary.md").read_text()
    assert "Metric noise at step 4, 2 evaluation noise batches" in summary and "\n| none | " in summary


def test_one_run_per_rank_gives_the_same_csv(tmp_path, digits_cache, reference):
    """Compared against: the same comparison run one run after another in this process. Under
    torchrun with 2 ranks (one run each, one thread each) rank 0 writes the report once both
    runs are evaluated; the CSV is the same bytes."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TINY_SPEC))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "launch" / "compare.py"), "--spec", str(spec), "--out", str(tmp_path / "out"),
           "--cache_dir", digits_cache]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {json.loads(p.read_text())["rank"] for p in (tmp_path / "out" / "evals").rglob("step-*.json")}
    assert ranks == {0, 1}
    assert (tmp_path / "out" / "results.csv").read_bytes() == reference


def test_cli_refuses_other_settings_in_a_started_folder(tmp_path):
    """launch/compare.py on a folder that holds evaluations made with other settings, or with a
    misspelt preset: an error naming it, before anything is written."""
    out = tmp_path / "out"
    done = out / "evals" / "none-s0" / "step-0000002.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    (out / "spec.json").write_text(json.dumps(CompareSpec.from_dict(TINY_SPEC).to_dict()))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for change, expect in (({"num_samples": 10}, "num_samples"),
                           ({"recipes": [{"name": "x", "preset": "digits-sit-irepaa"}]}, "unknown preset")):
        spec = tmp_path / "other.json"
        spec.write_text(json.dumps({**TINY_SPEC, **change}))
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "compare.py"), "--spec", str(spec), "--out",
                               str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_spec_validation_and_resume_rules(tmp_path):
    with pytest.raises(ValueError, match="distinct names"):
        CompareSpec(recipes=[Recipe("a", "p"), Recipe("a", "q")], seeds=[0], eval_steps=[1])
    with pytest.raises(ValueError, match="strictly increasing"):
        CompareSpec(recipes=[Recipe("a", "p")], seeds=[0], eval_steps=[2, 2])
    with pytest.raises(ValueError, match="unknown key"):
        CompareSpec.from_dict({**TINY_SPEC, "num_sample": 3})
    with pytest.raises(ValueError, match="names folders"):
        Recipe("a/b", "p")
    with pytest.raises(ValueError, match="sets train.steps"):
        backend.run_config("digits-sit-irepa", {"steps": 3}, seed=0, steps=2, out_dir=tmp_path, run_name="r",
                           cache_dir=tmp_path)
    s = CompareSpec.from_dict(TINY_SPEC)
    check_spec(tmp_path, CompareSpec.from_dict({**TINY_SPEC, "num_samples": 7}), 0, print)
    check_spec(tmp_path, s, 0, print)  # nothing evaluated or trained yet: the new spec replaces the old
    assert CompareSpec.load(tmp_path / "spec.json").num_samples == TINY_SPEC["num_samples"]
    (tmp_path / "evals" / "none-s0").mkdir(parents=True)
    (tmp_path / "evals" / "none-s0" / "step-0000002.json").write_text("{}")
    more = CompareSpec.from_dict({**TINY_SPEC, "seeds": [0, 1],
                                  "recipes": TINY_SPEC["recipes"] + [{"name": "repa", "preset": "digits-sit-repa"}]})
    check_spec(tmp_path, more, 0, print)  # added seeds and recipes continue the same folder
    assert CompareSpec.load(tmp_path / "spec.json").seeds == [0, 1]
    other = CompareSpec.from_dict({**TINY_SPEC, "recipes": [{"name": "none", "preset": "digits-sit-repa"}]})
    with pytest.raises(ValueError, match="recipe none"):
        check_spec(tmp_path, other, 0, print)
    d = digits_default()
    assert [r.name for r in d.recipes] == ["none", "repa", "irepa"] and len(d.seeds) == 3


def _fake_eval(out, spec, recipe, seed, step, value, acc):
    p = eval_path(out, spec.recipes[[r.name for r in spec.recipes].index(recipe)], seed, step)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"recipe": recipe, "seed": seed, "step": step, "metric": "fd_classifier",
                             "value": value, "class_acc": acc, "num_samples": 20, "train_seconds": 1.0}))


def test_report_table_and_speedup(tmp_path):
    """Compared against hand-computed means, sample standard deviations and interpolated steps."""
    assert steps_to_reach({10: 50.0, 20: 30.0, 40: 10.0}, 20.0) == pytest.approx(30.0)
    assert steps_to_reach({10: 50.0, 20: 30.0}, 5.0) is None
    spec = CompareSpec(recipes=[Recipe("none", "p"), Recipe("irepa", "p")], seeds=[0, 1], eval_steps=[10, 20])
    for seed, (a, b) in enumerate([(40.0, 20.0), (44.0, 24.0)]):
        _fake_eval(tmp_path, spec, "none", seed, 10, a, 0.5)
        _fake_eval(tmp_path, spec, "none", seed, 20, b, 0.7)
        _fake_eval(tmp_path, spec, "irepa", seed, 10, a - 20, 0.8)
        _fake_eval(tmp_path, spec, "irepa", seed, 20, b - 10, 0.9)
    text = write_report(tmp_path, spec).read_text()
    assert "| none | 42.00 ± 2.83 | 22.00 ± 2.83 | 70.0 ± 0.0 |" in text
    assert "| irepa | 22.00 ± 2.83 | 12.00 ± 2.83 | 90.0 ± 0.0 |" in text
    assert "| step 20: 22.00 | 20 (1.00x) | 10 (2.00x) |" in text  # irepa is at 22 by its first eval step
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0] == "recipe,seed,step,metric,value,class_acc,num_samples" and len(rows) == 9
    assert rows[1] == "none,0,10,fd_classifier,40.000000,0.500000,20"
    assert (tmp_path / "convergence.png").stat().st_size > 0


def _record_sampling(monkeypatch):
    """Every recipe.sample call of the comparison's evaluations as (recipe name, method, steps,
    checkpoint: the one the recipe's decoder was made for); the trainers' own sample grids (a
    decoder of the live parts, no checkpoint) are left out."""
    from irepa.recipes import base

    calls, seen = [], {}
    original_sample, original_decoder = base.Recipe.sample, base.Recipe.decoder

    def wrap(cls):
        inner_sample = cls.__dict__.get("sample", original_sample)
        inner_decoder = cls.__dict__.get("decoder", original_decoder)

        def decoder(self, *args, **kw):
            seen[id(self)] = kw.get("checkpoint")
            return inner_decoder(self, *args, **kw)

        def sample(self, model, noise, labels, **kw):
            if seen.get(id(self)) is not None:
                calls.append((self.name, kw["method"], kw["steps"], seen[id(self)]))
            return inner_sample(self, model, noise, labels, **kw)
        monkeypatch.setattr(cls, "sample", sample)
        monkeypatch.setattr(cls, "decoder", decoder)
    from irepa import recipes
    for name in recipes.names():
        wrap(recipes.get(name))
    return calls


def test_each_recipe_samples_its_own_way(tmp_path, cache, monkeypatch):
    """Compared against: the preset's own sampler and the spec's choices. A SiT recipe that names
    a sampler is sampled with it; a MeanFlow recipe that names none samples with its preset's
    (MeanFlowRecipe.sample, 1-step euler); both on the same prepared digits, each evaluation
    through the checkpoint it scores. setup.json and summary.md say which sampler each used."""
    calls = _record_sampling(monkeypatch)
    spec = {"recipes": [{"name": "sit", "preset": "digits-sit-irepa", "sample_method": "euler", "sample_steps": 2},
                        {"name": "mf", "preset": "digits-meanflow-irepa"}],
            "seeds": [0], "eval_steps": [1], "common": TINY, "num_samples": 20, "classifier": {"epochs": 2}}
    _compare(tmp_path, cache, spec)
    assert [c[:3] for c in calls] == [("sit", "euler", 2), ("meanflow", "euler", 1)]
    assert [c[3].parent.parent.name for c in calls] == ["sit-s0", "mf-s0"] and all(c[3].name == "step-0000001"
                                                                                   for c in calls)
    assert json.loads((tmp_path / "setup.json").read_text())["samplers"] == {"sit": ["euler", 2], "mf": ["euler", 1]}
    assert "(sit: euler, 2 steps; mf: euler, 1 steps, no guidance" in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match="evaluation sampler"):
        backend.run_config("digits-sit-irepa", TINY, seed=0, steps=1, out_dir=tmp_path, run_name="r",
                           cache_dir=cache, sampler={"train.sample_method": "heun", "train.sample_steps": 0})


def test_pixel_recipe_comparison(tmp_path, cache, monkeypatch):
    """JiT on pixels (a manifest without latent statistics): prepared, trained, sampled with its
    preset's sampler (the spec names none) and scored; one row in results.csv."""
    calls = _record_sampling(monkeypatch)
    spec = {"recipes": [{"name": "jit", "preset": "digits-jit-irepa",
                         "overrides": {"model.input_size": 32, "data.resolution": 32}}],
            "seeds": [0], "eval_steps": [1], "num_samples": 20, "sample_steps": 2, "classifier": {"epochs": 2},
            "common": {"train.batch_size": 8, "train.log_every": 1, "train.ema_decays": [0.9],
                       "optim.warmup_steps": 0}}
    _compare(tmp_path, cache, spec)
    assert [c[:3] for c in calls] == [("jit", "heun", 2)]
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("jit,0,1,fd_classifier,")


def test_inception_scores_samples_quantized_as_the_recipe_writes_them():
    """Compared against: irepa.grid.quantize_unit. With the Inception metric, generated images
    reach the network as the uint8 values of the recipe's release (SiT truncates, JiT rounds;
    Recipe.sample_quantize); the run's recipe names the rule."""
    import numpy as np
    from irepa.compare.evaluate import Evaluator
    from irepa.grid import quantize_unit
    from irepa.metrics.fid import Stats
    from irepa.recipes import resolve

    seen = []

    def inception(x):
        seen.append(x.clone())
        return {"pool": x.flatten(1)[:, :4].double()}
    ev = Evaluator(classifier=None, metric="fid_inception", inception=inception,
                   reference=Stats.of(np.random.default_rng(0).normal(size=(16, 4))))
    images = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for rule in ("truncate", "round"):
        ev.distance(images, rule)
        assert torch.equal(seen[-1], quantize_unit(images, rule).float())
    assert not torch.equal(seen[0], seen[1])
    assert backend.sample_quantize(resolve("digits-sit-irepa")) == "truncate"
    assert backend.sample_quantize(resolve("digits-jit-irepa")) == "round"


def test_cli_names_the_option_of_a_bad_value(tmp_path, capsys, monkeypatch):
    """`--seeds abc` said "invalid literal for int() with base 10: 'a'" (the letters of the string,
    converted one by one); the option and the expected form are named, exit status 1, one line."""
    from irepa import cli
    from test_sample_script import _load_launch
    mod = _load_launch("compare")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    out = tmp_path / "out"
    for argv, message in ((["--seeds", "abc"], "compare.py: --seeds: expected a list of int (A,B or [A, B]) or None, "
                                               "got 'abc'\n"),
                          (["--eval_steps", "2.5"], "compare.py: --eval_steps: expected a list of int"),
                          (["--eval_steps", "3,2"], "compare.py: eval_steps must be positive and strictly increasing"),
                          (["--metric", "fid"], "compare.py: --metric: expected one of 'auto', 'inception', "
                                                "'classifier' or None, got 'fid'")):
        with pytest.raises(SystemExit) as e:
            cli.run(mod.main, "compare.py", [*argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()
    cli.call(mod.main, "compare.py", ["--seeds", "4,5", "--eval_steps", "[3]", "--print_spec"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["seeds"] == [4, 5] and printed["eval_steps"] == [3]
