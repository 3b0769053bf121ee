"""Each tool loads cleanly three ways: CASA ``execfile``, ``import``, and without heavy deps.

CASA 6's ``execfile`` runs a file's source in the session's namespace.  Loading must
define the public API and do nothing else: no output, no files, no ``sys.exit``, no
heavy imports, no logging handlers, and the CLI must not start even when the namespace
says ``__name__ == "__main__"`` (CASA's interactive namespace holds ``casalog``).
"""
import json
import logging
import subprocess
import sys

import pytest

from conftest import ROOT

MODULES = ["faust_imaging", "clover", "autospec", "racs_pipeline", "ir_blobs"]
# Imported lazily, inside the functions that need them, never at module load.
HEAVY = ["tensorflow", "keras", "casatools", "casatasks", "casaconfig", "mpdaf",
         "AegeanTools", "bdsf", "sqlalchemy", "psycopg", "astroquery", "spectral_cube",
         "radio_beam", "matplotlib", "pandas", "sep", "pyspeckit", "scipy", "astropy"]


def _execfile(name, namespace):
    path = ROOT / f"{name}.py"
    namespace.setdefault("__file__", str(path))
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("dunder_name", ["casa_execfile", "__main__"])
def test_execfile_defines_api_and_runs_nothing(name, dunder_name, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["casa", "--nogui"])
    handlers_before = list(logging.getLogger(name).handlers)
    # a CASA session's namespace: casalog is defined there
    namespace = {"__name__": dunder_name, "casalog": object()}
    _execfile(name, namespace)            # would raise SystemExit if main() ran
    for public in namespace["__all__"]:
        assert public in namespace, f"{name}: __all__ names {public!r} but it is not defined"
    assert callable(namespace["main"]) and namespace["__version__"]
    assert capfd.readouterr() == ("", ""), "loading printed something"
    assert list(tmp_path.iterdir()) == [], "loading created files"
    assert logging.getLogger(name).handlers == handlers_before, "loading added log handlers"
    # and the functions defined by execfile work in that namespace
    assert namespace["main"](["--version"]) == 0


def test_reexecfile_does_not_duplicate_log_output(tmp_path, capfd):
    missing = str(tmp_path / "missing.fits")
    namespace = _execfile("ir_blobs", {"__name__": "casa_execfile"})
    assert namespace["main"](["predict", missing]) == 2
    namespace = _execfile("ir_blobs", {"__name__": "casa_execfile"})
    assert namespace["main"](["predict", missing]) == 2
    lines = [l for l in capfd.readouterr().err.splitlines() if "no such file" in l]
    assert len(lines) == 2, lines


def _run_isolated(code, tmp_path):
    """Run ``code`` in a fresh interpreter where the HEAVY packages cannot be imported."""
    blocker = f"""
import sys, importlib.abc
BLOCKED = {HEAVY!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split('.')[0] in BLOCKED:
            raise ImportError('blocked for this test: ' + fullname)
        return None
sys.meta_path.insert(0, Blocker())
sys.path.insert(0, {str(ROOT)!r})
"""
    return subprocess.run([sys.executable, "-c", blocker + code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", MODULES)
def test_import_without_heavy_dependencies(name, tmp_path):
    code = f"""
import json, {name}
loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
rc = {name}.main(['--help'])
print(json.dumps({{'loaded': loaded, 'rc': rc, 'all': [n for n in {name}.__all__ if not hasattr({name}, n)]}}))
"""
    result = _run_isolated(code, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"loaded": [], "rc": 0, "all": []}


def test_blocker_really_blocks(tmp_path):
    # the isolation above must be able to fail: importing a blocked package errors
    result = _run_isolated("import casatools", tmp_path)
    assert result.returncode != 0 and "blocked for this test" in result.stderr


def test_faust_casa_import_error_is_clear(tmp_path):
    result = _run_isolated("import faust_imaging; faust_imaging.import_casa()", tmp_path)
    assert result.returncode != 0
    assert "faust_imaging needs casatools and casatasks" in result.stderr
    assert "make test" in result.stderr
