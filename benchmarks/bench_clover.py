"""Benchmark: clover predict vs a scipy least-squares 1-/2-Gaussian fit with AIC selection.

Both methods see the same simulated 500-channel Gaussian-line cube (default 100 x 100
pixels in 10 x 10-pixel blocks, each block noise / one / two components with random
parameters drawn from the training ranges, small gradients inside the block, peak S/N
4-30).  Reported: spectra per second and accuracy against the truth (classification per
class, median absolute centroid/dispersion errors of two-component pixels).

    .venv/bin/python benchmarks/bench_clover.py [--size 100] [--lsq-pixels 10000] [--quick]

Writes ``benchmarks/results/clover.json`` and prints a Markdown table.  ``--quick`` is a smoke
run (30 x 30 pixels, 30 least-squares pixels, one repeat, no warm-up) whose numbers are not
written.
"""
import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchutil import best_of, markdown_table, write_results  # noqa: E402

# Timing note: clover runs TensorFlow on --nproc threads (default 2); curve_fit is one
# process on one core.  Per-core, divide clover's rate by the thread count.


def simulate_block_cube(size, seed=12345, block=10):
    """(500, size, size) cube of random 10x10-pixel blocks with truth maps (km/s)."""
    import clover
    rng = np.random.default_rng(seed)
    vel = clover.gaussian_template_axis()
    nb = -(-size // block)
    r = clover.GAUSS_RANGES
    code = rng.integers(0, 3, (nb, nb))
    v1 = rng.uniform(-8, 8, (nb, nb))
    s = rng.uniform(*r["sigma_kms"], (nb, nb, 2))
    sep = s.max(-1) * rng.uniform(*r["sep_factor"], (nb, nb))
    snr = np.exp(rng.uniform(np.log(4), np.log(30), (nb, nb)))
    p2 = rng.uniform(np.minimum(4 / snr, 1), 1)
    up = lambda a: np.repeat(np.repeat(a, block, 0), block, 1)[:size, :size]  # noqa: E731
    code, v1, sep, snr, p2 = map(up, (code, v1, sep, snr, p2))
    s1, s2 = up(s[..., 0]), up(s[..., 1])
    yy, xx = np.mgrid[0:size, 0:size]
    v1 = v1 + 0.02 * ((xx % block) - block / 2)   # small gradient inside each block
    v2 = v1 + sep
    amp = np.column_stack([np.where(code != 1, 1.0, 0.0).ravel(), np.where(code == 2, p2, 0.0).ravel()])
    spec = clover.gaussian_profiles(vel, amp, np.column_stack([v1.ravel(), v2.ravel()]),
                                    np.column_stack([s1.ravel(), s2.ravel()]))
    noise = (1.0 / snr).ravel()[:, None]
    spec = spec + rng.standard_normal(spec.shape).astype(np.float32) * noise
    cube = spec.T.reshape(len(vel), size, size).astype(np.float32)
    lo, hi = np.minimum(v1, v2), np.maximum(v1, v2)
    slo, shi = np.where(v1 <= v2, s1, s2), np.where(v1 <= v2, s2, s1)
    truth = {"class": code, "vlsr1": lo, "vlsr2": hi, "sig1": slo, "sig2": shi, "vlsr": v1, "sig": s1}
    return cube, vel, truth


def _gauss(v, *p):
    out = np.zeros_like(v)
    for a, c, s in zip(p[0::3], p[1::3], p[2::3]):
        out += a * np.exp(-0.5 * ((v - c) / s) ** 2)
    return out


def lsq_fit(spec, vel):
    """Fit 0, 1 and 2 Gaussians (scipy curve_fit); choose by AIC and by BIC.

    AIC = n ln(RSS/n) + 2k (Akaike 1974); BIC = n ln(RSS/n) + k ln n (Schwarz 1978);
    k = 3 per component.  Returns {criterion: (ncomp, parameters)}.
    """
    from scipy.optimize import curve_fit
    n, dv = len(vel), vel[1] - vel[0]
    results = {0: (np.sum(spec ** 2), [])}
    i = int(np.argmax(spec))
    a0 = spec[i]
    half = spec > a0 / 2
    s0 = min(4.9, max(0.1, half.sum() * dv / 2.355))
    bounds1 = ([0, vel[0], 0.3 * dv], [np.inf, vel[-1], 5.0])
    try:
        p1, _ = curve_fit(_gauss, vel, spec, p0=[a0, vel[i], s0], bounds=bounds1, maxfev=2000)
        results[1] = (np.sum((spec - _gauss(vel, *p1)) ** 2), p1)
        resid = spec - _gauss(vel, *p1)
        j = int(np.argmax(resid))
        p0 = [p1[0], p1[1], p1[2], max(resid[j], 1e-3), vel[j], s0]
        p2, _ = curve_fit(_gauss, vel, spec, p0=p0, bounds=(bounds1[0] * 2, bounds1[1] * 2), maxfev=4000)
        results[2] = (np.sum((spec - _gauss(vel, *p2)) ** 2), p2)
    except (RuntimeError, ValueError):
        pass
    out = {}
    for name, penalty in (("AIC", 2.0), ("BIC", np.log(n))):
        score = {k: n * np.log(rss / n) + penalty * 3 * k for k, (rss, _) in results.items()}
        best = min(score, key=score.get)
        out[name] = (best, results[best][1])
    return out


def run_lsq(cube, vel, pixels):
    """Least-squares maps per criterion for the given flat pixel indices (NaN elsewhere)."""
    ny, nx = cube.shape[1:]
    outs = {c: {k: np.full(ny * nx, np.nan) for k in ("class", "vlsr1", "vlsr2", "sig1", "sig2", "vlsr", "sig")}
            for c in ("AIC", "BIC")}
    flat = cube.reshape(cube.shape[0], -1)
    code_of = {0: 1, 1: 0, 2: 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in pixels:
            for crit, (ncomp, par) in lsq_fit(flat[:, p].astype(float), vel).items():
                out = outs[crit]
                out["class"][p] = code_of[ncomp]
                if ncomp == 2:
                    c, s = np.array(par[1::3]), np.array(par[2::3])
                    o = np.argsort(c)
                    out["vlsr1"][p], out["vlsr2"][p] = c[o]
                    out["sig1"][p], out["sig2"][p] = s[o]
                elif ncomp == 1:
                    out["vlsr"][p], out["sig"][p] = par[1], abs(par[2])
    return {crit: {k: v.reshape(ny, nx) for k, v in out.items()} for crit, out in outs.items()}


def accuracy(maps, truth, mask):
    """Per-class accuracy and two-component errors on the pixels in ``mask``."""
    row = {}
    for name, code in (("one", 0), ("noise", 1), ("two", 2)):
        sel = mask & (truth["class"] == code)
        row["acc_" + name] = float((maps["class"][sel] == code).mean())
    for code, keys in ((2, ("vlsr1", "vlsr2", "sig1", "sig2")), (0, ("vlsr", "sig"))):
        both = mask & (truth["class"] == code) & (maps["class"] == code)
        for key in keys:
            row["mae_" + key] = float(np.nanmedian(np.abs(maps[key] - truth[key])[both]))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--lsq-pixels", type=int, default=3000,
                        help="random pixels fitted by least squares (default 3000)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="30 x 30 pixels, 30 fitted, one repeat, no warm-up (a smoke run; nothing written)")
    args = parser.parse_args(argv)
    repeat = 3
    if args.quick:
        args.size, args.lsq_pixels, repeat = 30, 30, 1       # 9 blocks: all three classes
    import clover
    cube, vel, truth = simulate_block_cube(args.size)
    npix = args.size ** 2
    lsq_pixels = min(npix, args.lsq_pixels)
    chosen = np.sort(np.random.default_rng(1).choice(npix, lsq_pixels, replace=False))
    models = clover.CloverModels("gauss", nproc=args.nproc)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.fits"
        clover.cube_hdu(cube, vel).writeto(path)
        predict = lambda: clover.predict(path, models=models, outdir=Path(tmp) / "out", overwrite=True,  # noqa: E731
                                         progress=False)
        if not args.quick:
            predict()                                               # warm-up (tracing)
        t_clover, res = best_of(predict, repeat=repeat)
        t_plain, plain = best_of(lambda: clover.predict(path, models=models, outdir=Path(tmp) / "plain",
                                                        overwrite=True, progress=False, refine=False), repeat=repeat)
    x, tmax, valid = clover.make_features(cube)
    t_net, _ = best_of(lambda: clover.predict_spectra(x, models), repeat=repeat)
    start = time.perf_counter()
    lsq = run_lsq(cube, vel, chosen)
    t_lsq = time.perf_counter() - start
    mask = np.zeros(npix, bool)
    mask[chosen] = True
    yy, xx = np.mgrid[0:args.size, 0:args.size]
    inner = (yy % 10 > 0) & (yy % 10 < 9) & (xx % 10 > 0) & (xx % 10 < 9)   # 3x3 inside one block
    mask = mask.reshape(args.size, args.size) & inner
    rows = [dict(method="clover predict (end to end, FITS in/out)", pixels=npix,
                 spectra_per_s=npix / t_clover, **accuracy(res["maps"], truth, mask)),
            dict(method="clover predict, refine=False (networks' values)", pixels=npix,
                 spectra_per_s=npix / t_plain, **accuracy(plain["maps"], truth, mask)),
            dict(method="clover networks only (6-member ensemble + regressors, no I/O, no refinement)",
                 pixels=npix, spectra_per_s=npix / t_net),
            dict(method="scipy curve_fit 0/1/2 Gaussians + AIC", pixels=lsq_pixels,
                 spectra_per_s=lsq_pixels / t_lsq, **accuracy(lsq["AIC"], truth, mask)),
            dict(method="scipy curve_fit 0/1/2 Gaussians + BIC (same fits)", pixels=lsq_pixels,
                 spectra_per_s=lsq_pixels / t_lsq, **accuracy(lsq["BIC"], truth, mask))]
    for row in rows[:2]:
        row["speedup_vs_lsq"] = row["spectra_per_s"] / rows[3]["spectra_per_s"]
    columns = ["method", "pixels", "spectra_per_s", "speedup_vs_lsq", "acc_one", "acc_noise", "acc_two",
               "mae_vlsr1", "mae_vlsr2", "mae_sig1", "mae_sig2", "mae_vlsr", "mae_sig"]
    print(markdown_table(rows, columns))
    print("\nerrors in km/s (median absolute; vlsr1..sig2 over two-component pixels and vlsr, sig over "
          "one-component pixels that each method puts in the right class); "
          "accuracy and errors over the %d of %d least-squares pixels whose 3x3 window lies in one block"
          % (mask.sum(), lsq_pixels))
    if args.quick:
        print("--quick: a smoke run, results/clover.json not written")
        return 0
    path = write_results("clover", rows, cube={"size": args.size, "nchan": 500, "seed": 12345,
                                              "blocks": "10x10 pixels, random class and parameters",
                                              "lsq_pixels": lsq_pixels, "scored_pixels": int(mask.sum()),
                                              "threads": args.nproc})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
