"""Every benchmark script must at least load and parse its arguments: bench_faust.py once
failed at import (it imported a name a test module no longer had), so README's figure could
not be reproduced.  Benchmarks import shared simulators from tests/simulate*.py, never from
test modules.  Each script is imported in a fresh interpreter and its --help run."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "benchutil.py")


def test_no_benchmark_imports_a_test_module():
    offenders = [p.name for p in SCRIPTS
                 if re.search(r"^\s*(from|import)\s+test_\w+", p.read_text(), re.M)]
    assert not offenders, offenders


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_loads_and_shows_help(script):
    env = {"CASASITECONFIG": str(ROOT / "configs" / "casasiteconfig.py"), "MPLBACKEND": "Agg",
           "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage" in result.stdout.lower()


# --quick: a tiny run of each benchmark through the same code as the full one (issue 18 item 8,
# "Every benchmark runs").  Each must exit 0, print its table (the text below, so that a script
# that ran nothing fails) and leave benchmarks/results/*.json and the stored pyspeckit reference
# tables as they were.  Wall times of --quick on the 2 shared cores (2026-12-02, load ~2-3):
# autospec 3.5 s, autospec_plots 4.3, racs_bane 2.7, clover 8.7, clover_domain 7.6,
# clover_nh3_limit 7.2, calibrate_clover_data_check 7.2 (TensorFlow's import + the models: ~4 s
# of each clover one); slow: faust 134, faust_scale 120 (CASA start-ups, MPI), clover_realdata 25
# (pyspeckit), ir_blobs_models 17 (training), racs 11 and racs_web 9 (PostgreSQL), ir_blobs 10,
# clover_nh3_maps 10, reference_clover_nh3_pyspeckit 5 - so that `-m "not slow"` of this file
# stays under a minute.
QUICK_EXPECT = {
    "bench_autospec": ["| method | objects | seconds |", "per-object mpdaf loop"],
    "bench_autospec_plots": ["| cube | objects | plots |", "A478 minicube"],
    "bench_clover": ["| method | pixels | spectra_per_s |", "scipy curve_fit 0/1/2 Gaussians + AIC"],
    "bench_clover_domain": ["| line | dv / trained |", "| nh3 |"],
    "bench_clover_nh3_limit": ["| spectra | n | fraction |", "best possible two-component accuracy"],
    "bench_clover_nh3_maps": ["| truth | noise beam sigma (px) |", "two, 1.2 sigma apart"],
    "bench_clover_realdata": ["G23.481 (1,1), real", "pyspeckit 1+2 comp. + BIC (2 pixels)"],
    "bench_faust": ["| case | ours_s | reference_s | ratio |", "chunked (2 chunks) via run_pipe.sh"],
    "bench_faust_scale": ["| case | ours_s | reference_s | ratio |", "real ASKAP MS"],
    "bench_ir_blobs": ["| step | n | seconds |", "classify subframes (CNN only)"],
    "bench_ir_blobs_models": ["| model | weights | precision |", "matched filter only"],
    "bench_racs": ["| N | ours_s | astropy_s |", "Where the time goes (s)"],
    "bench_racs_web": ["| database | request | median_ms |", "cone search 10'"],
    "calibrate_clover_data_check": ["| w | T | acc noise |", "nh3 ("],
    "reference_clover_nh3_pyspeckit": ["fitting 2 pixels", "all fits of a pixel:"],
    "bench_racs_bane": ["rms_map vs AegeanTools BANE", "|---|"],
}
GENERIC_EXPECT = ["|---|"]      # a script not listed above must at least print a Markdown table
QUICK_SLOW = {"bench_faust", "bench_faust_scale", "bench_ir_blobs", "bench_ir_blobs_models", "bench_racs",
              "bench_racs_web", "bench_clover_nh3_maps", "bench_clover_realdata", "reference_clover_nh3_pyspeckit"}
PROTECTED = [ROOT / "benchmarks" / "results", ROOT / "tests" / "data" / "nh3"]


def _snapshot():
    """(mtime, bytes) of every file the full runs write, by path."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for d in PROTECTED for p in sorted(d.iterdir())
            if p.is_file()}


def test_quick_expectations_are_consistent():
    assert QUICK_SLOW <= set(QUICK_EXPECT)
    assert all(QUICK_EXPECT.values())


@pytest.mark.parametrize("script", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in QUICK_SLOW
                                                 else []) for p in SCRIPTS])
def test_benchmark_runs_quick_and_writes_no_results(script, tmp_path):
    # as the --help test, plus sbin (tests/with_postgres.sh runs the server through runuser as root)
    # and a fresh HOME
    env = {"CASASITECONFIG": str(ROOT / "configs" / "casasiteconfig.py"), "MPLBACKEND": "Agg",
           "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path)}
    before = _snapshot()
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for text in QUICK_EXPECT.get(script.stem, GENERIC_EXPECT):
        assert text in output, (text, output[-4000:])
    assert "not written" in output
    assert _snapshot() == before, "a --quick run changed benchmarks/results or tests/data/nh3"
