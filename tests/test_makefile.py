"""The two-command set-up: clear errors from `make` before anything is installed."""
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(*args):
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, timeout=60)


def test_missing_python_is_reported_clearly():
    result = _make("check-python", "PYTHON=python3.99-not-here")
    assert result.returncode == 2
    assert "'python3.99-not-here' not found" in result.stderr
    assert "Python 3.11" in result.stderr and "make PYTHON=" in result.stderr


def test_wrong_python_version_is_reported_clearly(tmp_path):
    fake = tmp_path / "python3.11"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = -c ]; then case \"$2\" in *platform*) echo 3.12.1;;"
                    " *) exit 1;; esac; fi\n")
    fake.chmod(0o755)
    result = _make("check-python", f"PYTHON={fake}")
    assert result.returncode == 2
    assert "is Python 3.12.1, but 3.11 is required" in result.stderr


def test_too_little_disk_space_is_reported_clearly():
    result = _make("check-space", "MIN_FREE_GB=100000000")
    assert result.returncode == 2
    assert "GB free in" in result.stderr and "needs" in result.stderr


def test_venv_is_reused_while_the_lock_is_unchanged():
    # `make test` has just built or reused .venv: the stamp is newer than the lock
    stamp = ROOT / ".venv" / ".installed-from-lock"
    if not stamp.exists():
        pytest.skip("not running under `make test` (.venv stamp absent)")
    result = _make("-q", ".venv/.installed-from-lock")
    assert result.returncode == 0, "make would rebuild .venv although requirements.lock is unchanged"
