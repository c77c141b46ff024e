"""Parts of a device call, one process each, each under its own time limit.

A part is a command. It runs in a new process session (a crash, a hung CUDA context or an
illegal-address fault ends only that process; at its limit the whole session gets SIGTERM,
then SIGKILL 10 s later), its output goes to the console and to the call's log as it comes,
and how it ended is a row of OUT/parts.csv (ok / failed / timeout / skipped, seconds, limit,
note) before the next part starts. Rows the part wrote itself are already on disk, so a part
that dies loses nothing of the others'. Every part shares the environment given to the runner
(the call puts Inductor's and Triton's caches there, so later parts reuse earlier compiles).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from perf.common import ROOT, write_rows

PARTS_FIELDS = ["part", "device", "status", "seconds", "limit", "note", "commit"]


@dataclass
class Part:
    name: str
    cmd: list[str]
    limit_s: float
    """its own time limit; less if the call's total has less left"""
    gate: bool = False
    """a failure ends the call: the remaining parts are skipped (the preflight, the kernel tests)"""
    gate_on_timeout: bool = True
    """a gate part that runs out of time ends the call too (a hung GPU), unless this is False (slow,
    not wrong: the kernel tests' compiles)"""
    env: dict = field(default_factory=dict)


@dataclass
class Outcome:
    status: str
    seconds: float
    limit: float
    note: str
    rc: int | None


def _pump(stream, sinks, tail: list[str], last: list[float]) -> None:
    for line in iter(stream.readline, ""):
        for s in sinks:
            s.write(line)
            s.flush()
        tail.append(line)
        del tail[:-200]
        last[0] = time.monotonic()


def run_part(part: Part, limit: float, log, env: dict) -> Outcome:
    """Run one part in its own process session under `limit` seconds."""
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(part.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**env, **part.env}, start_new_session=True, bufsize=1,
                                cwd=ROOT)
    except OSError as e:
        return Outcome("failed", 0.0, limit, f"could not start: {e}", None)
    tail: list[str] = []
    last = [t0]
    reader = threading.Thread(target=_pump, args=(proc.stdout, [sys.stdout, log], tail, last), daemon=True)
    reader.start()
    status = "ok"
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        status = "timeout"
        _stop(proc)
    reader.join(timeout=5)
    rc = proc.returncode
    if status == "ok" and rc != 0:
        status = "failed"
    note = note_of(status, rc, tail)
    if status == "timeout":  # a part that hangs after its last line differs from one still working
        note = f"last output {last[0] - t0:.0f} s in; " + note
    return Outcome(status, time.monotonic() - t0, limit, note, rc)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def note_of(status: str, rc: int | None, tail: list[str]) -> str:
    """The line that says most about how a part ended: pytest's count, a failure, or its last line."""
    text = [line.strip() for line in tail if line.strip()]
    for pat in ("passed", "failed", "FAILED", "Error", "error:", "preflight:"):
        hits = [line for line in text if pat in line]
        if hits and (status != "ok" or pat in ("passed", "preflight:")):
            return hits[-1].strip("= ")[:200]
    if status == "timeout":
        return f"stopped at its limit; last line: {text[-1][:160] if text else '(none)'}"
    return (text[-1][:200] if text else "") if status != "ok" else ""


def run_parts(parts: list[Part], out: Path, total_s: float, device: str, commit: str, env: dict,
              after_each=None) -> list[tuple[Part, Outcome]]:
    """Each part in order under min(its limit, what the total has left); a failed gate part skips
    the rest. Every outcome is a row of OUT/parts.csv as soon as it is known; after_each(out) runs
    after every part (the call rewrites its summary there)."""
    deadline = time.monotonic() + total_s
    done: list[tuple[Part, Outcome]] = []
    stop_reason = ""
    with open(out / "call.log", "a") as log:
        for part in parts:
            left = deadline - time.monotonic() - 5
            if stop_reason or left < 10:
                why = stop_reason or f"no time left of the call's {total_s:.0f} s"
                outcome = Outcome("skipped", 0.0, part.limit_s, why, None)
                print(f"=== {part.name}: skipped ({why})", flush=True)
            else:
                limit = min(part.limit_s, left)
                banner = f"=== {part.name} (limit {limit:.0f} s): {' '.join(part.cmd)}"
                print(banner, flush=True)
                log.write(banner + "\n")
                outcome = run_part(part, limit, log, env)
                print(f"=== {part.name}: {outcome.status} ({outcome.seconds:.0f} s) {outcome.note}", flush=True)
                if part.gate and (outcome.status == "failed" or outcome.status == "timeout" and part.gate_on_timeout):
                    stop_reason = f"{part.name} {outcome.status}: {outcome.note}"[:200]
            write_rows(out / "parts.csv", [dict(part=part.name, device=device, status=outcome.status,
                                                seconds=f"{outcome.seconds:.0f}", limit=f"{outcome.limit:.0f}",
                                                note=outcome.note.replace("\n", " "), commit=commit)],
                       PARTS_FIELDS, quiet=True)
            done.append((part, outcome))
            if after_each is not None:
                after_each(out)
    return done
