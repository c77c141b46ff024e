"""Sharded checkpoints (torch.distributed.checkpoint) that any world size can resume.

Written by FSDP runs instead of the single-file layout of irepa/train/checkpoint.py, in
the same place (checkpoints/step-N/, built in step-N.tmp-dcp/ and renamed when complete):
  dcp/                 DCP files: {"model", "optimizer", "ema": {"0", "1", ...}}, each rank
                       writes its own shards; tensors are addressed by parameter name, so
                       a different world size (or a single process) reshards on load
  trainer.safetensors  RNG states; step, per-rank data position, EMA decays, encoder dims
                       and "sharded": true in the metadata
  manifest.json        size and sha256 of every file above (hashed by the rank that wrote
                       it), "sharded": true; written last
`load_sharded` fills a live trainer tree (FSDP-sharded or a plain module) and optimizer
and EMA; `irepa.train.export` turns one into the single-file layout.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from irepa.train import checkpoint as ckpt_io
from irepa.train.parallelize import clean_name

TMP_SUFFIX = ".tmp-dcp"


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if _dist()[1] > 1:
        dist.barrier()


def _options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def _state(net, optimizer, ema) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(net, options=_options()),
            "optimizer": get_optimizer_state_dict(net, optimizer, options=_options()),
            "ema": {str(i): sd for i, sd in enumerate(ema.state_dicts())}}


def is_sharded(ckpt: str | Path) -> bool:
    mpath = Path(ckpt) / "manifest.json"
    return mpath.is_file() and bool(json.loads(mpath.read_text()).get("sharded"))


def save_sharded(run_dir: str | Path, step: int, *, net, optimizer, ema, trainer_state: dict,
                 rng_tensors: dict[str, torch.Tensor], keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns checkpoints/step-N."""
    import torch.distributed.checkpoint as dcp

    rank, world = _dist()
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}{TMP_SUFFIX}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "dcp").mkdir(parents=True)
    _barrier()
    dcp.save(_state(net, optimizer, ema), checkpoint_id=str(tmp / "dcp"))
    # each rank hashes the shard files it wrote; rank 0 the shared ones
    mine = {f"dcp/{p.name}": p for p in (tmp / "dcp").glob(f"__{rank}_*")}
    if rank == 0:
        save_file({k: v.detach().contiguous().cpu() for k, v in rng_tensors.items()}, str(tmp / "trainer.safetensors"),
                  metadata={"format": "pt", "state": json.dumps({**trainer_state, "step": step, "sharded": True})})
        mine["trainer.safetensors"] = tmp / "trainer.safetensors"
        mine.update({f"dcp/{p.name}": p for p in (tmp / "dcp").iterdir() if not p.name.startswith("__")})
    files = {name: {"bytes": p.stat().st_size, "sha256": ckpt_io._sha256(p)} for name, p in mine.items()}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, files)
        files = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        manifest = {"format_version": ckpt_io.FORMAT_VERSION, "step": step, "sharded": True,
                    "world_size": world, "files": dict(sorted(files.items()))}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in ckpt_io.complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _verify(ckpt: Path) -> dict:
    """Every rank checks a share of the files; any failure stops every rank with the message."""
    rank, world = _dist()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    names = sorted(manifest["files"])
    err = None
    try:
        for n in names[rank::world]:
            p, info = ckpt / n, manifest["files"][n]
            if not p.is_file():
                raise ckpt_io.CheckpointError(f"{p}: missing file listed in {ckpt / 'manifest.json'}")
            if p.stat().st_size != info["bytes"]:
                raise ckpt_io.CheckpointError(f"{p}: truncated or altered ({p.stat().st_size} bytes, "
                                              f"manifest says {info['bytes']})")
            if ckpt_io._sha256(p) != info["sha256"]:
                raise ckpt_io.CheckpointError(f"{p}: corrupt (sha256 does not match the manifest)")
    except ckpt_io.CheckpointError as e:
        err = str(e)
    if world > 1:
        errs = [None] * world
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e), None)
    if err:
        raise ckpt_io.CheckpointError(err)
    return manifest


def read_trainer_state(ckpt: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    path = Path(ckpt) / "trainer.safetensors"
    return json.loads(ckpt_io._metadata(path)["state"]), load_file(str(path))


def load_sharded(ckpt: str | Path, net, optimizer, ema, verify: bool = True) -> tuple[dict, dict]:
    """Fill net / optimizer / ema (sharded or plain) from a sharded checkpoint; returns (trainer state, rng)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    ckpt = Path(ckpt)
    if verify:
        _verify(ckpt)
    tr, rng = read_trainer_state(ckpt)
    n_ema = len(tr.get("ema_decays", []))
    if n_ema and n_ema != len(ema.decays):
        raise ValueError(f"{ckpt}: checkpoint has {n_ema} EMA models, config asks for {len(ema.decays)}")
    state = _state(net, optimizer, ema)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    except Exception as e:  # DCP's own message names the missing or mismatched key
        raise ckpt_io.CheckpointError(f"{ckpt / 'dcp'}: cannot load into this model ({e})") from e
    set_model_state_dict(net, state["model"], options=_options())
    set_optimizer_state_dict(net, optimizer, state["optimizer"], options=_options())
    ema.load_state_dicts([state["ema"][str(i)] for i in range(len(ema.decays))])
    return tr, rng


def load_full_into_sharded(state: dict, net, optimizer, ema, params: list[torch.Tensor]) -> None:
    """A single-file checkpoint (irepa.train.checkpoint.load_checkpoint) into an FSDP-sharded tree."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(net, state["model"], options=_options(full=True))
    # single-file optimizer state is keyed by position in `params`; DCP's full form by name
    names = {id(p): clean_name(n) for n, p in net.named_parameters()}
    fqns = [names[id(p)] for p in params]
    osd = state["optimizer"]
    full = {"state": {fqns[int(i)]: s for i, s in osd["state"].items()},
            "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}
    set_optimizer_state_dict(net, optimizer, full, options=_options(full=True))
    ema.load_state_dicts(state["ema"])
