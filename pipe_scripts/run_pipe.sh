#!/usr/bin/env bash
# run_pipe.sh -- run the shell commands of a job file in parallel on this machine.
#
# A job file holds one shell command per line; blank lines and '#' comments are
# ignored, and a line that is exactly 'wait' is a barrier: every job above it must
# have succeeded before any job below it starts.  Each job runs as `bash -c "<line>"`
# in the directory run_pipe.sh was called from, with its output in its own log file.
# See pipe_scripts/README.md and pipe_scripts/example_jobs.txt.
set -euo pipefail

PIPE_PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=_jobfile.sh
source "$(dirname "${BASH_SOURCE[0]}")/_jobfile.sh"

# ---------------------------------------------------------------- options

opt_workers=""
opt_logdir=""
opt_dry_run=no
opt_no_venv=no
opt_jobfile=""

print_usage() {
    cat <<EOF
Usage: $PIPE_PROG [-j N] [-l LOGDIR] [--dry-run] [--no-venv] JOBFILE

Run the shell commands in JOBFILE (one per line) with N at a time on this machine.
Blank lines and lines starting with '#' are ignored; a line that is exactly 'wait'
is a barrier: the jobs after it start only when all jobs before it succeeded (if
one failed, the later jobs are skipped).  Jobs run with 'bash -c' in the current
directory.

Options:
  -j, --jobs N       run N jobs at a time (default: nproc, here $(default_workers))
  -l, --logdir DIR   log directory (default: pipe_logs/<jobfile name>_<YYYYmmdd-HHMMSS>);
                     job N logs to DIR/job_NNNN.log, the summary goes to DIR/summary.txt
      --dry-run      list the jobs and stages, run nothing
      --no-venv      do not put <repo>/.venv/bin first on PATH
  -h, --help         show this help

CASASITECONFIG is set to <repo>/configs/casasiteconfig.py when unset.
Exit status: 0 all jobs succeeded, 1 a job failed or was skipped, 2 usage error,
130/143 interrupted by Ctrl-C / SIGTERM (running jobs are killed).
EOF
}

default_workers() {
    nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1
}

