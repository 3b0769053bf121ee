#!/usr/bin/env bash
# qsub_run_pipe.sh -- run the shell commands of a job file as a PBS (PBS Pro or Torque)
# array job: one array task per command line.
#
# 'wait' lines in the job file split it into stages; each stage is its own array job,
# submitted with a dependency on the previous one, so it starts only when every task
# of the previous stage succeeded.  A stage of more jobs than one array may hold (the
# server's max_array_size / max_job_array_size, --max-array-size) is submitted as
# several arrays whose indices are offsets into the stage; the next stage waits for
# all of them.  See pipe_scripts/README.md.
set -euo pipefail

PIPE_PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=_jobfile.sh
source "$(dirname "${BASH_SOURCE[0]}")/_jobfile.sh"

# ---------------------------------------------------------------- options

opt_flavour=pbspro
opt_name=""
opt_queue=""
opt_resources=()
opt_max_array=10000
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
  --max-array-size N the most subjobs one array may hold (default 10000): the server's
                     max_array_size on PBS Pro (default 10000), max_job_array_size on
                     Torque (see 'qmgr -c "print server"'). A longer stage becomes
                     several arrays stage<S>_part<K>.pbs of indices 0-(n-1) offset into
                     the stage, and the next stage waits for all of them
  --logdir DIR       where the task logs (job_NNNN.log), the generated scripts and the
                     cleaned job list go (default: pipe_logs/<jobfile name>_<YYYYmmdd-HHMMSS>)
  --no-venv          do not put <repo>/.venv/bin first on PATH in the jobs
  --dry-run          print the generated script(s) and qsub commands; submit and write nothing
  -h, --help         show this help

A stage (or an array of a split stage) with a single job is submitted as a plain job
(PBS Pro refuses '-J 1-1').
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
    pipe_check_positive_int --max-array-size "$opt_max_array" "the server's max_array_size (PBS Pro) or max_job_array_size (Torque), e.g. 10000"
    opt_max_array=$(( 10#$opt_max_array ))
}

# ---------------------------------------------------------------- scripts

PIPE_LOG_DIR=""
PIPE_SUBMIT=(qsub)
PIPE_CANCEL="qdel"
job_name=""
# Torque refuses array indices above PBS_MAXJOBARRAY (99999): a stage past it gets offsets.
PBS_MAX_INDEX=99999

# piece_is_array PIECE -- true unless the array holds a single job (then a plain job).
piece_is_array() {
    (( PIPE_PIECE_LAST[$1] > PIPE_PIECE_FIRST[$1] ))
}

# emit_directives PIECE -- the '#PBS' lines: name, array range, queue, resources, logs.
emit_directives() {
    local piece=$1 stage=${PIPE_PIECE_STAGE[$1]} first=${PIPE_PIECE_FIRST[$1]} last=${PIPE_PIECE_LAST[$1]}
    local flag=-J resource
    printf '#PBS -N %s\n' "$(pipe_stage_job_name "$job_name" "$stage" "${#PIPE_STAGE_FIRST[@]}")"
    if piece_is_array "$piece"; then
        if [[ $opt_flavour == torque ]]; then
            flag=-t
        fi
        if (( PIPE_PIECE_OFFSET[piece] == 0 )); then
            printf '#PBS %s %d-%d\n' "$flag" "$first" "$last"
        else
            printf '#PBS %s 0-%d\n' "$flag" "$(( last - first ))"
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

# emit_task_id PIECE -- how the script learns its job number.
emit_task_id() {
    local piece=$1 first=${PIPE_PIECE_FIRST[$1]} offset=${PIPE_PIECE_OFFSET[$1]} index_var=PBS_ARRAY_INDEX
    if [[ $opt_flavour == torque ]]; then
        index_var=PBS_ARRAYID
    fi
    if ! piece_is_array "$piece"; then
        printf '# A single job, submitted without an array (PBS Pro refuses -J %d-%d).\n' "$first" "$first"
        printf 'task_id=%d\n' "$first"
        printf "task_hint='this script runs only job %d'\n" "$first"
    elif (( offset == 0 )); then
        cat <<EOF
task_id=\${$index_var:-}
task_hint='run it with qsub, or by hand with $index_var=<job number> PBS_O_WORKDIR=<dir>'
EOF
    else
        printf '# Array %d of %d of this stage: array index i runs job number i + %d.\n' \
            "${PIPE_PIECE_PART[piece]}" "${PIPE_STAGE_PIECE_COUNT[PIPE_PIECE_STAGE[piece] - 1]}" "$offset"
        cat <<EOF
task_id=\${$index_var:-}
task_offset=$offset   # array index 0 is job number $offset
task_hint="run it with qsub, or by hand with $index_var=<job number - \$task_offset> PBS_O_WORKDIR=<dir>"
if [[ \$task_id =~ ^[0-9]+\$ ]]; then
    task_id=\$(( 10#\$task_id + task_offset ))
fi
EOF
    fi
}

# build_stage_script PIECE -- print the complete batch script for one array.
build_stage_script() {
    printf '#!/usr/bin/env bash\n'
    emit_directives "$1"
    pipe_emit_stage_comment "${PIPE_PIECE_STAGE[$1]}" "$opt_jobfile"
    pipe_emit_script_prelude PBS_O_WORKDIR "$PIPE_LOG_DIR" "$opt_no_venv"
    emit_task_id "$1"
    pipe_emit_task_runner yes
}

# stage_script_path PIECE -- stage<S>.pbs, or stage<S>_part<K>.pbs for an offset array.
stage_script_path() {
    pipe_piece_script_path "$1" pbs
}

# dependency_args STAGE PREVIOUS_ID... -- the qsub arguments that make STAGE wait for
# every array of the previous stage (their ids in piece order), one per line (none for
# stage 1).  PBS Pro takes afterok for arrays and plain jobs alike; Torque needs
# afterokarray for an array and afterok for a plain job.
dependency_args() {
    local stage=$1 piece arrays="" plain=""
    shift
    if (( stage == 1 )); then
        return 0
    fi
    for (( piece = PIPE_STAGE_PIECE_FIRST[stage - 2]; $# > 0; piece++ )); do
        if [[ $opt_flavour == torque ]] && piece_is_array "$piece"; then
            arrays+=":$1"
        else
            plain+=":$1"
        fi
        shift
    done
    printf '%s\n' -W "depend=${arrays:+afterokarray$arrays}${arrays:+${plain:+,}}${plain:+afterok$plain}"
}

main() {
    parse_args "$@"
    pipe_read_jobfile "$opt_jobfile"
    PIPE_LOG_DIR=$(pipe_abs_path "${opt_logdir:-$(pipe_default_logdir "$opt_jobfile")}")
    pipe_check_cluster_logdir "$PIPE_LOG_DIR"
    job_name=${opt_name:-$(pipe_default_job_name "$opt_jobfile")}
    pipe_split_stages "$opt_max_array" "$PBS_MAX_INDEX"
    if [[ $opt_dry_run == yes ]]; then
        pipe_print_dry_run
    else
        pipe_submit_all
    fi
}

main "$@"
