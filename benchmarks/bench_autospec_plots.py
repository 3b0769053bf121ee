"""Benchmark: autospec objects per second end to end, with and without plots.

Two cubes, each run by ``autospec.run`` as a user would (1 worker, fresh OUTPUT):

* the real MUSE minicube of Abell 478 in the mpdaf wheel (3681 x 40 x 40) with its 8-object
  ``cat.txt`` repeated ``--copies`` times under new IDs;
* the simulated 200 x 200 x 1000 cube of ``tests/simulate_autospec.benchmark_scene``
  (``--objects`` objects).

Reported: objects/s end to end (reading, white light, segmentation included) and for the
per-object part alone, with PLOTS = True and False, and the share of the run the plots take.

    .venv/bin/python benchmarks/bench_autospec_plots.py [--copies 5] [--objects 60] [--quick]

Writes ``benchmarks/results/autospec_plots.json`` and prints a Markdown table.  ``--quick`` is a
smoke run (2 of the minicube's objects, a 60 x 60 x 200 simulated cube with 2 objects) whose
numbers are not written.
"""
import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]

from benchutil import markdown_table, write_results  # noqa: E402


def _minicube(tmp, copies, first=None):
    import mpdaf
    sdetect = Path(mpdaf.__file__).parent / "data" / "sdetect"
    rows = [line.split()[:3] for line in (sdetect / "cat.txt").read_text().splitlines()[1:] if line.strip()]
    rows = rows[:first]
    cat = Path(tmp) / "cat_repeated.txt"
    cat.write_text("ID RA DEC\n" + "".join("%d %s %s\n" % (k * 100 + int(i), ra, dec)
                                          for k in range(copies) for i, ra, dec in rows))
    return sdetect / "minicube.fits", cat, len(rows) * copies


def _simulated(tmp, nobj, quick=False):
    import simulate_autospec as sim
    scene = sim.benchmark_scene(nx=60, ny=60, nwave=200, nobj=nobj) if quick else sim.benchmark_scene(nobj=nobj)
    files = sim.write_scene(scene, Path(tmp) / "sim")
    return files["cube"], files["catalogue"], nobj


def measure(name, cube, cat, n, tmp):
    import autospec
    rows = []
    for plots in (False, True):
        out = Path(tmp) / ("%s_%s" % (name, plots))
        res = autospec.run(DATACUBE=cube, CATALOG=cat, OUTPUT=out, PLOTS=plots, APER=[1.0], SPLIT_SHARED=False,
                           progress=False, overwrite=True)
        rows.append({"cube": name, "objects": n, "plots": plots, "objects_per_s": n / res["elapsed_s"],
                     "objects_per_s_per_object_part": n / res["objects_s"], "seconds": res["elapsed_s"]})
    rows[1]["plot_share"] = 1 - rows[0]["seconds"] / rows[1]["seconds"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=5, help="repeats of the minicube's 8-object catalogue")
    parser.add_argument("--objects", type=int, default=60, help="objects in the simulated cube")
    parser.add_argument("--quick", action="store_true",
                        help="2 objects per cube, a small simulated cube (a smoke run; nothing written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.copies, args.objects = 1, 2
    import autospec
    autospec.setup_logging(quiet=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += measure("A478 minicube (real, 3681 x 40 x 40)",
                        *_minicube(tmp, args.copies, first=2 if args.quick else None), tmp)
        rows += measure("simulated 60 x 60 x 200" if args.quick else "simulated 200 x 200 x 1000",
                        *_simulated(tmp, args.objects, args.quick), tmp)
    print(markdown_table(rows, ["cube", "objects", "plots", "objects_per_s", "objects_per_s_per_object_part",
                                "seconds", "plot_share"]))
    if args.quick:
        print("--quick: a smoke run, results/autospec_plots.json not written")
    else:
        print("wrote", write_results("autospec_plots", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
