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
