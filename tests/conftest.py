"""Shared pytest set-up for the toolkit's tests.

Order matters here (see ../shared/STACK-NOTES.md): casatools must be imported before
tensorflow/keras in any process that uses both, otherwise the two bundled protobuf
copies abort the process.  This file therefore points casaconfig at the repository's
offline site config and imports casatools (if installed) before any test module runs.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------------------
# PostgreSQL (+ Q3C) for the racs_pipeline database and website tests
# ---------------------------------------------------------------------------
PGBIN = Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_url():
    """A PostgreSQL URL: TOOLKIT_PG_URL, else a throwaway cluster (as tests/with_postgres.sh)."""
    url = os.environ.get("TOOLKIT_PG_URL")
    if url:
        yield url
        return
    in_ci = os.environ.get("CI", "").lower() == "true"
    if not (PGBIN / "initdb").exists():
        message = ("no PostgreSQL server: set TOOLKIT_PG_URL or install postgresql-15 "
                   "postgresql-15-q3c (make postgres)")
        if in_ci:
            pytest.fail(message)
        pytest.skip(message)
    workdir = Path(tempfile.mkdtemp(prefix="toolkit-pg."))
    as_pg = []
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = workdir / "data"
    try:
        subprocess.run(as_pg + [str(PGBIN / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
                       check=True, capture_output=True)
        subprocess.run(as_pg + [str(PGBIN / "pg_ctl"), "-D", str(data), "-l", str(workdir / "log"), "-w",
                                "-o", "-p %d -c listen_addresses=127.0.0.1 -c unix_socket_directories=%s"
                                % (port, workdir), "start"], check=True, capture_output=True)
        subprocess.run([str(PGBIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "toolkit_test"], check=True, capture_output=True)
        subprocess.run([str(PGBIN / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d",
                        "toolkit_test", "-c", "CREATE EXTENSION IF NOT EXISTS q3c"], capture_output=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        message = "could not start a throwaway PostgreSQL: %s" % getattr(exc, "stderr", exc)
        if in_ci:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield "postgresql+psycopg://postgres@127.0.0.1:%d/toolkit_test" % port
    finally:
        subprocess.run(as_pg + [str(PGBIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def fresh_pg_database(pg_url):
    """A new, empty database on the test server (schema creation races included), dropped after."""
    import sqlalchemy as sa
    name = "racs_fresh_%d_%d" % (os.getpid(), np.random.default_rng().integers(1e9))
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text('CREATE DATABASE "%s"' % name))
    yield pg_url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(sa.text('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name))
    admin.dispose()




# ---------------------------------------------------------------------------
# Slow tests: `make test-fast` (-m "not slow") must stay under 3 minutes on 2 cores
# ---------------------------------------------------------------------------
SLOW_LIST = TESTS / "slow_tests.txt"


def _slow_names():
    names = set()
    for line in SLOW_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line)
    return names


@pytest.hookimpl(tryfirst=True)          # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark as slow the tests named in tests/slow_tests.txt (besides @pytest.mark.slow).

    The list holds ``file::test`` names measured above ~2 s on 2 cores, and every user of a
    module fixture that costs more than that (marking only some of them would move the
    fixture's cost to the next one).  A listed name that no longer exists in a collected file
    is an error, so the list cannot rot silently.
    """
    names = _slow_names()
    collected_files = {item.nodeid.split("::", 1)[0] for item in items}
    seen = set()
    for item in items:
        name = item.nodeid.split("[", 1)[0]
        if name in names:
            item.add_marker(pytest.mark.slow)
            seen.add(name)
    whole_files = not config.getoption("-k") and not any("::" in a for a in config.args)
    stale = sorted(n for n in names - seen if n.split("::", 1)[0] in collected_files)
    if stale and whole_files and not config.getoption("--lf"):
        raise pytest.UsageError("tests/slow_tests.txt names tests that do not exist: %s"
                                % ", ".join(stale))
