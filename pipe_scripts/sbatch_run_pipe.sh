#!/usr/bin/env bash
# sbatch_run_pipe.sh -- run the shell commands of a job file as a Slurm array job:
# one array task per command line.
#
# 'wait' lines in the job file split it into stages; each stage is its own array job,
# submitted with --dependency=afterok on the previous one, so it starts only when every
# task of the previous stage succeeded.  A stage whose job numbers exceed the cluster's
# largest array index (MaxArraySize - 1, 1000 by default) is submitted as several arrays
# of at most that many tasks, whose indices are offsets into the stage; the next stage
# waits for all of them.  See pipe_scripts/README.md.
set -euo pipefail

PIPE_PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=_jobfile.sh
source "$(dirname "${BASH_SOURCE[0]}")/_jobfile.sh"

# ---------------------------------------------------------------- options

opt_name=""
opt_partition=""
opt_time=""
opt_mem=""
opt_cpus=""
opt_account=""
opt_max_parallel=""
opt_max_array=1000
opt_logdir=""
opt_dry_run=no
opt_no_venv=no
opt_jobfile=""

print_usage() {
    cat <<EOF
Usage: $PIPE_PROG [options] JOBFILE

Submit the shell commands in JOBFILE (one per line) as a Slurm array job, one array
task per command; task N runs job line N with 'bash -c' in the submission directory.
Blank lines and '#' comments are ignored; a line that is exactly 'wait' starts a new
stage, submitted as its own array with --dependency=afterok on the previous stage.

Options:
  -J, --job-name NAME      job name (default: from the job file name; stages add _s1, ...)
  -p, --partition P        partition
  -t, --time T             time limit per task, e.g. 04:00:00 or 1-00:00:00
      --mem M              memory per task, e.g. 8G
  -c, --cpus-per-task N    CPUs per task
      --account A          account to charge
      --max-parallel M     run at most M tasks of a stage at once (--array=...%M)
      --max-array-size N   the largest array index the cluster allows (MaxArraySize - 1;
                           default 1000): longer stages become several arrays
      --logdir DIR         where the task logs (job_NNNN.log), the generated scripts and
                           the cleaned job list go
                           (default: pipe_logs/<jobfile name>_<YYYYmmdd-HHMMSS>)
      --no-venv            do not put <repo>/.venv/bin first on PATH in the jobs
      --dry-run            print the generated script(s) and sbatch commands;
                           submit and write nothing
  -h, --help               show this help

Exit status: 0 submitted (or printed), 1 sbatch failed, 2 usage error.
EOF
}

