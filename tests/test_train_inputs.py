"""train.py's startup against what the user points it at (issue 25, items 2, 5, 6 and 10).

A resume into a folder of another run, an option of a recipe the run does not use, data whose
classes differ from the model's, an unknown model, a file where the run folder goes and damaged
dataset files: each ends train.py with exit status 1 and one line, and a refused start leaves
the run folder exactly as it was (compared file by file: names, mtimes, sha256). Tiny runs on
the session's digits cache and on a 4-class image folder made here with PIL.
"""
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from irepa import cli
from irepa.config import ConfigError
from irepa.data import build_loader, ffcv_available, prepare, read_manifest
from irepa.errors import InputError, UserError
from irepa.recipes import resolve
from irepa.train.trainer import Trainer

from test_train import TINY as TRAIN_TINY

ROOT = Path(__file__).resolve().parents[1]
TINY = {**TRAIN_TINY, "train.ckpt_every": 2, "train.sample_steps": 2}  # 2-step runs with a checkpoint
pytestmark = pytest.mark.usefixtures("one_thread")
_CACHE = {}


@pytest.fixture(autouse=True, scope="module")
def _digits(digits_cache):
    _CACHE["dir"] = digits_cache  # the session's prepared digits, for _over


def _over(out_dir, name, **over) -> dict:
    return {**TINY, "train.out_dir": str(out_dir), "train.run_name": name, "data.cache_dir": _CACHE["dir"], **over}


