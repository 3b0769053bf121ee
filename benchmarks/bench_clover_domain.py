"""Benchmark: clover's accuracy across channel widths, line widths and beam sampling.

Simulated cubes (tests/simulate_clover.py: 12 x 12 pixels, columns of noise / one / two
components 3 dispersions apart, gentle gradients; Gaussian lines peak S/N 10, NH3 (1,1)
T_kin 15/12 K, log N 14.0/13.8, noise 0.1 K) on axes of 0.5-4x the trained channel width
(0.0724 km/s) with line widths of 1-40 channels, noise independent per pixel or smoothed
by a Gaussian "beam" of 2 pixels (sigma; BMAJ/BMIN written accordingly).  No preprocessing:
each cube goes through ``clover.predict`` as a user would run it.  Reported per bin: class
accuracy (pixels whose 3x3 window is in one region), median |centroid error| in km/s and
in channels of the cube, median |dispersion error| / dispersion, the robust spread of the
centroid pulls (error / reported uncertainty) and whether the axis was resampled.

    .venv/bin/python benchmarks/bench_clover_domain.py [--nproc 2] [--quick]

Writes ``benchmarks/results/clover_domain.json`` and prints Markdown tables.  ``--quick`` is a
smoke run (two Gaussian bins and one NH3 bin of the grid) whose numbers are not written.
"""
import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests"), str(HERE)]

from benchutil import markdown_table, write_results  # noqa: E402

FACTORS = (0.5, 1.0, 2.0, 4.0)
GAUSS_SIGMA_CH = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0)
NH3_SIGMA_KMS = (0.15, 0.3, 0.6)
BEAMS = (0.0, 2.0)


def run_bin(line, models, factor, sigma_kms, beam, tmp, seed=1):
    """One simulated cube through clover.predict; its metrics."""
    import clover
    import simulate_clover as sc
    dv = factor * clover.TEMPLATE_DV_KMS
    cube, vel, truth = sc.domain_cube(line, dv, sigma_kms, rng=np.random.default_rng(seed), beam_px=beam,
                                      v0=63.0 if line == "nh3" else 0.0)
    path = sc.write_cube_fits(Path(tmp) / "cube.fits", cube, vel, line, beam)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = clover.predict(path, nh3=(line == "nh3"), models=models, write=False, progress=False)
    row = {"line": line, "dv / trained": factor, "sigma (channels)": round(sigma_kms / dv, 2), "beam (px)": beam,
           "nchan": cube.shape[0], "resampled": res["domain"].resampled}
    row.update(sc.map_metrics(res["maps"], truth, dv))
    row["warnings"] = ",".join(sorted({w.category.__name__ for w in caught if issubclass(w.category, clover.CloverWarning)}))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="three bins of the grid (a smoke run; nothing written)")
    args = parser.parse_args(argv)
    import clover
    clover.setup_logging(quiet=True)
    if args.quick:
        gauss_bins = [(1.0, 2.0, 0.0), (2.0, 5.0, 2.0)]
        nh3_bins = [(2.0, 0.3, 2.0)]
    else:
        gauss_bins = [(f, s, b) for f in FACTORS for s in GAUSS_SIGMA_CH for b in BEAMS]
        nh3_bins = [(f, s, b) for f in FACTORS for s in NH3_SIGMA_KMS for b in BEAMS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = clover.CloverModels("gauss", nproc=args.nproc)
        for factor, sch, beam in gauss_bins:
            rows.append(run_bin("gauss", models, factor, sch * factor * clover.TEMPLATE_DV_KMS, beam, tmp))
        models = clover.CloverModels("nh3", nproc=args.nproc)
        for factor, sig, beam in nh3_bins:
            rows.append(run_bin("nh3", models, factor, sig, beam, tmp))
    columns = ["line", "dv / trained", "sigma (channels)", "beam (px)", "resampled", "class_accuracy", "mae_v_kms",
               "mae_v_channels", "mae_sigma_rel", "pull_std_v", "warnings"]
    for line in ("gauss", "nh3"):
        print("\n" + markdown_table([r for r in rows if r["line"] == line], columns))
    if args.quick:
        print("--quick: a smoke run, results/clover_domain.json not written")
        return 0
    path = write_results("clover_domain", rows, grid={"factors": FACTORS, "gauss_sigma_channels": GAUSS_SIGMA_CH,
                                                     "nh3_sigma_kms": NH3_SIGMA_KMS, "beams_px": BEAMS})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
