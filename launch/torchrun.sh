#!/usr/bin/env bash
# kdqat on one node with torchrun: NUM_PROCS ranks (one per GPU, or CPU ranks over gloo), under DeepSpeed or
# PyTorch FSDP2.
#
#   NUM_PROCS=2 launch/torchrun.sh tiny_debug teacher.path=runs/tiny_teacher/model \
#       train.output_dir=runs/tiny_ds engine.deepspeed.zero_stage=2 engine.deepspeed.teacher=zero3
#   ENGINE=fsdp2 NUM_PROCS=2 launch/torchrun.sh tiny_debug teacher.path=runs/tiny_teacher/model \
#       train.output_dir=runs/tiny_fsdp2
#
# runs exactly:
#   torchrun --standalone --nproc_per_node $NUM_PROCS --module kdqat_dist.cli \
#       $COMMAND [--resume] --config <recipe> engine.backend=$ENGINE <key=value ...>
#
# If one rank dies, torchrun stops the others and reports which rank failed and how (exit code or
# signal), so a lost rank never leaves the job hanging. RESUME=1 continues from the latest checkpoint.
# Env: NUM_PROCS (2), ENGINE (deepspeed | fsdp2), COMMAND (train | finetune), RESUME=1, KDQAT_DRY_RUN=1 to print
# the command.
set -euo pipefail
# shellcheck source=launch/checks.sh
source "$(dirname "${BASH_SOURCE[0]}")/checks.sh"
RECIPE="${1:?usage: launch/torchrun.sh <recipe> [key=value ...]}"
shift
check_num_procs; check_command; check_engine; check_run "${NUM_PROCS:-2}" "$@"
export TOKENIZERS_PARALLELISM=false
${KDQAT_DRY_RUN:+echo} torchrun --standalone --nproc_per_node "${NUM_PROCS:-2}" \
    --module kdqat_dist.cli "${COMMAND:-train}" ${RESUME:+--resume} --config "$RECIPE" "engine.backend=${ENGINE:-deepspeed}" "$@"
