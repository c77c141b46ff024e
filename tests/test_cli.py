"""irepa.cli: a misspelt option stops every launch script before it runs (fire would run it with defaults first)."""
import subprocess
import sys
from pathlib import Path

import pytest

from irepa.cli import UsageError, check_args

ROOT = Path(__file__).resolve().parents[1]


def _f(model, out, steps: int = 250, keep_shards: bool = False):
    pass


def _kw(preset="x", **overrides):
    pass


def test_check_args_on_a_function():
    check_args(["m", "o", "--steps", "3", "--nokeep_shards", "--out=o2", "-s", "4"], _f)
    with pytest.raises(UsageError, match=r"unknown option --stpes \(did you mean --steps\?\)"):
        check_args(["m", "o", "--stpes", "3"], _f)
    with pytest.raises(UsageError, match="5 positional values for 4 parameters"):
        check_args(["m", "o", "x", "y", "z"], _f)


def test_check_args_on_commands_and_kwargs():
    cmds = {"list": _f, "train": _kw}
    with pytest.raises(UsageError, match=r"unknown command 'lst' \(did you mean 'list'\?\)"):
        check_args(["lst"], cmds)
    check_args(["train", "--anything", "1"], cmds)  # **kwargs: the function checks its own names
    check_args(["--help"], cmds)


@pytest.mark.parametrize("script,args", [
    ("sample.py", ["runs/none", "--out", "OUT", "--stpes", "2"]),
    ("prepare.py", ["digits", "OUT", "--resolutoin", "64"]),
    ("evaluate.py", ["a.npz", "b.npz", "--out", "OUT/x.json", "--batchh", "2"]),
    ("analyze.py", ["metrics", "--encoder", "hog", "--out", "OUT"]),
    ("compare.py", ["--out", "OUT", "--eval_step", "[2]"]),
])
def test_launch_scripts_refuse_typos_before_writing(tmp_path, script, args):
    out = tmp_path / "out"
    args = [a.replace("OUT", str(out)) for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "unknown option" in proc.stderr and "did you mean" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def _entry(name):
    """(target, signature) as the script's `__main__` hands them to irepa.cli.run."""
    from test_sample_script import _load_launch
    mod = _load_launch(name)
    if name == "evaluate":
        return mod._cli, mod.main
    if name == "analyze":
        return mod.COMMANDS, None
    if name == "encoders":
        return {"list": mod.list_encoders, "info": mod.info, "table": mod.table, "check": mod.check}, None
    return mod.main, None


@pytest.mark.parametrize("script,argv,wanted", [
    ("sample", ["--help"], ["usage: sample.py MODEL OUT [options]", "MODEL  (a string)",
                            "--method = 'sde'  (one of 'sde', 'euler', 'heun')", "the sampler: sde",
                            "--progress = 'auto'"]),
    ("evaluate", ["--help"], ["usage: evaluate.py REF SAMPLES [options]", "--metric = 'inception'",
                              "offline: a classifier-feature Frechet"]),  # fire: TypeError
    ("export_vae", ["-h"], ["usage: export_vae.py RUN OUT [options]", "a repae run folder", "--overwrite = False"]),
    ("compare", ["--help"], ["--seeds = None  (a list of int", "training seeds"]),
    ("prepare", ["--help"], ["usage: prepare.py SOURCE OUT [options]", "--resolution = 256  (an integer)"]),
    ("analyze", ["--help"], ["usage: analyze.py COMMAND [options]", "  metrics ", "spatialnorm"]),
    ("analyze", ["metrics", "--help"], ["usage: analyze.py metrics [options]", "--resolution = 256"]),
    ("encoders", ["info", "--help"], ["usage: encoders.py info NAME"]),
    ("train", ["--help"], ["--train.resume = True"]),  # train.py lists its config keys itself
])
def test_help_shows_the_real_options(script, argv, wanted, capsys):
    """fire's help of these wrapped functions showed "GROUP is one of: FIRE_METADATA" and no option
    help (evaluate.py's ended in a TypeError); the help is written from the signature and docstring."""
    from irepa.cli import call
    target, signature = _entry(script)
    call(target, f"{script}.py", argv, signature=signature)
    out = capsys.readouterr().out
    assert "FIRE_METADATA" not in out and "GROUP" not in out
    for w in wanted:
        assert w in out, (w, out)


@pytest.mark.parametrize("script,argv,message", [
    ("sample", ["runs/x"], "missing OUT; usage: sample.py MODEL OUT [options]"),
    ("sample", ["--out", "o"], "missing MODEL; usage: sample.py MODEL OUT [options]"),
    ("evaluate", ["a.npz"], "missing SAMPLES; usage: evaluate.py REF SAMPLES [options]"),
    ("export_vae", [], "missing RUN and OUT; usage: export_vae.py RUN OUT [options]"),
    ("prepare", ["digits"], "missing OUT; usage: prepare.py SOURCE OUT [options]"),
    ("encoders", ["info"], "info: missing NAME; usage: encoders.py info NAME"),
    ("analyze", [], "missing COMMAND; usage: analyze.py COMMAND [options]; commands: metrics, correlate"),
])
def test_a_missing_argument_is_one_line_with_the_usage(script, argv, message, capsys, monkeypatch):
    """fire printed its usage screen with exit status 2 (and FIRE_METADATA as a group); now exit 1 and one
    line, like every other usage error."""
    from irepa.cli import run
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    target, signature = _entry(script)
    with pytest.raises(SystemExit) as e:
        run(target, f"{script}.py", argv, signature=signature)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"{script}.py: {message}") and err.count("\n") == 1, err


def test_help_entries_come_from_the_docstring():
    from irepa.cli_help import parse_docstring

    def f(model: str, out: str, steps: int = 2, vae: str | None = None):
        """Summary line.

        MODEL: a run. OUT: a folder,
        over two lines.
        --steps: how many.
            An indented continuation.

        --vae: a folder. Another paragraph is the end of an entry.

        Closing words.
        """
    summary, entries = parse_docstring(f)
    assert entries == {"model": "a run.", "out": "a folder, over two lines.",
                       "steps": "how many. An indented continuation.",
                       "vae": "a folder. Another paragraph is the end of an entry."}
    assert summary == "Summary line.\n\nClosing words."


def test_the_scripts_themselves_exit_1_on_a_missing_argument_and_0_on_help():
    for args, code in ((["launch/sample.py", "runs/x"], 1), (["launch/evaluate.py", "--help"], 0)):
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == code, p.stderr
        assert "Traceback" not in p.stderr and "FIRE_METADATA" not in p.stdout
        if code:
            assert p.stderr.count("\n") == 1 and "missing OUT" in p.stderr, p.stderr
        else:
            assert "--metric" in p.stdout
