"""Benchmark: clover vs pyspeckit on NH3 (1,1) maps - the real G23.481 cutout and a simulated cube.

1. Real data: the VLA+GBT G23.481 (1,1) cutout (20 x 20 pixels, 380 channels of 158 m/s,
   beam ~8 x 6 pixels) and its (2,2) partner.  pyspeckit's numbers (one- and
   two-component cold_ammonia fits with BIC selection, joint (1,1)+(2,2) fits for T_kin)
   come from the stored reference table made by reference_clover_nh3_pyspeckit.py (its fit
   times included); clover runs end to end on the FITS file (networks + fits, models
   loaded once).  Reported: spectra/s, class agreement, median |dv|, |dsigma| of the
   two-component pixels both call, clover's errors / pyspeckit's (scaled by sqrt(reduced
   chi2)), T_kin of the dominant component against pyspeckit's joint fits.
2. Simulated: a ``--size`` x ``--size`` NH3 (1,1) cube on the real header (158 m/s
   channels, noise 0.1 K smoothed over a 2.5-pixel beam; noise / one / two-component
   regions, tests/simulate_clover.py): clover on every pixel, pyspeckit (the reference
   script's per-pixel fits) on ``--pyspeckit-pixels`` random pixels; both scored against
   the injected truth.

    .venv/bin/python benchmarks/bench_clover_realdata.py [--size 100] [--pyspeckit-pixels 60] [--quick]

Writes ``benchmarks/results/clover_realdata.json`` and prints Markdown tables.  ``--quick`` is a
smoke run (the real cubes timed once, a 12 x 12 simulated cube, 2 pyspeckit pixels) whose
numbers are not written.
"""
import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]

from benchutil import best_of, markdown_table, write_results  # noqa: E402

DATA = ROOT / "tests" / "data" / "nh3"
CUBE11, CUBE22 = DATA / "ammonia_11_cutout.fits", DATA / "ammonia_22_cutout.fits"


def real_rows(models, quick=False):
    """clover vs the stored pyspeckit reference on the real cubes (``quick``: no warm-up, one repeat)."""
    import clover
    from astropy.table import Table
    ref = Table.read(DATA / "g23_pyspeckit_reference.ecsv")
    run = lambda **kw: clover.predict(CUBE11, nh3=True, models=models, write=False, progress=False, **kw)  # noqa: E731
    if not quick:
        run()
    t11, res = best_of(run, repeat=1 if quick else 2)
    t22, res22 = best_of(lambda: run(nh3_22=CUBE22), repeat=1)
    y, x = np.asarray(ref["y"]), np.asarray(ref["x"])
    maps = res22["maps"]
    at = lambda name: maps[name][y, x]  # noqa: E731
    ours, theirs = at("ncomp"), np.asarray(ref["ncomp"])
    both = (ours == 2) & (theirs == 2)
    scale = np.sqrt(np.asarray(ref["m2_redchi2"]))
    row = {"cube": "G23.481 (1,1), real", "pixels": len(ref), "clover two/one/noise": "%d/%d/%d" % tuple(
        int((ours == k).sum()) for k in (2, 1, 0)), "pyspeckit two/one/noise": "%d/%d/%d" % tuple(
        int((theirs == k).sum()) for k in (2, 1, 0)), "class agreement": float((ours == theirs).mean())}
    dv = np.concatenate([np.abs(at("vlsr" + c) - np.asarray(ref["m2_c%s_vlsr" % c]))[both] for c in "12"])
    ds = np.concatenate([np.abs(at("sig" + c) - np.asarray(ref["m2_c%s_sigma" % c]))[both] for c in "12"])
    ratio = np.concatenate([(at("vlsr%s_err" % c) / (np.asarray(ref["m2_c%s_vlsr_err" % c]) * scale))[both] for c in "12"])
    row.update({"median |dv| km/s": float(np.median(dv)), "median |dsigma| km/s": float(np.median(ds)),
                "err ratio (clover / pyspeckit scaled)": float(np.median(ratio))})
    py11 = float(np.sum(ref["m1_time"]) + np.sum(ref["m2_time"]))
    pyj = float(np.sum(ref["j1_time"]) + np.sum(ref["j2_time"]))
    speed = [{"method": "pyspeckit 1+2 comp. fits + BIC, (1,1) (1 core)", "spectra_per_s": len(ref) / py11},
             {"method": "clover predict (1,1), networks + fits, FITS in", "spectra_per_s": len(ref) / t11,
              "speedup": py11 / t11},
             {"method": "pyspeckit (1,1) fits + joint (1,1)+(2,2) fits", "spectra_per_s": len(ref) / (py11 + pyj)},
             {"method": "clover predict --nh3-22 (joint fits of the chosen components)",
              "spectra_per_s": len(ref) / t22, "speedup": (py11 + pyj) / t22}]
    brighter = at("tpeak1") >= at("tpeak2")
    bright = both & (np.asarray(ref["peak_snr_22"]) > 5)
    ref_t = np.where(brighter, ref["j2_c1_tkin"], ref["j2_c2_tkin"])
    ref_e = np.where(brighter, ref["j2_c1_tkin_err"], ref["j2_c2_tkin_err"])
    dt = (at("tkin_dom") - ref_t)[bright]
    row.update({"Tkin clover (median)": float(np.nanmedian(maps["tkin_dom"])),
                "Tkin pyspeckit (median)": float(np.nanmedian(ref_t[both])),
                "median |dTkin| / err, (2,2) S/N > 5": float(np.nanmedian(np.abs(dt) / ref_e[bright])),
                "pixels (2,2) S/N > 5": int(bright.sum())})
    return row, speed


