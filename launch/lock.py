"""The locked dependency set: what launch/install.sh installs, and how it is checked and renewed.

  python launch/lock.py constraints [--latest]   # pip constraints for this machine (install.sh uses them)
  python launch/lock.py check                    # every installed dependency is the locked version
  python launch/lock.py freeze                   # the installed dependency set as a lock (relock.sh)

launch/requirements.txt names what the project asks for; launch/requirements.lock pins that
set and everything it pulls in (torch and FFCV's build included), as last tested together.
A machine whose torch is a CUDA build (a GPU machine's own) keeps it, with the packages
that come with it (Triton, nvidia-*): the lock's torch-coupled lines give way to the
versions installed there, everything else stays locked.

Only the standard library and pip's own `packaging` are used: this runs before the
project's dependencies exist.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
LOCK = HERE / "requirements.lock"
OPTIONAL = ("ffcv",)  # installed by install.sh only on request; locked with what they pull in
INSTALLER = {"pip", "setuptools", "wheel", "distribute"}  # the installer's own, left out as `pip freeze` does
TORCH_COUPLED = re.compile(r"^(torch|triton|pytorch-triton(-.*)?|nvidia-.*|cuda-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path | None = None) -> dict[str, str]:
    """{canonical name: version} of a lock file's `name==version` lines (default: the lock)."""
    path = path or LOCK
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not m:
            raise SystemExit(f"lock.py: {path}:{n}: expected 'name==version', got {line!r}")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def read_requirements(path: Path | None = None) -> list[Requirement]:
    lines = (ln.split("#", 1)[0].strip() for ln in (path or REQUIREMENTS).read_text().splitlines())
    return [Requirement(ln) for ln in lines if ln]


SEARCH_PATH: list[str] | None = None  # where installed distributions are looked up (None: sys.path)


def distributions(**query):
    return md.distributions(**query) if SEARCH_PATH is None else md.distributions(path=SEARCH_PATH, **query)


def distribution(name: str):
    """The installed distribution called `name` (any spelling), or None."""
    return next(iter(distributions(name=canonical(name))), None)


def installed_version(name: str) -> str | None:
    dist = distribution(name)
    return dist.version if dist is not None else None


def cuda_torch() -> bool:
    """The installed torch is a CUDA build (a GPU machine's): it and what comes with it are kept."""
    if installed_version("torch") is None:
        return False
    code = "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def closure(roots: list[Requirement], skip=lambda name: False) -> dict[str, str]:
    """{canonical name: installed version} of the installed distributions `roots` need, transitively
    (environment markers evaluated here; extras followed). A missing distribution maps to ''."""
    found: dict[str, str] = {}
    seen = set()
    todo = [(r, frozenset(r.extras)) for r in roots]
    while todo:
        req, extras = todo.pop()
        name = canonical(req.name)
        if name in INSTALLER or skip(name) or (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = distribution(req.name)
        if dist is None:
            found[name] = ""
            continue
        found[name] = dist.version
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((sub, frozenset(sub.extras)))
    return found


def project_roots() -> list[Requirement]:
    """What the project asks for, plus the optional packages installed on this machine."""
    return read_requirements() + [Requirement(n) for n in OPTIONAL if installed_version(n) is not None]


def constraints(latest: bool) -> list[str]:
    """Pins for `pip install -c`: the torch installed now (install.sh installs it first), the packages
    a CUDA torch came with, and, unless `latest`, the lock's version of everything else."""
    keep = cuda_torch()
    lines = []
    for dist in distributions():
        name = canonical(dist.metadata["Name"] or "")
        if name == "torch" or keep and TORCH_COUPLED.match(name):
            lines.append(f"{name}=={dist.version}")
    if not latest:
        lines += [f"{n}=={v}" for n, v in read_pins().items() if not TORCH_COUPLED.match(n) or
                  not keep and n != "torch"]
    return sorted(set(lines))


def torch_requirement() -> str:
    """The lock's torch as a public version (`torch==2.13.0` takes the local `+cpu` wheel where
    pip finds one, as on the project's CPU machines)."""
    return f"torch=={read_pins()['torch'].split('+')[0]}"


def this_platform() -> str:
    return f"cp{sys.version_info[0]}{sys.version_info[1]} {platform.system()} {platform.machine()}"


def lock_platform() -> str | None:
    m = re.search(r"^# platform: (.+)$", LOCK.read_text(), re.M)
    return m.group(1).strip() if m else None


def check() -> int:
    """0: the dependencies are the locked ones. 1: they differ on the platform the lock was made
    for (an error). 2: they differ elsewhere (a warning: another Python may pull other packages)."""
    pins = read_pins()
    keep = cuda_torch()
    need = closure(project_roots(), skip=lambda n: keep and bool(TORCH_COUPLED.match(n)))
    bad = []
    for name, version in sorted(need.items()):
        if not version:
            bad.append(f"{name}: required but not installed")
        elif name not in pins:
            bad.append(f"{name}=={version}: installed but not in the lock")
        elif pins[name] != version:
            bad.append(f"{name}=={version}: the lock has {pins[name]}")
    if bad:
        made_for, here = lock_platform(), this_platform()
        print(f"lock.py: the installed dependencies differ from {LOCK}:\n  "
              + "\n  ".join(bad) + "\n(regenerate the lock with `bash launch/relock.sh`, or install with "
              "`bash launch/install.sh --latest` to use the newest releases on purpose)", file=sys.stderr)
        if made_for != here:
            print(f"lock.py: the lock was made for {made_for}, this is {here}: going on", file=sys.stderr)
            return 2
        return 1
    where = "the machine's CUDA torch kept" if keep else "torch included"
    print(f"[install] {len(need)} dependencies match {LOCK.name} ({where})")
    return 0


def freeze() -> str:
    need = closure(project_roots())
    missing = sorted(n for n, v in need.items() if not v)
    if missing:
        raise SystemExit(f"lock.py: required but not installed: {', '.join(missing)}")
    head = ["# The exact dependency set launch/install.sh installs: launch/requirements.txt and everything it",
            f"# pulls in ({', '.join(OPTIONAL)} with its dependencies included), tested together with the suite.",
            f"# Written by `bash launch/relock.sh` on {time.strftime('%Y-%m-%d')}: Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}. Do not edit by hand.",
            f"# platform: {this_platform()}"]
    return "\n".join(head + [f"{n}=={v}" for n, v in sorted(need.items())]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("constraints", help="pip constraints for this machine, one per line")
    c.add_argument("--latest", action="store_true", help="only torch pinned (the newest of everything else)")
    sub.add_parser("check", help="exit 1 naming every installed dependency that is not the locked version")
    sub.add_parser("freeze", help="print the installed dependency set in lock format")
    sub.add_parser("torch", help="the torch requirement to install on a machine without a CUDA torch")
    a = p.parse_args(argv)
    if a.cmd == "constraints":
        print("\n".join(constraints(a.latest)))
    elif a.cmd == "check":
        return check()
    elif a.cmd == "freeze":
        sys.stdout.write(freeze())
    else:
        print(torch_requirement())
    return 0


if __name__ == "__main__":
    sys.exit(main())
