"""Probes of issue 15 (items 1 and 6): typed options and one-line user errors, kept as a suite.

Each probe is what a user typed and what they must get back. Compared against: the field's
declared type in irepa/config.py (and each launch function's signature), and the message
format `script: message` on one line with no traceback. Most run in this process through
the same fire path the scripts use (irepa.cli.call / run); the process-level ones (exit
status, stderr, torchrun's summary) run the scripts.
"""
import functools
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from irepa import cli
from irepa.coerce import BadValue
from irepa.config import Config, ConfigError
from irepa.dist import pick_device
from irepa.errors import InputError, UserError

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def train_cli(monkeypatch):
    """launch/train.py's main through irepa.cli.call; the Config it would train is captured, not trained."""
    import irepa.train.trainer as trainer
    got = {}
    monkeypatch.setattr(trainer, "train", lambda cfg: got.update(cfg=cfg) or {})  # train returns the last row
    main = _script("train").main

    def run(*argv):
        got.clear()
        cli.call(main, "train.py", list(argv))
        return got["cfg"]
    return run


# -- item 1: every override is converted to its field's type -----------------------------------------
@pytest.mark.parametrize("argv,where,expected", [
    (["--train.resume", "false"], "train.resume", False),        # was the truthy string 'false'
    (["--train.resume", "No"], "train.resume", False),
    (["--train.resume=0"], "train.resume", False),
    (["--resume", "TRUE"], "train.resume", True),
    (["--model.fused_kernels", "false"], "model.fused_kernels", False),  # the README's flag (bool | None)
    (["--model.fused_kernels", "None"], "model.fused_kernels", None),
    (["--data.online_encoders", "false"], "data.online_encoders", False),
    (["--train.compile", "off"], "train.compile", False),
    (["--train.compile"], "train.compile", True),                # a bare flag
    (["--train.steps", "4e2"], "train.steps", 400),
    (["--lr", "2e-4"], "optim.lr", 2e-4),
    (["--betas", "0.9,0.95"], "optim.betas", (0.9, 0.95)),
    (["--betas", "(0.9, 0.95)"], "optim.betas", (0.9, 0.95)),
    (["--align.encoders", "[]"], "align.encoders", []),
    (["--align.encoders", "hog"], "align.encoders", ["hog"]),
    (["--align.encoders", "[hog, sift]"], "align.encoders", ["hog", "sift"]),
    (["--train.ema_decays", "0.9999,0.999"], "train.ema_decays", [0.9999, 0.999]),
    (["--gamma", "None"], "align.gamma", None),
    (["--gamma", "null"], "align.gamma", None),
    (["--run_name", "007"], "train.run_name", "007"),           # fire alone would give the number 7
    (["--run_name", "1e3"], "train.run_name", "1e3"),
    (["--projector", "mlp"], "align.projector", "mlp"),
    (["--log.wandb", "yes", "--wandb_mode", "offline"], "log.wandb_mode", "offline"),
])
def test_overrides_take_the_declared_type(train_cli, argv, where, expected):
    cfg = train_cli(*argv)
    sec, key = where.split(".")
    value = getattr(getattr(cfg, sec), key)
    assert value == expected and type(value) is type(expected), (value, expected)


@pytest.mark.parametrize("argv,message", [
    (["--train.steps", "2.5"], "train.steps: expected an integer, got '2.5'"),  # ran 3 steps before
    (["--train.steps", "abc"], "train.steps: expected an integer, got 'abc'"),
    (["--lr", "abc"], "optim.lr: expected a number, got 'abc'"),
    (["--lr", "nan"], "optim.lr: expected a number, got 'nan'"),
    (["--train.resume", "maybe"], "train.resume: expected a boolean (true/false, 1/0, yes/no), got 'maybe'"),
    (["--model.fused_kernels", "fasle"], "model.fused_kernels: expected a boolean"),
    (["--train.batch_size", "2.5"], "train.batch_size: expected an integer, got '2.5'"),
    (["--projector", "cnv"], "align.projector: expected one of 'conv', 'mlp', got 'cnv'"),
    (["--train.parallel", "zero"], "train.parallel: expected one of 'auto', 'none', 'ddp', 'fsdp'"),
    (["--betas", "0.9"], "optim.betas: expected 2 values (float, float) as A,B, got '0.9'"),
    (["--betas", "0.9,x"], "optim.betas: expected 2 values"),
    (["--log.wandb_mode", "sometimes"], "log.wandb_mode: expected one of 'online', 'offline'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--train.stesp", "3"], "did you mean train.steps"),
])
def test_bad_overrides_are_refused_in_one_line(train_cli, argv, message):
    with pytest.raises(ConfigError if "preset" in argv[0] or "stesp" in argv[0] else BadValue) as e:
        train_cli(*argv)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, UserError)


