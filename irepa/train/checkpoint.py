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

Never written, never loaded: a checkpoint with a non-finite weight, EMA or optimizer value
(`save` checks every tensor it is given first: NonFiniteError). Pruning keeps the checkpoint
just written and deletes only older steps. A failed write (disk full) removes the partial
step-N.tmp/ and names the file it was writing (CheckpointWriteError). `load_newest` resumes
from the newest checkpoint that verifies and holds finite values: a corrupt or non-finite newer
one is renamed step-N.corrupt / step-N.nonfinite (kept, never loaded) with a log line. Sharded
checkpoints are read without executing anything: DCP's `.metadata` pickle goes through an
unpickler that admits only DCP's metadata classes, and its byte items load with
`weights_only=True` (UnsafeCheckpointError otherwise).
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


class CorruptCheckpointError(CheckpointError):
    """The checkpoint's own content is damaged (manifest, sizes, hashes, unreadable files, trainer
    state): an older complete checkpoint may stand in for it. Not raised for a model that does not fit."""


class NonFiniteCheckpointError(CorruptCheckpointError):
    """A stored weight, EMA or optimizer value is NaN or infinite."""


class UnsafeCheckpointError(CheckpointError):
    """A file would run code or construct objects other than checkpoint metadata when loaded."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a non-finite value (loss, gradient, weight); nothing of it is saved."""


class CheckpointWriteError(UserError, OSError):
    """Writing a checkpoint failed (e.g. disk full); the partial folder was removed."""


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


# -- finiteness -----------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def _named_state(parts: dict):
    """(label, tensor) of everything `save` stores of the parts: weights, EMA, optimizer state."""
    for name, part in parts.items():
        weights, opt, ema = part_keys(name)
        for k, v in part.module.state_dict().items():
            yield f"{weights}: {k}", v
        for i, sd in enumerate(part.ema.state_dicts() if part.ema else []):
            for k, v in sd.items():
                yield f"{_ema_key(ema, i)}: {k}", v
        for idx, st in part.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    yield f"{opt}: state.{idx}.{k}", v


def first_nonfinite(named) -> str | None:
    """Label of the first floating tensor of `named` ((label, tensor) pairs) holding NaN or inf, or
    None. One device reduction per tensor and a single host sync; DTensors are checked by their
    local shard (collect the answers of all ranks for the whole picture)."""
    labels, flags = [], []
    for label, t in named:
        t = _local(t)
        if t.is_floating_point() and t.numel():
            labels.append(label)
            flags.append(torch.isfinite(t).all())
    if not flags:
        return None
    ok = torch.stack([f.to(flags[0].device) for f in flags]).cpu()
    if bool(ok.all()):
        return None
    return labels[int((~ok).nonzero()[0])]


def parts_nonfinite(parts: dict) -> str | None:
    """The first non-finite stored value of the parts on any rank ("rank R: label"), or None (collective)."""
    bad = first_nonfinite(_named_state(parts))
    found = [(r, b) for r, b in enumerate(all_gather_object(bad)) if b]
    if not found:
        return None
    r, b = found[0]
    return b if rank_world()[1] == 1 else f"rank {r}: {b}"


# -- saving -------------------------------------------------------------------------------
def _write_error(e: BaseException, path: Path) -> tuple:
    errno = getattr(e, "errno", None)
    return errno, (getattr(e, "strerror", None) or str(e) or type(e).__name__), str(path)


def save(run_dir: str | Path, step: int, parts: dict, *, trainer_state: dict, rng: dict[str, torch.Tensor],
         keep: int = 2) -> Path:
    """Write checkpoints/step-N (collective: every rank calls it); prune to the newest `keep`.

    Refuses (NonFiniteError, nothing written) when any stored value is NaN or infinite; a failed
    write removes step-N.tmp/ and raises CheckpointWriteError naming the file."""
    rank, world = rank_world()
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}.tmp"
    bad = parts_nonfinite(parts)
    if bad is not None:
        raise NonFiniteError(f"not writing {final}: non-finite value in {bad}")
    sharded = any(_is_sharded(p) for p in parts.values())
    state = {**trainer_state, "step": step, "parts": {n: {"ema": len(p.ema.decays) if p.ema else 0}
                                                      for n, p in parts.items()}}
    if sharded:
        state["sharded"] = True
    _all_ranks_ok(_fresh_tmp(root, tmp) if rank == 0 else None, tmp, rank)
    hashes, err = _write_payload(tmp, parts, rank, sharded, rng, state)
    gathered = all_gather_object((hashes, err))
    if any(e for _, e in gathered):
        _failed_write(tmp, [e for _, e in gathered], rank)
    hashes = {k: v for part, _ in gathered for k, v in part.items()}
    _all_ranks_ok(_write_manifest(tmp, step, hashes, sharded, world) if rank == 0 else None, tmp, rank)
    if rank == 0:
        if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep, final)
    barrier()
    return final


