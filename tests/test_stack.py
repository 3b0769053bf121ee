"""The installed stack is the locked one, and every direct dependency really imports.

All of them are imported in ONE process, casatools first (importing TensorFlow first
aborts the process, see ../shared/STACK-NOTES.md), which is the situation of the test
suite and of `make demo`.
"""
import json
import re
import subprocess
import sys
from importlib import metadata

from conftest import ROOT, SITECONFIG

# distribution name -> module to import
DIRECT = {
    "casatools": "casatools", "casatasks": "casatasks", "casadata": "casadata",
    "numpy": "numpy", "scipy": "scipy", "astropy": "astropy", "spectral-cube": "spectral_cube",
    "radio-beam": "radio_beam", "astroquery": "astroquery", "pandas": "pandas",
    "matplotlib": "matplotlib", "tomli": "tomli", "tensorflow_cpu": "tensorflow",
    "keras": "keras", "mpdaf": "mpdaf.obj", "sep": "sep", "pyspeckit": "pyspeckit",
    "AegeanTools": "AegeanTools.source_finder", "bdsf": "bdsf", "SQLAlchemy": "sqlalchemy",
    "psycopg": "psycopg", "tqdm": "tqdm", "pytest": "pytest",
}


def _locked_versions():
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_lock_pins_every_installed_direct_dependency_exactly():
    pins = _locked_versions()
    for dist in DIRECT:
        key = dist.lower().replace("_", "-")
        assert key in pins, f"{dist} is not pinned in requirements.lock"
        assert metadata.version(dist) == pins[key], (
            f"{dist} {metadata.version(dist)} installed but {pins[key]} locked: run `make venv`")


def test_lock_has_only_exact_pins():
    for number, line in enumerate((ROOT / "requirements.lock").read_text().splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            assert re.match(r"^[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+$", text), \
                f"requirements.lock line {number} is not an exact pin: {text!r}"


def test_whole_stack_imports_in_one_process(tmp_path):
    modules = list(DIRECT.values())
    code = f"""
import importlib, json, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from simulate import import_casatools
import_casatools()                      # casatools before tensorflow
failed = {{}}
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = repr(exc)
print(json.dumps(failed))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
                                 "CASASITECONFIG": str(SITECONFIG), "TF_CPP_MIN_LOG_LEVEL": "3",
                                 "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}
