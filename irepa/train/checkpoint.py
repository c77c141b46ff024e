"""Checkpoints of a run's trained parts at any world size: one save, one load, one layout folder.

A run's trained state is a dict of named parts, each with `module` (the trained tree, plain
or FSDP-sharded in place), `optimizer`, `params` (the optimizer's parameters in order) and
`ema` (or None): irepa.train.step.Part. "model" is the diffusion model with its projectors;
a recipe may add more (REPA-E: "vae", "disc"). Part P is stored under the names
    P (weights), <pre>optimizer, <pre>ema, <pre>ema-1, ...   <pre> = "" for "model", "P-" otherwise
plus "trainer" (RNG states as tensors; step, data position and the trainer's state as JSON).

checkpoints/step-N/ is built in step-N.tmp/ and renamed when complete. Two layouts:
- single files (no part sharded: one process, DDP): rank 0 writes <name>.safetensors for each
  name above (optimizer state tensors with the param groups in the metadata);
- sharded (a part under FSDP): every rank writes its shards with torch.distributed.checkpoint
  into dcp/ (the same names as keys; tensors addressed by parameter name, so any world size,
  or one process, reshards on load); rank 0 writes trainer.safetensors.
manifest.json is written last: format version, step, layout, world size, and the size and
sha256 of every file (hashed by the rank that wrote it). A folder without it is never loaded;
a size or hash mismatch, or a file safetensors cannot parse, is a CheckpointError naming the
file; older checkpoints are pruned only after a newer one is complete. `load` fills live parts
from either layout. `python -m irepa.train.export RUN` turns a sharded checkpoint into single files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from irepa.dist import all_gather_object, barrier, rank_world
from irepa.errors import UserError
from irepa.train.parallelize import clean_name

FORMAT_VERSION = 1
MAIN = "model"
_STEP_RE = re.compile(r"^step-(\d+)$")
_PART_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class CheckpointError(UserError, RuntimeError):
    pass


# -- names --------------------------------------------------------------------------------
def part_keys(name: str) -> tuple[str, str, str]:
    """(weights, optimizer, EMA) names of part `name` in files and DCP keys."""
    if name == MAIN:
        return MAIN, "optimizer", "ema"
    if not _PART_RE.match(name) or name in ("optimizer", "ema", "trainer", "dcp"):
        raise ValueError(f"trained part name {name!r}: use lowercase letters, digits and _ (not a reserved name)")
    return name, f"{name}-optimizer", f"{name}-ema"


def _ema_key(prefix: str, i: int) -> str:
    return prefix if i == 0 else f"{prefix}-{i}"


def _is_sharded(part) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in part.module.parameters())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def optimizer_to_tensors(opt_sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for idx, state in opt_sd["state"].items():
        for k, v in state.items():
            tensors[f"state.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": json.dumps(opt_sd["param_groups"])}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


# -- saving -------------------------------------------------------------------------------
def save(run_dir: str | Path, step: int, parts: dict, *, trainer_state: dict, rng: dict[str, torch.Tensor],
         keep: int = 2) -> Path:
    """Write checkpoints/step-N (collective: every rank calls it); prune to the newest `keep`."""
    rank, world = rank_world()
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}.tmp"
    sharded = any(_is_sharded(p) for p in parts.values())
    state = {**trainer_state, "step": step, "parts": {n: {"ema": len(p.ema.decays) if p.ema else 0}
                                                      for n, p in parts.items()}}
    if sharded:
        state["sharded"] = True
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    if sharded:
        files = _write_dcp(tmp, parts, rank)
    else:
        files = _write_files(tmp, parts) if rank == 0 else {}
    if rank == 0:
        save_file(_cpu(rng), str(tmp / "trainer.safetensors"), metadata={"format": "pt", "state": json.dumps(state)})
        files["trainer.safetensors"] = tmp / "trainer.safetensors"
    hashes = {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in files.items()}
    hashes = {k: v for part in all_gather_object(hashes) for k, v in part.items()}
    if rank == 0:
        manifest = {"format_version": FORMAT_VERSION, "step": step, "files": dict(sorted(hashes.items()))}
        if sharded:
            manifest.update(sharded=True, world_size=world)
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    barrier()
    return final


def _write_files(tmp: Path, parts: dict) -> dict[str, Path]:
    out = {}

    def write(name, tensors, meta=None):
        path = tmp / f"{name}.safetensors"
        save_file(_cpu(tensors), str(path), metadata={"format": "pt", **(meta or {})})
        out[path.name] = path

    for name, part in parts.items():
        weights, opt, ema = part_keys(name)
        write(weights, part.module.state_dict())
        for i, sd in enumerate(part.ema.state_dicts() if part.ema else []):
            write(_ema_key(ema, i), sd)
        write(opt, *optimizer_to_tensors(part.optimizer.state_dict()))
    return out


def _options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def _dcp_state(parts: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {}
    for name, part in parts.items():
        weights, opt, ema = part_keys(name)
        state[weights] = get_model_state_dict(part.module, options=_options())
        state[opt] = get_optimizer_state_dict(part.module, part.optimizer, options=_options())
        if part.ema:
            state[ema] = {str(i): sd for i, sd in enumerate(part.ema.state_dicts())}
    return state


def _write_dcp(tmp: Path, parts: dict, rank: int) -> dict[str, Path]:
    import torch.distributed.checkpoint as dcp
    dcp.save(_dcp_state(parts), checkpoint_id=str(tmp / "dcp"))
    barrier()  # every shard is written before rank 0 lists the shared files
    mine = {f"dcp/{p.name}": p for p in (tmp / "dcp").glob(f"__{rank}_*")}
    if rank == 0:
        mine.update({f"dcp/{p.name}": p for p in (tmp / "dcp").iterdir() if not p.name.startswith("__")})
    return mine


def _prune(root: Path, keep: int) -> None:
    for path in complete_checkpoints(root.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob("step-*.tmp*"):  # leftovers of a killed writer
        shutil.rmtree(stale, ignore_errors=True)


# -- finding and verifying ----------------------------------------------------------------
def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders that have a manifest, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(out, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_manifest(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    mpath = ckpt / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: no manifest.json, the checkpoint is incomplete (writer was interrupted?)")
    try:
        return json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: corrupt manifest ({e})") from e


def _check_files(ckpt: Path, manifest: dict, names: list[str]) -> None:
    for name in names:
        path, info = ckpt / name, manifest["files"][name]
        if not path.is_file():
            raise CheckpointError(f"{path}: missing file listed in {ckpt / 'manifest.json'}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: truncated or altered ({size} bytes, manifest says {info['bytes']})")
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path}: corrupt (sha256 does not match {ckpt / 'manifest.json'})")


def verify_checkpoint(ckpt: str | Path, collective: bool = False) -> dict:
    """Sizes and hashes against manifest.json; returns the manifest. collective: every rank checks
    a share of the files and any failure stops every rank with its message."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    rank, world = rank_world() if collective else (0, 1)
    err = None
    try:
        _check_files(ckpt, manifest, sorted(manifest.get("files", {}))[rank::world])
    except CheckpointError as e:
        if world == 1:
            raise
        err = str(e)
    if world > 1:
        err = next((e for e in all_gather_object(err) if e), None)
        if err:
            raise CheckpointError(err)
    return manifest


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e


