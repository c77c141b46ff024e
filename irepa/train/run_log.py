"""Where a run's scalars and sample grids go: TensorBoard always, Weights & Biases when `log.wandb` is on.

The trainer writes through one `RunLog` (the SummaryWriter methods it uses: add_scalar,
add_image, close), which hands every call to each sink, so TensorBoard and W&B get the same
tags, values, steps and images. wandb is imported only when enabled; `log.wandb_mode offline`
writes the W&B run under <run folder>/wandb without network (`wandb sync` uploads it later).
The W&B run id is kept in <run folder>/wandb_run_id, so a resumed run continues its W&B run.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Protocol

import numpy as np

from irepa.config import Config
from irepa.errors import UserError

WANDB_ID_FILE = "wandb_run_id"


class Sink(Protocol):
    def add_scalar(self, tag: str, value: float, step: int) -> None: ...

    def add_image(self, tag: str, image_HWC: np.ndarray, step: int) -> None: ...

    def close(self) -> None: ...


class RunLog:
    """Fans each call out to every sink (SummaryWriter-compatible for what the trainer calls)."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for s in self.sinks:
            s.add_scalar(tag, float(value), step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        """`image`: uint8 or [0, 1] float array in `dataformats` (HWC or CHW)."""
        img = np.asarray(image)
        if dataformats == "CHW":
            img = img.transpose(1, 2, 0)
        elif dataformats != "HWC":
            raise ValueError(f"RunLog.add_image: dataformats HWC or CHW, got {dataformats!r}")
        for s in self.sinks:
            s.add_image(tag, img, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run hides the events logged after its checkpoint: they are logged again
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def add_scalar(self, tag, value, step):
        self.writer.add_scalar(tag, value, step)

    def add_image(self, tag, image_HWC, step):
        self.writer.add_image(tag, image_HWC, step, dataformats="HWC")

    def close(self):
        self.writer.close()


class WandbSink:
    """One W&B run per run folder; scalars and images under the TensorBoard tags, at the trainer's step."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.wandb = import_wandb()
        lg = cfg.log
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() and cfg.train.resume else None
        if run_id is None:
            run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
            id_file.write_text(run_id + "\n")
        self.run = self.wandb.init(project=lg.wandb_project, entity=lg.wandb_entity, name=lg.wandb_name or run_dir.name,
                              mode=lg.wandb_mode, dir=str(run_dir), id=run_id, resume="allow",
                              config=cfg.to_dict())

    def add_scalar(self, tag, value, step):
        self.run.log({tag: value}, step=step)

    def add_image(self, tag, image_HWC, step):
        self.run.log({tag: self.wandb.Image(image_HWC)}, step=step)

    def close(self):
        self.run.finish()


def import_wandb():
    """The wandb module, or a UserError saying how to get it (the trainer asks before it writes anything)."""
    try:
        import wandb
    except ImportError:
        raise UserError("log.wandb is on but wandb is not installed: pip install wandb "
                        "(or --log.wandb false)") from None
    return wandb


def open_run_log(cfg: Config, run_dir: Path, resume_step: int = 0) -> RunLog:
    """The run's log: TensorBoard events in `run_dir`, plus W&B when cfg.log.wandb (rank 0 only).
    resume_step N > 0: TensorBoard hides the events after step N (purge_step N + 1)."""
    sinks: list[Sink] = []
    if cfg.log.wandb:  # first: a missing wandb fails before any event file is opened
        sinks.append(WandbSink(cfg, Path(run_dir)))
    sinks.insert(0, TensorBoardSink(Path(run_dir), resume_step + 1 if resume_step else None))
    return RunLog(sinks)
