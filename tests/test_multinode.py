"""Multi-node training on this CPU (gloo): torchrun agents on localhost joined by the c10d rendezvous
as separate "nodes", launch/slurm.sh under a fake SLURM, preemption, a killed rank, a resume on
another node count, and the start checks of a multi-node run.

The fake SLURM is two scripts on PATH: `srun` records its command line and, with FAKE_SRUN_RUN=1,
runs it once per node (SLURM_NODEID set, signals forwarded like srun does); `scontrol` answers
`show hostnames` with localhost and records `requeue`. The tiny run is tests/test_parallel.py's.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_parallel import TINY as PARALLEL_TINY, _cli, _env, replay_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
RUN = {**PARALLEL_TINY, "train.steps": STEPS, "train.parallel": "fsdp"}

FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_SLURM_LOG"
echo "env $TORCHINDUCTOR_CACHE_DIR $TRITON_CACHE_DIR ${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-}" >> "$FAKE_SLURM_LOG"
[[ ${FAKE_SRUN_RUN:-0} == 1 ]] || exit 0
while [[ $1 == --* ]]; do shift; done   # srun's own options
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}"' USR1
trap 'kill -TERM "${pids[@]}"' TERM
status=0
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
    wait "$pid" || status=$?
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
[[ $1 == show && $2 == hostnames ]] && echo localhost
exit 0
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _fake_slurm(tmp: Path, nodes: int, scontrol: bool = True, **env) -> dict:
    """An environment with SLURM's variables of a `nodes`-node job and the fake srun (and scontrol)."""
    bin_dir = tmp / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL))[:2 if scontrol else 1]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = _env()
    out.update({"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
                "FAKE_SLURM_LOG": str(tmp / "slurm.log"), "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NODELIST": f"node[07-{7 + nodes - 1:02d}]", "SLURM_NNODES": str(nodes),
                "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NODEID": "0", "SLURM_SUBMIT_DIR": str(ROOT),
                "GPUS_PER_NODE": "1", "RDZV_PORT": str(_free_port()), "SCRATCH": str(tmp / "scratch"), **env})
    return out


def _overrides(out_dir: Path, name: str, cache: str, **extra) -> list[str]:
    return _cli({**RUN, "data.cache_dir": cache, "train.out_dir": str(out_dir), "train.run_name": name, **extra})


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _start_agents(nodes, args: list[str], *, per_node: int = 1, max_restarts: int = 0, cwd=(ROOT,), extra=([],),
                  started: int | None = None, rdzv_conf: str = "", store_first: bool = False) -> list[subprocess.Popen]:
    """`nodes` torchrun agents on localhost forming one job through the c10d rendezvous (nodes: a
    count, or torchrun's elastic "min:max"), started together (the first `started` of them only, if
    given), agent i with cwd[i] and args + extra[i] (cycled). store_first: the others start once
    agent 0 listens on the rendezvous port, so agent 0 hosts the store."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id=job{port}",
           f"--max-restarts={max_restarts}", *([f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []), *args]
    env = {**_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # irepa.dist.check_restartable
    count = started if started is not None else int(str(nodes).split(":")[-1])
    procs = []
    for i in range(count):
        procs.append(subprocess.Popen(cmd + extra[i % len(extra)], env=env, cwd=cwd[i % len(cwd)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        if store_first and i == 0:
            _wait_listening(port, procs[0])
    return procs


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the first agent exited: {proc.communicate()[1][-3000:]}"
        with socket.socket() as s:
            if s.connect_ex(("localhost", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"no rendezvous store on port {port} after {timeout} s")


SLOW_TRAIN = """import runpy, sys, time
from irepa.train.trainer import Trainer
step = Trainer.train_step
def slow_step(self, batch, index):
    time.sleep(0.1)
    return step(self, batch, index)
