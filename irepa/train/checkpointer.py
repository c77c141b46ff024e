"""A run's checkpoints as the trainer takes them: what besides the parts makes a resume exact (step,
data position of every rank, RNG, loss scale) saved with them, and restored from the newest good
one. The files and their checks are irepa.train.checkpoint's."""
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
        data = tr["data"]
        if "epoch" not in data:  # one position per rank; a new world size continues from rank 0's (same epoch, batch)
            data = data.get(str(run.rank), data["0"])
        run.data.loader.load_state_dict(data)
        torch.set_rng_state(rng["cpu"])
        step = int(tr["step"])
        self.log(f"resumed from {latest} at step {step}")
        return step

    def save(self, step: int) -> Path:
        """Every part, the data position of every rank and the RNG at `step` (collective)."""
        run = self.run
        data_state = run.data.loader.state_dict()
        if run.world > 1:
            data_state = {str(r): s for r, s in enumerate(all_gather_object(data_state))}
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