def read_trainer_state(ckpt: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer state, RNG tensors) of a checkpoint of either layout."""
    path = Path(ckpt) / "trainer.safetensors"
    meta = _metadata(path)
    if "state" not in meta:
        raise CheckpointError(f"{path}: no trainer state in the metadata")
    return json.loads(meta["state"]), read_tensors(path)


def _ema_counts(ckpt: Path, tr: dict, manifest: dict) -> dict[str, int]:
    if "parts" in tr:
        return {n: int(p["ema"]) for n, p in tr["parts"].items()}
    if manifest.get("sharded"):  # written before parts were recorded: one part, its decays
        return {MAIN: len(tr.get("ema_decays", []))}
    return {MAIN: sum(1 for n in manifest["files"] if n == "ema.safetensors" or re.match(r"^ema-\d+\.", n))}


# -- loading ------------------------------------------------------------------------------
def load(ckpt: str | Path, parts: dict, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fill the live `parts` (plain or sharded) from a checkpoint of either layout, at any world
    size (collective under a process group). Returns (trainer state, RNG tensors)."""
    ckpt = Path(ckpt)
    manifest = verify_checkpoint(ckpt, collective=True) if verify else read_manifest(ckpt)
    tr, rng = read_trainer_state(ckpt)
    counts = _ema_counts(ckpt, tr, manifest)
    for name, part in parts.items():
        if name not in counts:
            raise CheckpointError(f"{ckpt}: holds no trained part {name!r} (it has {sorted(counts)})")
        want = len(part.ema.decays) if part.ema else 0
        if counts[name] != want:
            raise ValueError(f"{ckpt}: checkpoint has {counts[name]} EMA models of {name!r}, config asks for {want}")
    if manifest.get("sharded"):
        _load_dcp(ckpt, parts)
    else:
        for name, part in parts.items():
            _load_part_files(ckpt, name, part)
    return tr, rng


