"""Benchmark of racs_pipeline.rms_map against AegeanTools' BANE: speed and noise values.

Both make the background and rms maps the source finder reads.  The images keep the real 4-D
RACS header of ``tests/data/askap/SB56659.RACS_0940-04...fits`` (RA, DEC, FREQ, STOKES;
2.5" pixels, 18.3" x 12.2" beam), resized to ``--size`` pixels, blank outside a circular
footprint, with beam-correlated noise of known sigma (``tests/simulate_racs.py``):

* ``noise``: noise only (sigma = 0.25 mJy/beam): the estimators' own bias;
* ``sources``: the same noise plus the simulator's faint and bright sources (what a real
  field looks like to the estimator);
* ``two-level``: noise only, three times higher in the right half: how well each map
  follows a change in the noise.

Methods, on the same file: ``rms_map`` with the pipeline's default box (30 beams, at most
a third of the image), ``rms_map`` with BANE's box (6 steps of 4 beams), and BANE
(``BANE.filter_image``, its defaults: step 4 beams, box 24 beams) on 1 and on all cores.
``wall_s`` is the best of ``--repeat`` calls from the FITS file (rms_map: ``load_image``
+ ``rms_map``, after one warm-up call; BANE, which reads the file itself: ``--bane-repeat``
calls after its first call in the process, the numba compilation, timed separately as
``bane_first_call_s``).  Values: per pixel, the map
divided by the injected sigma map, median and 1st/99th percentiles, over the pixels more
than half a box from the footprint edge and (two-level) from the step; ``vs_bane`` is the
median of rms_map / BANE rms over the same pixels; ``step_width_px`` (two-level) the
number of pixel columns around the step where the map (median over the central rows) is
more than 10 % off the injected sigma.

Run: ``.venv/bin/python benchmarks/bench_racs_bane.py [--size 4000] [--repeat 3] [--quick]``.
``--quick`` is a smoke run (500 px, one repeat, BANE on one core) whose numbers are not
written; the full run writes ``benchmarks/results/racs_bane.json``.
"""
import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

import racs_pipeline as racs  # noqa: E402
import simulate_racs as sim_mod  # noqa: E402
from benchutil import markdown_table, write_results  # noqa: E402

TEMPLATE = ROOT / "tests" / "data" / "askap" / "SB56659.RACS_0940-04.beam17.round3-0000-image.sub.fits"
SIGMA = 0.25e-3            # Jy/beam, the injected noise
COLUMNS = ["case", "method", "box_px", "wall_s", "median_vs_sigma", "p1_vs_sigma", "p99_vs_sigma",
           "vs_bane", "step_width_px"]


