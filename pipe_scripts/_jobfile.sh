# shellcheck shell=bash
# _jobfile.sh -- helpers shared by run_pipe.sh, qsub_run_pipe.sh and sbatch_run_pipe.sh.
#
# Source this file (the three wrappers do); do not run it.  It provides:
#   * error helpers with exit code 2 for usage errors,
#   * job-file parsing (one shell command per line, '#' comments, blank lines,
#     and 'wait' barriers that split the jobs into stages),
#   * the repository / environment set-up (CASASITECONFIG, .venv/bin on PATH),
#   * the pieces of the batch scripts that qsub_ and sbatch_run_pipe.sh generate.
#
# The callers set PIPE_PROG (their own name, used in messages) before sourcing.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "_jobfile.sh holds helpers for the pipe_scripts wrappers: source it, do not run it" >&2
    exit 2
fi

# pipe_check_bash MAJOR MINOR VERSION -- exit 2 unless bash >= 4.3: mapfile, ${array[@]+...}
# under set -u and the generated scripts need it (macOS ships 3.2 as /bin/bash).
pipe_check_bash() {
    if (( $1 < 4 || ($1 == 4 && $2 < 3) )); then
        echo "${PIPE_PROG:-pipe_scripts}: error: needs bash >= 4.3, this is bash $3; run it with a newer bash (e.g. from your package manager) as 'bash $0 ...'" >&2
        exit 2
    fi
}
pipe_check_bash "${BASH_VERSINFO[0]}" "${BASH_VERSINFO[1]}" "$BASH_VERSION"

# ---------------------------------------------------------------- constants

PIPE_PROG=${PIPE_PROG:-pipe_scripts}
PIPE_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
PIPE_REPO_ROOT=$(dirname "$PIPE_SCRIPTS_DIR")
PIPE_SITECONFIG="$PIPE_REPO_ROOT/configs/casasiteconfig.py"
PIPE_VENV_BIN="$PIPE_REPO_ROOT/.venv/bin"
PIPE_JOB_LIST_NAME=jobs.txt      # cleaned job list written next to the cluster logs

# Filled by pipe_read_jobfile: the job commands (job number N is PIPE_JOBS[N-1]) and,
# for each stage, the numbers of its first and last job.
PIPE_JOBS=()
PIPE_STAGE_FIRST=()
PIPE_STAGE_LAST=()

# ---------------------------------------------------------------- errors

# pipe_die CODE MESSAGE -- print "PROG: error: MESSAGE" on stderr and exit with CODE.
pipe_die() {
    printf '%s: error: %s\n' "$PIPE_PROG" "$2" >&2
    exit "$1"
}

# pipe_usage_error MESSAGE -- a mistake on the command line or in the job file: exit 2.
pipe_usage_error() {
    pipe_die 2 "$1 (see '$PIPE_PROG --help')"
}

# pipe_need_value OPTION ARGC -- fail unless the option is followed by a value.
pipe_need_value() {
    if (( $2 < 2 )); then
        pipe_usage_error "option $1 needs a value"
    fi
}

