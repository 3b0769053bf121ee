"""Shared pytest set-up for the toolkit's tests.

Order matters here (see ../shared/STACK-NOTES.md): casatools must be imported before
tensorflow/keras in any process that uses both, otherwise the two bundled protobuf
copies abort the process.  This file therefore points casaconfig at the repository's
offline site config and imports casatools (if installed) before any test module runs.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SITECONFIG = ROOT / "configs" / "casasiteconfig.py"

os.environ.setdefault("CASASITECONFIG", str(SITECONFIG))
for _p in (str(ROOT), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from simulate import import_casatools  # noqa: E402  (needs sys.path above)

casatools = import_casatools(required=False)


@pytest.fixture(scope="session")
def repo_root():
    """Absolute path of the repository root."""
    return ROOT


@pytest.fixture(scope="session")
def venv_python():
    """The interpreter running the tests (the project's .venv under `make test`)."""
    return sys.executable