Trainer.train_step = slow_step
sys.argv[0] = "{train}"
runpy.run_path("{train}", run_name="__main__")
"""


def _complete_checkpoint_from(run_dir: Path, step: int) -> bool:
    """A complete checkpoint (its manifest written) of `step` or later in the run folder."""
    return any(int(d.name.split("-")[1]) >= step for d in (run_dir / "checkpoints").glob("step-*[0-9]")
               if (d / "manifest.json").is_file())


def _world_of_newest_checkpoint(run_dir: Path) -> int:
    """The world size saved in the newest complete checkpoint (retried: the running job prunes old ones)."""
    from irepa.train.checkpoint import read_trainer_state
    for _ in range(20):
        done = sorted(d for d in (run_dir / "checkpoints").glob("step-*[0-9]") if (d / "manifest.json").is_file())
        try:
            return read_trainer_state(done[-1])[0]["world_size"]
        except (OSError, IndexError):
            time.sleep(0.05)
    raise AssertionError(f"no readable complete checkpoint in {run_dir}")


def _results(procs: list[subprocess.Popen], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _agents(nodes: int, args: list[str], timeout: int = 300, **kw) -> list[subprocess.CompletedProcess]:
    """_start_agents, and their results once all have exited."""
    return _results(_start_agents(nodes, args, **kw), timeout)


@pytest.fixture(scope="module")
def replay(tmp_path_factory, digits_cache):
    """One process replaying the 2-rank run (the same global batch of 8): per-step losses."""
    from irepa.recipes import resolve
    from irepa.train.trainer import Trainer
    out = tmp_path_factory.mktemp("replay")
    tr = Trainer(resolve(overrides={**RUN, "train.parallel": "auto", "data.cache_dir": digits_cache,
                                    "train.out_dir": str(out), "train.run_name": "replay"}))
    return [log["loss"] for log in replay_steps(tr, STEPS)]


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, digits_cache, replay):
    """launch/slurm.sh of a 2-node job (1 process each) under the fake SLURM, run to the end."""
    tmp = tmp_path_factory.mktemp("slurm")
    env = _fake_slurm(tmp, 2, FAKE_SRUN_RUN="1")
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm.sh"), *_overrides(tmp, "two", digits_cache)], env=env,
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "two", (tmp / "slurm.log").read_text()


def test_two_nodes_match_one_process_with_the_same_global_batch(slurm_run, replay):
    """To float32 round-off: the logged loss is the mean of the ranks' losses, all-reduced in float32 by
    the run and averaged in float64 by the replay (measured: at most 4e-8 relative, 1 ulp); the
    gradients are averaged by gloo in the run and summed by autograd in the replay."""
    run_dir, log = slurm_run
    losses = _losses(run_dir)
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sorted(losses) == list(range(1, STEPS + 1)) and len(rows) == STEPS  # one writer: global rank 0
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1 and len(list(run_dir.glob("samples/*.png"))) == 1
    for step, ref in enumerate(replay, 1):
        assert losses[step] == pytest.approx(ref, rel=1e-6, abs=0), (losses, replay)
    manifest = json.loads((run_dir / "checkpoints/step-0000006/manifest.json").read_text())
    assert manifest["sharded"] and manifest["world_size"] == 2
    assert any(f.startswith("dcp/__1_") for f in manifest["files"])  # the second node wrote its own shards
    assert "scontrol requeue" not in log  # a finished run is not requeued


def test_slurm_script_builds_one_torchrun_agent_per_node(tmp_path):
    """Recorded, not run: the srun line (one task per node) and torchrun's rendezvous from the node
    list, parsed without scontrol (gpu[003-004] -> gpu003), scratch and caches node-local."""
    env = _fake_slurm(tmp_path, 2, scontrol=False, SLURM_JOB_NODELIST="gpu[003-004],cpu9", GPUS_PER_NODE="8",
                      RDZV_PORT="29611", SLURM_TMPDIR="/local/job")
    env.pop("SCRATCH")
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm.sh"), "--preset", "sit-xl2-irepa", "--train.out_dir",
                           "/shared/runs"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line, env_line = (tmp_path / "slurm.log").read_text().splitlines()
    assert env_line == "env /local/job/inductor /local/job/triton 1"  # node-local caches; a store per restart
    assert line.split() == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "torchrun", "--nnodes=2",
        "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu003:29611", "--rdzv-id=irepa-4242",
        "--rdzv-conf=join_timeout=900", "--max-restarts=3",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=240",
        f"{ROOT}/launch/train.py", "--preset", "sit-xl2-irepa", "--train.out_dir", "/shared/runs"]
    probe = subprocess.run(["bash", "-c", "source <(sed -n '/^first_host()/,/^}/p' launch/slurm.sh); "
                            "for l in node1 'a[9],b' 'x-[1-3]' 'n[010,2-3]'; do first_host \"$l\"; done"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.split() == ["node1", "a9", "x-1", "n010"], probe.stderr


def test_slurm_script_refuses_to_run_outside_a_job(tmp_path):
    env = {k: v for k, v in _fake_slurm(tmp_path, 1).items() if k != "SLURM_JOB_ID"}
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr
    assert not (tmp_path / "slurm.log").exists()


def test_preemption_signal_checkpoints_and_requeues(tmp_path, digits_cache, slurm_run):
    """SIGUSR1 to the batch script (SLURM's --signal=B:USR1) -> srun -> torchrun agent -> the
    training process: it finishes its step, writes a normal checkpoint, exits with status 75, and
    the script asks scontrol to requeue the job."""
    env = _fake_slurm(tmp_path, 1, FAKE_SRUN_RUN="1")
    run_dir = tmp_path / "long"
    script = subprocess.Popen(["bash", str(ROOT / "launch/slurm.sh"),
                               *_overrides(tmp_path, "long", digits_cache, **{"train.steps": 100_000,
                                                                              "train.ckpt_every": 100_000,
                                                                              "train.parallel": "auto"})],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").is_file() and script.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    script.send_signal(signal.SIGUSR1)
    stdout, stderr = script.communicate(timeout=300)
    assert script.returncode != 0, stderr[-3000:]
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 0 < int(ckpts[0].name[5:]) < 100_000, stderr[-3000:]
    assert (ckpts[0] / "manifest.json").is_file()  # complete: a resume takes it
    step = int(ckpts[0].name[5:])
    assert f"signal {signal.SIGUSR1.value}: writing a checkpoint at step {step}" in stderr
    assert f"stopped by signal {signal.SIGUSR1.value} after the checkpoint of step {step}; exit status 75" in stderr
    assert (tmp_path / "slurm.log").read_text().splitlines()[-1] == "scontrol requeue 4242"


def test_killed_rank_restarts_and_resumes_exactly(tmp_path, digits_cache, slurm_run):
    """Two agents with --max-restarts 1; rank 1 is SIGKILLed before step 4 (tests/interrupts.py,
    on the first start only). torchrun restarts both, they resume from step 2's checkpoint and every
    logged loss equals the uninterrupted 2-node run's bit for bit (same world, same reductions)."""
    args = [str(ROOT / "tests/interrupts.py"), "--kill_rank", "1", "--kill_at", "3",
            *_overrides(tmp_path, "killed", digits_cache)]
    procs = _agents(2, args, max_restarts=1)
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    assert any("failed (exitcode: -9)" in p.stderr for p in procs)  # the kill happened; torchrun went on
    assert "resumed from" in "".join(p.stderr for p in procs)
    assert _losses(tmp_path / "killed") == _losses(slurm_run[0])


def test_two_node_run_resumes_on_one_node(tmp_path, digits_cache, slurm_run):
    """The 2-node run's step-4 checkpoint resumed by one node with 2 processes: the same losses for
    steps 5-6 as the uninterrupted run, bit for bit."""
    shutil.copytree(slurm_run[0], tmp_path / "one", ignore=shutil.ignore_patterns("step-0000006", "events*"))
    procs = _agents(1, [str(ROOT / "launch/train.py"), *_overrides(tmp_path, "one", digits_cache)], per_node=2)
    assert procs[0].returncode == 0, procs[0].stderr[-3000:]
    assert "resumed from" in procs[0].stderr and "at step 4" in procs[0].stderr
    assert _losses(tmp_path / "one") == _losses(slurm_run[0])
    from irepa.train.checkpoint import read_trainer_state
    trainer_state, _ = read_trainer_state(slurm_run[0] / "checkpoints/step-0000004")
    assert trainer_state["data"] == {"epoch": 0, "index": 4, "global_batch": 8}  # one global position


def test_nodes_with_another_config_are_refused_by_name(tmp_path, digits_cache):
    args = [str(ROOT / "launch/train.py"), *_overrides(tmp_path, "cfg", digits_cache)]
    procs = _agents(2, args, extra=([], ["--optim.lr", "0.5"]))
    out = "".join(p.stderr for p in procs)
    assert all(p.returncode != 0 for p in procs)
    assert "does not run what rank 0" in out and "optim.lr" in out and "vs 0.5" in out, out[-3000:]
    assert not (tmp_path / "cfg").exists()  # refused before the run folder is written


def test_run_folder_not_shared_by_every_node_is_refused(tmp_path, digits_cache):
    """The two agents run in different folders and train.out_dir is relative: the same config,
    two different run folders, as on two machines with node-local disks."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    args = [str(ROOT / "launch/train.py"), *_cli({**RUN, "data.cache_dir": digits_cache, "train.out_dir": "runs",
                                                   "train.run_name": "x"})]
    procs = _agents(2, args, cwd=(a, b))
    out = "".join(p.stderr for p in procs)
    assert all(p.returncode != 0 for p in procs)
    assert "train.out_dir runs is not one folder for every rank" in out, out[-3000:]
    assert not list(a.rglob("rank-*")) and not list(b.rglob("rank-*"))  # the markers are gone
    assert not (a / "runs/x").exists() and not (b / "runs/x").exists()


def test_rendezvous_timeout_ends_the_agent(tmp_path):
    """One agent of a 2-node job, the other never comes: torchrun ends after join_timeout with its
    RendezvousTimeoutError (no worker was started, so nothing of ours waits)."""
    t0 = time.monotonic()
    proc, = _agents(2, [str(ROOT / "launch/train.py"), "--train.out_dir", str(tmp_path)], started=1,
                    rdzv_conf="join_timeout=3", timeout=120)
    assert proc.returncode != 0 and "RendezvousTimeoutError" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    assert not list(tmp_path.iterdir())


def test_stop_signal_ends_train_py_with_status_75(tmp_path, digits_cache, slurm_run):
    """One process, no torchrun: SIGUSR1 -> checkpoint -> exit status 75 (PREEMPTED), one line saying so."""
    cmd = [sys.executable, str(ROOT / "launch/train.py"),
           *_overrides(tmp_path, "alone", digits_cache, **{"train.steps": 100_000, "train.ckpt_every": 100_000,
                                                           "train.parallel": "auto"})]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (tmp_path / "alone/metrics.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    step = int(next((tmp_path / "alone/checkpoints").glob("step-*")).name[5:])
    assert stderr.splitlines()[-1] == (f"train.py: stopped by signal {signal.SIGUSR1.value} after the checkpoint of "
                                       f"step {step}; exit status 75: run the same command again to resume")


def test_restarts_across_nodes_need_their_own_store(monkeypatch):
    """What the killed-rank test hit in about half of its runs with torch's shared rendezvous store: the restarted
    group hung in init_process_group (or failed). Refused at once, before the process group starts."""
    from irepa.dist import setup
    from irepa.errors import InputError
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2",
                 "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InputError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        setup("cpu")
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart: the shared store is fine
    monkeypatch.setenv("WORLD_SIZE", "1")
    setup("cpu")


def test_global_batches_cover_the_same_samples_on_any_number_of_ranks():
    """The loaders' order (irepa.data.memory.epoch_order): step i of 1 rank x 8 and of 2 ranks x 4
    reads the same 8 samples, before and after a resume at a global position."""
    from irepa.data.memory import TensorLoader
    x = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)
    y = torch.zeros(50, dtype=torch.long)

    def steps(world, start=None, n=8):
        loaders = [TensorLoader(x, y, [], 8 // world, seed=3, rank=r, world_size=world) for r in range(world)]
        if start is not None:
            for ld in loaders:
                ld.load_state_dict(start)
        its = [iter(ld) for ld in loaders]
        return [sorted(int(v) for it in its for v in next(it)["x"].flatten()) for _ in range(n)]

    assert steps(1) == steps(2)  # 6 batches an epoch, so the 8 steps cross into epoch 1
    assert steps(1, {"epoch": 0, "index": 4}) == steps(2, {"epoch": 0, "index": 4}) == steps(1)[4:] + steps(1, n=12)[8:]


def test_saved_data_position_follows_the_global_sample_index():
    from irepa.train.checkpointer import loader_position
    assert loader_position({"epoch": 2, "index": 5, "global_batch": 8}, 8, 100) == {"epoch": 2, "index": 5}
    assert loader_position({"epoch": 2, "index": 5, "global_batch": 8}, 16, 100) == {"epoch": 2, "index": 3}  # 40 -> 48
    assert loader_position({"epoch": 2, "index": 5, "global_batch": 8}, 4, 100) == {"epoch": 2, "index": 10}
    assert loader_position({"epoch": 0, "index": 99, "global_batch": 8}, 16, 50) == {"epoch": 1, "index": 0}
    assert loader_position({"0": {"epoch": 1, "index": 3}, "1": {"epoch": 1, "index": 3}}, 8, 100) == \
        {"epoch": 1, "index": 3}  # a checkpoint from before the global position: one per rank


def _stop_on_one_rank(rank: int, store: str, out: str):
    import torch.distributed as dist
    from irepa.train.preemption import StopRequest
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    stop = StopRequest(2)
    seen = []
    with stop.handlers():
        for step in range(3):
            if rank == 1 and step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # reaches rank 1 only, mid-"step"
            seen.append(stop.requested())
    Path(f"{out}.{rank}").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(_stop_on_one_rank, args=(str(tmp_path / "store"), str(tmp_path / "seen")), nprocs=2,
                       start_method="spawn")
    stop = signal.SIGUSR1.value
    assert [json.loads((tmp_path / f"seen.{r}").read_text()) for r in range(2)] == [[0, stop, stop]] * 2


def test_setup_differences_name_the_keys_files_and_versions():
    from irepa.train.world_checks import setup_differences
    ref = {"config": {"optim": {"lr": 1e-4}, "train": {"steps": 10}}, "code": {"irepa/a.py": "1", "irepa/b.py": "2"},
           "versions": {"irepa": "0.1.0", "torch": "2.13.0"}}
    other = {"config": {"optim": {"lr": 2e-4}, "train": {"steps": 10}}, "code": {"irepa/a.py": "1", "irepa/b.py": "3",
             "irepa/c.py": "4"}, "versions": {"irepa": "0.1.0", "torch": "2.12.0"}}
    assert setup_differences(ref, other) == ["config optim.lr 0.0001 vs 0.0002", "source files irepa/b.py, irepa/c.py",
                                             "torch 2.13.0 vs 2.12.0"]
    assert setup_differences(ref, ref) == []


def test_a_killed_node_leaves_an_elastic_job_running_on_the_rest(tmp_path, digits_cache):
    """--nnodes 1:2: one node (its agent and its worker) SIGKILLed after the step-4 checkpoint; the
    other agent (started first, so it hosts the rendezvous store, which must outlive the job)
    restarts its worker, the rendezvous closes with one node, and the run resumes from the newest
    complete checkpoint on a world of 1 (FSDP shards resharded, the same global sample) and
    finishes, each step logged once. The first round waits up to last_call_timeout for the second
    node: with 1 s, a second agent slow to start under load missed it, joined later, and its
    arrival restarted the job from step 1 (a membership change, which costs no restart)."""
    steps = 40
    # each step sleeps 0.1 s: on an idle machine the 40 tiny steps take ~1 s, less than a poll can
    # see a checkpoint before the run ends; the kill must land mid-run
    slow = tmp_path / "slow_train.py"
    slow.write_text(SLOW_TRAIN.format(train=ROOT / "launch/train.py"))
    procs = _start_agents("1:2", [str(slow), *_overrides(tmp_path, "elastic", digits_cache, **{"train.steps": steps})],
                          max_restarts=1, rdzv_conf="last_call_timeout=15", store_first=True)
    run_dir = tmp_path / "elastic"
    deadline = time.monotonic() + 300
    while not _complete_checkpoint_from(run_dir, 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (run_dir / f"checkpoints/step-{steps:07d}").exists(), "the run ended before the kill"
    from irepa.train.checkpoint import read_trainer_state
    assert _world_of_newest_checkpoint(run_dir) == 2, "the first rendezvous round did not hold both nodes"
    node = procs[1]
    workers = [int(w) for f in Path(f"/proc/{node.pid}/task").glob("*/children") for w in f.read_text().split()]
    for pid in [node.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    survivor, _ = _results(procs)
    assert survivor.returncode == 0, survivor.stderr[-3000:]
    resumed = [line for line in survivor.stderr.splitlines() if line.startswith("[irepa] resumed from")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 4, survivor.stderr[-3000:]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, steps + 1))
    assert read_trainer_state(run_dir / f"checkpoints/step-{steps:07d}")[0]["world_size"] == 1