def noise_image(path, size, two_level=False, seed=11):
    """A noise-only image with the real 4-D header; returns the injected sigma map (2-D)."""
    from astropy.io import fits
    header, _ = sim_mod.template_header(TEMPLATE, size)
    pix = abs(header["CDELT2"]) * 3600.0
    beam = (header["BMAJ"] * 3600.0, header["BMIN"] * 3600.0, header["BPA"])
    rng = np.random.default_rng(seed)
    plane = sim_mod._paint_plane(size, np.zeros((0, 2)), np.zeros(0), beam, pix, SIGMA, rng)
    sigma = np.full((size, size), SIGMA)
    if two_level:
        sigma[:, size // 2:] *= 3.0
        plane *= sigma / SIGMA
    yy, xx = np.mgrid[0:size, 0:size]
    plane[np.hypot(xx - size / 2, yy - size / 2) > 0.48 * size] = np.nan
    fits.PrimaryHDU(plane[None, None].astype(np.float32), header=header).writeto(path, overwrite=True)
    return sigma


def source_image(workdir, size, seed=7):
    """The simulator's field on the same header, at its default source density (150 faint and
    150 bright sources per 1000 x 1000 pixels, plus 3 transients of each kind)."""
    n = max(10, int(150 * (size / 1000.0) ** 2))
    sim = sim_mod.simulate_field(workdir, size=size, n_faint=n, n_bright=n, template=TEMPLATE, mosaic=False,
                                 name="sources", seed=seed)
    return sim["image"], np.full((size, size), sim["rms"])


def evaluation_mask(size, box, two_level):
    """Pixels more than half a box from the footprint edge (and from the noise step)."""
    yy, xx = np.mgrid[0:size, 0:size]
    keep = np.hypot(xx - size / 2, yy - size / 2) < 0.48 * size - box / 2
    if two_level:
        keep &= np.abs(xx - size / 2) > box / 2
    return keep


def best_time(func, repeat, warm_up=True):
    """Smallest wall time of ``repeat`` calls (after one untimed warm-up) and the last result."""
    value = func() if warm_up else None
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        value = func()
        best = min(best, time.perf_counter() - start)
    return best, value


def run_rms_map(path, box):
    image = racs.load_image(path)
    return racs.rms_map(image.data, box=box)[1]


def run_bane(path, cores):
    from AegeanTools import BANE
    return BANE.filter_image(str(path), None, cores=cores)[1]


def bench_case(case, path, sigma, repeat, bane_repeat, all_cores):
    """Rows of one image: every method's time and values."""
    from AegeanTools import BANE
    image = racs.load_image(path)
    default_box = racs.scaled_default("rms_box", image)
    step = BANE.get_step_size(image.header)[0]
    bane_box = 6 * step
    methods = [("rms_map (default box)", default_box, repeat, lambda: run_rms_map(path, default_box)),
               ("rms_map (BANE's box)", bane_box, repeat, lambda: run_rms_map(path, bane_box)),
               ("AegeanTools BANE, 1 core", bane_box, bane_repeat, lambda: run_bane(path, 1))]
    if all_cores > 1:
        methods.append(("AegeanTools BANE, %d cores" % all_cores, bane_box, bane_repeat,
                        lambda: run_bane(path, all_cores)))
    size = image.data.shape[0]
    keep = evaluation_mask(size, max(default_box, bane_box), case == "two-level")
    keep &= np.isfinite(image.data)
    yy, xx = np.mgrid[0:size, 0:size]
    # central rows, away from the footprint's edge in x too (one box)
    rows_band = (np.abs(yy - size / 2) < 0.25 * size) & (np.hypot(xx - size / 2, yy - size / 2)
                                                          < 0.48 * size - max(default_box, bane_box))
    maps, rows = {}, []
    for name, box, times, func in methods:
        # BANE is compiled already (first_bane_call) and takes seconds: no warm-up call
        wall, rms = best_time(func, times, warm_up=name.startswith("rms_map"))
        ratio = rms[keep] / sigma[keep]
        maps[name] = rms
        rows.append({"case": case, "method": name, "box_px": int(box), "wall_s": round(wall, 4),
                     "median_vs_sigma": round(float(np.median(ratio)), 4),
                     "p1_vs_sigma": round(float(np.percentile(ratio, 1)), 4),
                     "p99_vs_sigma": round(float(np.percentile(ratio, 99)), 4)})
        if case == "two-level":
            rows[-1]["step_width_px"] = step_width(rms, sigma, rows_band)
    bane = maps["AegeanTools BANE, 1 core"]
    for row in rows:
        if row["method"].startswith("rms_map"):
            row["vs_bane"] = round(float(np.median(maps[row["method"]][keep] / bane[keep])), 4)
        row["pixels"] = int(keep.sum())
    return rows


def first_bane_call(workdir):
    """Time of BANE's very first call in this process, on a 200 x 200 image: numba compiling
    its sigmaclip (later calls, in the table, do not pay it)."""
    path = Path(workdir) / "compile.fits"
    noise_image(path, 200)
    start = time.perf_counter()
    run_bane(path, 1)
    return round(time.perf_counter() - start, 3)


def step_width(rms, sigma, keep_rows):
    """Two-level case: how many pixel columns around the noise step the map misses the injected
    sigma by more than 10 % (median over the central rows, inside the footprint)."""
    with np.errstate(invalid="ignore"):
        profile = np.nanmedian(np.where(keep_rows, rms / sigma, np.nan), axis=0)
    inside = np.isfinite(profile)
    return int(np.sum(inside & (np.abs(profile - 1.0) > 0.1)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4000, help="image side (pixels)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per method (best is kept)")
    parser.add_argument("--bane-repeat", type=int, default=1, help="timed BANE calls per setting")
    parser.add_argument("--quick", action="store_true",
                        help="500 px, one repeat, BANE on one core (a smoke run; nothing written)")
    args = parser.parse_args(argv)
    size, repeat, cores = (500, 1, 1) if args.quick else (args.size, args.repeat, os.cpu_count() or 1)
    from AegeanTools import BANE
    BANE.logger.setLevel(logging.WARNING)      # AegeanTools sets its logger to INFO at import
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        noise_path = workdir / "noise.fits"
        sigma = noise_image(noise_path, size)
        first_call = first_bane_call(workdir)
        rows += bench_case("noise", noise_path, sigma, repeat, args.bane_repeat, cores)
        source_path, sigma = source_image(workdir, size)
        rows += bench_case("sources", source_path, sigma, repeat, args.bane_repeat, cores)
        step_path = workdir / "two_level.fits"
        sigma = noise_image(step_path, size, two_level=True)
        rows += bench_case("two-level", step_path, sigma, repeat, args.bane_repeat, cores)
    print("\nrms_map vs AegeanTools BANE on a %d x %d image with the real 4-D RACS header, injected sigma "
          "%.2f mJy/beam (%d CPUs; BANE's first call in the process, on 200 x 200 px: %.2f s)\n"
          % (size, size, SIGMA * 1e3, os.cpu_count(), first_call))
    print(markdown_table(rows, COLUMNS))
    if args.quick:
        print("\n--quick: a smoke run, results/racs_bane.json not written")
        return 0
    path = write_results("racs_bane", rows, size=size, sigma_jy=SIGMA, bane_first_call_s=first_call,
                         template=TEMPLATE.name, repeat=repeat, bane_repeat=args.bane_repeat,
                         load_average=os.getloadavg())
    print("\nwritten", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
