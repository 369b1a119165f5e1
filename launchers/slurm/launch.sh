#!/usr/bin/env bash
# One node's share of a multi-node run: `accelerate launch` for this node, with SIGUSR1 passed on
# to the training processes. train.sbatch and predict.sbatch run it once per node (srun, one task
# per node); the tests run it twice on one machine (NODE_RANK 0 and 1 on 127.0.0.1) to simulate
# two nodes.
#
#   launch.sh [arguments of $MODULE: --config FILE.yaml key.sub=value ... for cmaclip.train]
#
# Environment (the sbatch script sets them from Slurm; the defaults are one local node):
#   NUM_NODES       nodes in the run                                   (default 1)
#   PROCS_PER_NODE  training processes per node, normally its GPUs     (default 1)
#   NODE_RANK       this node's rank, 0..NUM_NODES-1 (default: $SLURM_NODEID, read here, on the
#                   node itself, so every node gets its own)
#   MAIN_ADDR       address of node 0                                  (default 127.0.0.1)
#   MAIN_PORT       a free TCP port on node 0                          (default 29500)
#   ACCELERATE_CONFIG  accelerate config     (default launchers/accelerate/multinode-zero2.yaml)
#   ACCELERATE      the accelerate executable                          (default: accelerate)
#   EXTRA_LAUNCH_ARGS  more `accelerate launch` flags, e.g. "--deepspeed_config_file X.json"
#   RDZV_TIMEOUT    seconds every node has to check in with node 0 (on MAIN_PORT + 1) before the
#                   launch; a node missing then stops it with one line naming it  (default 300)
#   MODULE          the Python module every process runs   (default cmaclip.train; cmaclip.predict,
#                   cmaclip.calibrate, cmaclip.evaluate and cmaclip.pretrain run the same way)
set -euo pipefail

NUM_NODES=${NUM_NODES:-1}
PROCS_PER_NODE=${PROCS_PER_NODE:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/multinode-zero2.yaml}
ACCELERATE=${ACCELERATE:-accelerate}
MODULE=${MODULE:-cmaclip.train}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-300}
PYTHON=${PYTHON:-$(dirname "$(command -v "$ACCELERATE")")/python}

if [ "$NUM_NODES" -gt 1 ]; then
  "$PYTHON" -m cmaclip.rendezvous --nodes "$NUM_NODES" --node-rank "$NODE_RANK" --addr "$MAIN_ADDR" \
    --port "$((MAIN_PORT + 1))" --timeout "$RDZV_TIMEOUT"
fi

# Slurm's --signal=USR1@T may reach only this script, or every process of the step. The launcher
# (torchrun's agent inside accelerate) must not die of it, so it starts with USR1 ignored (the
# trainer installs its own handler); this script forwards USR1 to the agent's children, the
# training processes, which agree on a step, save a checkpoint and exit 0.
(
  trap '' USR1
  exec "$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NUM_NODES" --num_processes "$((NUM_NODES * PROCS_PER_NODE))" \
    --machine_rank "$NODE_RANK" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
    ${EXTRA_LAUNCH_ARGS:-} -m "$MODULE" "$@"
) &
launcher=$!

forward_usr1() { pkill -USR1 -P "$launcher" || true; }
trap forward_usr1 USR1

# `wait` returns early when a trapped signal arrives; keep waiting until the launcher exits.
while true; do
  set +e
  wait "$launcher"
  status=$?
  set -e
  if ! kill -0 "$launcher" 2>/dev/null; then
    exit "$status"
  fi
done
