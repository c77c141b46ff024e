#!/bin/bash
# Multi-node training under SLURM: one torchrun agent per node (srun), the c10d rendezvous on the
# allocation's first host, node-local compile caches, and a requeue when the job is preempted.
#
#   cd <repository> && sbatch --nodes 4 launch/slurm.sh --preset sit-xl2-irepa \
#       --data.source /shared/in256 --train.out_dir /shared/runs
#
# The arguments go to launch/train.py on every rank; train.out_dir must be on storage every node
# mounts (the trainer checks it). Submit from the repository root (sbatch runs a copy of this
# file, so launch/train.py is found from SLURM_SUBMIT_DIR), or set IREPA_TRAIN.
# Settings (environment): GPUS_PER_NODE (default SLURM_GPUS_ON_NODE, else 8), RDZV_PORT (29500),
# MAX_RESTARTS (3: torchrun restarts the group after a failed worker, from the newest checkpoint),
# RDZV_JOIN_TIMEOUT (900 s for every node's agent to join), SHUTDOWN_TIMEOUT (240 s for the workers
# to checkpoint after the stop signal; keep it under the --signal lead time below), SCRATCH
# (node-local: default $SLURM_TMPDIR, else /tmp/irepa-$SLURM_JOB_ID), TORCHRUN (torchrun).
#
# Preemption: SLURM sends SIGUSR1 to this script 300 s before the time limit (--signal=B:USR1@300);
# it is forwarded to srun, which forwards it to the torchrun agents, which forward it to the
# training processes (--signals-to-handle). Those finish their step, agree on stopping, write a
# normal checkpoint on every rank and exit with status 75; this script then requeues the job, and
# the next run resumes from that checkpoint. See docs/multi-node.md.
#SBATCH --job-name=irepa
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=irepa-%j.out

set -u

: "${SLURM_JOB_ID:?launch/slurm.sh: not inside a SLURM job (SLURM_JOB_ID is not set); submit it with sbatch}"
: "${SLURM_JOB_NODELIST:?launch/slurm.sh: SLURM_JOB_NODELIST is not set}"

# The first host of a node list: scontrol expands it; without scontrol, the first name of a list
# such as "gpu[003-005,9],cpu1" (-> gpu003).
first_host() {
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1" | head -n 1
        return
    fi
    local prefix=${1%%[\[,]*}
    if [[ ${1:${#prefix}:1} == "[" ]]; then
        local rest=${1#*\[}
        echo "$prefix${rest%%[,\]-]*}"
    else
        echo "$prefix"
    fi
}

NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD=$(first_host "$SLURM_JOB_NODELIST")
TRAIN=${IREPA_TRAIN:-${SLURM_SUBMIT_DIR:-.}/launch/train.py}
SCRATCH=${SCRATCH:-${SLURM_TMPDIR:-/tmp/irepa-$SLURM_JOB_ID}}
# node-local: the same path names each node's own disk (compiled kernels are per machine anyway)
export TORCHINDUCTOR_CACHE_DIR=$SCRATCH/inductor TRITON_CACHE_DIR=$SCRATCH/triton
# each restart's process group gets a store of its own (irepa.dist.check_restartable says why)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

cmd=("${TORCHRUN:-torchrun}" --nnodes="$NNODES" --nproc-per-node="$GPUS"
     --rdzv-backend=c10d --rdzv-endpoint="$HEAD:${RDZV_PORT:-29500}" --rdzv-id="irepa-$SLURM_JOB_ID"
     --rdzv-conf="join_timeout=${RDZV_JOIN_TIMEOUT:-900}" --max-restarts="${MAX_RESTARTS:-3}"
     --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-240}"
     "$TRAIN" "$@")
echo "launch/slurm.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $NNODES node(s) x $GPUS," \
     "rendezvous $HEAD:${RDZV_PORT:-29500}, scratch $SCRATCH: ${cmd[*]}" >&2

preempted=""
# Forwarded once: a second signal would cut the agents' wait for the checkpoint short. SIGTERM is
# only noted: on preemption SLURM sends it to the agents itself.
on_signal() {
    [[ -n $preempted ]] && return
    preempted=$1
    echo "launch/slurm.sh: SIG$1: the training checkpoints and stops; the job is then requeued" >&2
    [[ $1 == USR1 ]] && kill -USR1 "$srun_pid" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${cmd[@]}" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid"  # returns early when a trapped signal arrives; srun goes on
done
wait "$srun_pid"
status=$?

if [[ -n $preempted && $status != 0 ]]; then
    echo "launch/slurm.sh: requeueing job $SLURM_JOB_ID (training stopped with status $status)" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