def _argv(preset: str, over: dict) -> list[str]:
    argv = ["--preset", preset]
    for key, value in over.items():
        argv += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def _train_main():
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _refused(capsys, argv: list[str]) -> str:
    """launch/train.py with `argv` in this process: exit status 1 and one stderr line, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(_train_main(), "train.py", argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("train.py: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """For refusals the config itself must make: a config that passes is not trained."""
    import irepa.train.trainer as trainer

    def accepted(cfg):
        raise AssertionError("the config was accepted")
    monkeypatch.setattr(trainer, "train", accepted)


def _snapshot(root: Path) -> dict:
    """Every path under root (the folder itself too) with its mtime, and each file's sha256."""
    out = {".": root.stat().st_mtime_ns}
    for p in sorted(root.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def meanflow_run(tmp_path_factory, digits_cache):
    """A MeanFlow run folder after 2 steps (one checkpoint); tests work on copies."""
    out = tmp_path_factory.mktemp("meanflow")
    Trainer(resolve("digits-meanflow-irepa", {**_over(out, "mf"), "data.cache_dir": digits_cache,
                                              "train.steps": 2})).train()
    return out / "mf"


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / run.name
    shutil.copytree(run, dst)
    return dst


# -- item 2: a resume refuses another run's folder before writing anything ------------------------
def test_sit_preset_on_a_meanflow_run_folder_is_refused_and_changes_nothing(meanflow_run, tmp_path, capsys):
    run = _copy(meanflow_run, tmp_path)
    config = (run / "config.json").read_bytes()
    before = _snapshot(run)
    err = _refused(capsys, _argv("digits-sit-irepa", _over(run.parent, run.name, **{"train.steps": 4})))
    assert "train.recipe: 'meanflow' -> 'sit'" in err and str(run / "config.json") in err
    assert (run / "config.json").read_bytes() == config
    assert _snapshot(run) == before


@pytest.mark.parametrize("over,refused", [
    ({"meanflow.omega": 2.0}, "meanflow.omega: 1.0 -> 2.0"),       # another objective: another run
    ({"meanflow.data_proportion": 0.5}, "meanflow.data_proportion: 0.75 -> 0.5"),
    ({"model.num_classes": 11}, "model.num_classes: 10 -> 11"),
    ({"meanflow.jvp": "split"}, None),                               # the same values by other kernels
    ({"meanflow.target_precision": "amp", "data.verify": "none"}, None),
])
def test_a_resume_refuses_settings_it_cannot_change(meanflow_run, tmp_path, over, refused):
    run = _copy(meanflow_run, tmp_path)
    before = _snapshot(run)
    cfg = resolve("digits-meanflow-irepa", _over(run.parent, run.name, **{"train.steps": 2, **over}))
    if refused is None:
        assert Trainer(cfg).step == 2  # resumed
        return
    with pytest.raises(UserError, match="settings a resume cannot change differ: " + refused.replace(".", r"\.")):
        Trainer(cfg)
    assert _snapshot(run) == before


def test_repae_options_that_change_the_vae_are_compared_and_its_weight_paths_are_not(tmp_path):
    """Config-level, no run: the VAE architecture is part of the checkpoint, where its first weights
    came from is not (a resume loads its own)."""
    from irepa import recipes
    from irepa.train import run_folder
    old = resolve("digits-repae-irepa")
    recipe = recipes.for_config(old)
    assert run_folder.resume_conflicts(old, resolve("digits-repae-irepa", {"repae.vae": "tiny"}), recipe) == [
        "repae.vae: 'digits' -> 'tiny'"]
    moved = resolve("digits-repae-irepa", {"repae.vae_weights": "/elsewhere/vae.pt", "repae.vae_lr": 3e-4})
    assert run_folder.resume_conflicts(old, moved, recipe) == []


def test_a_refused_start_moves_nothing_aside_and_rewrites_no_config(meanflow_run, tmp_path, capsys, monkeypatch):
    """Refusals that come after the model and data are built (a checkpoint that does not fit, a
    missing FID reference) or that the log makes (wandb not installed) still come before the
    first write: config.json is not rewritten and a fresh start does not move the old run aside."""
    run = _copy(meanflow_run, tmp_path)
    before = _snapshot(run)
    two_emas = _over(run.parent, run.name, **{"train.steps": 4, "train.ema_decays": [0.9, 0.8]})
    err = _refused(capsys, _argv("digits-meanflow-irepa", two_emas))
    assert "EMA models" in err and "train.ema_decays" in err
    assert _snapshot(run) == before
    no_ref = _over(run.parent, run.name, **{"train.resume": "false", "train.fid_every": 2,
                                            "train.fid_ref": str(tmp_path / "none.npz")})
    err = _refused(capsys, _argv("digits-meanflow-irepa", no_ref))
    assert "none.npz" in err
    assert _snapshot(run) == before and not list(run.glob("previous-*"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    no_wandb = _over(run.parent, run.name, **{"train.resume": "false", "log.wandb": "true"})
    err = _refused(capsys, _argv("digits-meanflow-irepa", no_wandb))
    assert "wandb is not installed" in err
    assert _snapshot(run) == before and not list(run.glob("previous-*"))


def test_a_checkpoint_of_another_model_is_one_line_and_not_set_aside(meanflow_run, tmp_path, capsys):
    """Without the config.json that would refuse it first: the load names the checkpoint, and the
    checkpoint, not damaged, is neither renamed .corrupt nor replaced by an older one."""
    run = _copy(meanflow_run, tmp_path)
    (run / "config.json").unlink()
    before = _snapshot(run)
    err = _refused(capsys, _argv("digits-sit-irepa", _over(run.parent, run.name, **{"train.steps": 4})))
    assert "step-0000002: its 'model' does not fit this run's model" in err and "h_embedder" in err
    assert _snapshot(run) == before


# -- item 5: options of a recipe the run does not use ---------------------------------------------
@pytest.mark.parametrize("argv,option,recipe", [
    (["--meanflow.omega", "2"], "meanflow.omega", "sit"),
    (["--repae.vae_align_weight", "9"], "repae.vae_align_weight", "sit"),
    (["--preset", "digits-meanflow-irepa", "--train.recipe", "sit", "--omega", "2"], "meanflow.omega", "sit"),
    (["--preset", "digits-jit-irepa", "--meanflow.kappa", "0.5"], "meanflow.kappa", "jit"),
])
def test_an_option_of_another_recipe_is_refused(argv, option, recipe, capsys, no_training):
    err = _refused(capsys, argv)
    assert f"--{option} is an option of the" in err and f"this run's recipe is '{recipe}'" in err


def test_a_switched_recipe_keeps_only_its_own_section():
    """A preset's section of the recipe --train.recipe replaced is dropped (not stored, never read);
    the new recipe's section is written out with its defaults."""
    to_sit = resolve("digits-meanflow-irepa", {"train.recipe": "sit"})
    assert "meanflow" not in json.loads(to_sit.to_json()) and set(to_sit.extra) == {"sit"}  # sit's own only
    to_meanflow = resolve("digits-sit-irepa", {"train.recipe": "meanflow"})
    assert json.loads(to_meanflow.to_json())["meanflow"]["omega"] == 1.0


def test_loading_a_run_as_another_model_is_refused(meanflow_run, monkeypatch):
    """What sample.py --model_name SiT-B/2 on a MeanFlow run asks of the shared loader: refused
    before any weight is read; the run's own name is accepted."""
    from irepa.train import checkpoint, export
    monkeypatch.setattr(checkpoint, "read_tensors", lambda *a: pytest.fail("weights read"))
    with pytest.raises(InputError, match=r"--model_name SiT-B/2: .* holds a SiT-Tiny/2 model .*recipe meanflow"):
        export.load_for_inference(meanflow_run, model_name="SiT-B/2")
    monkeypatch.undo()
    model, cfg = export.load_for_inference(meanflow_run, model_name="SiT-Tiny/2")
    assert cfg.train.recipe == "meanflow" and hasattr(model, "h_embedder")


# -- item 6: the model's classes are the data's ---------------------------------------------------
@pytest.fixture(scope="module")
def four_classes(tmp_path_factory):
    """A 4-class folder of 8 random 64 px RGB images each, prepared as digits-codec latents with HOG."""
    from PIL import Image
    root = tmp_path_factory.mktemp("four")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / "src" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "src" / f"class{c}" / f"{i}.png")
    formats = ("ffcv", "memmap") if ffcv_available() else ("memmap",)
    return Path(prepare(str(root / "src"), str(root / "ds"), resolution=64, vae="digits-codec",
                        encoders=["hog-patch"], formats=formats, device="cpu", progress=False))


def test_model_classes_must_equal_the_data_classes(four_classes, tmp_path, capsys):
    assert read_manifest(four_classes)["num_classes"] == 4
    data = {"data.source": str(four_classes), "train.steps": 2}
    err = _refused(capsys, _argv("digits-sit-irepa", _over(tmp_path, "ten", **data)))  # the preset's 10
    assert "the data has 4 classes" in err and "model.num_classes is 10" in err and "--model.num_classes 4" in err
    assert not (tmp_path / "ten").exists()
    err = _refused(capsys, _argv("digits-sit-irepa", _over(tmp_path, "three", **data, **{"model.num_classes": 3})))
    assert "model.num_classes is 3" in err
    Trainer(resolve("digits-sit-irepa", _over(tmp_path, "four", **data, **{"model.num_classes": 4}))).train()
    from PIL import Image
    grid = Image.open(tmp_path / "four" / "samples" / "step-0000002.png")
    assert round(8 * grid.height / grid.width) == 4  # a row of 8 for each class, none for a class without data


# -- item 10: one line instead of a traceback -----------------------------------------------------
def test_an_unknown_model_name_lists_the_valid_ones(capsys, no_training):
    err = _refused(capsys, ["--model.name", "SiT-Q/2"])
    assert "unknown model.name 'SiT-Q/2'" in err and "SiT-B/2" in err and "SiT-XL/2" in err
    with pytest.raises(ConfigError, match="JiT-B/16"):
        resolve("digits-jit-irepa", {"model.name": "JiT-Q/16"})


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    err = _refused(capsys, _argv("digits-sit-irepa", _over(f, "run", **{"data.cache_dir": str(tmp_path / "c")})))
    assert f"{f}: a file" in err and "--train.out_dir" in err
    assert f.read_text() == "mine" and not (tmp_path / "c").exists()


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif path.suffix == ".npy":  # foreign: a valid .npy array of another dataset
        np.save(path, np.zeros((3, 4), np.float32))
    else:
        path.write_bytes(b"not an ffcv file " * 20)


def _dataset_files(backend: str) -> list[str]:
    return ["data.beton"] if backend == "ffcv" else ["memmap/label.npy", "memmap/latent.npy", "memmap/feat_0.npy"]


@pytest.mark.parametrize("backend", ["memmap", pytest.param("ffcv", marks=pytest.mark.skipif(
    not ffcv_available(), reason="ffcv is not installed"))])
@pytest.mark.parametrize("verify", ["sampled", "none"])
@pytest.mark.parametrize("how", ["truncated", "foreign"])
def test_a_damaged_dataset_file_is_one_error_naming_it(four_classes, tmp_path, backend, verify, how):
    for name in _dataset_files(backend):
        ds = tmp_path / name.replace("/", "-")
        shutil.copytree(four_classes, ds)
        _damage(ds / name, how)
        with pytest.raises(InputError, match=str(ds / name).replace(".", r"\.")):
            build_loader(ds, 8, ["hog-patch"], backend=backend, verify=verify)


def test_train_on_a_truncated_dataset_file_is_one_line(four_classes, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(four_classes, ds)
    _damage(ds / "memmap" / "latent.npy", "truncated")
    over = _over(tmp_path, "run", **{"data.source": str(ds), "model.num_classes": 4, "data.backend": "memmap"})
    err = _refused(capsys, _argv("digits-sit-irepa", over))
    assert str(ds / "memmap" / "latent.npy") in err and "truncated" in err
    assert not (tmp_path / "run").exists()


def test_ffcv_backend_without_ffcv_is_a_user_error(four_classes, monkeypatch):
    import irepa.data.loader as loader
    monkeypatch.setattr(loader, "ffcv_available", lambda: False)
    with pytest.raises(UserError, match="--data.backend memmap"):
        build_loader(four_classes, 8, ["hog-patch"], backend="ffcv")
