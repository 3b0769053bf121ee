"""Benchmark faust_imaging: pipeline overhead over its bare tclean calls, and chunked runs
with 2 parallel workers vs 1.

1. The unchunked pipeline (dirty -> nomask -> seed mask -> clean -> postprocess with the
   QA summary, then moment maps) on a simulated 12 m MS, timed as a whole; then the exact
   tclean calls it made (same parameters, the seed mask copied in for the final clean),
   re-run bare in a fresh folder.  The ratio is the pipeline's own overhead (rms, masks,
   post-processing, moments); target <= 1.10.  Because a shared machine makes two
   separate runs differ by +-10 %, the same pipeline run is also compared with the time
   spent inside its own tclean calls (overhead measured within one run).
2. The chunked pipeline as a job file (preprocess, wait, chunks, wait, postprocess) run by
   pipe_scripts/run_pipe.sh with -j 1 and -j 2 (2 chunks).

Usage::

    .venv/bin/python benchmarks/bench_faust.py [--nchan 32] [--keep DIR] [--quick]

Each case is timed ``--repeat`` times (default 2), alternating, and the best time kept,
because the machine may be shared.  Prints a Markdown table and writes
benchmarks/results/faust.json (not with ``--quick``: 16 channels, one repeat, a smoke run
whose numbers mean little).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]
os.environ.setdefault("CASASITECONFIG", str(ROOT / "configs" / "casasiteconfig.py"))

from benchutil import markdown_table, write_results  # noqa: E402
from simulate import import_casatools  # noqa: E402

import_casatools()
import faust_imaging as fi  # noqa: E402
from simulate_faust import FIELD, LABEL, faust_sim_sources as test_sources, write_config  # noqa: E402


def simulate(root, nchan):
    from simulate import simulate_alma_line_ms
    ms_dir = root / "data" / f"{FIELD}-Setup9"
    ms_dir.mkdir(parents=True)
    sim = simulate_alma_line_ms(ms_dir / "sim12m.ms", array="12m", nchan=nchan, seed=3,
                                vsys_channel=6, sources=test_sources())
    cfg = write_config(root)
    spws = (root / "spws.csv").read_text().replace(",32,384.5", ",%d,384.5" % nchan)
    (root / "spws.csv").write_text(spws)
    return sim, cfg


def time_pipeline(cfg):
    config = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=cfg)
    start = time.perf_counter()
    config.run_pipeline(ext="clean", use_chunking=False, overwrite=True)
    fi.make_all_moment_maps(FIELD, ext="clean", config=cfg)
    return time.perf_counter() - start, config


def time_bare_tclean(config, scratch):
    _, casatasks = fi.import_casa()
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    total = 0.0
    for call in config.tclean_calls:
        params = dict(call)
        name = Path(params["imagename"]).name
        params["imagename"] = str(scratch / name)
        if params.get("usemask") == "auto-multithresh" and name.endswith("_clean"):
            shutil.copytree(config.nomask_imagebase + ".summask", params["imagename"] + ".mask")
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            start = time.perf_counter()
            casatasks.tclean(**params)
            total += time.perf_counter() - start
        finally:
            os.chdir(cwd)
    return total


def time_chunked(root, cfg, workers, nchunks=2):
    prod = root / ("prod_j%d" % workers)
    shutil.rmtree(prod, ignore_errors=True)
    shutil.rmtree(root / ("logs_j%d" % workers), ignore_errors=True)
    text = Path(cfg).read_text().replace(str(root / "prod"), str(prod))
    cfg_j = root / ("faust_j%d.cfg" % workers)
    cfg_j.write_text(text)
    jobs = root / ("jobs_j%d.txt" % workers)
    fi.write_chunk_jobfile(FIELD, LABEL, nchunks, jobs, nworkers=nchunks, kind="12m",
                           config_path=cfg_j, python=sys.executable, overwrite=True)
    start = time.perf_counter()
    result = subprocess.run(["bash", str(ROOT / "pipe_scripts" / "run_pipe.sh"), "-j", str(workers),
                             "-l", str(root / ("logs_j%d" % workers)), str(jobs)],
                            cwd=root, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit("chunked run with %d workers failed:\n%s\n%s"
                         % (workers, result.stdout, result.stderr))
    return elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nchan", type=int, default=32)
    parser.add_argument("--keep", help="work in this folder and keep it")
    parser.add_argument("--repeat", type=int, default=2, help="best of N alternating runs")
    parser.add_argument("--quick", action="store_true",
                        help="16 channels, one repeat (a smoke run; results/faust.json not written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.nchan, args.repeat = 16, 1       # the simulated lines need >= 16 channels
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-faust-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        sim, cfg = simulate(root, args.nchan)
        # alternate the cases and keep each one's best time: the machine may be shared
        pipeline_s = bare_s = inside_s = one = two = float("inf")
        for _ in range(args.repeat):
            seconds, config = time_pipeline(cfg)
            if seconds < pipeline_s:
                pipeline_s, inside_s = seconds, sum(config.tclean_seconds)
            bare_s = min(bare_s, time_bare_tclean(config, root / "bare"))
            one = min(one, time_chunked(root, cfg, 1))
            two = min(two, time_chunked(root, cfg, 2))
        imsize = list(config.dset.imsize)     # read from the MS (dish diameter): before it is removed
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = [
        {"case": "unchunked pipeline + moments vs its %d bare tclean calls" % len(config.tclean_calls),
         "ours_s": pipeline_s, "reference_s": bare_s, "ratio": pipeline_s / bare_s},
        {"case": "same pipeline run vs the time spent inside its own tclean calls",
         "ours_s": pipeline_s, "reference_s": inside_s, "ratio": pipeline_s / inside_s},
        {"case": "chunked (2 chunks) via run_pipe.sh: -j 2 vs -j 1",
         "ours_s": two, "reference_s": one, "ratio": two / one},
    ]
    columns = ["case", "ours_s", "reference_s", "ratio"]
    print("nchan %d, imsize %s, load average %s" % (args.nchan, imsize, os.getloadavg()))
    print(markdown_table(rows, columns))
    if args.quick:
        print("--quick: a smoke run, results/faust.json not written")
        return 0
    path = write_results("faust", rows, nchan=args.nchan, imsize=imsize, repeat=args.repeat,
                         loadavg=os.getloadavg(), target_overhead_ratio=1.10)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
