"""Why this CNN: architecture variants and a matched-filter baseline trained and scored alike.

Every variant is trained on the same simulated subframes (``--n-train``, default 6000, and
1000 validation, seed 12345 as the shipped model's data) for at most ``--epochs`` (default
8, early stopping), its threshold set at the validation set's best F1, then scored on the
same fresh frame-level test set as ``ir_blobs evaluate`` (seed 4242, 30 frames, blobs of
1-30 % depth).  The matched-filter baseline flags a tile when the largest compensated-disc
S/N in it passes a threshold chosen the same way.  Reported: weights, precision and recall
for blobs of depth >= 10 %, faint-blob (< 10 %) recall, ROC AUC, training time and
classification speed on 2 CPU threads.

    .venv/bin/python benchmarks/bench_ir_blobs_models.py [--n-train 6000] [--epochs 8] [--quick]

Writes ``benchmarks/results/ir_blobs_models.json`` and prints a Markdown table.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchutil import markdown_table, write_results  # noqa: E402
from bench_ir_blobs import original_architecture  # noqa: E402

VARIANTS = {
    "shipped: avgpool 2, conv 8-16-32-32, global max": dict(),
    "no input pooling": dict(pool=1),
    "half the filters (4-8-16-16)": dict(filters=(4, 8, 16, 16)),
    "three convs (8-16-32)": dict(filters=(8, 16, 32), kernels=(5, 3, 3)),
}


def _score(labels, ambiguous, depth, prob, thr):
    import ir_blobs as ib
    from sklearn.metrics import roc_auc_score
    lab = labels.astype(bool)
    ok = ~ambiguous
    bright = lab & (depth >= 0.1)
    sel = ok & (~lab | bright)
    m = ib._binary_metrics(lab[sel], prob[sel] >= thr)
    faint = lab & (depth < 0.1)
    return dict(precision=m["precision"], recall=m["recall"], false_pos=m["fp"],
                faint_recall=float((prob[faint] >= thr).mean()), auc=float(roc_auc_score(lab[ok], prob[ok])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not a measurement)")
    args = parser.parse_args(argv)
    import ir_blobs as ib
    n_train, n_val, epochs = (64, 32, 1) if args.quick else (args.n_train, 1000, args.epochs)
    n_frames, n_test = (1, 2) if args.quick else (24, 30)
    keras = ib._import_keras(2)
    lib = ib.synthetic_blob_library(600, seed=12345, radius_range=ib.TRAIN_RADII)
    train_frames = ib.simulated_frames(n_frames, 12345)
    val_frames = ib.simulated_frames(max(n_frames // 2, 1), 12346)
    tr = ib.make_dataset(train_frames, n_train, 12347, library=lib)
    va = ib.make_dataset(val_frames, n_val, 12348, library=lib)
    test_frames = ib.simulated_frames(n_test, 4242, n_blobs=6, depth_range=(0.01, 0.3))
    te = ib.frame_tile_set(test_frames)
    depth = np.nan_to_num(te["blob_depth"])
    rows = []
    builders = {name: (lambda kw=kw: ib.build_model(**kw)) for name, kw in VARIANTS.items()}
    builders["the original's layers (flatten -> dense 128)"] = lambda: _original_binary(keras)
    for name, build in builders.items():
        keras.utils.set_random_seed(12345)
        model = build()
        model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-5), loss="binary_crossentropy")
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)
        t0 = time.perf_counter()
        hist = model.fit(tr["images"][..., None], tr["labels"].astype("float32"), batch_size=32, epochs=epochs,
                         validation_data=(va["images"][..., None], va["labels"].astype("float32")), verbose=0,
                         callbacks=[stop])
        t_fit = time.perf_counter() - t0
        pv = model.predict(va["images"][..., None], batch_size=64, verbose=0)[:, 0]
        thr = ib._threshold_from_validation(va["labels"], pv)
        t1 = time.perf_counter()
        pt = model.predict(te["images"][..., None], batch_size=64, verbose=0)[:, 0]
        t_pred = time.perf_counter() - t1
        rows.append(dict(model=name, weights=int(model.count_params()), threshold=thr,
                         epochs=len(hist.history["loss"]), train_s=t_fit, subframes_per_s=len(pt) / t_pred,
                         **_score(te["labels"], te["ambiguous"], depth, pt, thr)))
        print(rows[-1], flush=True)
    # matched-filter baseline: the tile's largest compensated-disc S/N
    radii = ib._section_defaults("Predict")["radii"]
    sv = np.array([ib.matched_filter(t, radii)[0].max() for t in va["images"]])
    thr_snr = max(((s, ib._binary_metrics(va["labels"], sv >= s)["f1"]) for s in np.arange(3, 30, 0.25)),
                  key=lambda x: x[1])[0]
    t1 = time.perf_counter()
    st = np.array([ib.matched_filter(t, radii)[0].max() for t in te["images"]])
    t_pred = time.perf_counter() - t1
    score = st / (2 * thr_snr)                      # monotone; only the threshold matters
    rows.append(dict(model="matched filter only (max S/N in the tile)", weights=0, threshold=float(thr_snr),
                     epochs=0, train_s=0.0, subframes_per_s=len(st) / t_pred,
                     **_score(te["labels"], te["ambiguous"], depth, score, 0.5)))
    cols = ["model", "weights", "precision", "recall", "false_pos", "faint_recall", "auc", "threshold", "epochs",
            "train_s", "subframes_per_s"]
    print(markdown_table(rows, cols))
    if args.quick:
        print("--quick: a smoke run, results/ir_blobs_models.json not written")
    else:
        print("wrote", write_results("ir_blobs_models", rows, n_train=n_train, n_val=n_val, epochs=epochs,
                                     test_tiles=int(len(te["labels"])), test_seed=4242))
    return 0


def _original_binary(keras):
    """The original's layers with a sigmoid output (the same loss as the others)."""
    base = original_architecture()
    out = keras.layers.Dense(1, activation="sigmoid")(base.layers[-2].output)
    return keras.Model(base.input, out)


if __name__ == "__main__":
    sys.exit(main())
