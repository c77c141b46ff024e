"""Checkpoints: safetensors files in checkpoints/step-N/, written atomically and verified.

Layout of one checkpoint (all written into step-N.tmp-<pid>/, then renamed):
  model.safetensors      trained tree (model + projectors)
  ema.safetensors        first EMA of the model (ema-1.safetensors, ... for further decays)
  optimizer.safetensors  optimizer state tensors; param_groups in the metadata
  trainer.safetensors    RNG states; step, data position, EMA decays in the metadata
  manifest.json          size and sha256 of every file above; written last
A directory without manifest.json, a size or hash mismatch, or a file safetensors can
not parse is refused with an error naming the file. Older checkpoints are pruned only
after a newer one is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def save_checkpoint(run_dir: str | Path, step: int, *, model_sd: dict, ema_sds: list[dict], optimizer_sd: dict,
                    trainer_state: dict, rng_tensors: dict[str, torch.Tensor], keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically; prune to the newest `keep` complete ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {"model.safetensors": (_contiguous(model_sd), {})}
    for i, sd in enumerate(ema_sds):
        files["ema.safetensors" if i == 0 else f"ema-{i}.safetensors"] = (_contiguous(sd), {})
    opt_t, opt_meta = optimizer_to_tensors(optimizer_sd)
    files["optimizer.safetensors"] = (_contiguous(opt_t), opt_meta)
    files["trainer.safetensors"] = (_contiguous(rng_tensors), {"state": json.dumps({**trainer_state, "step": step})})
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": {}}
    for name, (tensors, meta) in files.items():
        path = tmp / name
        save_file(tensors, str(path), metadata={"format": "pt", **meta})
        manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = complete_checkpoints(root.parent)
    for path in done[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob("step-*.tmp-*"):  # leftovers of a killed writer
        if not stale.name.endswith(f".tmp-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


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


def verify_checkpoint(ckpt: str | Path) -> dict:
    """Check sizes and hashes against manifest.json; returns the manifest."""
    ckpt = Path(ckpt)
    mpath = ckpt / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: no manifest.json, the checkpoint is incomplete (writer was interrupted?)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: corrupt manifest ({e})") from e
    for name, info in manifest.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing file listed in {mpath}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: truncated or altered ({size} bytes, manifest says {info['bytes']})")
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path}: corrupt (sha256 does not match {mpath})")
    return manifest


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e


def load_checkpoint(ckpt: str | Path, verify: bool = True) -> dict:
    """Read a checkpoint folder: model, ema list, optimizer state dict, trainer state, rng tensors."""
    ckpt = Path(ckpt)
    manifest = verify_checkpoint(ckpt) if verify else json.loads((ckpt / "manifest.json").read_text())
    names = manifest["files"]
    emas = [ckpt / "ema.safetensors"] + sorted(
        (ckpt / n for n in names if n.startswith("ema-")), key=lambda p: int(p.stem.split("-")[1]))
    opt_path, tr_path = ckpt / "optimizer.safetensors", ckpt / "trainer.safetensors"
    return {
        "model": _load(ckpt / "model.safetensors"),
        "ema": [_load(p) for p in emas if p.name in names],
        "optimizer": optimizer_from_tensors(_load(opt_path), _metadata(opt_path)),
        "trainer": json.loads(_metadata(tr_path)["state"]),
        "rng": _load(tr_path),
    }


def load_for_inference(path: str | Path, which: str = "ema", device: str | torch.device = "cpu"):
    """A run folder (newest checkpoint) or a checkpoint folder -> (model in eval mode, Config).

    which: "ema" (first EMA), "ema-1", ... or "model" (raw trained weights).
    """
    from irepa.config import Config
    from irepa.train.build import build_model

    path = Path(path)
    ckpt = path if (path / "manifest.json").is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no complete checkpoint (expected {path}/checkpoints/step-N/manifest.json)")
    run_dir = ckpt.parent.parent
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing; it is needed to rebuild the model")
    cfg = Config.from_dict(json.loads(cfg_path.read_text()))
    if verify_checkpoint(ckpt).get("sharded"):
        raise CheckpointError(f"{ckpt}: a sharded (FSDP) checkpoint; export it to single files first: "
                              f"python -m irepa.train.export {run_dir}")
    fname = {"ema": "ema.safetensors", "model": "model.safetensors"}.get(which, f"{which}.safetensors")
    sd = _load(ckpt / fname)
    if which == "model":  # the trained tree holds model.* and head.*
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    model = build_model(cfg, fused=False)
    model.load_state_dict(sd)
    return model.to(device).eval(), cfg
