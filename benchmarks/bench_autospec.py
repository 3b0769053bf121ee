"""Benchmark: AutoSpec objects per second, ours (nproc 1 and 2) vs a per-object mpdaf loop.

Cube: >= 200 x 200 spaxels x 1000 channels (4750-6000 A) with >= 200 catalogue objects,
from tests/simulate_autospec.py (``benchmark_scene``).  Both methods do the same
extractions per object and write one mpdaf Source file each (no plots):

* **mpdaf loop** (the original's approach): ``Source.from_data``, ``add_white_image``,
  ``sep`` on the white-light stamp (standing in for the SExtractor binary), sky / union /
  intersection masks (``find_*_mask``), ``extract_spectra`` (mask sum, white-light
  weighted, APER apertures, sky subtraction), continuum subtraction of the sub-cube with
  ``numpy.polyfit`` over all spaxels and of the reference with ``Spectrum.poly_spec``,
  cross-correlation images by cube arithmetic and ``compute_optimal_spectrum`` with
  them (raw, continuum-subtracted, one iteration), ``Source.write``.
* **ours**: ``autospec.run`` (vectorised per-stamp numpy, field segmented once, forked
  workers); it also extracts the Horne optimal spectrum and writes the summary + MARZ.

The mpdaf loop runs on the first ``--baseline-objects`` objects (default 40) and its rate
is per object; ours runs on all of them.  Rates are given end to end (reading the cube,
white light and segmentation included) and for the per-object part alone.  Also prints the S/N of each extraction
(median over objects, from the propagated variance).

Run: ``.venv/bin/python benchmarks/bench_autospec.py [--quick]``; ``--quick`` is a smoke run
(an 80 x 80 x 200 cube, 9 objects, one repeat, 3 objects in the mpdaf loop) whose numbers mean
little and are not written.
"""
import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(ROOT / "tests"), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import autospec  # noqa: E402
import simulate_autospec as sim  # noqa: E402
from benchutil import best_of, markdown_table, write_results  # noqa: E402

APER = [1.0, 2.0]
SIZE = 5.0


def make_inputs(directory, quick=False):
    """Simulate the benchmark cube and catalogue (cached in ``directory``)."""
    directory = Path(directory)
    if quick:
        scene = sim.benchmark_scene(nx=80, ny=80, nwave=200, nobj=9)
    else:
        scene = sim.benchmark_scene(nx=200, ny=200, nwave=1000, nobj=210)
    cube = directory / "cube.fits"
    start = time.perf_counter()
    files = sim.write_scene(scene, directory)
    print("simulated %s (%d objects) in %.1fs" % (cube, len(scene.galaxies),
                                                  time.perf_counter() - start))
    return scene, files


# ---------------------------------------------------------------------------
# The original's approach: a per-object loop over mpdaf calls
# ---------------------------------------------------------------------------
def _sep_segmentation(image):
    import sep
    data = np.ascontiguousarray(image.data.filled(0), dtype=np.float64)
    bkg = sep.Background(data, bw=16, bh=16)
    _, seg = sep.extract(data - bkg.back(), 1.5, err=bkg.globalrms, minarea=5,
                         deblend_cont=0.005, segmentation_map=True)
    return seg


def mpdaf_object(cube, ident, ra, dec, outdir, poly=5):
    """One object the way the original did it, with mpdaf calls."""
    import astropy.units as u
    from mpdaf.obj import Image
    from mpdaf.sdetect import Source
    from mpdaf.sdetect.sea import compute_optimal_spectrum
    src = Source.from_data(ident, ra, dec, ("bench", "0", "cube", ""))
    src.add_white_image(cube, size=SIZE)
    white = src.images["MUSE_WHITE"]
    src.images["SEG_MUSE_WHITE"] = Image(wcs=white.wcs, data=_sep_segmentation(white))
    tags = ["SEG_MUSE_WHITE"]
    src.find_sky_mask(tags)
    src.find_union_mask(tags)
    src.find_intersection_mask(tags)
    mask_name = "MASK_INTER" if src.images["MASK_INTER"].data.sum() > 0 else "MASK_UNION"
    if src.images[mask_name].data.sum() == 0:
        raise ValueError("empty segmentation")
    src.extract_spectra(cube, obj_mask=mask_name, sky_mask="MASK_SKY",
                        tags_to_try=["MUSE_WHITE"], apertures=APER, skysub=True)
    sub = cube.subcube(center=(dec, ra), size=SIZE, unit_center=u.deg, unit_size=u.arcsec)
    sky = src.spectra["MUSE_SKY"]
    sub = sub - sky
    data = sub.data.filled(0).reshape(sub.shape[0], -1)
    chan = np.arange(sub.shape[0])
    coeffs = np.polyfit(chan, data, poly)
    cont = np.vander(chan, poly + 1) @ coeffs
    contsub = sub.clone(data_init=np.empty)
    contsub.data = (data - cont).reshape(sub.shape)
    contsub.var = sub.var
    ref = src.spectra["MUSE_WHITE_SKYSUB"]
    ref_cs = ref - ref.poly_spec(poly)
    mask = src.images[mask_name].data.filled(0)
    ima = (sub * ref.data.filled(0)[:, None, None]).sum(axis=0)
    src.images["CROSS_CORRELATION"] = ima
    src.spectra["CROSS_CORRELATION_SKYSUB"] = compute_optimal_spectrum(
        sub, mask, np.clip(ima.data.filled(0), 0, None))
    current = ref_cs
    for iteration in range(2):
        ima = (contsub * current.data.filled(0)[:, None, None]).sum(axis=0)
        name = "CROSS_CORRELATION_CONTSUB" if iteration == 0 else "CROSS_CORRELATION_ITER"
        src.images[name] = ima
        spec = compute_optimal_spectrum(sub, mask, np.clip(ima.data.filled(0), 0, None))
        src.spectra[name + "_SKYSUB"] = spec
        current = spec - spec.poly_spec(poly)
    src.write(str(Path(outdir) / ("mpdaf_%d.fits" % ident)))
    return src


