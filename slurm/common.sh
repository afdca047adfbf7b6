# Sourced by the sbatch scripts in this folder (from the repository root, where they are submitted):
# the training flags from the environment, one launcher per srun task, and preemption.
#
# Preemption: 90 s before the time limit Slurm sends USR1 to the batch shell (#SBATCH
# --signal=B:USR1@90; by hand: scancel --signal=USR1 --batch JOBID). The shell forwards it to the
# job step, whose training processes save a checkpoint at the end of the current step, write
# OUTPUT_DIR/PREEMPTED and exit 0; the shell then requeues the job. The restarted job runs the same
# command, and --resume_from_checkpoint latest (always passed) continues from that checkpoint.

log() { echo "[distsparse-slurm $(date +%T)] $*"; }
export PYTHONUNBUFFERED=1  # the log follows the training as it happens

OUTPUT_DIR=${OUTPUT_DIR:-outputs/$SLURM_JOB_NAME-$SLURM_JOB_ID}  # the job id survives requeues
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

train_args=(--output_dir "$OUTPUT_DIR" --resume_from_checkpoint latest)
[[ -n ${MODEL:-} ]] && train_args+=(--model_name_or_path "$MODEL")
[[ -n ${TEACHER:-} ]] && train_args+=(--teacher "$TEACHER")
[[ -n ${RECIPE:-} ]] && train_args+=(--recipe "$RECIPE")
[[ -n ${TRAIN_FILE:-} ]] && train_args+=(--train_file "$TRAIN_FILE")
[[ -n ${VALIDATION_FILE:-} ]] && train_args+=(--validation_file "$VALIDATION_FILE")
read -r -a extra_args <<<"${EXTRA_ARGS:-}"  # split on spaces; values cannot contain spaces
train_args+=("${extra_args[@]}")

log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: output $OUTPUT_DIR"

# `accelerate launch "$@"` once per srun task, each a "machine" ranked by its own SLURM_PROCID (one
# task per node, so the node's rank). The task shell and the launcher ignore USR1: only the training
# processes, which install a handler, act on it (Slurm signals every process of the step).
launch() {
    srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
        bash -c 'trap "" USR1
                 echo "[distsparse-slurm] machine $SLURM_PROCID of $SLURM_NTASKS on $(hostname)"
                 exec accelerate launch --machine_rank "$SLURM_PROCID" "$@"' launch "$@"
}

# Runs "$@" (a job step) to its end; on USR1, forwards it and requeues the job once the step stopped.
run_preemptible() {
    local signalled=0 pid status
    trap 'signalled=1; log "USR1: asking the training to checkpoint and stop"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
    rm -f "$OUTPUT_DIR/PREEMPTED"
    "$@" &
    pid=$!
    while :; do
        wait "$pid"
        status=$?
        kill -0 "$pid" 2>/dev/null || break  # otherwise wait was only interrupted by the trap
    done
    if [[ -e $OUTPUT_DIR/PREEMPTED ]] || ((signalled && status != 0)); then
        log "requeueing job $SLURM_JOB_ID (training exit $status); the restart resumes from the latest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    log "training exit $status"
    exit "$status"
}
