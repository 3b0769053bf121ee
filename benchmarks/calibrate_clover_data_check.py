"""Calibration of clover's model-selection rule (``clover.DATA_CHECK``) on simulated spectra.

The number of components is ``argmax_k softmax[(-BIC_k / 2 + w ln P_k) / T]`` with the
BIC of zero-, one- and two-component fits and ``P_k`` the ensemble's probabilities
(:func:`clover.select_components`).  This script fits every spectrum of a simulated set
once (its own seed, not the training or test seeds), then scans the network weight
``w`` and the temperature ``T``: for each it reports the accuracy per class (peak S/N >=
4), the mean log loss of the true class and the expected calibration error (ECE: the
count-weighted mean |fraction correct - mean prob| over probability bins) - the
numbers behind the shipped ``network_weight`` and ``temperature``.

    .venv/bin/python benchmarks/calibrate_clover_data_check.py [--n 3000] [--seed 555] [--quick]

Writes ``benchmarks/results/clover_data_check.json`` and prints Markdown tables.  ``--quick`` is a
smoke run (60 Gaussian and 30 NH3 spectra) whose numbers are not written.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchutil import markdown_table, write_results  # noqa: E402

WEIGHTS = (0.0, 0.5, 1.0, 2.0)
TEMPERATURES = (1.0, 2.0, 3.0, 4.0, 6.0)


def fitted_set(line, n, seed, nproc):
    """Simulated spectra, network output and the fits of check_against_data."""
    import clover
    models = clover.CloverModels(line, nproc=nproc)
    sim = clover.LINE_TYPES[line]["simulate"](n, np.random.default_rng(seed))
    res = clover.predict_spectra(sim["x"], models)
    vel = clover.gaussian_template_axis() if line == "gauss" else clover.nh3_template_axis()[1]
    net = clover._network_physical(res, sim["tmax"], vel, models.nchan)
    spectra = sim["x"][:, :, 0].astype(np.float64) * sim["tmax"][:, None]
    return sim, res, clover.check_against_data(spectra, vel, net, line)


def score(sim, res, check, weight, temperature):
    """Accuracy per class (S/N >= 4), log loss and ECE of one setting."""
    import clover
    ncomp, prob, _ = clover.select_components(check, res["probs"], {"network_weight": weight,
                                                                    "temperature": temperature})
    truth = np.choose(sim["label"].astype(int), [1, 0, 2])
    snr = np.where(truth == 2, sim["snr_min"], sim["snr"])
    high = (snr >= 4) | (truth == 0)
    row = {"w": weight, "T": temperature}
    for name, k in (("noise", 0), ("one", 1), ("two", 2)):
        sel = high & (truth == k)
        row["acc " + name] = float((ncomp[sel] == k).mean())
    correct = ncomp == truth
    p_true = np.where(correct, prob, (1 - prob) / 2)
    row["log loss"] = float(-np.mean(np.log(np.clip(p_true, 1e-12, 1))))
    curve = clover.calibration_curve(prob, correct)
    row["ECE"] = float(sum(c * abs(f - p) for p, f, c in curve.values()) / len(prob))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="spectra per line type (NH3: half)")
    parser.add_argument("--seed", type=int, default=555)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="60 + 30 spectra (a smoke run; nothing written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = 60
    out = {}
    for line, n in (("gauss", args.n), ("nh3", args.n // 2)):
        sim, res, check = fitted_set(line, n // 3 * 3, args.seed, args.nproc)
        rows = [score(sim, res, check, w, t) for w in WEIGHTS for t in TEMPERATURES]
        print("\n%s (%d spectra)\n" % (line, n))
        print(markdown_table(rows, ["w", "T", "acc noise", "acc one", "acc two", "log loss", "ECE"]))
        out[line] = rows
    if args.quick:
        print("--quick: a smoke run, results/clover_data_check.json not written")
        return 0
    path = write_results("clover_data_check", out, n=args.n, seed=args.seed)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