def _all_ranks_ok(err, tmp: Path, rank: int) -> None:
    """Collective: every rank raises (and rank 0 removes tmp) when any rank's err is set."""
    errors = all_gather_object(err)
    if any(errors):
        _failed_write(tmp, errors, rank)


def _fresh_tmp(root: Path, tmp: Path):
    """An empty step-N.tmp/ (rank 0); the write error, or None."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        return _write_error(e, tmp)
    return None


def _write_payload(tmp: Path, parts: dict, rank: int, sharded: bool, rng: dict, state: dict) -> tuple[dict, object]:
    """This rank's files into tmp: (their sizes and digests by name, the write error or None)."""
    writing, hashes = tmp, {}
    try:
        if sharded:
            writing = tmp / "dcp"
            files = _write_dcp(tmp, parts, rank)
        else:
            files = _write_files(tmp, parts) if rank == 0 else {}
        if rank == 0:
            writing = tmp / "trainer.safetensors"
            save_file(_cpu(rng), str(writing), metadata={"format": "pt", "state": json.dumps(state)})
            files["trainer.safetensors"] = writing
        hashes = {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in files.items()}
    except _FileWriteError as e:
        return hashes, _write_error(e.__cause__, e.path)
    except Exception as e:  # OSError from our files; DCP wraps its writers' errors in CheckpointException
        return hashes, _write_error(e, writing)
    return hashes, None


def _write_manifest(tmp: Path, step: int, hashes: dict, sharded: bool, world: int):
    """tmp/manifest.json, the mark of a complete checkpoint (rank 0); the write error, or None."""
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": dict(sorted(hashes.items()))}
    if sharded:
        manifest.update(sharded=True, world_size=world)
    try:
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return _write_error(e, tmp / "manifest.json")
    return None


class _FileWriteError(Exception):
    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def _failed_write(tmp: Path, errors: list, rank: int):
    """Remove the partial checkpoint (rank 0) and raise the first rank's error on every rank."""
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    errno, why, path = next(e for e in errors if e)
    msg = f"cannot write {path}: {why}; the partial checkpoint {tmp} was removed, the older checkpoints are untouched"
    raise CheckpointWriteError(errno, msg) if errno is not None else CheckpointWriteError(msg)