def test_config_json_with_a_bad_value_is_a_config_error():
    d = Config().to_dict()
    d["train"]["precision"] = "fp64"
    with pytest.raises(ConfigError, match="train.precision must be"):
        Config.from_dict(d)


def test_help_lists_each_key_with_its_type(capsys):
    cli.call(_script("train").main, "train.py", ["--help"])
    out = capsys.readouterr().out
    assert "--train.resume = True  (a boolean (true/false, 1/0, yes/no))" in out
    assert "--align.projector = 'conv'  (one of 'conv', 'mlp')" in out
    assert "--log.wandb = False" in out


# -- item 1: the other launch scripts check each option against their signatures -------------------
def _options(script, argv, command=None):
    """What the script's function would be called with (irepa.cli.call against its real signature)."""
    mod = _script(script)
    fn = getattr(mod, command) if command else mod.main
    got = {}

    def record(*args, **kw):
        got.update(inspect.signature(fn).bind(*args, **kw).arguments)
    stub = functools.wraps(fn)(record)
    cli.call({command: stub} if command else stub, f"{script}.py", argv,
             signature=None if command else fn)
    return got


@pytest.mark.parametrize("script,argv,key,expected", [
    ("sample", ["run", "--out", "007", "--keep_shards", "false"], "keep_shards", False),
    ("sample", ["run", "--out", "007"], "out", "007"),
    ("sample", ["run", "--out", "o", "--vae", "None"], "vae", None),
    ("sample", ["run", "--out", "o", "--steps", "40"], "steps", 40),
    ("sample", ["run", "--out", "o", "--cfg", "2"], "cfg", 2.0),
    ("sample", ["run", "--out", "o", "--interval", "0,0.7"], "interval", (0, 0.7)),  # unannotated: fire's value
    ("evaluate", ["a.npz", "b.npz", "--batch", "50"], "batch", 50),
    ("prepare", ["digits", "out", "--store_images", "no"], "store_images", False),
    ("prepare", ["digits", "out", "--resolution", "128"], "resolution", 128),
    ("export_vae", ["run", "out", "--overwrite", "false"], "overwrite", False),
])
def test_launch_options_take_their_declared_type(script, argv, key, expected):
    got = _options(script, argv)
    assert got[key] == expected and type(got[key]) is type(expected), got


@pytest.mark.parametrize("script,argv,message", [
    ("sample", ["run", "--out", "o", "--steps", "2.5"], "--steps: expected an integer, got 2.5"),
    ("sample", ["run", "--out", "o", "--keep_shards", "maybe"], "--keep_shards: expected a boolean"),
    ("sample", ["run", "--out", "o", "--cfg", "abc"], "--cfg: expected a number, got 'abc'"),
    ("evaluate", ["a.npz", "b.npz", "--batch", "abc"], "--batch: expected an integer, got 'abc'"),
    ("prepare", ["digits", "out", "--resolution", "abc"], "--resolution: expected an integer, got 'abc'"),
    ("export_vae", ["run", "out", "--overwrite", "2"], "--overwrite: expected a boolean"),
])
def test_bad_launch_options_are_refused(script, argv, message):
    with pytest.raises(BadValue, match=message.replace("(", r"\(").replace(")", r"\)")):
        _options(script, argv)


def test_analyze_and_encoders_commands_are_typed(tmp_path):
    analyze = _script("analyze")
    for argv, message in ((["metrics", "--resolution", "abc"], "--resolution: expected an integer, got 'abc'"),
                          (["spatialnorm", "--gamma", "abc"], "--gamma: expected a number, got 'abc'"),
                          (["metrics", "--limit", "2.5"], "--limit: expected an integer or None, got 2.5")):
        with pytest.raises(BadValue, match=message):
            analyze.main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    enc = _script("encoders")
    with pytest.raises(BadValue, match="--resolution: expected an integer"):
        cli.call({"check": enc.check}, "encoders.py", ["check", "hog", "--resolution", "abc"])