def pyspeckit_fits(cube, vel, pixels, v0):
    """pyspeckit (1,1) one/two-component fits + BIC of the given (y, x) pixels (reference script)."""
    import clover
    import reference_clover_nh3_pyspeckit as refmod
    cfg = {"vwin": (v0 - 3.0, v0 + 4.0), "v_guesses": (v0, v0 + 1.0), "tkin_fixed": 15.0, "joint_tkin_starts": (12.0, 20.0)}
    freq = clover.NH3_11_REST_HZ * (1 - vel / clover.C_KMS) / 1e9
    out = []
    logging.getLogger("reference_nh3_pyspeckit").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refmod._quiet()
        for y, x in pixels:
            s11 = {"spec": cube[:, y, x].astype(float), "freq": freq, "velo": vel, "restfreq": clover.NH3_11_REST_HZ}
            out.append(refmod.fit_one_spectrum(s11, None, cfg, y, x))
    return out


def simulated_rows(models, size, n_py, seed=21):
    """clover (all pixels) and pyspeckit (a random subset) on a simulated cube with the real header."""
    import clover
    import simulate_clover as sc
    dv = 0.158133
    cube, vel, truth = sc.domain_cube("nh3", dv, 0.3, ny=size, nx=size, rng=np.random.default_rng(seed),
                                      beam_px=2.5, v0=63.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = sc.write_cube_fits(Path(tmp) / "sim.fits", cube, vel, "nh3", 2.5, template=CUBE11)
        t_clover, res = best_of(lambda: clover.predict(path, nh3=True, models=models, write=False, progress=False), 1)
    maps = res["maps"]
    inner = clover.interior_pixels(truth["class"])
    rng = np.random.default_rng(seed + 1)
    ys, xs = np.nonzero(inner)
    pick = rng.choice(len(ys), min(n_py, len(ys)), replace=False)
    pixels = list(zip(ys[pick], xs[pick]))
    start = time.perf_counter()
    py = pyspeckit_fits(cube, vel, pixels, 63.0)
    t_py = time.perf_counter() - start
    rows = []
    for method, get, sel in (("clover (all %d pixels)" % size ** 2, lambda y, x: maps, None),
                             ("clover (the pyspeckit pixels)", lambda y, x: maps, pixels),
                             ("pyspeckit 1+2 comp. + BIC (%d pixels)" % len(pixels), None, pixels)):
        if get is None:
            nc = np.array([r["ncomp"] for r in py])
            tn = np.array([truth["ncomp"][y, x] for y, x in pixels])
            v1 = np.array([r.get("m2_c1_vlsr", np.nan) if r["ncomp"] == 2 else r.get("m1_vlsr", np.nan) for r in py])
            tv = np.array([truth["vlsr1"][y, x] if truth["ncomp"][y, x] == 2 else truth["vlsr"][y, x] for y, x in pixels])
            good = nc == tn
            rows.append({"method": method, "spectra_per_s": len(pixels) / t_py, "class accuracy": float(good.mean()),
                         "median |dv1| km/s": float(np.nanmedian(np.abs(v1 - tv)[good & (tn > 0)]))})
            continue
        mask = inner.copy() if sel is None else np.zeros_like(inner)
        if sel is not None:
            for y, x in sel:
                mask[y, x] = True
        nc, tn = maps["ncomp"][mask], truth["ncomp"][mask]
        v1 = np.where(maps["ncomp"] == 2, maps["vlsr1"], maps["vlsr"])[mask]
        tv = np.where(truth["ncomp"] == 2, truth["vlsr1"], truth["vlsr"])[mask]
        good = nc == tn
        rows.append({"method": method, "spectra_per_s": size ** 2 / t_clover, "class accuracy": float(good.mean()),
                     "median |dv1| km/s": float(np.nanmedian(np.abs(v1 - tv)[good & (tn > 0)]))})
    rows[0]["speedup"] = rows[0]["spectra_per_s"] / rows[2]["spectra_per_s"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100, help="simulated cube size (pixels)")
    parser.add_argument("--pyspeckit-pixels", type=int, default=60, help="pixels pyspeckit fits in the simulated cube")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="one timing of the real cubes, a 12 x 12 simulated cube, 2 pyspeckit pixels "
                             "(a smoke run; nothing written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.pyspeckit_pixels = 12, 2
    import clover
    clover.setup_logging(quiet=True)
    models = clover.CloverModels("nh3", nproc=args.nproc)
    real, speed = real_rows(models, args.quick)
    print(markdown_table([real], list(real)))
    print("\n" + markdown_table(speed, ["method", "spectra_per_s", "speedup"]))
    sim = simulated_rows(models, args.size, args.pyspeckit_pixels)
    print("\n" + markdown_table(sim, ["method", "spectra_per_s", "speedup", "class accuracy", "median |dv1| km/s"]))
    if args.quick:
        print("--quick: a smoke run, results/clover_realdata.json not written")
        return 0
    path = write_results("clover_realdata", {"real": real, "speed": speed, "simulated": sim},
                         size=args.size, pyspeckit_pixels=args.pyspeckit_pixels, threads=args.nproc)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