def _write_files(tmp: Path, parts: dict) -> dict[str, Path]:
    out = {}

    def write(name, tensors, meta=None):
        path = tmp / f"{name}.safetensors"
        try:
            save_file(_cpu(tensors), str(path), metadata={"format": "pt", **(meta or {})})
        except Exception as e:
            raise _FileWriteError(path) from e
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


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Keep `newest` (just written) and the keep - 1 newest checkpoints of lower step; a folder of a
    higher step (not this run's history) is never pruned. keep 0: prune nothing."""
    if keep > 0:
        step = _step(newest)
        older = [p for p in complete_checkpoints(root.parent) if _step(p) < step]
        for path in older[:max(0, len(older) - (keep - 1))]:
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
    return sorted(out, key=_step)


def _step(ckpt: Path) -> int:
    return int(_STEP_RE.match(ckpt.name).group(1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_manifest(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    mpath = ckpt / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: no manifest.json, the checkpoint is incomplete (writer was interrupted?)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{mpath}: corrupt manifest, not valid JSON ({e})") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CorruptCheckpointError(f"{mpath}: corrupt manifest, no 'files' table of bytes and sha256")
    if any(Path(n).is_absolute() or ".." in Path(n).parts for n in files):
        raise CorruptCheckpointError(f"{mpath}: corrupt manifest, a file name leaves the checkpoint folder")
    return manifest


def _check_files(ckpt: Path, manifest: dict, names: list[str]) -> None:
    for name in names:
        path, info = ckpt / name, manifest["files"][name]
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing file listed in {ckpt / 'manifest.json'}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CorruptCheckpointError(f"{path}: truncated or altered ({size} bytes, manifest says {info['bytes']})")
        if _sha256(path) != info["sha256"]:
            raise CorruptCheckpointError(f"{path}: corrupt (sha256 does not match {ckpt / 'manifest.json'})")


def verify_checkpoint(ckpt: str | Path, collective: bool = False) -> dict:
    """Sizes and hashes against manifest.json; returns the manifest. collective: every rank checks
    a share of the files and any failure stops every rank with its message."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    rank, world = rank_world() if collective else (0, 1)
    err = None
    try:
        _check_files(ckpt, manifest, sorted(manifest["files"])[rank::world])
    except CheckpointError as e:
        if world == 1:
            raise
        err = str(e)
    if world > 1:
        err = next((e for e in all_gather_object(err) if e), None)
        if err:
            raise CorruptCheckpointError(err)
    return manifest


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: cannot read safetensors file ({e})") from e


def require_finite(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """`tensors` (read from `path`), or NonFiniteCheckpointError naming the file and the first bad key."""
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise NonFiniteCheckpointError(f"{path}: non-finite weights (NaN or inf in {bad!r}); the run diverged "
                                       f"before this checkpoint was written, use an older one")
    return tensors


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpointError(f"{path}: cannot read safetensors header ({e})") from e


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_trainer_state(path: Path, tr, rng: dict) -> None:
    """What resume reads of the trainer state, checked before it is used (CorruptCheckpointError)."""
    def bad(what):
        raise CorruptCheckpointError(f"{path}: invalid trainer state ({what})")

    if not isinstance(tr, dict):
        bad(f"a JSON {type(tr).__name__}, not an object")
    if not _is_int(tr.get("step")):
        bad(f"'step' is {tr.get('step')!r}")
    data = tr.get("data")
    if not isinstance(data, dict):
        bad(f"'data' is {data!r}")
    positions = [data] if "epoch" in data else list(data.values())
    if not positions or "epoch" not in data and "0" not in data:
        bad("'data' holds no loader position (epoch/index, or one per rank from '0')")
    for pos in positions:
        if not (isinstance(pos, dict) and _is_int(pos.get("epoch")) and _is_int(pos.get("index"))):
            bad(f"loader position {pos!r} is not {{'epoch': int, 'index': int}}")
    parts = tr.get("parts", {})
    if not isinstance(parts, dict) or not all(isinstance(p, dict) and _is_int(p.get("ema")) for p in parts.values()):
        bad(f"'parts' is {parts!r}")
    if not isinstance(tr.get("loss_scale", {}) or {}, dict):
        bad(f"'loss_scale' is {tr.get('loss_scale')!r}")
    cpu = rng.get("cpu")
    if cpu is None or cpu.dtype != torch.uint8 or cpu.dim() != 1:
        bad("no 'cpu' RNG state (uint8 vector)")


def read_trainer_state(ckpt: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer state, RNG tensors) of a checkpoint of either layout, checked (CorruptCheckpointError)."""
    path = Path(ckpt) / "trainer.safetensors"
    meta = _metadata(path)
    if "state" not in meta:
        raise CorruptCheckpointError(f"{path}: no trainer state in the metadata")
    try:
        tr = json.loads(meta["state"])
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path}: invalid trainer state (not JSON: {e})") from e
    rng = read_tensors(path)
    _check_trainer_state(path, tr, rng)
    return tr, rng


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
            raise CheckpointError(f"{ckpt}: checkpoint has {counts[name]} EMA models of {name!r}, config asks for "
                                  f"{want} (train.ema_decays)")
    if manifest.get("sharded"):
        _load_dcp(ckpt, parts)
    else:
        for name, part in parts.items():
            _load_part_files(ckpt, name, part)
    bad = parts_nonfinite(parts)
    if bad is not None:
        raise NonFiniteCheckpointError(f"{ckpt}: non-finite value in {bad}; the run diverged before this "
                                       f"checkpoint was written")
    return tr, rng


def load_newest(run_dir: str | Path, parts: dict, log=print) -> tuple[Path, dict, dict[str, torch.Tensor]] | None:
    """Fill `parts` from the newest complete checkpoint of `run_dir` that verifies and holds finite
    values (collective). A newer damaged one (CorruptCheckpointError: manifest, hashes, unreadable
    files, trainer state, non-finite values) is skipped with a log line and, once an older one has
    loaded, renamed step-N.corrupt / step-N.nonfinite (kept, never loaded again). When none is left
    the first error is raised with the ways on. Returns (checkpoint, trainer state, RNG) or None."""
    rank, _ = rank_world()
    skipped: list[tuple[Path, CorruptCheckpointError]] = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        try:
            tr, rng = load(ckpt, parts)
        except CorruptCheckpointError as e:
            log(f"skipping checkpoint {ckpt}: {e}")
            skipped.append((ckpt, e))
            continue
        for bad, e in skipped:
            kind = "nonfinite" if isinstance(e, NonFiniteCheckpointError) else "corrupt"
            aside = bad.with_name(f"{bad.name}.{kind}")
            if rank == 0:
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(bad, aside)
            log(f"moved the damaged checkpoint {bad} to {aside} (kept, never loaded); resuming from {ckpt}")
        barrier()
        return ckpt, tr, rng
    if skipped:
        ckpt, e = skipped[0]
        raise type(e)(f"{e}. No older complete checkpoint in {Path(run_dir) / 'checkpoints'} to resume from: "
                      f"repair or remove {ckpt}, or start afresh with --train.resume false (moves this run "
                      f"aside to {Path(run_dir)}/previous-<time>/)") from e
    return None


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
        try:
            part.module.load_state_dict(state["model"])
        except RuntimeError as e:  # keys or shapes of another model: not damage, so no older checkpoint stands in
            what = " ".join(str(e).split())
            raise CheckpointError(f"{ckpt}: its {name!r} does not fit this run's model ({what[:300]}); the run "
                                  f"folder's config.json says how it was made") from None
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
    for md in sorted((ckpt / "dcp").glob("*.metadata")) + [ckpt / "dcp" / ".metadata"]:
        if md.is_file():  # refused here with its own error; the reader below admits the same classes
            safe_load_metadata(md)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, storage_reader=_SafeReader(ckpt / "dcp"), planner=_SafePlanner())
    except Exception as e:  # DCP's own message names the missing or mismatched key
        if "refusing to load" in str(e) or "refusing to unpickle" in str(e):  # DCP re-raises ours as text
            raise UnsafeCheckpointError(f"{ckpt / 'dcp'}: {e}") from e
        raise CheckpointError(f"{ckpt / 'dcp'}: cannot load into this model ({e})") from e
    for name, part in parts.items():
        weights, opt, ema = part_keys(name)
        set_model_state_dict(part.module, state[weights], options=_options())
        set_optimizer_state_dict(part.module, part.optimizer, state[opt], options=_options())
        if part.ema:
            part.ema.load_state_dicts([state[ema][str(i)] for i in range(len(part.ema.decays))])


# -- DCP without code execution ------------------------------------------------------------
def _metadata_globals() -> dict[tuple[str, str], object]:
    """Every global a DCP .metadata pickle of torch 2.13 refers to: DCP's metadata dataclasses, its
    storage record, torch.Size, dtypes and layouts (by name), pathlib paths. Nothing else loads."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    import torch.serialization
    allowed = {("pathlib", n): getattr(pathlib, n) for n in ("PosixPath", "PurePosixPath", "WindowsPath",
                                                              "PureWindowsPath", "Path")}
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for n in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
              "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(md, n):
            allowed[("torch.distributed.checkpoint.metadata", n)] = getattr(md, n)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    for n, v in vars(torch).items():
        if isinstance(v, torch.dtype):
            allowed[("torch", n)] = v
    return allowed


def safe_load_metadata(path: Path):
    """DCP's .metadata file, unpickled with only `_metadata_globals()` admitted (UnsafeCheckpointError)."""
    import pickle

    allowed = _metadata_globals()

    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise UnsafeCheckpointError(
                    f"{path}: refers to {module}.{name}, which is not checkpoint metadata; refusing to load it "
                    f"(a pickle can run code: this file was not written by torch.distributed.checkpoint)")
            return allowed[(module, name)]

    from torch.distributed.checkpoint.metadata import Metadata
    try:
        with open(path, "rb") as f:
            md = _Restricted(f).load()
    except (UnsafeCheckpointError, OSError):  # DCP tries rank-local metadata files when one is missing
        raise
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: cannot read DCP metadata ({type(e).__name__}: {e})") from e
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(md).__name__}, not DCP Metadata")
    return md


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """FileSystemReader whose metadata goes through safe_load_metadata (tensors already load
        with weights_only=True in torch's reader)."""

        def read_metadata(self, *args, **kwargs):
            md = safe_load_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader


def _SafeReader(path: Path):
    return _reader_class()(str(path))


def _SafePlanner():
    import io

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import ReadItem

    class SafePlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner whose non-tensor items (param groups, steps) load with weights_only=True
        (torch 2.13's own load_bytes unpickles them with weights_only=False)."""

        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                raise UnsafeCheckpointError(f"DCP item {read_item.dest_index.fqn!r} is not plain data "
                                            f"({type(e).__name__}); refusing to unpickle it") from e
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()
