"""Benchmark faust_imaging at scale: CASA MPI vs serial, pipeline overhead on a real ASKAP MS,
and the peak memory of post-processing a large cube, streamed vs read whole.

1. The real 36-antenna ASKAP MS of tests/data/askap (288 x 1 MHz channels; shipped fully
   flagged, so it is unflagged and three point sources plus noise are predicted into its
   DATA with the CASA simulator): ``add-dataset``, then ``run --window`` (a 30-channel
   window of the SPW, geometry from the data with ``oversample`` 3 and ``imsize_pb_factor``
   0.15, a faster clean: gain 0.2, cyclefactor 1), serial vs ``--mpi 2``; and the serial
   run's wall time vs the time inside its own tclean calls (the pipeline's overhead).
2. A simulated 12 m MS of ``--nchan`` (default 120) channels: the unchunked pipeline, serial
   vs ``--mpi 2``.
3. Post-processing (residual check, pbcor, common beam, FITS, QA summary, moments) of a
   ``--big`` (default 1600) x ``--big`` x 128 float32 cube (tests/faust_bigcube.py) in a
   fresh process: peak resident memory now (one plane at a time) vs the code before the
   streaming (commit b847778, whole-cube numpy reads).

Usage::

    .venv/bin/python benchmarks/bench_faust_scale.py [--quick] [--keep DIR]

``--quick`` shrinks every case (a smoke run for the tests; its numbers mean little): a 3-channel
window of the ASKAP MS at two thirds of the image size, 16 simulated channels imaged serially only
(MPI start-up is the slow part), a 200^2 x 16 cube.
Prints a Markdown table and writes benchmarks/results/faust_scale.json (not with --quick).
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]
os.environ.setdefault("CASASITECONFIG", str(ROOT / "configs" / "casasiteconfig.py"))

from benchutil import markdown_table, write_results  # noqa: E402

ASKAP_ZIP = ROOT / "tests" / "data" / "askap" / "SB39400.RACS_0635-31.beam0.small.ms.zip"
PRE_STREAMING_COMMIT = "b847778"
TCLEAN_TOOK = re.compile(r"tclean \S+ took ([0-9.]+) s")


def cli(args, log_to=None):
    """Run faust_imaging.py with ``args``; return (seconds, stdout, stderr)."""
    env = dict(os.environ, MPLBACKEND="Agg")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "faust_imaging.py")] + [str(a) for a in args],
                            capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit("faust_imaging %s failed:\n%s" % (" ".join(map(str, args)), result.stderr[-4000:]))
    return elapsed, result.stdout, result.stderr


def askap_case(root, quick):
    with zipfile.ZipFile(ASKAP_ZIP) as archive:
        archive.extractall(root)
    ms = next(root.glob("*.ms"))
    from simulate_faust import paint_sources
    paint_sources(ms)
    cfg = root / "askap.cfg"
    _, out, _ = cli(["add-dataset", ms, "-c", cfg, "-q"])
    field, label = out.split()[:2]
    settings = ["--set", "Imaging.oversample=3",
                "--set", "Imaging.imsize_pb_factor=%s" % ("0.1" if quick else "0.15"),
                "--set", "Imaging.line_vwin=%s" % ("1000km/s" if quick else "10000km/s"),
                "--set", "Imaging.weighting_name=natural", "--set", "Imaging.gain=0.2",
                "--set", "Imaging.cyclefactor=1", "--set", "Imaging.scales=0,1,3"]
    rows = {}
    for mode, extra in (("serial", []), ("mpi2", ["--mpi", "2"])):
        prod = root / ("askap_" + mode)
        seconds, _, err = cli(["run", field, label, "-c", cfg, "--window", "--set", "Paths.PROD_DIR=%s" % prod]
                              + settings + extra)
        rows[mode] = {"wall_s": seconds, "tclean_s": sum(float(t) for t in TCLEAN_TOOK.findall(err))}
    geometry = re.search(r"-> beam ~([0-9.]+) arcsec, cell ([0-9.]+) arcsec, image (\d+) x", err)
    return rows, {"window": "1000 km/s (3 channels)" if quick else "10000 km/s (30 channels)",
                  "field": field, "label": label, "beam_arcsec": float(geometry.group(1)),
                  "cell_arcsec": float(geometry.group(2)), "imsize": int(geometry.group(3))}


def simulated_case(root, nchan, mpi=True):
    from simulate import simulate_alma_line_ms
    from simulate_faust import FIELD, LABEL, faust_sim_sources, write_config
    ms_dir = root / "sim" / "data" / f"{FIELD}-Setup9"
    ms_dir.mkdir(parents=True)
    simulate_alma_line_ms(ms_dir / "sim12m.ms", array="12m", nchan=nchan, seed=3, vsys_channel=6,
                          sources=faust_sim_sources())
    cfg = write_config(root / "sim")
    spws = root / "sim" / "spws.csv"
    spws.write_text(spws.read_text().replace(",32,384.5", ",%d,384.5" % nchan))
    rows = {}
    for mode, extra in (("serial", []), ("mpi2", ["--mpi", "2"]))[:2 if mpi else 1]:
        seconds, _, err = cli(["run", FIELD, LABEL, "-c", cfg, "--kind", "12m", "--no-chunked",
                               "--set", "Paths.PROD_DIR=%s" % (root / "sim" / mode)] + extra)
        rows[mode] = {"wall_s": seconds, "tclean_s": sum(float(t) for t in TCLEAN_TOOK.findall(err))}
    return rows


def _post_rss(script_dir, cube_dir):
    """Peak RSS (MB) of a fresh process post-processing the cube with the module in ``script_dir``."""
    code = ("import sys, resource, importlib; sys.path.insert(0, %r); sys.path.insert(1, %r);"
            "importlib.import_module('casatools'); import faust_bigcube as b; b._limit_address_space = "
            "lambda mb: 0; b.post(%r, 0)" % (str(script_dir), str(ROOT / "tests"), str(cube_dir)))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, MPLBACKEND="Agg"))
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit("post-processing with %s failed:\n%s" % (script_dir, result.stderr[-3000:]))
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return summary["maxrss_mb"], elapsed


def memory_case(root, nx, nchan):
    cube = root / "big"
    subprocess.run([sys.executable, str(ROOT / "tests" / "faust_bigcube.py"), "make", cube, str(nx), str(nchan)],
                   check=True, capture_output=True)
    old = root / "old_module"
    old.mkdir()
    source = subprocess.run(["git", "-C", str(ROOT), "show", "%s:faust_imaging.py" % PRE_STREAMING_COMMIT],
                            capture_output=True, text=True)
    out = {"cube_mb_float32": nx * nx * nchan * 4 / 1e6}
    out["streamed_rss_mb"], out["streamed_s"] = _post_rss(ROOT, cube)
    if source.returncode == 0:
        (old / "faust_imaging.py").write_text(source.stdout)
        shutil.copytree(ROOT / "configs", old / "configs")
        for product in cube.glob("big.*"):
            if product.name not in ("big.image", "big.residual", "big.pb", "big.mask"):
                shutil.rmtree(product) if product.is_dir() else product.unlink()
        shutil.rmtree(cube / "moments", ignore_errors=True)
        out["whole_cube_rss_mb"], out["whole_cube_s"] = _post_rss(old, cube)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (numbers not written)")
    parser.add_argument("--nchan", type=int, default=120, help="channels of the simulated MS")
    parser.add_argument("--big", type=int, default=1600, help="pixels per side of the large cube")
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args(argv)
    if args.quick:
        args.nchan, args.big = 16, 200
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-faust-scale-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        askap, geometry = askap_case(root, args.quick)
        sim = simulated_case(root, args.nchan, mpi=not args.quick)     # --quick: MPI on the ASKAP MS only
        memory = memory_case(root, args.big, 16 if args.quick else 128)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = [
        {"case": "real ASKAP MS, %d px, %s window: --mpi 2 vs serial" % (geometry["imsize"], geometry["window"]),
         "ours_s": askap["mpi2"]["wall_s"], "reference_s": askap["serial"]["wall_s"],
         "ratio": askap["mpi2"]["wall_s"] / askap["serial"]["wall_s"]},
        {"case": "real ASKAP MS, serial pipeline vs the time inside its tclean calls",
         "ours_s": askap["serial"]["wall_s"], "reference_s": askap["serial"]["tclean_s"],
         "ratio": askap["serial"]["wall_s"] / max(askap["serial"]["tclean_s"], 1e-9)},
        {"case": "simulated 12 m MS, %d channels: --mpi 2 vs serial" % args.nchan,
         "ours_s": sim["mpi2"]["wall_s"], "reference_s": sim["serial"]["wall_s"],
         "ratio": sim["mpi2"]["wall_s"] / sim["serial"]["wall_s"]} if "mpi2" in sim else None,
        {"case": "simulated 12 m MS, serial pipeline vs the time inside its tclean calls",
         "ours_s": sim["serial"]["wall_s"], "reference_s": sim["serial"]["tclean_s"],
         "ratio": sim["serial"]["wall_s"] / max(sim["serial"]["tclean_s"], 1e-9)},
    ]
    rows = [row for row in rows if row]
    if "whole_cube_rss_mb" in memory:
        rows.append({"case": "post-processing peak RSS (MB), %d x %d x %d cube (%.0f MB): streamed vs whole-cube"
                     % (args.big, args.big, 16 if args.quick else 128, memory["cube_mb_float32"]),
                     "ours_s": memory["streamed_rss_mb"], "reference_s": memory["whole_cube_rss_mb"],
                     "ratio": memory["streamed_rss_mb"] / memory["whole_cube_rss_mb"]})
        rows.append({"case": "post-processing wall time of that cube: streamed vs whole-cube",
                     "ours_s": memory["streamed_s"], "reference_s": memory["whole_cube_s"],
                     "ratio": memory["streamed_s"] / memory["whole_cube_s"]})
    print("ASKAP geometry from the data: %s; load average %s" % (geometry, os.getloadavg()))
    print(markdown_table(rows, ["case", "ours_s", "reference_s", "ratio"]))
    if args.quick:
        print("--quick: a smoke run, results/faust_scale.json not written")
    else:
        path = write_results("faust_scale", rows, geometry=geometry, askap=askap, simulated=sim, memory=memory,
                             nchan=args.nchan, big=args.big, loadavg=os.getloadavg(),
                             maxrss_self_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
