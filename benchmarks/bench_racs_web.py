"""Benchmark of the review website: response times with 1e5 crossmatch rows.

Ten runs of 1e4 crossmatch rows each (1e5 in all) are injected with ``RacsDatabase``
into SQLite and into PostgreSQL (+ Q3C); the site is migrated and served with the real
command line (waitress, 8 threads) on 127.0.0.1; a logged-in client then times, over
HTTP, a filtered and sorted table page (candidates, a ratio cut, sorted by ratio, a
random page), a cone search (10 arcmin around random positions), one run's crossmatch
table and the runs page.  Median and 95th percentile per request kind are written to
``benchmarks/results/racs_web.json``.  Target: median < 300 ms, p95 < 1 s.

Run: ``.venv/bin/python benchmarks/bench_racs_web.py [--rows 100000] [--requests 60] [--quick]``;
without TOOLKIT_PG_URL the script re-runs itself under tests/with_postgres.sh.  ``--quick`` is a
smoke run (1000 rows, 3 requests of each kind) whose numbers are not written.
"""
import argparse
import http.cookiejar
import re
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

import racs_pipeline as racs  # noqa: E402
import simulate_racs as sim_mod  # noqa: E402
from benchutil import markdown_table, postgres_or_reexec, write_results  # noqa: E402

TAGS = ["Good"] * 8 + ["Extended source", "Edge of ASKAP image", "Likely double", "Local RMS too high"]


def fill(url, rows, runs=10, seed=0):
    """Inject ``runs`` runs sharing ``rows`` crossmatch rows (random sky near RA 150, Dec -30)."""
    import pandas as pd
    rng = np.random.default_rng(seed)
    db = racs.RacsDatabase(url)
    per = rows // runs
    for k in range(runs):
        ra0, dec0 = 150.0 + 3.0 * (k % 5), -30.0 - 3.0 * (k // 5)
        ratio = np.exp(rng.normal(0.05, 0.4, per)).clip(1.0)
        m = rng.normal(0, 0.5, per)
        master = pd.DataFrame({
            "master_name": ["SUMSS_J%06d_%02d" % (i, k) for i in range(per)],
            "ra": ra0 + rng.uniform(-2, 2, per), "dec": dec0 + rng.uniform(-2, 2, per),
            "gal_l": rng.uniform(0, 360, per), "gal_b": rng.uniform(-90, 90, per),
            "survey": "sumss", "transient_type": rng.choice(["match"] * 8 + ["noaskapmatch", "nocatalogmatch"], per),
            "d2d": rng.uniform(0, 30, per), "askap_iflux": 10 ** rng.uniform(-3, 0, per),
            "catalog_iflux": 10 ** rng.uniform(-2.5, 0, per), "ratio": ratio, "ratio_e": 0.1 * ratio,
            "vs": np.abs(rng.normal(0, 5, per)), "m": m, "m_abs": np.abs(m),
            "pipelinetag": rng.choice(TAGS, per), "candidate": rng.random(per) < 0.01,
            "flagged": rng.random(per) < 0.3, "distance_from_centre": rng.uniform(0, 3, per)})
        row = {"name": "bench_%02d.fits" % k, "description": "bench", "checksum": "bench%02d" % k, "plane": "2-D",
               "url": "/data/bench_%02d.fits" % k, "ra": ra0, "dec": dec0, "number_askap_sources": per,
               "matched_to": "SUMSS", "runtime": "2026-12-01 00:00:00"}
        db.inject(row, None, master)
    db.engine.dispose()


def login(base):
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(base + "accounts/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    data = urllib.parse.urlencode({"username": "vetter", "password": sim_mod.WEB_PASSWORD,
                                   "csrfmiddlewaretoken": token}).encode()
    opener.open(urllib.request.Request(base + "accounts/login/", data=data, headers={"Referer": base}))
    return opener


def timed(opener, url):
    start = time.perf_counter()
    with opener.open(url) as response:
        response.read()
        assert response.status == 200, url
    return (time.perf_counter() - start) * 1e3


def bench(url, n_requests, rows, label, workdir):
    fill(url, rows)
    env = sim_mod.web_environment(workdir)
    sim_mod.web_setup(url, env, users=(("vetter", True),))
    rng = np.random.default_rng(1)
    out = []
    with sim_mod.WebServer(url, env, log_path=Path(workdir) / ("serve_%s.log" % label)) as server:
        opener = login(server.url)
        kinds = {
            "filtered sorted page": lambda: "query/?" + urllib.parse.urlencode({
                "show": "candidates", "ratio_min": "%.2f" % rng.uniform(1.0, 1.5), "sort": "-ratio",
                "page": int(rng.integers(1, 4))}),
            "cone search 10'": lambda: "query/?" + urllib.parse.urlencode({
                "cone_ra": "%.4f" % rng.uniform(149, 163), "cone_dec": "%.4f" % rng.uniform(-34, -27),
                "cone_radius": 10, "cone_unit": "arcmin"}),
            "run crossmatch table": lambda: "run/%d/crossmatches/?sort=-vs&page=%d" % (
                int(rng.integers(1, 11)), int(rng.integers(1, 20))),
            "runs page": lambda: "",
        }
        for kind, make in kinds.items():
            timed(opener, server.url + make())                       # warm up
            times = np.array([timed(opener, server.url + make()) for _ in range(n_requests)])
            out.append({"database": label, "request": kind, "rows": rows, "n": n_requests,
                        "median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)),
                        "max_ms": float(times.max())})
            print(out[-1], flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="1000 rows, 3 requests each (a smoke run; nothing written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.requests = 1000, 3
    pg_url, code = postgres_or_reexec(__file__, argv, skip=args.no_postgres)
    if code is not None:
        return code
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        rows += bench("sqlite:///%s" % (Path(workdir) / "bench.sqlite"), args.requests, args.rows, "SQLite", workdir)
        if pg_url:
            import sqlalchemy as sa
            admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text('DROP DATABASE IF EXISTS "racs_web_bench" WITH (FORCE)'))
                conn.execute(sa.text('CREATE DATABASE "racs_web_bench"'))
            rows += bench(pg_url.rsplit("/", 1)[0] + "/racs_web_bench", args.requests, args.rows, "PostgreSQL+Q3C",
                          workdir)
            with admin.connect() as conn:
                conn.execute(sa.text('DROP DATABASE IF EXISTS "racs_web_bench" WITH (FORCE)'))
    print("\nReview website, %d crossmatch rows, %d requests each, over HTTP on 127.0.0.1\n" % (args.rows, args.requests))
    print(markdown_table(rows, ["database", "request", "median_ms", "p95_ms", "max_ms"]))
    if args.quick:
        print("\n--quick: a smoke run, results/racs_web.json not written")
        return 0
    path = write_results("racs_web", rows, target="median < 300 ms, p95 < 1 s (1e5 rows)")
    print("\nwritten", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
