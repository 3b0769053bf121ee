"""Benchmark: ir_blobs predict and monitor speed on 2 CPU cores, vectorised vs looped scaling.

Measured on simulated 1024 x 1024 WFC3/IR-like frames (``ir_blobs.simulate_frame``):

* classification only: subframes per second of the shipped CNN (batch of 16 x N tiles),
  beside the original's architecture rebuilt in keras (conv 8 / conv 16 / flatten 65,536 ->
  dense 128; untrained weights, same input) for the side-by-side ratio;
* ``predict`` of one frame with its median stack (read, difference, background, scaling,
  16 tiles, localisation), without and with the PNG + CSV + JSON outputs;
* ``monitor`` of a directory of frames (median stacks built from the earlier frames);
* scaling: ``scale_data`` (vectorised) vs the original's per-pixel Python loop over the
  out-of-bound pixels (re-implemented here only as the reference);
* training time: read from the shipped model's metadata (``python ir_blobs.py train``).

    .venv/bin/python benchmarks/bench_ir_blobs.py [--frames 8] [--quick]

Writes ``benchmarks/results/ir_blobs.json`` and prints a Markdown table.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchutil import best_of, markdown_table, write_results  # noqa: E402


def original_architecture():
    """The original Classifier's layers in keras (for timing only; 8.4 M weights)."""
    import ir_blobs as ib
    keras = ib._import_keras()
    layers = keras.layers
    inputs = keras.Input((256, 256, 1))
    x = layers.Conv2D(8, 5, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(16, 5, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(0.15)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, layers.Dense(2)(x))


def looped_scale(data, factor, limits, border=10):
    """The original's scaling: a Python loop over the out-of-bound pixels (reference only)."""
    data = np.array(data, dtype=np.float64)
    med = np.nanmedian(data)
    data[~np.isfinite(data)] = med
    lo, hi = factor * limits[0], factor * limits[1]
    n = data.shape[0]
    for y, x in zip(*np.nonzero((data < lo) | (data > hi))):
        if y < border or x < border or y > n - border - 1 or x > n - border - 1:
            data[y, x] = med
        else:
            data[y, x] = lo if data[y, x] < lo else hi
    return (data - data.mean()) / data.std()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20,
                        help="frames in the monitor directory (the first Data.min_stack = 10 have no stack)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not a measurement)")
    args = parser.parse_args(argv)
    import ir_blobs as ib
    n_frames = 4 if args.quick else args.frames
    data = {"min_stack": 2} if args.quick else None
    repeat = 1 if args.quick else 3
    model = ib.BlobModel(threads=2)
    rng = np.random.default_rng(7)
    rows = []
    sims = [ib.simulate_frame(rng, n_blobs=4) for _ in range(2 if args.quick else 8)]
    scaled = [ib.scale_data(ib.subtract_background(s["difference"]), mode="sigma")[0] for s in sims]
    tiles = np.concatenate([ib.extract_tiles(s)[0] for s in scaled])
    model.predict(tiles[:16])                                           # warm-up
    t_ours, _ = best_of(lambda: model.predict(tiles), repeat)
    orig = original_architecture()
    orig.predict(tiles[:16, ..., None], verbose=0)
    t_orig, _ = best_of(lambda: orig.predict(tiles[..., None], batch_size=64, verbose=0), repeat)
    rows.append(dict(step="classify subframes (CNN only)", n=len(tiles), seconds=t_ours,
                     rate=len(tiles) / t_ours, unit="subframes/s", reference=len(tiles) / t_orig,
                     ratio=t_orig / t_ours, note="reference: the original's architecture in keras"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cur = ib.write_frame(tmp / "f_flt.fits", sims[0]["current"])
        stack = ib.write_frame(tmp / "stack.fits", sims[0]["stack"])
        ib.predict(cur, stack, write=False)
        t_pred, _ = best_of(lambda: ib.predict(cur, stack, write=False), repeat)
        rows.append(dict(step="predict one 1024 frame + median stack (no outputs)", n=16, seconds=t_pred,
                         rate=16 / t_pred, unit="subframes/s"))
        out = tmp / "out"
        t_write, _ = best_of(lambda: ib.predict(cur, stack, outdir=out, overwrite=True), repeat)
        rows.append(dict(step="predict + CSV/JSON/PNG outputs", n=16, seconds=t_write, rate=16 / t_write,
                         unit="subframes/s"))
        frames = tmp / "frames"
        frames.mkdir()
        for i in range(n_frames):
            s = ib.simulate_frame(rng, n_blobs=1 if i == n_frames - 1 else 0, level=900.0)
            ib.write_frame(frames / ("m%03d_flt.fits" % i), s["current"], mjd=60000.0 + i)
        t0 = time.perf_counter()
        res = ib.monitor(frames, tmp / "log.csv", data_settings=data)
        t_mon = time.perf_counter() - t0
        n_done = len(res["processed"]) + len(res["no_stack"])
        rows.append(dict(step="monitor (median stack of the earlier frames)", n=n_done, seconds=t_mon,
                         rate=len(res["processed"]) / t_mon, unit="frames/s",
                         note="%d processed, %d without a stack (first %d)" % (len(res["processed"]),
                                                                           len(res["no_stack"]),
                                                                           len(res["no_stack"]))))
    diff = ib.subtract_background(sims[0]["difference"])
    limits = ib.zscale_limits(diff)
    t_vec, _ = best_of(lambda: ib.scale_data(diff, 0.5, limits=limits, mode="zscale"), repeat)
    t_loop, _ = best_of(lambda: looped_scale(diff, 0.5, limits), 1)
    rows.append(dict(step="scale_data 1024 frame (zscale rule)", n=1, seconds=t_vec, rate=1 / t_vec,
                     unit="frames/s", reference=1 / t_loop, ratio=t_loop / t_vec,
                     note="reference: the original's per-pixel loop"))
    meta = model.meta
    rows.append(dict(step="train (shipped model, %d + %d subframes, %d epochs run)"
                     % (meta["settings"]["n_train"], meta["settings"]["n_val"], meta["epochs_run"]),
                     n=meta["settings"]["n_train"], seconds=meta["seconds"]["total"],
                     rate=meta["settings"]["n_train"] * meta["epochs_run"] / meta["seconds"]["fit"],
                     unit="subframe-epochs/s", note="%s threads; from ir_blobs_model.json" % meta["threads"]))
    print(markdown_table(rows, ["step", "n", "seconds", "rate", "unit", "reference", "ratio", "note"]))
    if not args.quick:
        path = write_results("ir_blobs", rows, threads=2, n_parameters=meta["n_parameters"],
                             original_parameters=int(orig.count_params()))
        print("wrote", path)
    else:
        print("--quick: a smoke run, results/ir_blobs.json not written")
        print(json.dumps({"quick": True, "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
