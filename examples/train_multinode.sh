#!/usr/bin/env bash
# Launch `megatron-mole train` on this node of a multi-node job (run it on every node).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 ./examples/train_multinode.sh examples/llama3_8b_mole.yaml [flags]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 ./examples/train_multinode.sh examples/llama3_8b_mole.yaml [flags]
#
# Extra flags go to `megatron-mole train` (--max-steps, --save, --load, --set parallel.ep=8, ...).
# Resuming: pass --load DIR (the latest checkpoint in DIR) or --load DIR --load-step N.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [train flags]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# Megatron-core asks for 1 with sequence parallelism: its async all-gather must be queued before the GEMM.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_mole train --config "$CONFIG" "$@"
