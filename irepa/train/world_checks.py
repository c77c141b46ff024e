"""Checks of a multi-process (multi-node) run at its start, before anything expensive: one line each.

- the global batch divides over the ranks (`check_batch_divides`, also used by the data builder);
- every rank runs the same config and the same code (`check_same_setup`): a hash of the config, of
  irepa's source files and of the versions is compared over all ranks, and a difference is named
  (the config keys, the source files, the versions) with the ranks and hosts involved;
- the run folder is one folder for every rank (`check_shared_out_dir`): each rank writes a marker
  with its rank into train.out_dir and, after a barrier, looks for the others'. A folder on
  node-local disk (or a relative path resolved on different machines) shows up here instead of
  as checkpoints split between nodes.

Each is collective (every rank calls it) and raises the same InputError on every rank, so no rank
is left waiting in a collective for a peer that stopped.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import sys
import uuid
from pathlib import Path

import torch

from irepa.config import Config
from irepa.dist import all_gather_object, barrier
from irepa.errors import InputError

PACKAGES = ("irepa", "irepa.data", "irepa.kernels")
"""the installed code a rank runs (its launch script is added)"""


def nodes_and_processes(world: int) -> tuple[int, int]:
    """(nodes, processes per node) from torchrun's LOCAL_WORLD_SIZE; (world, 1) without it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) or 1
    return max(1, world // local), local


def check_batch_divides(batch_size: int, world: int) -> None:
    if batch_size % world:
        nodes, local = nodes_and_processes(world)
        raise InputError(f"train.batch_size {batch_size} is not divisible by {world} ranks ({nodes} node(s) x "
                         f"{local} process(es)); use a multiple of {world} or another node count")


def check_world(cfg: Config, rank: int, world: int) -> None:
    """Every check of this module (collective); nothing to compare for one process."""
    check_batch_divides(cfg.train.batch_size, world)
    if world > 1:
        check_same_setup(cfg, rank)
        check_shared_out_dir(Path(cfg.train.out_dir), rank, world)


# -- same config and code -------------------------------------------------------------------
def source_files() -> dict[str, str]:
    """'package/relative/path': sha256 of each .py file of PACKAGES and of the launch script."""
    out = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for p in sorted(Path(root).rglob("*.py")):
                out[f"{name}/{p.relative_to(root).as_posix()}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    main = Path(sys.argv[0])
    if main.suffix == ".py" and main.is_file():
        out[f"script/{main.name}"] = hashlib.sha256(main.read_bytes()).hexdigest()
    return out


def setup_of(cfg: Config) -> dict:
    """What must be equal on every rank: the config, the source files and the versions."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        irepa_version = version("irepa")
    except PackageNotFoundError:
        irepa_version = "not installed"
    return {"config": json.loads(cfg.to_json()), "code": source_files(),
            "versions": {"irepa": irepa_version, "torch": torch.__version__, "python": sys.version.split()[0]}}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def setup_differences(ref: dict, other: dict) -> list[str]:
    """What differs between two ranks' setup_of(): config keys, source files, versions."""
    out = []
    a, b = _flat(ref["config"]), _flat(other["config"])
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if keys:
        out.append("config " + ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:5])
                   + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""))
    files = sorted(f for f in ref["code"].keys() | other["code"].keys() if ref["code"].get(f) != other["code"].get(f))
    if files:
        out.append("source files " + ", ".join(files[:5]) + (f" (+{len(files) - 5} more)" if len(files) > 5 else ""))
    out += [f"{k} {ref['versions'][k]} vs {other['versions'].get(k)}" for k in sorted(ref["versions"])
            if ref["versions"][k] != other["versions"].get(k)]
    return out


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_setup(cfg: Config, rank: int) -> None:
    """Refuse a start where some rank runs another config, code or version than rank 0 (collective).
    Only digests travel unless they differ; then every rank's setup is gathered to name the difference."""
    mine = setup_of(cfg)
    digests = all_gather_object((_digest(mine), socket.gethostname()))
    if len({d for d, _ in digests}) == 1:
        return
    setups = all_gather_object(mine)
    r = next(r for r, (d, _) in enumerate(digests) if d != digests[0][0])
    raise InputError(f"rank {r} (host {digests[r][1]}) does not run what rank 0 (host {digests[0][1]}) runs: "
                     f"{'; '.join(setup_differences(setups[0], setups[r]))}; start every node with the same "
                     f"command and the same checkout / installed irepa")


# -- one run folder for every rank ----------------------------------------------------------------
def check_shared_out_dir(out_dir: Path, rank: int, world: int) -> None:
    """Refuse a train.out_dir that is not the same folder on every rank (collective). The markers
    live in out_dir/.ranks-<token>/ for the length of the check; the run folder is not touched."""
    token = all_gather_object(uuid.uuid4().hex if rank == 0 else None)[0]
    folder = out_dir / f".ranks-{token}"
    mine = folder / f"rank-{rank}"
    host = socket.gethostname()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mine.write_text(host)
        error = None
    except OSError as e:
        error = f"rank {rank} (host {host}) cannot write to train.out_dir {out_dir}: {e.strerror or e}"
    barrier()
    seen = sorted(int(p.name.split("-")[1]) for p in folder.glob("rank-*")) if folder.is_dir() else []
    views = all_gather_object((host, seen, error))
    barrier()  # every rank has looked before any marker goes
    mine.unlink(missing_ok=True)
    barrier()
    try:
        folder.rmdir()
    except OSError:
        pass  # another rank removed it, or (a separate folder) its own is already gone
    errors = [e for _, _, e in views if e]
    if errors:
        raise InputError(errors[0])
    blind = [(r, h, s) for r, (h, s, _) in enumerate(views) if len(s) != world]
    if blind:
        r, h, s = blind[0]
        raise InputError(f"train.out_dir {out_dir} is not one folder for every rank: rank {r} (host {h}) sees the "
                         f"markers of rank(s) {s} only, of {world}; put the run folder on storage every node "
                         f"mounts (a shared file system, by an absolute path), and node-local scratch elsewhere")
