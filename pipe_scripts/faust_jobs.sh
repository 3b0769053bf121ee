#!/usr/bin/env bash
# faust_jobs.sh -- image FAUST spectral windows in parallel with the pipe_scripts wrappers.
#
#   faust_jobs.sh [--backend local|pbs|slurm] [--wrapper-opts "OPTS"] -- JOBS-ARGS...
#
# JOBS-ARGS are those of `faust_imaging.py jobs` (without -o), e.g.
#   faust_jobs.sh -- CB68 244.936GHz_CS --nchunks 8 -c faust_imaging.cfg      (one SPW, 8 chunks)
#   faust_jobs.sh --backend slurm --wrapper-opts "-t 24:00:00" -- CB68 --setup 1 -c faust_imaging.cfg
# The job file (preprocess; wait; chunks; wait; postprocess -- or one line per SPW) is
# written to faust_jobs_<YYYYmmdd-HHMMSS>.txt in the current directory and handed to
# run_pipe.sh (local), qsub_run_pipe.sh (pbs) or sbatch_run_pipe.sh (slurm).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
backend=local
wrapper_opts=""

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --backend) backend=${2:?--backend needs local, pbs or slurm}; shift 2 ;;
        --wrapper-opts) wrapper_opts=${2-}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "faust_jobs.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ $# -eq 0 ]; then
    echo "faust_jobs.sh: give the arguments of 'faust_imaging.py jobs' after --" >&2
    exit 2
fi
case "$backend" in
    local) wrapper="$here/run_pipe.sh" ;;
    pbs) wrapper="$here/qsub_run_pipe.sh" ;;
    slurm) wrapper="$here/sbatch_run_pipe.sh" ;;
    *) echo "faust_jobs.sh: --backend must be local, pbs or slurm, not $backend" >&2; exit 2 ;;
esac

python=python
if [ -x "$repo/.venv/bin/python" ]; then
    python="$repo/.venv/bin/python"
fi
jobfile="faust_jobs_$(date +%Y%m%d-%H%M%S).txt"
"$python" "$repo/faust_imaging.py" jobs "$@" --python "$python" -o "$jobfile"
# shellcheck disable=SC2086  # wrapper options are split on purpose
exec "$wrapper" $wrapper_opts "$jobfile"
