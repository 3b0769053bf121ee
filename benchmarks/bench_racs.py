"""Benchmark of racs_pipeline: crossmatch speed and end-to-end time per image.

Crossmatch of N x N sources (N = 1e4, 1e5, 1e6; every source of catalogue 1 gets its
nearest neighbour in catalogue 2 within 45"), side by side:

* ours: ``racs_pipeline.crossmatch_nearest`` (KD-tree on unit vectors);
* astropy ``SkyCoord.match_to_catalog_sky`` (what the original called);
* a row loop like the original's pandas loops (one great-circle distance vector per row;
  timed on a few hundred rows and extrapolated to N rows, marked "extrapolated");
* PostgreSQL + Q3C: ``q3c_join`` with a LATERAL nearest-neighbour query on indexed
  tables (loading and indexing timed separately).

Then the whole pipeline (simulate -> Aegean -> crossmatch -> transients -> stamps -> database)
on a simulated 4k x 4k ASKAP-like image, with the time of each step.

Run: ``.venv/bin/python benchmarks/bench_racs.py [--sizes 1e4 1e5 1e6] [--e2e-size 4000] [--quick]``.
Without TOOLKIT_PG_URL the script re-runs itself under tests/with_postgres.sh.  ``--quick`` is a
smoke run (2000 x 2000 sources, one repeat, a 500 x 500 image end to end) whose numbers are not
written.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

import racs_pipeline as racs  # noqa: E402
from benchutil import best_of, markdown_table, postgres_or_reexec, write_results  # noqa: E402

RADIUS = 45.0   # arcsec


def catalogues(n, seed=0):
    """Two all-sky catalogues: 2 is 1 shifted by ~2" (90 %) plus 10 % unrelated sources."""
    rng = np.random.default_rng(seed)
    ra1 = rng.uniform(0, 360, n)
    dec1 = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    ra2 = ra1 + rng.normal(0, 2, n) / 3600 / np.cos(np.radians(dec1))
    dec2 = dec1 + rng.normal(0, 2, n) / 3600
    other = rng.random(n) < 0.1
    ra2[other] = rng.uniform(0, 360, other.sum())
    dec2[other] = np.degrees(np.arcsin(rng.uniform(-1, 1, other.sum())))
    perm = rng.permutation(n)
    return ra1, dec1, np.mod(ra2[perm], 360), np.clip(dec2[perm], -90, 90)


def row_loop(ra1, dec1, ra2, dec2, rows):
    """The original's style: one Python iteration per row (haversine against all of 2)."""
    r2, d2 = np.radians(ra2), np.radians(dec2)
    out = []
    for i in range(rows):
        r1, d1 = np.radians(ra1[i]), np.radians(dec1[i])
        hav = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
        j = int(np.argmin(hav))
        sep = np.degrees(2 * np.arcsin(np.sqrt(hav[j]))) * 3600
        out.append(j if sep <= RADIUS else -1)
    return out


def q3c_setup(url, ra1, dec1, ra2, dec2):
    import psycopg
    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    conn = psycopg.connect(conninfo, autocommit=True)
    start = time.perf_counter()
    with conn.cursor() as cur:
        for name, ra, dec in (("bench_a", ra1, dec1), ("bench_b", ra2, dec2)):
            cur.execute("DROP TABLE IF EXISTS %s" % name)
            cur.execute("CREATE TABLE %s (id integer, ra double precision, dec double precision)" % name)
            with cur.copy("COPY %s (id, ra, dec) FROM STDIN" % name) as copy:
                for row in zip(range(len(ra)), ra.tolist(), dec.tolist()):
                    copy.write_row(row)
            cur.execute("CREATE INDEX ON %s (q3c_ang2ipix(ra, dec))" % name)
            cur.execute("CLUSTER %s USING %s_q3c_ang2ipix_idx" % (name, name))
            cur.execute("ANALYZE %s" % name)
    return conn, time.perf_counter() - start


Q3C_NEAREST = """
SELECT count(m.id) FROM bench_a a LEFT JOIN LATERAL (
    SELECT b.id FROM bench_b b WHERE q3c_join(a.ra, a.dec, b.ra, b.dec, %s)
    ORDER BY q3c_dist(a.ra, a.dec, b.ra, b.dec) LIMIT 1) m ON true
"""


