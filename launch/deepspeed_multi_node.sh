#!/usr/bin/env bash
# kdqat on several nodes with the DeepSpeed launcher (ssh/pdsh from this node to every host in HOSTFILE).
#
#   HOSTFILE=launch/hostfile.example launch/deepspeed_multi_node.sh bert_base_w2a8_kd \
#       data.task=rte teacher.path=models/rte train.output_dir=/shared/runs/rte_w2 engine.deepspeed.zero_stage=2
#
# runs exactly:
#   deepspeed --hostfile $HOSTFILE --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
#       --launcher $DS_LAUNCHER --module kdqat_dist.cli $COMMAND [--resume] --config <recipe> \
#       engine.backend=deepspeed <key=value ...>
#
# Needs: passwordless ssh to every host, the same venv path on each (activate it first), and
# train.output_dir on a filesystem all nodes share (rank 0 writes the resolved DeepSpeed JSON there and
# every rank reads it; checkpoints go there too). Variables to forward to the remote ranks (e.g.
# HF_HUB_OFFLINE=1) go in ~/.deepspeed_env or ./.deepspeed_env, one NAME=value per line.
# Env: HOSTFILE (hostfile), MASTER_ADDR (first host of HOSTFILE), MASTER_PORT (29500), DS_LAUNCHER
# (pdsh | openmpi | mvapich | ...), COMMAND (train | finetune), RESUME=1, KDQAT_DRY_RUN=1.
set -euo pipefail
# shellcheck source=launch/checks.sh
source "$(dirname "${BASH_SOURCE[0]}")/checks.sh"
RECIPE="${1:?usage: HOSTFILE=... launch/deepspeed_multi_node.sh <recipe> [key=value ...]}"
shift
check_hostfile; check_command; check_run "" "$@"
export TOKENIZERS_PARALLELISM=false
${KDQAT_DRY_RUN:+echo} deepspeed --hostfile "${HOSTFILE:-hostfile}" \
    ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --master_port "${MASTER_PORT:-29500}" \
    --launcher "${DS_LAUNCHER:-pdsh}" \
    --module kdqat_dist.cli "${COMMAND:-train}" ${RESUME:+--resume} --config "$RECIPE" engine.backend=deepspeed "$@"
