"""A run's checkpoints as the trainer takes them: what besides the parts makes a resume exact (step,
data position, RNG, loss scale) saved with them, and restored from the newest good one. The files
and their checks are irepa.train.checkpoint's.

The data position is global: (epoch, global batches consumed, global batch size). Every rank's
loader reads its stride of the same per-epoch permutation, so global batch i covers permutation
positions [i * B, (i + 1) * B) whatever the number of ranks: a resume on another number of nodes
continues at the same global sample, and a resume with another batch size at the first sample
its predecessor had not reached."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from irepa.dist import all_gather_object
from irepa.train import checkpoint
from irepa.train.assemble import Run


class Checkpointer:
    def __init__(self, run: Run, run_dir: Path, log: Callable[[str], None]):
        self.run, self.run_dir, self.log = run, run_dir, log

    def resume(self) -> int:
        """Load the newest good checkpoint (train.resume) and return its step (0: none). Reads the run
        folder, except that a damaged newer checkpoint is renamed once an older one has loaded
        (irepa.train.checkpoint.load_newest)."""
        run = self.run
        found = checkpoint.load_newest(self.run_dir, run.parts, log=self.log) if run.cfg.train.resume else None
        if found is None:
            return 0
        latest, tr, rng = found  # either layout, any world size
        run.scaler.load_state_dict(tr.get("loss_scale"))
        run.data.loader.load_state_dict(loader_position(tr["data"], run.cfg.train.batch_size,
                                                        run.data.loader.batches_per_epoch))
        torch.set_rng_state(rng["cpu"])
        step = int(tr["step"])
        self.log(f"resumed from {latest} at step {step}")
        return step

    def save(self, step: int) -> Path:
        """Every part, the global data position and the RNG at `step` (collective)."""
        run = self.run
        positions = all_gather_object(run.data.loader.state_dict())
        if any(p != positions[0] for p in positions):  # the ranks step together: a bug, not an input
            raise RuntimeError(f"the ranks' loaders are at different positions: {positions}")
        data_state = {**positions[0], "global_batch": run.cfg.train.batch_size}
        rng = {"cpu": torch.get_rng_state()}
        if run.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(run.device)
        trainer_state = {"data": data_state, "ema_decays": run.cfg.train.ema_decays, "world_size": run.world,
                         "loss_scale": run.scaler.state_dict(), "encoder_dims": run.data.encoder_dims}
        path = checkpoint.save(self.run_dir, step, run.parts, trainer_state=trainer_state, rng=rng,
                               keep=run.cfg.train.keep_checkpoints)
        sharded = run.parallel == "fsdp"
        self.log(f"checkpoint {path}" + (f" (sharded; `python -m irepa.train.export {self.run_dir}` for one file)"
                                         if sharded else ""))
        return path


def loader_position(saved: dict, global_batch: int, batches_per_epoch: int) -> dict:
    """A checkpoint's data position for this run's loaders: {"epoch", "index"} in batches of
    `global_batch`. `saved` is global (with "global_batch"), or from an older checkpoint one position
    per rank ("0", "1", ...; they are equal: the ranks step together)."""
    pos = saved if "epoch" in saved else saved["0"]
    epoch, index = int(pos["epoch"]), int(pos["index"])
    old_batch = int(pos.get("global_batch", global_batch))
    if old_batch != global_batch:  # the first sample not yet reached, in batches of the new size
        index = -(-index * old_batch // global_batch)
        if index >= batches_per_epoch:
            epoch, index = epoch + 1, 0
    return {"epoch": epoch, "index": index}