parse_args() {
    while (( $# > 0 )); do
        case $1 in
            --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
            -h|--help) print_usage; exit 0 ;;
            -j|--jobs) pipe_need_value "$1" "$#"; opt_workers=$2; shift ;;
            -j*) opt_workers=${1#-j} ;;
            -l|--logdir) pipe_need_value "$1" "$#"; opt_logdir=$2; shift ;;
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
    if [[ -z $opt_workers ]]; then
        opt_workers=$(default_workers)
    fi
    pipe_check_positive_int -j "$opt_workers" "the number of jobs to run at a time, e.g. -j 4"
    opt_workers=$(( 10#$opt_workers ))
}

# ---------------------------------------------------------------- state

log_dir=""
exit_code_dir=""       # job N writes its exit code to $exit_code_dir/N
interrupted=""         # INT or TERM once a signal arrived
kill_signal=TERM       # a second Ctrl-C escalates to KILL
stage_pids=()
job_state=()           # per job number: ok, failed, killed or skipped
job_exit=()

job_log_path() {
    printf '%s/job_%04d.log' "$log_dir" "$1"
}

# ---------------------------------------------------------------- one job

# run_job NUMBER -- runs in a background subshell: log header, the command, its exit code.
run_job() {
    local number=$1 command_line=${PIPE_JOBS[$1 - 1]} log status=0 started=$SECONDS
    log=$(job_log_path "$number")
    {
        printf '### job %04d: %s\n' "$number" "$command_line"
        printf '### directory %s, started %s\n' "$PWD" "$(date '+%Y-%m-%d %H:%M:%S')"
    } > "$log"
    bash -c "$command_line" < /dev/null >> "$log" 2>&1 || status=$?
    printf '### job %04d finished %s with exit code %d\n' \
        "$number" "$(date '+%Y-%m-%d %H:%M:%S')" "$status" >> "$log"
    echo "$status" > "$exit_code_dir/$number"
    report_job_done "$number" "$status" $(( SECONDS - started ))
}

report_job_done() {
    local word=ok
    if (( $2 != 0 )); then
        word="FAILED (exit code $2)"
    fi
    printf 'job %04d %s after %ds: %s\n' "$1" "$word" "$3" "${PIPE_JOBS[$1 - 1]}"
}

# ---------------------------------------------------------------- stages

# run_stage FIRST LAST -- run jobs FIRST..LAST with at most opt_workers at a time.
run_stage() {
    local number running=0
    stage_pids=()
    for (( number = $1; number <= $2; number++ )); do
        if (( running >= opt_workers )); then
            wait -n || true
            running=$(( running - 1 ))
        fi
        if [[ -n $interrupted ]]; then
            break
        fi
        run_job "$number" &
        stage_pids+=("$!")
        job_state[number]=started
        running=$(( running + 1 ))
    done
    until wait; do :; done   # `wait` returns early when a trapped signal arrives
    collect_stage_results "$1" "$2"
}

# collect_stage_results FIRST LAST -- read the exit codes; return 1 if any job failed.
collect_stage_results() {
    local number code all_ok=0
    for (( number = $1; number <= $2; number++ )); do
        if [[ ${job_state[number]:-} != started ]]; then
            job_state[number]=skipped
            all_ok=1
        elif [[ -s $exit_code_dir/$number ]]; then
            code=$(< "$exit_code_dir/$number")
            job_exit[number]=$code
            job_state[number]=$([[ $code == 0 ]] && echo ok || echo failed)
            [[ $code == 0 ]] || all_ok=1
        else
            job_state[number]=killed
            all_ok=1
        fi
    done
    return "$all_ok"
}

mark_skipped() {
    local number
    for (( number = $1; number <= $2; number++ )); do
        job_state[number]=skipped
    done
}

run_all_stages() {
    local stage n_stages=${#PIPE_STAGE_FIRST[@]} first last failed=no
    for (( stage = 1; stage <= n_stages; stage++ )); do
        first=${PIPE_STAGE_FIRST[stage - 1]}
        last=${PIPE_STAGE_LAST[stage - 1]}
        if [[ $failed == yes || -n $interrupted ]]; then
            mark_skipped "$first" "$last"
            continue
        fi
        if (( n_stages > 1 )); then
            printf 'stage %d of %d: jobs %d-%d\n' "$stage" "$n_stages" "$first" "$last"
        fi
        run_stage "$first" "$last" || failed=yes
    done
}

on_signal() {
    interrupted=$1
    printf '%s: caught SIG%s, stopping the running jobs (again to force)\n' "$PIPE_PROG" "$1" >&2
    local pid
    for pid in ${stage_pids[@]+"${stage_pids[@]}"}; do
        kill "-$kill_signal" -- "-$pid" 2>/dev/null || true
    done
    kill_signal=KILL
}

# ---------------------------------------------------------------- summary

count_state() {
    local state count=0
    for state in "${job_state[@]}"; do
        [[ $state == "$1" ]] && count=$(( count + 1 ))
    done
    echo "$count"
}

print_summary() {
    local number n_jobs=${#PIPE_JOBS[@]} n_failed
    n_failed=$(( $(count_state failed) + $(count_state killed) ))
    printf '==== %s summary for %s\n' "$PIPE_PROG" "$opt_jobfile"
    printf 'jobs: %d ok, %d failed, %d skipped (of %d); logs in %s\n' \
        "$(count_state ok)" "$n_failed" "$(count_state skipped)" "$n_jobs" "$log_dir"
    for (( number = 1; number <= n_jobs; number++ )); do
        case ${job_state[number]} in
            failed) printf 'FAILED  job %04d, exit code %s: %s\n        log: %s\n' "$number" \
                        "${job_exit[number]}" "${PIPE_JOBS[number - 1]}" "$(job_log_path "$number")" ;;
            killed) printf 'KILLED  job %04d (interrupted): %s\n        log: %s\n' "$number" \
                        "${PIPE_JOBS[number - 1]}" "$(job_log_path "$number")" ;;
            skipped) printf 'SKIPPED job %04d (an earlier stage failed or the run was interrupted): %s\n' \
                        "$number" "${PIPE_JOBS[number - 1]}" ;;
        esac
    done
}

# run_exit_code -- 0 all ok, 1 some failed or skipped, 128+signal when interrupted.
run_exit_code() {
    case $interrupted in
        INT) echo 130 ;;
        TERM) echo 143 ;;
        *) [[ $(count_state ok) == "${#PIPE_JOBS[@]}" ]] && echo 0 || echo 1 ;;
    esac
}

# ---------------------------------------------------------------- dry run

print_plan() {
    local stage n_stages=${#PIPE_STAGE_FIRST[@]} number
    printf '%s --dry-run: %d jobs in %d stage(s), %d at a time; logs would go to %s\n' \
        "$PIPE_PROG" "${#PIPE_JOBS[@]}" "$n_stages" "$opt_workers" "$log_dir"
    for (( stage = 1; stage <= n_stages; stage++ )); do
        printf 'stage %d of %d:\n' "$stage" "$n_stages"
        for (( number = PIPE_STAGE_FIRST[stage - 1]; number <= PIPE_STAGE_LAST[stage - 1]; number++ )); do
            printf '  job %04d: %s\n' "$number" "${PIPE_JOBS[number - 1]}"
        done
    done
}

# ---------------------------------------------------------------- main

main() {
    parse_args "$@"
    pipe_read_jobfile "$opt_jobfile"
    log_dir=$(pipe_abs_path "${opt_logdir:-$(pipe_default_logdir "$opt_jobfile")}")
    if [[ $opt_dry_run == yes ]]; then
        print_plan
        return 0
    fi
    mkdir -p "$log_dir" || pipe_die 2 "cannot create log dir '$log_dir'; choose a writable -l DIR"
    exit_code_dir=$(mktemp -d "$log_dir/.exit_codes.XXXXXX")
    pipe_export_env "$opt_no_venv"
    trap 'on_signal INT' INT
    trap 'on_signal TERM' TERM
    set -m   # each job in its own process group, so a signal can stop all its children
    run_all_stages
    set +m
    rm -rf "$exit_code_dir"
    print_summary | tee "$log_dir/summary.txt"
    return "$(run_exit_code)"
}

main "$@"
