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