def bench_crossmatch(sizes, pg_url, repeat):
    from astropy.coordinates import SkyCoord
    rows = []
    for n in sizes:
        ra1, dec1, ra2, dec2 = catalogues(n)
        row = {"N": "%.0e" % n}
        t, (idx, _) = best_of(lambda: racs.crossmatch_nearest(ra1, dec1, ra2, dec2, max_sep=RADIUS), repeat)
        row["ours_s"] = t
        row["matched"] = int((idx >= 0).sum())
        c1, c2 = SkyCoord(ra1, dec1, unit="deg"), SkyCoord(ra2, dec2, unit="deg")
        t_astropy, (ref_idx, ref_sep, _) = best_of(lambda: c1.match_to_catalog_sky(c2), 1 if n >= 1e6 else repeat)
        ref = np.where(ref_sep.arcsec <= RADIUS, ref_idx, -1)
        assert np.array_equal(ref, idx), "astropy and ours disagree"
        row["astropy_s"] = t_astropy
        sample = int(min(n, 200 if n <= 1e5 else 40))
        t_loop, loop_idx = best_of(lambda: row_loop(ra1, dec1, ra2, dec2, sample), 1)
        assert list(loop_idx) == list(idx[:sample]), "row loop and ours disagree"
        row["row_loop_s"] = t_loop * n / sample
        row["row_loop_note"] = "measured" if sample == n else "extrapolated from %d rows" % sample
        if pg_url:
            conn, t_load = q3c_setup(pg_url, ra1, dec1, ra2, dec2)
            with conn.cursor() as cur:
                def run():
                    cur.execute(Q3C_NEAREST, (RADIUS / 3600.0,))
                    return cur.fetchone()[0]
                t_q3c, count = best_of(run, 1 if n >= 1e6 else repeat)
            conn.close()
            assert count == row["matched"], "q3c and ours disagree: %s vs %s" % (count, row["matched"])
            row["q3c_join_s"], row["q3c_load_index_s"] = t_q3c, t_load
        row["speedup_vs_loop"] = row["row_loop_s"] / row["ours_s"]
        print("N=%s: %s" % (row["N"], {k: v for k, v in row.items() if k != "N"}), flush=True)
        rows.append(row)
    return rows


def bench_end_to_end(size, workdir):
    """Simulate a size x size field, run the whole pipeline (stamps of the candidates
    included) and report where the time goes (the run summary's ``timings_s``)."""
    import json
    import simulate_racs as sim_mod
    scale = (size / 1000.0) ** 2
    start = time.perf_counter()
    sim = sim_mod.simulate_field(Path(workdir) / "e2e", size=size, n_faint=int(150 * scale),
                                 n_bright=int(150 * scale), mosaic=True, name="askap_%d" % size)
    t_sim = time.perf_counter() - start
    parset = sim_mod.write_parset(sim, Path(workdir) / "e2e" / "parset.in", overlays=True, stamps=True)
    start = time.perf_counter()
    code = racs.main(["process", "-q", "-c", str(parset), "--overwrite", str(sim["image"])])
    t_run = time.perf_counter() - start
    stem = Path(sim["image"]).stem
    summary = json.loads((Path(sim["image"]).parent / (stem + "_results") / (stem + "_summary.json")).read_text())
    row = {"image": "%dx%d" % (size, size), "sources": len(sim["truth"]), "simulate_s": t_sim,
           "pipeline_s": t_run, "exit_code": code, "n_askap": summary["n_askap"],
           "n_candidates": summary["n_candidates"]}
    row.update({"t_%s" % k: v for k, v in summary["timings_s"].items()})
    row["t_other"] = t_run - sum(summary["timings_s"].values())      # imports, tables, summary
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", type=float, default=[1e4, 1e5, 1e6],
                        help="crossmatch sizes; none (--sizes with no value) keeps the last results")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--e2e-size", type=int, default=4000, help="0 = skip the end-to-end run")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="2000 sources, one repeat, a 500 px image (a smoke run; nothing written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat, args.e2e_size = [2000], 1, 500
    pg_url, code = postgres_or_reexec(__file__, argv, skip=args.no_postgres)
    if code is not None:
        return code
    rows = bench_crossmatch([int(n) for n in args.sizes], pg_url, args.repeat)
    if not rows:          # only the end-to-end run: keep the last crossmatch rows
        import json
        from benchutil import RESULTS_DIR
        previous = RESULTS_DIR / "racs.json"
        rows = json.loads(previous.read_text()).get("rows", []) if previous.is_file() else []
    columns = ["N", "ours_s", "astropy_s", "row_loop_s", "row_loop_note", "q3c_join_s", "q3c_load_index_s",
               "speedup_vs_loop", "matched"]
    print("\nCrossmatch, N x N sources, nearest within 45\" (%d CPUs)\n" % os.cpu_count())
    print(markdown_table(rows, columns))
    e2e = []
    if args.e2e_size:
        with tempfile.TemporaryDirectory() as workdir:
            e2e.append(bench_end_to_end(args.e2e_size, workdir))
        print("\nEnd to end (simulate, Aegean, crossmatch, transients, plots, SQLite)\n")
        print(markdown_table(e2e, ["image", "sources", "simulate_s", "pipeline_s", "n_askap", "n_candidates",
                                   "exit_code"]))
        stages = [k for k in e2e[0] if k.startswith("t_")]
        print("\nWhere the time goes (s)\n")
        print(markdown_table(e2e, ["image"] + stages))
    if not e2e:      # keep the last end-to-end rows when only the crossmatch was re-run
        import json
        from benchutil import RESULTS_DIR
        previous = RESULTS_DIR / "racs.json"
        if previous.is_file():
            e2e = json.loads(previous.read_text()).get("end_to_end", [])
    if args.quick:
        print("\n--quick: a smoke run, results/racs.json not written")
        return 0
    path = write_results("racs", rows, end_to_end=e2e, target="1e6 x 1e6 crossmatch <= 5 s on 2 cores")
    print("\nwritten", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
