"""How separable are the two-component NH3 (1,1) spectra of the CLOVER training ranges?

For simulated two-component NH3 spectra drawn from the training ranges (weaker
component peak S/N >= 4), the best one-component NH3 model is fitted by least squares
(scipy ``least_squares``, three starts) to the mean of nine noisy copies of the spectrum
(a 3x3 neighbourhood without gradients, where that mean is a sufficient statistic: all
the information any classifier can have).  ``dchi2 = chi2(one-component best fit) -
chi2(true two-component model)`` measures the evidence for a second component; below
~8 (the AIC penalty of 4 extra parameters) no criterion prefers two components, so no
classifier can do better than chance on such spectra.  The shipped clover ensemble
classifies the same spectra; its accuracy is reported per dchi2 class and per separation
bin.

    .venv/bin/python benchmarks/bench_clover_nh3_limit.py [--n 1200] [--seed 4242] [--quick]

Writes ``benchmarks/results/clover_nh3_limit.json`` and prints a Markdown table.  ``--quick`` is
a smoke run (30 spectra) whose numbers are not written.
"""
import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchutil import markdown_table, write_results  # noqa: E402

BOUNDS = ([2.8, 11.5, 0.02, -6.0], [60.0, 16.0, 3.0, 6.0])   # Tkin (K), log N, width, voff (km/s)


def simulate(n, rng):
    """Two-component spectra (no gradients): truth, nine noisy copies, weaker S/N."""
    import clover
    r = clover.NH3_RANGES
    tkin, logn, width, centre = clover._nh3_parameters(n, rng)
    tkin = np.maximum(tkin + r["tkin_offset_k"], r["tkin_floor_k"])
    freq, _ = clover.nh3_template_axis()
    comps = [clover.nh3_spectra_fast(freq, tkin[:, k], logn[:, k], width[:, k], centre[:, k]).astype(float)
             for k in range(2)]
    model = comps[0] + comps[1]
    copies = model[:, None, :] + rng.normal(0, r["noise_k"], (n, 9, freq.size))
    snr_min = np.minimum(comps[0].max(1), comps[1].max(1)) / r["noise_k"]
    params = np.stack([tkin, logn, width, centre], axis=-1)          # (n, 2, 4)
    return freq, model, copies, snr_min, params


def best_one_component(freq, y, sigma, params):
    """Smallest chi2 of a one-component NH3 model over three starting points."""
    import clover
    from scipy.optimize import least_squares

    def resid(p):
        return (clover.nh3_spectra_fast(freq, p[0], p[1], p[2], p[3])[0] - y) / sigma

    bright = int(np.argmax([clover.nh3_spectra_fast(freq, *pp).max() for pp in params]))
    merged = params.mean(axis=0)
    merged[2] = params[:, 2].max() + abs(params[1, 3] - params[0, 3]) / 2
    best = np.inf
    for start in (params[bright], params[1 - bright], merged):
        x0 = np.clip(start, np.array(BOUNDS[0]) + 1e-6, np.array(BOUNDS[1]) - 1e-6)
        fit = least_squares(resid, x0, bounds=BOUNDS, x_scale=[5.0, 0.5, 0.1, 0.1], max_nfev=200)
        best = min(best, 2 * fit.cost)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="30 spectra (a smoke run; nothing written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = 30
    import clover
    rng = np.random.default_rng(args.seed)
    freq, model, copies, snr_min, params = simulate(args.n, rng)
    keep = snr_min >= 4
    x, _ = clover._features_from_windows(copies.astype(np.float32))   # velocity increases with index
    pred = clover.predict_spectra(x, clover.CloverModels("nh3", nproc=args.nproc))["class"]
    sigma = clover.NH3_RANGES["noise_k"] / 3.0
    mean = copies.mean(axis=1)
    start = time.perf_counter()
    dchi2 = np.full(args.n, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in np.flatnonzero(keep):
            chi1 = best_one_component(freq, mean[i], sigma, params[i])
            chi2 = np.sum(((mean[i] - model[i]) / sigma) ** 2)
            dchi2[i] = chi1 - chi2
    seconds = time.perf_counter() - start
    sep = np.abs(params[:, 1, 3] - params[:, 0, 3]) / params[:, :, 2].max(axis=1)
    two = pred == clover.CLASS_CODES["two"]
    rows = []
    groups = [("all, weaker S/N >= 4", keep),
              ("dchi2 < 8 (no criterion prefers two)", keep & (dchi2 < 8)),
              ("8 <= dchi2 < 28 (AIC yes, BIC no)", keep & (dchi2 >= 8) & (dchi2 < 28)),
              ("dchi2 >= 28 (BIC prefers two)", keep & (dchi2 >= 28)),
              ("dchi2 >= 8", keep & (dchi2 >= 8))]
    for lo, hi in zip(clover.SEP_BINS[:-1], clover.SEP_BINS[1:]):
        groups.append(("separation %g-%g x larger width" % (lo, hi), keep & (sep >= lo) & (sep < hi)))
    for label, sel in groups:
        rows.append({"spectra": label, "n": int(sel.sum()), "fraction": float(sel.sum() / keep.sum()),
                     "clover_two_accuracy": float(two[sel].mean()) if sel.any() else float("nan"),
                     "median_dchi2": float(np.median(dchi2[sel])) if sel.any() else float("nan")})
    print(markdown_table(rows, ["spectra", "n", "fraction", "clover_two_accuracy", "median_dchi2"]))
    ceiling = 1 - 0.5 * rows[1]["fraction"]
    print("\nwith chance (0.5) on the dchi2 < 8 spectra and perfect elsewhere, the best possible "
          "two-component accuracy is %.3f; one-component fits took %.0f s" % (ceiling, seconds))
    if args.quick:
        print("--quick: a smoke run, results/clover_nh3_limit.json not written")
        return 0
    path = write_results("clover_nh3_limit", rows, ceiling=ceiling, n=args.n, seed=args.seed,
                         fit_seconds=seconds)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