# -- item 6: user errors are one line, programming errors keep their traceback -----------------------
def test_run_prints_a_user_error_as_one_line(capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)

    def bad(path: str):
        raise InputError(f"{path}: not a prepared dataset")
    with pytest.raises(SystemExit) as e:
        cli.run(bad, "x.py", ["/data/none"])
    assert e.value.code == 1
    assert capsys.readouterr().err == "x.py: /data/none: not a prepared dataset\n"

    def bug(path: str):
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):  # not swallowed: the traceback stays
        cli.run(bug, "x.py", ["p"])


def test_under_torchrun_the_message_goes_to_the_error_file(tmp_path, capsys, monkeypatch):
    """torchrun shows each failed rank's error file in its summary; only rank 0 prints the line itself."""
    err = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err))
    for rank, printed in (("1", ""), ("0", "x.py: bad\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit):
            cli.exit_with_user_error("x.py", UserError("bad"))
        assert capsys.readouterr().err == printed
        data = json.loads(err.read_text())
        assert data["message"]["message"] == data["message"]["extraInfo"]["py_callstack"] == "x.py: bad"


def test_device_cuda_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="device 'cuda': CUDA is not available on this machine"):
        pick_device("cuda")
    with pytest.raises(InputError, match="'gpu' is not a device name"):
        pick_device("gpu")


def test_evaluate_and_sample_input_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    ev = _script("evaluate")
    with pytest.raises(SystemExit):
        cli.run(ev._cli, "evaluate.py", [str(tmp_path / "ref.npz"), str(tmp_path / "s.npz")], signature=ev.main)
    assert capsys.readouterr().err == f"evaluate.py: reference batch not found: {tmp_path / 'ref.npz'}\n"
    sample = _script("sample")
    with pytest.raises(SystemExit):
        cli.run(sample.main, "sample.py", ["run", "--out", str(tmp_path / "o"), "--precision", "fp16"])
    assert capsys.readouterr().err == "sample.py: --precision: expected one of 'fp32', 'bf16', got 'fp16'\n"
    with pytest.raises(SystemExit):
        cli.run(sample.main, "sample.py", [str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"),
                                           "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.startswith("sample.py: ") and err.count("\n") == 1 and "none.pt" in err, err
    assert not (tmp_path / "o").exists()


def _run(args, timeout=180, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)


def test_train_script_bad_value_is_one_stderr_line(tmp_path):
    p = _run([sys.executable, "launch/train.py", "--train.steps", "2.5", "--out_dir", str(tmp_path)])
    assert p.returncode == 1 and p.stderr == "train.py: train.steps: expected an integer, got '2.5'\n", p.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_cuda_is_one_stderr_line(tmp_path):
    p = _run([sys.executable, "launch/train.py", "--train.device", "cuda", "--out_dir", str(tmp_path)])
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "CUDA is not available" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_torchrun_batch_not_divisible_ends_with_the_message(tmp_path):
    """2 ranks, batch 7: the worker prints one line (rank 0) and torchrun's summary names the cause
    (its own launcher traceback stays: torchrun prints it for any failed worker)."""
    p = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "launch/train.py",
              "--train.batch_size", "7", "--train.device", "cpu", "--out_dir", str(tmp_path),
              "--data.cache_dir", str(tmp_path / "cache")])
    out = p.stdout + p.stderr
    msg = ("train.py: train.batch_size 7 is not divisible by 2 ranks (1 node(s) x 2 process(es)); use a "
           "multiple of 2 or another node count")
    assert p.returncode != 0
    assert out.splitlines().count(msg) == 1, out               # printed by rank 0 only
    assert f"traceback : {msg}" in out, out                     # rank 0 and 1 error files, in torchrun's block
    assert "irepa/train" not in out and "launch/train.py\", line" not in out, out  # no worker traceback


def test_a_string_option_without_its_value_is_refused():
    """fire would pass the string 'True' as the output folder or VAE path."""
    main = _script("sample").main
    for argv, option in ((["run", "--out"], "--out"), (["run", "--out", "o", "--vae", "--steps", "3"], "--vae")):
        with pytest.raises(cli.UsageError, match=f"{option} needs a value"):
            cli.check_args(argv, main)
    cli.check_args(["run", "--out", "o", "--keep_shards"], main)  # a bare boolean flag is fine