parse_args() {
    while (( $# > 0 )); do
        case $1 in
            --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
            -h|--help) print_usage; exit 0 ;;
            -J|--job-name) pipe_need_value "$1" "$#"; opt_name=$2; shift ;;
            -p|--partition) pipe_need_value "$1" "$#"; opt_partition=$2; shift ;;
            -t|--time) pipe_need_value "$1" "$#"; opt_time=$2; shift ;;
            --mem) pipe_need_value "$1" "$#"; opt_mem=$2; shift ;;
            -c|--cpus-per-task) pipe_need_value "$1" "$#"; opt_cpus=$2; shift ;;
            -A|--account) pipe_need_value "$1" "$#"; opt_account=$2; shift ;;
            --max-parallel) pipe_need_value "$1" "$#"; opt_max_parallel=$2; shift ;;
            --max-array-size) pipe_need_value "$1" "$#"; opt_max_array=$2; shift ;;
            --logdir) pipe_need_value "$1" "$#"; opt_logdir=$2; shift ;;
            --dry-run) opt_dry_run=yes ;;
            --no-venv) opt_no_venv=yes ;;
            --) shift; break ;;
            -?*) pipe_usage_error "unknown option '$1'" ;;
            *) break ;;
        esac
        shift
    done
    if (( $# > 1 )); then
        pipe_usage_error "expected one job file, got $#: $*"
    fi
    opt_jobfile=${1:-}
    check_options
}

check_options() {
    local option value
    for option in -J:"$opt_name" -p:"$opt_partition" --account:"$opt_account"; do
        value=${option#*:}
        if [[ -n $value ]]; then
            pipe_check_no_space "${option%%:*}" "$value"
        fi
    done
    if [[ -n $opt_time && ! $opt_time =~ ^[0-9]+([:-][0-9]+)*$ ]]; then
        pipe_usage_error "bad value for -t: '$opt_time' (use a Slurm time such as 30, 04:00:00 or 1-12:00:00)"
    fi
    if [[ -n $opt_mem && ! $opt_mem =~ ^[0-9]+[KMGTkmgt]?$ ]]; then
        pipe_usage_error "bad value for --mem: '$opt_mem' (use a number with an optional K/M/G/T unit, e.g. 8G)"
    fi
    if [[ -n $opt_cpus ]]; then
        pipe_check_positive_int -c "$opt_cpus" "CPUs per task, e.g. -c 4"
    fi
    if [[ -n $opt_max_parallel ]]; then
        pipe_check_positive_int --max-parallel "$opt_max_parallel" "tasks running at once, e.g. --max-parallel 10"
    fi
    pipe_check_positive_int --max-array-size "$opt_max_array" "the cluster's MaxArraySize - 1, e.g. 1000"
}

# ---------------------------------------------------------------- arrays of a stage

# Each stage becomes one or more arrays ("pieces"): PIECE_STAGE[i], PIECE_FIRST[i] and
# PIECE_LAST[i] (job numbers) and PIECE_OFFSET[i]: 0 when the array indices are the job
# numbers, else the job number of array index 0 (indices 0..N-1, below the cluster limit).
PIECE_STAGE=()
PIECE_FIRST=()
PIECE_LAST=()
PIECE_OFFSET=()

split_stages() {
    local stage first last start end
    for (( stage = 1; stage <= ${#PIPE_STAGE_FIRST[@]}; stage++ )); do
        first=${PIPE_STAGE_FIRST[stage - 1]} last=${PIPE_STAGE_LAST[stage - 1]}
        if (( last <= opt_max_array )); then
            PIECE_STAGE+=("$stage") PIECE_FIRST+=("$first") PIECE_LAST+=("$last") PIECE_OFFSET+=(0)
            continue
        fi
        for (( start = first; start <= last; start += opt_max_array )); do
            end=$(( start + opt_max_array - 1 < last ? start + opt_max_array - 1 : last ))
            PIECE_STAGE+=("$stage") PIECE_FIRST+=("$start") PIECE_LAST+=("$end") PIECE_OFFSET+=("$start")
        done
    done
}

# pieces_of STAGE -- the piece indices of a stage, one per line.
pieces_of() {
    local i
    for (( i = 0; i < ${#PIECE_STAGE[@]}; i++ )); do
        if (( PIECE_STAGE[i] == $1 )); then
            printf '%d\n' "$i"
        fi
    done
}

# ---------------------------------------------------------------- scripts

PIPE_LOG_DIR=""
PIPE_SUBMIT=(sbatch --parsable)
PIPE_CANCEL="scancel"
job_name=""

# emit_directives PIECE -- the '#SBATCH' lines: name, array range, resources, log files.
emit_directives() {
    local piece=$1 stage=${PIECE_STAGE[$1]} offset=${PIECE_OFFSET[$1]} array
    if (( offset == 0 )); then
        array="${PIECE_FIRST[piece]}-${PIECE_LAST[piece]}"
    else
        array="0-$(( PIECE_LAST[piece] - PIECE_FIRST[piece] ))"
    fi
    if [[ -n $opt_max_parallel ]]; then
        array+="%$opt_max_parallel"
    fi
    printf '#SBATCH --job-name=%s\n' "$(pipe_stage_job_name "$job_name" "$stage" "${#PIPE_STAGE_FIRST[@]}")"
    printf '#SBATCH --array=%s\n' "$array"
    if (( offset == 0 )); then
        printf '#SBATCH --output=%s/job_%%4a.log\n' "$PIPE_LOG_DIR"
    else                        # the task writes job_NNNN.log itself (NNNN = index + offset)
        printf '#SBATCH --output=%s/slurm_%%A_%%a.log\n' "$PIPE_LOG_DIR"
    fi
    print_directive_if_set --partition "$opt_partition"
    print_directive_if_set --time "$opt_time"
    print_directive_if_set --mem "$opt_mem"
    print_directive_if_set --cpus-per-task "$opt_cpus"
    print_directive_if_set --account "$opt_account"
}

print_directive_if_set() {
    if [[ -n $2 ]]; then
        printf '#SBATCH %s=%s\n' "$1" "$2"
    fi
}

emit_task_id() {
    cat <<'EOF'
task_id=${SLURM_ARRAY_TASK_ID:-}
EOF
    if (( $1 == 0 )); then
        cat <<'EOF'
task_hint='run it with sbatch, or by hand with SLURM_ARRAY_TASK_ID=<job number> SLURM_SUBMIT_DIR=<dir>'
EOF
    else
        printf 'task_offset=%d   # array index 0 is job number %d\n' "$1" "$1"
        cat <<'EOF'
task_hint="run it with sbatch, or by hand with SLURM_ARRAY_TASK_ID=<job number - $task_offset> SLURM_SUBMIT_DIR=<dir>"
if [[ $task_id =~ ^[0-9]+$ ]]; then
    task_id=$(( 10#$task_id + task_offset ))
fi
EOF
    fi
}

# build_stage_script PIECE -- print the complete batch script for one array.
build_stage_script() {
    printf '#!/usr/bin/env bash\n'
    emit_directives "$1"
    pipe_emit_stage_comment "${PIECE_STAGE[$1]}" "$opt_jobfile"
    pipe_emit_script_prelude SLURM_SUBMIT_DIR "$PIPE_LOG_DIR" "$opt_no_venv"
    emit_task_id "${PIECE_OFFSET[$1]}"
    if (( PIECE_OFFSET[$1] == 0 )); then
        pipe_emit_task_runner no
    else
        pipe_emit_task_runner yes
    fi
}

# stage_script_path PIECE -- stage<N>.sbatch, or stage<N>_part<K>.sbatch for a split stage.
stage_script_path() {
    local stage=${PIECE_STAGE[$1]} first=$1
    while (( first > 0 && PIECE_STAGE[first - 1] == stage )); do
        first=$(( first - 1 ))
    done
    if (( PIECE_OFFSET[$1] == 0 )); then
        printf '%s/stage%d.sbatch' "$PIPE_LOG_DIR" "$stage"
    else
        printf '%s/stage%d_part%d.sbatch' "$PIPE_LOG_DIR" "$stage" "$(( $1 - first + 1 ))"
    fi
}

# dependency_args STAGE PREVIOUS_IDS -- sbatch arguments that make STAGE wait for the
# previous one (its array ids joined by ':'), one per line (none for stage 1); a failed
# stage cancels the next.
dependency_args() {
    if (( $1 > 1 )); then
        printf '%s\n' "--dependency=afterok:$2" --kill-on-invalid-dep=yes
    fi
}

print_dry_run() {
    local stage n_stages=${#PIPE_STAGE_FIRST[@]} piece args previous
    for (( stage = 1; stage <= n_stages; stage++ )); do
        if (( $(pieces_of "$(( stage - 1 ))" | wc -l) > 1 )); then
            previous="<jobids of stage $(( stage - 1 ))>"
        else
            previous="<jobid of stage $(( stage - 1 ))>"
        fi
        while read -r piece; do
            mapfile -t args < <(dependency_args "$stage" "$previous")
            printf '# ==== stage %d of %d (jobs %d-%d); would be submitted with:\n' "$stage" "$n_stages" \
                "${PIECE_FIRST[piece]}" "${PIECE_LAST[piece]}"
            printf '# ====   %s\n' "${PIPE_SUBMIT[*]} ${args[*]+${args[*]} }$(stage_script_path "$piece")"
            build_stage_script "$piece"
        done < <(pieces_of "$stage")
    done
}

submit_piece() {
    local script job_id args
    script=$(stage_script_path "$1")
    build_stage_script "$1" > "$script"
    chmod +x "$script"
    mapfile -t args < <(dependency_args "${PIECE_STAGE[$1]}" "$2")
    # ${args[@]+...}: an empty array is "unbound" under set -u in bash 4.3
    if ! job_id=$("${PIPE_SUBMIT[@]}" ${args[@]+"${args[@]}"} "$script"); then
        pipe_die 1 "${PIPE_SUBMIT[0]} failed for stage ${PIECE_STAGE[$1]} ($script); stages already submitted are listed in $PIPE_LOG_DIR/submitted.txt (remove them with $PIPE_CANCEL if needed)"
    fi
    job_id=${job_id%%;*}              # sbatch --parsable may print 'jobid;cluster'
    job_id=${job_id//[[:space:]]/}
    printf 'stage %d (jobs %d-%d): %s %s\n' "${PIECE_STAGE[$1]}" "${PIECE_FIRST[$1]}" \
        "${PIECE_LAST[$1]}" "$job_id" "$script" >> "$PIPE_LOG_DIR/submitted.txt"
    printf '%s' "$job_id"
}

submit_all() {
    local stage n_stages=${#PIPE_STAGE_FIRST[@]} previous="" ids piece
    command -v "${PIPE_SUBMIT[0]}" > /dev/null ||
        pipe_die 1 "${PIPE_SUBMIT[0]} not found on PATH; run this on the cluster's login node, or use --dry-run to only print the scripts"
    pipe_prepare_logdir "$PIPE_LOG_DIR"
    pipe_write_job_list "$PIPE_LOG_DIR/$PIPE_JOB_LIST_NAME"
    for (( stage = 1; stage <= n_stages; stage++ )); do
        ids=""
        while read -r piece; do
            ids+="${ids:+:}$(submit_piece "$piece" "$previous")"
        done < <(pieces_of "$stage")
        previous=$ids
        printf 'submitted stage %d of %d (jobs %d-%d) as %s\n' "$stage" "$n_stages" \
            "${PIPE_STAGE_FIRST[stage - 1]}" "${PIPE_STAGE_LAST[stage - 1]}" "$previous"
    done
    printf 'logs: %s/job_NNNN.log\n' "$PIPE_LOG_DIR"
}

main() {
    parse_args "$@"
    pipe_read_jobfile "$opt_jobfile"
    PIPE_LOG_DIR=$(pipe_abs_path "${opt_logdir:-$(pipe_default_logdir "$opt_jobfile")}")
    pipe_check_cluster_logdir "$PIPE_LOG_DIR"
    job_name=${opt_name:-$(pipe_default_job_name "$opt_jobfile")}
    split_stages
    if [[ $opt_dry_run == yes ]]; then
        print_dry_run
    else
        submit_all
    fi
}

main "$@"