def run_mpdaf_loop(files, rows, outdir):
    """Read the cube with mpdaf, then loop over the objects; returns per-object S/N."""
    from mpdaf.obj import Cube
    Path(outdir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cube = Cube(str(files["cube"]))
    cube.data  # noqa: B018  (load the data once, as the original did on opening)
    setup = time.perf_counter() - start
    snr = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row in rows:
            try:
                src = mpdaf_object(cube, row.ID, row.RA, row.DEC, outdir)
            except (ValueError, IndexError) as exc:
                print("mpdaf loop: %s failed: %s" % (row.ID, exc))
                continue
            snr[row.ID] = {name: autospec.integrated_snr(s.data.filled(np.nan), s.var.filled(np.nan))
                           for name, s in src.spectra.items() if s.var is not None}
    return snr, setup


def run_ours(files, outdir, nproc):
    if Path(outdir).exists():
        shutil.rmtree(outdir)
    return autospec.run(DATACUBE=files["cube"], CATALOG=files["catalogue"], APER=APER,
                        SIZE=SIZE, OUTPUT=outdir, PLOTS=False, nproc=nproc, overwrite=True,
                        progress=False)


def snr_table(ours_rows, mpdaf_snr):
    """Median S/N, over the objects both methods extracted, of every extraction."""
    names = sorted({k[3:] for r in ours_rows for k in r if k.startswith("SN_")})
    rows = []
    for name in names:
        values = [r.get("SN_" + name) for r in ours_rows
                  if r["STATUS"] in ("ok", "fallback") and r["ID"] in mpdaf_snr]
        values = np.array([v for v in values if v is not None and np.isfinite(v)])
        theirs = np.array([s[name] for s in mpdaf_snr.values() if name in s])
        rows.append({"spectrum": name, "ours median S/N": float(np.median(values)) if values.size else "",
                     "mpdaf loop median S/N": float(np.median(theirs)) if theirs.size else ""})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny cube, one repeat (a smoke run; results/autospec.json not written)")
    parser.add_argument("--baseline-objects", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", help="keep inputs/outputs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.baseline_objects = 1, min(args.baseline_objects, 3)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_autospec_"))
    scene, files = make_inputs(workdir, args.quick)
    rows = autospec.read_catalogue(files["catalogue"])
    nobj = len(rows)
    table, results = [], {}
    for nproc in (1, 2):
        seconds, result = best_of(lambda: run_ours(files, workdir / ("ours%d" % nproc), nproc),
                                  repeat=args.repeat)
        results[nproc] = result
        table.append({"method": "autospec.run nproc=%d" % nproc, "objects": nobj,
                      "seconds": seconds, "setup s": result["setup_s"],
                      "objects/s (end to end)": nobj / seconds,
                      "objects/s (per-object part)": nobj / result["objects_s"]})
        print(table[-1])
    subset = rows[:args.baseline_objects]
    start = time.perf_counter()
    mpdaf_snr, setup = run_mpdaf_loop(files, subset, workdir / "mpdaf")
    seconds = time.perf_counter() - start
    table.append({"method": "per-object mpdaf loop", "objects": len(subset), "seconds": seconds,
                  "setup s": setup, "objects/s (end to end)": len(subset) / seconds,
                  "objects/s (per-object part)": len(subset) / (seconds - setup)})
    base = table[-1]
    for row in table:
        row["speed-up (end to end)"] = row["objects/s (end to end)"] / base["objects/s (end to end)"]
        row["speed-up (per object)"] = (row["objects/s (per-object part)"]
                                        / base["objects/s (per-object part)"])
    shape = "%d x %d x %d" % (scene.nx, scene.ny, scene.nwave)
    print("\nCube %s, %d objects, SIZE %.0f\", APER %s\n" % (shape, nobj, SIZE, APER))
    print(markdown_table(table, ["method", "objects", "seconds", "setup s", "objects/s (end to end)",
                                 "objects/s (per-object part)", "speed-up (end to end)",
                                 "speed-up (per object)"]))
    snr = snr_table(results[1]["rows"], mpdaf_snr)
    print()
    print(markdown_table(snr, ["spectrum", "ours median S/N", "mpdaf loop median S/N"]))
    if args.quick:
        print("\n--quick: a smoke run, results/autospec.json not written")
    else:
        print("\nwrote", write_results("autospec", table, cube=shape, n_objects=nobj, snr=snr, quick=False))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
