# Checks shared by the launch scripts (sourced, not run): bad launcher input is one line and exit 2,
# before any rank starts, instead of a 1-rank run that exits 0 or a launcher traceback.
# shellcheck shell=bash

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

check_num_procs() {  # NUM_PROCS, when set, is a positive integer
    local n="${NUM_PROCS:-2}"
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCS=$n: must be a positive integer (ranks on this node)"
}

check_command() {  # COMMAND is a training command
    case "${COMMAND:-train}" in train|finetune) ;; *) die "COMMAND=${COMMAND}: allowed: train, finetune" ;; esac
}

check_engine() {  # ENGINE names a sharded engine that torchrun can launch
    case "${ENGINE:-deepspeed}" in deepspeed|fsdp2) ;; *) die "ENGINE=${ENGINE}: allowed: deepspeed, fsdp2" ;; esac
}

check_hostfile() {  # HOSTFILE exists and every entry reads "<host> slots=<N>" (DeepSpeed's format)
    local f="${HOSTFILE:-hostfile}" line n=0 hosts=0
    [[ -f "$f" && -r "$f" ]] || die "HOSTFILE=$f: no such readable file (one '<host> slots=<N>' line per node)"
    while IFS= read -r line || [[ -n "$line" ]]; do
        n=$((n + 1))
        line="${line%%#*}"
        [[ -z "${line//[[:space:]]/}" ]] && continue
        [[ "$line" =~ ^[[:space:]]*[^[:space:]=]+[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]] \
            || die "$f:$n: '$line' is not '<host> slots=<N>' (N >= 1)"
        hosts=$((hosts + 1))
    done < "$f"
    [[ $hosts -gt 0 ]] || die "HOSTFILE=$f: no hosts (one '<host> slots=<N>' line per node)"
}

check_run() {  # usage: check_run <ranks or ""> [key=value ...]; needs RECIPE (and COMMAND, RESUME, ENGINE, PYTHON)
    # The recipe, the overrides, the task and the run's folders, checked once as every rank would check them
    # (kdqat_dist/precheck.py), so a mistake is one line here, not one per rank plus the launcher's report.
    # A dry run only prints the command.
    [[ -n "${KDQAT_DRY_RUN:-}" ]] && return 0
    local world="$1"
    shift
    "${PYTHON:-python}" -m kdqat_dist.precheck "${COMMAND:-train}" ${RESUME:+--resume} --config "$RECIPE" \
        ${world:+--world-size "$world"} "engine.backend=${ENGINE:-deepspeed}" "$@" || exit 2
}
