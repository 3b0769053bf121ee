"""Small helpers shared by the benchmark scripts: timing, tables, JSON results."""
import json
import os
import platform
import subprocess
import time
from pathlib import Path

__all__ = ["best_of", "markdown_table", "write_results", "postgres_or_reexec", "RESULTS_DIR"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def best_of(func, repeat=3):
    """Smallest wall time (s) of ``repeat`` calls of ``func()``, and its last return value."""
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = func()
        best = min(best, time.perf_counter() - start)
    return best, value


def markdown_table(rows, columns):
    """Rows (dicts) as a Markdown table with the given column order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [("%.4g" % v) if isinstance(v, float) else str(v) for v in
                 (row.get(c, "") for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=RESULTS_DIR.parent, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "memory_gb": round(memory_gb, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_results(name, rows, **extra):
    """Write ``results/<name>.json`` (atomically) with the rows and the machine facts."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "machine": _machine(), "rows": rows, **extra},
                              indent=2, default=str))
    tmp.replace(path)
    return path


def postgres_or_reexec(script, argv, skip=False):
    """``(pg_url, None)`` with TOOLKIT_PG_URL, or ``(None, exit code)`` after re-running ``script``
    under tests/with_postgres.sh (a throwaway server); ``(None, None)`` when ``skip``."""
    import sys
    if skip:
        return None, None
    url = os.environ.get("TOOLKIT_PG_URL")
    if url or os.environ.get("_BENCH_POSTGRES_REEXEC"):
        return url, None
    env = dict(os.environ, _BENCH_POSTGRES_REEXEC="1")
    wrapper = RESULTS_DIR.parents[1] / "tests" / "with_postgres.sh"
    return None, subprocess.call([str(wrapper), sys.executable, str(script)]
                                 + list(argv if argv is not None else sys.argv[1:]), env=env)
