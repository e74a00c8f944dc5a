#!/usr/bin/env bash
# kdqat on one node with the DeepSpeed launcher: NUM_PROCS ranks (one per GPU, or CPU ranks over gloo).
#
#   NUM_PROCS=2 launch/deepspeed_single_node.sh tiny_debug teacher.path=runs/tiny_teacher/model \
#       train.output_dir=runs/tiny_ds engine.deepspeed.zero_stage=2 engine.deepspeed.teacher=zero3
#
# runs exactly:
#   deepspeed --num_accelerators $NUM_PROCS --master_port $MASTER_PORT --module kdqat_dist.cli \
#       $COMMAND [--resume] --config <recipe> engine.backend=deepspeed <key=value ...>
#
# Env: NUM_PROCS (2), MASTER_PORT (29500), COMMAND (train | finetune), RESUME=1 to continue from the
# run's latest checkpoint (needs train.save_every), KDQAT_DRY_RUN=1 to print the command instead.
# The launcher appends --local_rank=N, which kdqat accepts and ignores (the rank comes from the env).
set -euo pipefail
# shellcheck source=launch/checks.sh
source "$(dirname "${BASH_SOURCE[0]}")/checks.sh"
RECIPE="${1:?usage: launch/deepspeed_single_node.sh <recipe> [key=value ...]}"
shift
check_num_procs; check_command; check_run "${NUM_PROCS:-2}" "$@"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
${KDQAT_DRY_RUN:+echo} deepspeed --num_accelerators "${NUM_PROCS:-2}" --master_port "${MASTER_PORT:-29500}" \
    --module kdqat_dist.cli "${COMMAND:-train}" ${RESUME:+--resume} --config "$RECIPE" engine.backend=deepspeed "$@"
