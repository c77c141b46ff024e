"""The install path a new user and CI take: launch/install.sh, the lock (launch/lock.py,
launch/requirements.lock) and .ci/run. The lock logic is exercised on a made-up set of
installed distributions (dist-info folders in a temporary site), including a GPU machine
whose own CUDA torch must be kept."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def lock(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("irepa_launch_lock", ROOT / "launch" / "lock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "SEARCH_PATH", [str(tmp_path / "site")])
    monkeypatch.setattr(mod, "REQUIREMENTS", tmp_path / "requirements.txt")
    monkeypatch.setattr(mod, "LOCK", tmp_path / "requirements.lock")
    monkeypatch.setattr(mod, "cuda_torch", lambda: False)
    (tmp_path / "site").mkdir()
    return mod


def _dist(tmp_path: Path, name: str, version: str, *requires: str) -> None:
    d = tmp_path / "site" / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir()
    d.joinpath("METADATA").write_text("\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                                                 *(f"Requires-Dist: {r}" for r in requires)]) + "\n")


def _machine(tmp_path: Path, lock, torch_version="2.13.0+cpu", pins=None) -> None:
    """requirements: app (-> lib, torch), triton; installed: those and lib's dependency."""
    _dist(tmp_path, "app", "1.0", "lib>=2", 'never; python_version < "3"', 'extra-dep; extra == "docs"')
    _dist(tmp_path, "lib", "2.5", "Dep_Name[fast]")
    _dist(tmp_path, "dep-name", "0.3", 'fastdep; extra == "fast"')
    _dist(tmp_path, "fastdep", "4.0")
    _dist(tmp_path, "torch", torch_version, "sympy")
    _dist(tmp_path, "sympy", "1.14.0")
    _dist(tmp_path, "triton", "3.9.0")
    lock.REQUIREMENTS.write_text("# the project's asks\napp>=1\ntriton>=3.0\ntorch\n")
    pins = pins or {"app": "1.0", "lib": "2.5", "dep-name": "0.3", "fastdep": "4.0", "torch": "2.13.0+cpu",
                    "sympy": "1.14.0", "triton": "3.9.0"}
    lock.LOCK.write_text(f"# platform: {lock.this_platform()}\n" + "".join(f"{n}=={v}\n" for n, v in pins.items()))


def test_closure_follows_requirements_markers_and_extras(lock, tmp_path):
    _machine(tmp_path, lock)
    found = lock.closure(lock.read_requirements())
    assert found == {"app": "1.0", "lib": "2.5", "dep-name": "0.3", "fastdep": "4.0", "torch": "2.13.0+cpu",
                     "sympy": "1.14.0", "triton": "3.9.0"}  # no `never` (marker), no `extra-dep` (extra not asked)


def test_freeze_writes_what_check_accepts(lock, tmp_path, capsys):
    _machine(tmp_path, lock)
    text = lock.freeze()
    assert f"# platform: {lock.this_platform()}" in text
    lock.LOCK.write_text(text)
    assert lock.read_pins()["dep-name"] == "0.3" and len(lock.read_pins()) == 7
    assert lock.check() == 0


def test_check_names_every_difference(lock, tmp_path, capsys):
    _machine(tmp_path, lock, pins={"app": "1.0", "lib": "2.4", "torch": "2.13.0+cpu", "sympy": "1.14.0",
                                   "triton": "3.9.0", "fastdep": "4.0"})
    assert lock.check() == 1
    err = capsys.readouterr().err
    assert "lib==2.5: the lock has 2.4" in err and "dep-name==0.3: installed but not in the lock" in err
    assert "relock.sh" in err
    # the same differences on another platform than the lock's are reported but accepted
    lock.LOCK.write_text(lock.LOCK.read_text().replace(lock.this_platform(), "cp399 Plan9 mips"))
    assert lock.check() == 2
    lock.REQUIREMENTS.write_text("app\nnot-installed\n")
    lock.LOCK.write_text(f"# platform: {lock.this_platform()}\napp==1.0\nlib==2.5\ndep-name==0.3\nfastdep==4.0\n")
    assert lock.check() == 1
    assert "not-installed: required but not installed" in capsys.readouterr().err


def test_constraints_on_a_cpu_machine(lock, tmp_path):
    _machine(tmp_path, lock)
    locked = lock.constraints(latest=False)
    assert locked == sorted(["app==1.0", "lib==2.5", "dep-name==0.3", "fastdep==4.0", "torch==2.13.0+cpu",
                             "sympy==1.14.0", "triton==3.9.0"])
    assert lock.constraints(latest=True) == ["torch==2.13.0+cpu"]  # the installed CPU torch stays
    assert lock.torch_requirement() == "torch==2.13.0"


def test_constraints_keep_a_gpu_machines_torch_and_lock_the_rest(lock, tmp_path, monkeypatch):
    _machine(tmp_path, lock, torch_version="2.11.0+cu130")
    (tmp_path / "site" / "triton-3.9.0.dist-info").rename(tmp_path / "site" / "old")
    _dist(tmp_path, "triton", "3.6.0")
    _dist(tmp_path, "nvidia-cublas", "13.1.0.3")
    monkeypatch.setattr(lock, "cuda_torch", lambda: True)
    locked = lock.constraints(latest=False)
    assert "torch==2.11.0+cu130" in locked and "triton==3.6.0" in locked and "nvidia-cublas==13.1.0.3" in locked
    assert "triton==3.9.0" not in locked and not any(c.startswith("torch==2.13") for c in locked)
    assert {"app==1.0", "lib==2.5", "sympy==1.14.0"} <= set(locked)
    assert sorted(lock.constraints(latest=True)) == ["nvidia-cublas==13.1.0.3", "torch==2.11.0+cu130",
                                                    "triton==3.6.0"]
    # torch's own subtree is the machine's: a locked-elsewhere torch is not a difference
    assert lock.check() == 0


def test_the_lock_covers_the_requirements():
    spec = importlib.util.spec_from_file_location("irepa_launch_lock2", ROOT / "launch" / "lock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pins = mod.read_pins()
    assert mod.lock_platform(), "the lock does not say which platform it was made for"
    for req in mod.read_requirements() + [mod.Requirement(n) for n in mod.OPTIONAL]:
        name = mod.canonical(req.name)
        assert name in pins, f"{req} is asked for in launch/requirements.txt but not pinned in the lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"the lock's {name}=={pins[name]} is not {req}"
    assert "torch" in pins and "kernels" in pins  # transitive: Hugging Face's kernels comes with transformers


def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"Run the tests[^\n]*\n\n```bash\n(.+?)\n```", readme)
    assert m, "README.md has no 'Run the tests' command block"
    command = m.group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines(), f".ci/run does not run the README's test command {command!r}"
    assert ci.index("-m venv") < ci.index(command), ".ci/run must make a fresh virtual environment first"
    assert "launch/install.sh" in command


def test_install_script_refuses_unknown_options():
    r = subprocess.run(["bash", str(ROOT / "launch" / "install.sh"), "--newest"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option '--newest'" in r.stderr
    r = subprocess.run(["bash", str(ROOT / "launch" / "install.sh")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "IREPA_DEPS": "newest"})
    assert r.returncode == 2 and "IREPA_DEPS=newest" in r.stderr


def test_lock_tool_runs_as_a_script():
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "lock.py"), "torch"], capture_output=True, text=True)
    assert r.returncode == 0 and re.fullmatch(r"torch==\d+\.\d+\.\d+\n", r.stdout)
