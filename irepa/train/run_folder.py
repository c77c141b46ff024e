"""The run folder: checked before a trainer builds anything, written only after every check passed.

`check` refuses, reading only: a file where the run folder (train.out_dir / run_name) or one of
its parents should be, and a resume into a folder whose config.json describes another run: a
different train.recipe, or a different setting that a resume cannot change (model, align and
data settings, the recipe's own options, `RESUME_FREE` and `Recipe.resume_may_change` aside).
The trainer calls it first, then builds, checks the data, loads the checkpoint, and only then
calls `start` (`write_config`, which moves a previous run aside on a fresh start, and
`drop_logged_steps_after`): a refused start leaves the folder as it was.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

from irepa.config import Config, ConfigError
from irepa.errors import InputError

CONFIG = "config.json"
COMPARED = ("model", "align", "data")
"""the sections a resume keeps, with the run's recipe section"""
RESUME_FREE = {("model", "attn_backend"), ("model", "fused_kernels"), ("align", "fused_loss"), ("data", "verify"),
               ("data", "backend"), ("data", "cache_dir")}
"""keys of those sections a resume may change: kernels and loaders that compute the same thing
(both loaders give the same batches), the startup check of the data, where the digits are cached"""


def check(cfg: Config, run_dir: Path, recipe) -> None:
    """Refuse (InputError, one line) a run folder this run cannot start or resume in; writes nothing.
    recipe: the run's recipe (its class is enough: its name, Options and resume_may_change)."""
    _check_no_file_in_the_way(run_dir)
    path = run_dir / CONFIG
    if not cfg.train.resume or not path.is_file():
        return
    diffs = resume_conflicts(read_config(path), cfg, recipe)
    if diffs:
        raise InputError(f"{path}: this run folder holds another run (settings a resume cannot change differ: "
                         f"{'; '.join(diffs)}); use another train.run_name, or --train.resume false to move that "
                         f"run aside into {run_dir}/previous-<time>/ and start afresh here")


def read_config(path: Path) -> Config:
    """A run folder's config.json (every recipe's section registered), or an InputError naming the file."""
    from irepa import recipes
    try:
        return recipes.stored_config(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable config ({e})") from None
    except ConfigError as e:
        raise InputError(f"{path}: {e}") from None


def resume_conflicts(old: Config, new: Config, recipe) -> list[str]:
    """'section.key: old -> new' for each setting of `new` that a resume of `old`'s run cannot change."""
    if old.train.recipe != new.train.recipe:
        return [f"train.recipe: {old.train.recipe!r} -> {new.train.recipe!r}"]
    before, after = old.to_dict(), new.to_dict()
    free = set(RESUME_FREE)
    sections = list(COMPARED)
    if recipe.Options is not None:
        sections.append(recipe.name)
        free |= {(recipe.name, k) for k in recipe.resume_may_change}
        before.setdefault(recipe.name, dataclasses.asdict(recipe.Options()))  # a config.json older than the section
    return [f"{s}.{k}: {before[s].get(k)!r} -> {v!r}" for s in sections for k, v in after[s].items()
            if (s, k) not in free and _plain(before[s].get(k)) != _plain(v)]


def _plain(value):
    """A value as config.json holds it (tuples are lists there)."""
    return json.loads(json.dumps(value))


def _check_no_file_in_the_way(run_dir: Path) -> None:
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{p}: a file, where the run folder {run_dir} (train.out_dir / train.run_name) "
                                 f"needs a folder; choose another --train.out_dir or --train.run_name")
            return


def start(cfg: Config, run_dir: Path, step: int, log: Callable[[str], None]) -> None:
    """The first write to the run folder, after every check and the checkpoint's load: config.json
    (a fresh start moves the previous run aside) and the rows of steps after `step` dropped."""
    write_config(cfg, run_dir, log)
    drop_logged_steps_after(run_dir, step, log)


def write_config(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> None:
    """config.json of this run, written atomically; a fresh start (train.resume false) first moves
    the run the folder holds into previous-<time>/."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.train.resume:
        move_previous_run(run_dir, log)
    path = run_dir / CONFIG
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(cfg.to_json())
    os.replace(tmp, path)


def move_previous_run(run_dir: Path, log: Callable[[str], None]) -> None:
    """A fresh start in a folder holding another run: move everything of it (config.json,
    checkpoints, metrics.jsonl, TensorBoard events, samples, exports) into previous-<time>/."""
    old = [p for p in run_dir.iterdir() if not p.name.startswith("previous-")]
    if not old:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir / f"previous-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir / f"previous-{stamp}-{n}"
    aside.mkdir()
    for p in old:
        os.replace(p, aside / p.name)
    log(f"train.resume false: moved the run that was in {run_dir} ({', '.join(sorted(p.name for p in old))}) "
        f"to {aside}; starting afresh")


def drop_logged_steps_after(run_dir: Path, step: int, log: Callable[[str], None]) -> None:
    """metrics.jsonl keeps the rows of steps <= `step`: the steps after it are run (and logged) again."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (ValueError, AttributeError, TypeError):
            pass  # a line cut by a kill: dropped
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
        log(f"{path}: dropped {len(lines) - len(keep)} rows after step {step} (they are logged again)")
