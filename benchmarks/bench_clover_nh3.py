"""Benchmark: clover NH3 (1,1) classification - networks alone vs settled by NH3 model fits.

Simulated spectra from the NH3 training ranges (a fresh seed; thirds noise / one / two
components, 3x3 neighbourhoods with the training set's gradients) are classified three
ways, side by side in one run:

* ``networks``: the 6-member ensemble alone (``refine=False``; the original's method);
* ``+ central fits``: pixels with uncertain one/two odds settled by one- and
  two-component NH3 slab fits of the central spectrum only;
* ``+ 3x3 fits`` (the default of ``clover.predict``): the same with the 8 neighbours
  fitted too, their chi^2 differences summed.

Reported: spectra per second (best of 2; TensorFlow on --nproc threads, fits on one core) and the
accuracy per class at peak S/N >= 4 (two components: the weaker one's S/N).

    .venv/bin/python benchmarks/bench_clover_nh3.py [--n 3000] [--seed 4243]

Writes ``benchmarks/results/clover_nh3.json`` and prints a Markdown table.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchutil import best_of, markdown_table, write_results  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=4243)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    import clover
    sim = clover.simulate_nh3(args.n, np.random.default_rng(args.seed), windows=True)
    models = clover.CloverModels("nh3", nproc=args.nproc)
    clover.predict_spectra(sim["x"][:64], models, refine=False)            # warm-up (graph tracing)
    near = clover.simulated_neighbours(sim)
    label = sim["label"].astype(int)
    snr = np.where(label == clover.CLASS_CODES["two"], sim["snr_min"], sim["snr"])
    runs = [("networks (refine=False)", {"refine": False}),
            ("+ central-spectrum fits", {"refine": True}),
            ("+ 3x3 fits (default)", {"refine": True, "neighbours": near})]
    rows = []
    for name, kwargs in runs:
        seconds, res = best_of(lambda: clover.predict_spectra(sim["x"], models, **kwargs), repeat=2)
        row = {"method": name, "spectra_per_s": args.n / seconds, "fitted": float(res["settled"].mean())}
        for cls, code in clover.CLASS_CODES.items():
            sel = (label == code) & ((snr >= 4) | (code == clover.CLASS_CODES["noise"]))
            row[cls] = float((res["class"][sel] == code).mean())
        rows.append(row)
    base = rows[0]["spectra_per_s"]
    for row in rows:
        row["slowdown"] = base / row["spectra_per_s"]
    columns = ["method", "spectra_per_s", "slowdown", "fitted", "one", "noise", "two"]
    print(markdown_table(rows, columns))
    path = write_results("clover_nh3", rows, n=args.n, seed=args.seed, nproc=args.nproc)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
