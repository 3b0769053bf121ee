#!/usr/bin/env bash
# sbatch_run_pipe.sh -- run the shell commands of a job file as a Slurm array job:
# one array task per command line.
#
# 'wait' lines in the job file split it into stages; each stage is its own array job,
# submitted with --dependency=afterok on the previous one, so it starts only when every
# task of the previous stage succeeded.  See pipe_scripts/README.md.
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
}

# ---------------------------------------------------------------- scripts

PIPE_LOG_DIR=""
PIPE_SUBMIT=(sbatch --parsable)
PIPE_CANCEL="scancel"
job_name=""

# emit_directives STAGE -- the '#SBATCH' lines: name, array range, resources, log files.
emit_directives() {
    local stage=$1 array="${PIPE_STAGE_FIRST[$1 - 1]}-${PIPE_STAGE_LAST[$1 - 1]}"
    if [[ -n $opt_max_parallel ]]; then
        array+="%$opt_max_parallel"
    fi
    printf '#SBATCH --job-name=%s\n' "$(pipe_stage_job_name "$job_name" "$stage" "${#PIPE_STAGE_FIRST[@]}")"
    printf '#SBATCH --array=%s\n' "$array"
    printf '#SBATCH --output=%s/job_%%4a.log\n' "$PIPE_LOG_DIR"
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
task_hint='run it with sbatch, or by hand with SLURM_ARRAY_TASK_ID=<job number> SLURM_SUBMIT_DIR=<dir>'
EOF
}

# build_stage_script STAGE -- print the complete batch script for one stage.
build_stage_script() {
    printf '#!/usr/bin/env bash\n'
    emit_directives "$1"
    pipe_emit_stage_comment "$1" "$opt_jobfile"
    pipe_emit_script_prelude SLURM_SUBMIT_DIR "$PIPE_LOG_DIR" "$opt_no_venv"
    emit_task_id
    pipe_emit_task_runner no
}

stage_script_path() {
    printf '%s/stage%d.sbatch' "$PIPE_LOG_DIR" "$1"
}

# dependency_args STAGE PREVIOUS_ID -- sbatch arguments that make STAGE wait for the
# previous one, one per line (none for stage 1); a failed stage cancels the next.
dependency_args() {
    if (( $1 > 1 )); then
        printf '%s\n' "--dependency=afterok:$2" --kill-on-invalid-dep=yes
    fi
}

main() {
    parse_args "$@"
    pipe_read_jobfile "$opt_jobfile"
    PIPE_LOG_DIR=$(pipe_abs_path "${opt_logdir:-$(pipe_default_logdir "$opt_jobfile")}")
    pipe_check_cluster_logdir "$PIPE_LOG_DIR"
    job_name=${opt_name:-$(pipe_default_job_name "$opt_jobfile")}
    if [[ $opt_dry_run == yes ]]; then
        pipe_print_dry_run
    else
        pipe_submit_all
    fi
}

main "$@"