# pipe_check_positive_int OPTION VALUE WHAT -- VALUE must be a whole number >= 1.
pipe_check_positive_int() {
    if [[ ! $2 =~ ^[0-9]+$ ]] || (( 10#$2 < 1 )); then
        pipe_usage_error "bad value for $1: '$2' (need a whole number >= 1: $3)"
    fi
}

# pipe_check_no_space OPTION VALUE -- VALUE goes into a scheduler directive, which
# cannot hold blanks or quotes.
pipe_check_no_space() {
    if [[ -z $2 || $2 =~ [[:space:]\"\'] ]]; then
        pipe_usage_error "bad value for $1: '$2' (must be non-empty, without blanks or quotes)"
    fi
}

# ---------------------------------------------------------------- job file

# pipe_trim TEXT -- set PIPE_TRIMMED to TEXT without leading/trailing blanks (a DOS
# '\r' included); a variable rather than output, to spare a fork per job-file line.
pipe_trim() {
    PIPE_TRIMMED=${1#"${1%%[![:space:]]*}"}
    PIPE_TRIMMED=${PIPE_TRIMMED%"${PIPE_TRIMMED##*[![:space:]]}"}
}

# pipe_end_stage -- close the current stage at the last job read (empty stages vanish).
pipe_end_stage() {
    local n_jobs=${#PIPE_JOBS[@]} n_stages=${#PIPE_STAGE_LAST[@]} first=1
    if (( n_stages > 0 )); then
        first=$(( PIPE_STAGE_LAST[n_stages - 1] + 1 ))
    fi
    if (( n_jobs >= first )); then
        PIPE_STAGE_FIRST+=("$first")
        PIPE_STAGE_LAST+=("$n_jobs")
    fi
}

# pipe_check_jobfile FILE -- the job file must be a readable regular file.
pipe_check_jobfile() {
    if [[ -z $1 ]]; then
        pipe_usage_error "no job file given; name a file with one shell command per line"
    elif [[ ! -e $1 ]]; then
        pipe_usage_error "job file '$1' does not exist; check the path"
    elif [[ -d $1 ]]; then
        pipe_usage_error "job file '$1' is a directory; name a file with one shell command per line"
    elif [[ ! -r $1 ]]; then
        pipe_usage_error "job file '$1' is not readable; check its permissions"
    fi
}

# pipe_read_jobfile FILE -- fill PIPE_JOBS, PIPE_STAGE_FIRST and PIPE_STAGE_LAST.
# Blank lines and lines starting with '#' are ignored; a line that is exactly 'wait'
# ends a stage.  An empty job file is a usage error.
pipe_read_jobfile() {
    local raw line
    pipe_check_jobfile "$1"
    PIPE_JOBS=() PIPE_STAGE_FIRST=() PIPE_STAGE_LAST=()
    while IFS= read -r raw || [[ -n $raw ]]; do
        pipe_trim "$raw"
        line=$PIPE_TRIMMED
        if [[ -z $line || $line == \#* ]]; then
            continue
        elif [[ $line == wait ]]; then
            pipe_end_stage
        else
            PIPE_JOBS+=("$line")
        fi
    done < "$1"
    pipe_end_stage
    if (( ${#PIPE_JOBS[@]} == 0 )); then
        pipe_usage_error "job file '$1' has no jobs (only blank lines, '#' comments or 'wait' barriers); add one shell command per line"
    fi
}

# pipe_write_job_list FILE -- the cleaned job list: line N holds job number N.
pipe_write_job_list() {
    printf '%s\n' "${PIPE_JOBS[@]}" > "$1"
}

# ---------------------------------------------------------------- paths and names

# pipe_abs_path PATH -- print PATH made absolute against the current directory.
pipe_abs_path() {
    if [[ $1 == /* ]]; then
        printf '%s' "$1"
    else
        printf '%s/%s' "$PWD" "${1#./}"
    fi
}

# pipe_jobfile_stem JOBFILE -- the job file's name without directory and extension.
pipe_jobfile_stem() {
    local name
    name=$(basename "$1")
    if [[ $name == ?*.* ]]; then
        name=${name%.*}
    fi
    printf '%s' "$name"
}

# pipe_default_logdir JOBFILE -- absolute pipe_logs/<stem>_<YYYYmmdd-HHMMSS>, with a
# numeric suffix when a run in the same second already took that name.
pipe_default_logdir() {
    local base suffix=1 candidate
    base="$PWD/pipe_logs/$(pipe_jobfile_stem "$1")_$(date +%Y%m%d-%H%M%S)"
    candidate=$base
    while [[ -e $candidate ]]; do
        suffix=$(( suffix + 1 ))
        candidate="${base}_$suffix"
    done
    printf '%s' "$candidate"
}

# pipe_default_job_name JOBFILE -- a scheduler-safe name from the job file's stem:
# letters, digits and '_' only, starting with a letter, at most 15 characters
# (the old Torque limit).
pipe_default_job_name() {
    local name
    name=$(pipe_jobfile_stem "$1")
    name=${name//[^A-Za-z0-9_]/_}
    if [[ ! $name =~ ^[A-Za-z] ]]; then
        name="pipe_$name"
    fi
    printf '%s' "${name:0:15}"
}

# pipe_stage_job_name NAME STAGE N_STAGES -- NAME, or NAME_s<STAGE> when there are stages.
pipe_stage_job_name() {
    if (( $3 > 1 )); then
        printf '%s_s%d' "$1" "$2"
    else
        printf '%s' "$1"
    fi
}

# pipe_check_cluster_logdir DIR -- the log dir goes into '#PBS -o' / '#SBATCH --output'
# directives, which end at the first blank.
pipe_check_cluster_logdir() {
    if [[ $1 =~ [[:space:]] ]]; then
        pipe_usage_error "log dir '$1' contains blanks, which batch directives cannot hold; choose a --logdir without spaces"
    fi
}

# pipe_prepare_logdir DIR -- create the cluster log dir; refuse to reuse one that
# already holds a submission, since running array tasks read its job list.
pipe_prepare_logdir() {
    if [[ -e "$1/$PIPE_JOB_LIST_NAME" ]]; then
        pipe_usage_error "log dir '$1' already holds a submission ($PIPE_JOB_LIST_NAME); choose another --logdir or remove that one"
    fi
    mkdir -p "$1" || pipe_die 1 "cannot create log dir '$1'; choose a writable --logdir"
}

# ---------------------------------------------------------------- environment

# pipe_export_env NO_VENV -- export CASASITECONFIG (when unset) and, unless NO_VENV is
# 'yes', put the repository's .venv/bin first on PATH.
pipe_export_env() {
    if [[ -z ${CASASITECONFIG:-} ]]; then
        export CASASITECONFIG="$PIPE_SITECONFIG"
    fi
    if [[ $1 != yes && -d $PIPE_VENV_BIN ]]; then
        export PATH="$PIPE_VENV_BIN:$PATH"
    fi
}

# ---------------------------------------------------------------- generated scripts

# pipe_emit_script_prelude WORKDIR_VAR LOGDIR NO_VENV -- print the part of a batch
# script that sets paths and environment and cds to the submission directory
# ($WORKDIR_VAR, or the directory the wrapper was called from when that is unset).
pipe_emit_script_prelude() {
    local workdir_var=$1 log_dir=$2 no_venv=$3
    printf 'set -euo pipefail\n\n'
    printf 'log_dir=%q\n' "$log_dir"
    echo "job_list=\"\$log_dir/$PIPE_JOB_LIST_NAME\""
    printf 'submit_dir=%q\n' "$PWD"
    printf 'site_config=%q\n' "$PIPE_SITECONFIG"
    if [[ $no_venv != yes ]]; then
        printf 'venv_bin=%q\n' "$PIPE_VENV_BIN"
    fi
    cat <<'EOF'

export CASASITECONFIG="${CASASITECONFIG:-$site_config}"
EOF
    if [[ $no_venv != yes ]]; then
        cat <<'EOF'
if [[ -d $venv_bin ]]; then
    export PATH="$venv_bin:$PATH"
fi
EOF
    fi
    cat <<EOF
cd "\${$workdir_var:-\$submit_dir}"

EOF
}

# pipe_emit_task_runner OWN_LOG -- print the part of a batch script that checks
# $task_id, picks line $task_id of the job list, logs and runs it with `bash -c`, and
# exits with its status.  With OWN_LOG=yes the task first sends its output to
# $log_dir/job_NNNN.log (for PBS, whose -o cannot name a file per array index).
pipe_emit_task_runner() {
    cat <<'EOF'
if [[ ! $task_id =~ ^[0-9]+$ ]]; then
    printf 'error: no valid array task id (got "%s"); %s\n' "$task_id" "$task_hint" >&2
    exit 2
fi
task_id=$(( 10#$task_id ))
mapfile -t job_lines < "$job_list"
if (( task_id < 1 || task_id > ${#job_lines[@]} )); then
    printf 'error: task id %d is not a job number in %s (it lists jobs 1-%d)\n' \
        "$task_id" "$job_list" "${#job_lines[@]}" >&2
    exit 2
fi
command_line=${job_lines[task_id - 1]}
EOF
    if [[ $1 == yes ]]; then
        cat <<'EOF'
printf -v task_log '%s/job_%04d.log' "$log_dir" "$task_id"
exec >"$task_log" 2>&1
EOF
    fi
    cat <<'EOF'

printf '### job %04d: %s\n' "$task_id" "$command_line"
printf '### host %s, directory %s, started %s\n' "${HOSTNAME:-unknown}" "$PWD" "$(date '+%Y-%m-%d %H:%M:%S')"
status=0
bash -c "$command_line" || status=$?
printf '### job %04d finished %s with exit code %d\n' "$task_id" "$(date '+%Y-%m-%d %H:%M:%S')" "$status"
exit "$status"
EOF
}

# pipe_emit_stage_comment STAGE JOBFILE -- the comment block that heads a batch script.
pipe_emit_stage_comment() {
    local stage=$1 n_stages=${#PIPE_STAGE_FIRST[@]}
    printf '#\n# Stage %d of %d (jobs %d-%d) of %s,\n' "$stage" "$n_stages" \
        "${PIPE_STAGE_FIRST[stage - 1]}" "${PIPE_STAGE_LAST[stage - 1]}" "$(pipe_abs_path "$2")"
    printf '# generated by %s on %s.\n' "$PIPE_PROG" "$(date '+%Y-%m-%d %H:%M:%S')"
    printf '# Task N runs line N of %s with bash -c; later edits of the job file do not matter.\n' \
        "$PIPE_JOB_LIST_NAME"
}

# ---------------------------------------------------------------- arrays of a stage

# Filled by pipe_split_stages: each stage becomes one or more submissions ("pieces"),
# in stage order.  Piece i runs jobs PIPE_PIECE_FIRST[i]-PIPE_PIECE_LAST[i] of stage
# PIPE_PIECE_STAGE[i]; PIPE_PIECE_PART[i] is its number within the stage (1, 2, ...);
# PIPE_PIECE_OFFSET[i] is 0 when the array indices are the job numbers, else the job
# number of array index 0 (indices 0..n-1).  Stage S's pieces are PIPE_STAGE_PIECE_FIRST
# [S-1] .. PIPE_STAGE_PIECE_FIRST[S-1] + PIPE_STAGE_PIECE_COUNT[S-1] - 1.
PIPE_PIECE_STAGE=()
PIPE_PIECE_FIRST=()
PIPE_PIECE_LAST=()
PIPE_PIECE_PART=()
PIPE_PIECE_OFFSET=()
PIPE_STAGE_PIECE_FIRST=()
PIPE_STAGE_PIECE_COUNT=()

# pipe_split_stages MAX_TASKS MAX_INDEX -- fill the PIPE_PIECE_* arrays.  A stage of
# more than MAX_TASKS jobs becomes several arrays of MAX_TASKS jobs (the last one the
# rest); the arrays of a split stage, and a stage whose last job number is above
# MAX_INDEX, get offsets (indices 0..n-1), else the indices are the job numbers.
pipe_split_stages() {
    local max_tasks=$1 max_index=$2 stage first last start end offset part
    PIPE_PIECE_STAGE=() PIPE_PIECE_FIRST=() PIPE_PIECE_LAST=() PIPE_PIECE_PART=() PIPE_PIECE_OFFSET=()
    PIPE_STAGE_PIECE_FIRST=() PIPE_STAGE_PIECE_COUNT=()
    for (( stage = 1; stage <= ${#PIPE_STAGE_FIRST[@]}; stage++ )); do
        first=${PIPE_STAGE_FIRST[stage - 1]} last=${PIPE_STAGE_LAST[stage - 1]} part=0
        PIPE_STAGE_PIECE_FIRST+=("${#PIPE_PIECE_STAGE[@]}")
        for (( start = first; start <= last; start += max_tasks )); do
            end=$(( start + max_tasks - 1 < last ? start + max_tasks - 1 : last ))
            offset=0
            if (( last - first + 1 > max_tasks || last > max_index )); then
                offset=$start
            fi
            part=$(( part + 1 ))
            PIPE_PIECE_STAGE+=("$stage") PIPE_PIECE_FIRST+=("$start") PIPE_PIECE_LAST+=("$end")
            PIPE_PIECE_PART+=("$part") PIPE_PIECE_OFFSET+=("$offset")
        done
        PIPE_STAGE_PIECE_COUNT+=("$part")
    done
}

# pipe_piece_script_path PIECE EXTENSION -- LOGDIR/stage<N>.EXT, or LOGDIR/stage<N>_part<K>.EXT
# for an array with offset indices.
pipe_piece_script_path() {
    local stage=${PIPE_PIECE_STAGE[$1]}
    if (( PIPE_PIECE_OFFSET[$1] == 0 )); then
        printf '%s/stage%d.%s' "$PIPE_LOG_DIR" "$stage" "$2"
    else
        printf '%s/stage%d_part%d.%s' "$PIPE_LOG_DIR" "$stage" "${PIPE_PIECE_PART[$1]}" "$2"
    fi
}

# pipe_piece_title PIECE -- "stage S of N (jobs F-L)", with ", array K of M" for a split stage.
pipe_piece_title() {
    local stage=${PIPE_PIECE_STAGE[$1]} parts=""
    if (( PIPE_STAGE_PIECE_COUNT[stage - 1] > 1 )); then
        parts=", array ${PIPE_PIECE_PART[$1]} of ${PIPE_STAGE_PIECE_COUNT[stage - 1]}"
    fi
    printf 'stage %d of %d%s (jobs %d-%d)' "$stage" "${#PIPE_STAGE_FIRST[@]}" "$parts" \
        "${PIPE_PIECE_FIRST[$1]}" "${PIPE_PIECE_LAST[$1]}"
}

# ---------------------------------------------------------------- cluster submission
# A wrapper that uses pipe_print_dry_run and pipe_submit_all (qsub_run_pipe.sh) calls
# pipe_split_stages first, defines build_stage_script PIECE, stage_script_path PIECE
# and dependency_args STAGE PREVIOUS_ID... (the submit-command arguments, one per line,
# that make STAGE wait for the job ids of every array of the stage before, in piece
# order; none for stage 1), and sets PIPE_LOG_DIR, PIPE_SUBMIT (the submit command, an
# array) and PIPE_CANCEL.

# pipe_print_dry_run -- for each array two '# ====' header lines (stage, submit command
# with placeholders for the previous stage's job ids), then the script as it would be
# written.  Nothing is written or submitted.
pipe_print_dry_run() {
    local stage n_stages=${#PIPE_STAGE_FIRST[@]} piece part args previous=()
    for (( stage = 1; stage <= n_stages; stage++ )); do
        previous=()
        if (( stage > 1 )); then
            if (( PIPE_STAGE_PIECE_COUNT[stage - 2] == 1 )); then
                previous=("<jobid of stage $(( stage - 1 ))>")
            else
                for (( part = 1; part <= PIPE_STAGE_PIECE_COUNT[stage - 2]; part++ )); do
                    previous+=("<jobid of stage $(( stage - 1 )) part $part>")
                done
            fi
        fi
        for (( piece = PIPE_STAGE_PIECE_FIRST[stage - 1];
               piece < PIPE_STAGE_PIECE_FIRST[stage - 1] + PIPE_STAGE_PIECE_COUNT[stage - 1]; piece++ )); do
            mapfile -t args < <(dependency_args "$stage" ${previous[@]+"${previous[@]}"})
            printf '# ==== %s; would be submitted with:\n' "$(pipe_piece_title "$piece")"
            printf '# ====   %s\n' "${PIPE_SUBMIT[*]} ${args[*]+${args[*]} }$(stage_script_path "$piece")"
            build_stage_script "$piece"
        done
    done
}

# pipe_submit_piece PIECE PREVIOUS_ID... -- write the array's script, submit it, record
# it in submitted.txt and print the new job id.
pipe_submit_piece() {
    local piece=$1 script job_id args
    shift
    script=$(stage_script_path "$piece")
    build_stage_script "$piece" > "$script"
    chmod +x "$script"
    mapfile -t args < <(dependency_args "${PIPE_PIECE_STAGE[piece]}" "$@")
    # ${args[@]+...}: an empty array is "unbound" under set -u in bash 4.3
    if ! job_id=$("${PIPE_SUBMIT[@]}" ${args[@]+"${args[@]}"} "$script"); then
        pipe_die 1 "${PIPE_SUBMIT[0]} failed for stage ${PIPE_PIECE_STAGE[piece]} ($script); arrays already submitted are listed in $PIPE_LOG_DIR/submitted.txt (remove them with $PIPE_CANCEL if needed)"
    fi
    job_id=${job_id%%;*}              # sbatch --parsable may print 'jobid;cluster'
    job_id=${job_id//[[:space:]]/}
    printf 'stage %d (jobs %d-%d): %s %s\n' "${PIPE_PIECE_STAGE[piece]}" "${PIPE_PIECE_FIRST[piece]}" \
        "${PIPE_PIECE_LAST[piece]}" "$job_id" "$script" >> "$PIPE_LOG_DIR/submitted.txt"
    printf '%s' "$job_id"
}

# pipe_submit_all -- write the cleaned job list and submit the arrays stage by stage,
# each array depending on every array of the stage before.
pipe_submit_all() {
    local stage n_stages=${#PIPE_STAGE_FIRST[@]} piece job_id previous=() ids=()
    command -v "${PIPE_SUBMIT[0]}" > /dev/null ||
        pipe_die 1 "${PIPE_SUBMIT[0]} not found on PATH; run this on the cluster's login node, or use --dry-run to only print the scripts"
    pipe_prepare_logdir "$PIPE_LOG_DIR"
    pipe_write_job_list "$PIPE_LOG_DIR/$PIPE_JOB_LIST_NAME"
    for (( stage = 1; stage <= n_stages; stage++ )); do
        ids=()
        for (( piece = PIPE_STAGE_PIECE_FIRST[stage - 1];
               piece < PIPE_STAGE_PIECE_FIRST[stage - 1] + PIPE_STAGE_PIECE_COUNT[stage - 1]; piece++ )); do
            job_id=$(pipe_submit_piece "$piece" ${previous[@]+"${previous[@]}"})
            ids+=("$job_id")
        done
        previous=("${ids[@]}")
        printf 'submitted stage %d of %d (jobs %d-%d) as %s\n' "$stage" "$n_stages" \
            "${PIPE_STAGE_FIRST[stage - 1]}" "${PIPE_STAGE_LAST[stage - 1]}" "${ids[*]}"
    done
    printf 'logs: %s/job_NNNN.log\n' "$PIPE_LOG_DIR"
}
