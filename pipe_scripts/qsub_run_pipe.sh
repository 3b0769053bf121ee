#!/usr/bin/env bash
# qsub_run_pipe.sh -- run the shell commands of a job file as a PBS (PBS Pro or Torque)
# array job: one array task per command line.
#
# 'wait' lines in the job file split it into stages; each stage is its own array job,
# submitted with a dependency on the previous one, so it starts only when every task
# of the previous stage succeeded.  See pipe_scripts/README.md.
set -euo pipefail

PIPE_PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=_jobfile.sh
source "$(dirname "${BASH_SOURCE[0]}")/_jobfile.sh"

# ---------------------------------------------------------------- options

opt_flavour=pbspro
opt_name=""
opt_queue=""
opt_resources=()
opt_logdir=""
opt_dry_run=no
opt_no_venv=no
opt_jobfile=""

print_usage() {
    cat <<EOF
Usage: $PIPE_PROG [options] JOBFILE

Submit the shell commands in JOBFILE (one per line) as a PBS array job, one array
task per command; task N runs job line N with 'bash -c' in the submission directory.
Blank lines and '#' comments are ignored; a line that is exactly 'wait' starts a new
stage, submitted as its own array that depends on the previous stage succeeding.

Options:
  --flavour F        pbspro (default; '#PBS -J', \$PBS_ARRAY_INDEX) or
                     torque ('#PBS -t', \$PBS_ARRAYID); --flavor works too
  -N NAME            job name (default: from the job file name; stages add _s1, _s2, ...)
  -q QUEUE           queue
  -l RESOURCES       resource list, e.g. -l walltime=04:00:00 -l select=1:ncpus=2:mem=8gb
                     (repeatable; each becomes a '#PBS -l' line)
  --logdir DIR       where the task logs (job_NNNN.log), the generated scripts and the
                     cleaned job list go (default: pipe_logs/<jobfile name>_<YYYYmmdd-HHMMSS>)
  --no-venv          do not put <repo>/.venv/bin first on PATH in the jobs
  --dry-run          print the generated script(s) and qsub commands; submit and write nothing
  -h, --help         show this help

A stage with a single job is submitted as a plain job (PBS Pro refuses '-J 1-1').
Exit status: 0 submitted (or printed), 1 qsub failed, 2 usage error.
EOF
}

parse_args() {
    while (( $# > 0 )); do
        case $1 in
            --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
            -h|--help) print_usage; exit 0 ;;
            --flavour|--flavor) pipe_need_value "$1" "$#"; opt_flavour=$2; shift ;;
            -N) pipe_need_value "$1" "$#"; opt_name=$2; shift ;;
            -q) pipe_need_value "$1" "$#"; opt_queue=$2; shift ;;
            -l) pipe_need_value "$1" "$#"; opt_resources+=("$2"); shift ;;
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
    local resource
    case $opt_flavour in
        pbspro|torque) ;;
        *) pipe_usage_error "bad value for --flavour: '$opt_flavour' (use pbspro or torque)" ;;
    esac
    if [[ -n $opt_name && ! $opt_name =~ ^[A-Za-z][A-Za-z0-9_.+-]*$ ]]; then
        pipe_usage_error "bad value for -N: '$opt_name' (a PBS job name starts with a letter and holds only letters, digits and _ . + -)"
    fi
    if [[ -n $opt_queue ]]; then
        pipe_check_no_space -q "$opt_queue"
    fi
    for resource in ${opt_resources[@]+"${opt_resources[@]}"}; do
        pipe_check_no_space -l "$resource"
    done
}

# ---------------------------------------------------------------- scripts

PIPE_LOG_DIR=""
PIPE_SUBMIT=(qsub)
PIPE_CANCEL="qdel"
job_name=""

stage_size() {
    echo $(( PIPE_STAGE_LAST[$1 - 1] - PIPE_STAGE_FIRST[$1 - 1] + 1 ))
}

# emit_directives STAGE -- the '#PBS' lines: name, array range, queue, resources, logs.
emit_directives() {
    local stage=$1 first=${PIPE_STAGE_FIRST[$1 - 1]} last=${PIPE_STAGE_LAST[$1 - 1]} resource
    printf '#PBS -N %s\n' "$(pipe_stage_job_name "$job_name" "$stage" "${#PIPE_STAGE_FIRST[@]}")"
    if (( $(stage_size "$stage") > 1 )); then
        if [[ $opt_flavour == torque ]]; then
            printf '#PBS -t %d-%d\n' "$first" "$last"
        else
            printf '#PBS -J %d-%d\n' "$first" "$last"
        fi
    fi
    if [[ -n $opt_queue ]]; then
        printf '#PBS -q %s\n' "$opt_queue"
    fi
    for resource in ${opt_resources[@]+"${opt_resources[@]}"}; do
        printf '#PBS -l %s\n' "$resource"
    done
    printf '#PBS -S /bin/bash\n#PBS -j oe\n#PBS -o %s/\n' "$PIPE_LOG_DIR"
}

# emit_task_id STAGE -- how the script learns its job number.
emit_task_id() {
    local stage=$1 first=${PIPE_STAGE_FIRST[$1 - 1]} index_var=PBS_ARRAY_INDEX
    if [[ $opt_flavour == torque ]]; then
        index_var=PBS_ARRAYID
    fi
    if (( $(stage_size "$stage") == 1 )); then
        printf '# A single job, submitted without an array (PBS Pro refuses -J %d-%d).\n' "$first" "$first"
        printf 'task_id=%d\n' "$first"
        printf "task_hint='this stage is the single job %d'\n" "$first"
    else
        cat <<EOF
task_id=\${$index_var:-}
task_hint='run it with qsub, or by hand with $index_var=<job number> PBS_O_WORKDIR=<dir>'
EOF
    fi
}

# build_stage_script STAGE -- print the complete batch script for one stage.
build_stage_script() {
    printf '#!/usr/bin/env bash\n'
    emit_directives "$1"
    pipe_emit_stage_comment "$1" "$opt_jobfile"
    pipe_emit_script_prelude PBS_O_WORKDIR "$PIPE_LOG_DIR" "$opt_no_venv"
    emit_task_id "$1"
    pipe_emit_task_runner yes
}

stage_script_path() {
    printf '%s/stage%d.pbs' "$PIPE_LOG_DIR" "$1"
}

# dependency_args STAGE PREVIOUS_ID -- the qsub arguments that make STAGE wait for the
# previous stage, one per line (none for stage 1).  Torque needs afterokarray for an
# array; PBS Pro takes afterok for arrays and plain jobs alike.
dependency_args() {
    local kind=afterok
    if (( $1 == 1 )); then
        return 0
    fi
    if [[ $opt_flavour == torque ]] && (( $(stage_size $(( $1 - 1 ))) > 1 )); then
        kind=afterokarray
    fi
    printf '%s\n' -W "depend=$kind:$2"
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