def read_part(ckpt: str | Path, name: str = MAIN, n_ema: int | None = None) -> dict:
    """One part of a single-file checkpoint as state dicts: {"model", "ema": [...], "optimizer"}."""
    ckpt = Path(ckpt)
    weights, opt, ema = part_keys(name)
    if n_ema is None:
        n_ema = _ema_counts(ckpt, read_trainer_state(ckpt)[0], read_manifest(ckpt)).get(name, 0)
    opt_path = ckpt / f"{opt}.safetensors"
    return {"model": read_tensors(ckpt / f"{weights}.safetensors"),
            "ema": [read_tensors(ckpt / f"{_ema_key(ema, i)}.safetensors") for i in range(n_ema)],
            "optimizer": optimizer_from_tensors(read_tensors(opt_path), _metadata(opt_path))}


def read_checkpoint(ckpt: str | Path, verify: bool = True) -> dict:
    """A single-file checkpoint's "model" part plus {"trainer": state, "rng": tensors}."""
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    tr, rng = read_trainer_state(ckpt)
    return {**read_part(ckpt), "trainer": tr, "rng": rng}


def _load_part_files(ckpt: Path, name: str, part) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state = read_part(ckpt, name, len(part.ema.decays) if part.ema else 0)
    if not _is_sharded(part):
        part.module.load_state_dict(state["model"])
        part.optimizer.load_state_dict(state["optimizer"])
    else:  # full tensors into FSDP shards; the file's optimizer state is keyed by position in `params`
        set_model_state_dict(part.module, state["model"], options=_options(full=True))
        names = {id(p): clean_name(n) for n, p in part.module.named_parameters()}
        fqns = [names[id(p)] for p in part.params]
        osd = state["optimizer"]
        full = {"state": {fqns[int(i)]: s for i, s in osd["state"].items()},
                "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}
        set_optimizer_state_dict(part.module, part.optimizer, full, options=_options(full=True))
    if part.ema:
        part.ema.load_state_dicts(state["ema"])


def _load_dcp(ckpt: Path, parts: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state = _dcp_state(parts)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    except Exception as e:  # DCP's own message names the missing or mismatched key
        raise CheckpointError(f"{ckpt / 'dcp'}: cannot load into this model ({e})") from e
    for name, part in parts.items():
        weights, opt, ema = part_keys(name)
        set_model_state_dict(part.module, state[weights], options=_options())
        set_optimizer_state_dict(part.module, part.optimizer, state[opt], options=_options())
        if part.ema:
            part.ema.load_state_dicts([state[ema][str(i)] for i in range(len(part.ema.decays))])
