"""``make demo``: run every tool's demo on built-in simulated data into ``demo_output/``.

Each tool contributes one demo function that writes into ``<outdir>/<tool>/`` and
returns a short summary (a dict of what it made and what it measured).  A summary of
all demos is printed and written to ``<outdir>/summary.json``.  Tools whose demo is not
built yet are listed as pending with their issue number.

Usage::

    python tests/demo.py --outdir demo_output [--only faust_imaging] [--overwrite]
"""
import argparse
import importlib
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from simulate import import_casatools  # noqa: E402  (sets up offline CASA first)

log = logging.getLogger("demo")


def _plot_cube(fits_path, result, sim, png_path):
    """Channel map at the line peak and the spectrum of the compact source vs truth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    with fits.open(fits_path) as hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)   # CASA's DATE-OBS/OBSGEO notes
        data = np.squeeze(hdul[0].data)           # (nchan, ny, nx)
        wcs = WCS(hdul[0].header).celestial
    measured, truth = result["measured"], result["truth"]
    x, y = measured["peak_pixel"]
    chan = measured["peak_channel"]
    fig = plt.figure(figsize=(10, 4.2))
    ax = fig.add_subplot(1, 2, 1, projection=wcs)
    image = ax.imshow(data[chan] * 1e3, origin="lower", cmap="inferno")
    fig.colorbar(image, ax=ax, label="mJy/beam")
    ax.plot(x, y, "c+", ms=14, label="recovered peak")
    ax.set_title(f"channel {chan} (v = {sim.velocities[chan]:.2f})")
    ax.set_xlabel("RA (J2000)")
    ax.set_ylabel("Dec (J2000)")
    ax.legend(loc="lower left", fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    velocities = sim.velocities.to_value("km/s")
    ax2.step(velocities, data[:, y, x] * 1e3, where="mid", label="tclean cube, peak pixel")
    ax2.plot(velocities, sim.compact.spectrum(sim.velocities).to_value("Jy") * 1e3
             * (truth["peak_flux"].value / sim.compact.peak_flux.to_value("Jy")),
             "k--", label="injected (beam-diluted)")
    ax2.axhline(3e3 * measured["rms"].value, color="0.6", lw=0.8, label="3 x measured rms")
    ax2.set_xlabel("LSRK velocity (km/s)")
    ax2.set_ylabel("mJy/beam")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def demo_casa_smoke(outdir):
    """Simulate an ALMA-like line MS, clean it with tclean, compare with the truth."""
    from simulate import image_and_measure, simulate_alma_line_ms

    import_casatools(required=True)
    import casatasks

    sim = simulate_alma_line_ms(outdir / "sim_12m.ms", seed=42)
    result = image_and_measure(sim, outdir / "sim_12m_cube")
    fits_path = outdir / "sim_12m_cube.image.fits"
    casatasks.exportfits(imagename=str(result["image"]), fitsimage=str(fits_path),
                         velocity=True, overwrite=True)
    png_path = outdir / "sim_12m_cube.png"
    _plot_cube(fits_path, result, sim, png_path)
    measured, truth = result["measured"], result["truth"]
    offset_error = float(np.hypot(*(measured["offset"] - truth["offset"]).to_value("arcsec")))
    summary = {
        "ms": str(sim.ms_path), "cube": str(fits_path), "plot": str(png_path),
        "tclean_seconds": round(result["tclean_seconds"], 1),
        "position_error_arcsec": round(offset_error, 3),
        "line_channel": {"recovered": measured["peak_channel"], "injected": truth["peak_channel"]},
        "rms_mJy_per_beam": {"measured": round(float(measured["rms"].value) * 1e3, 3),
                             "expected": round(float(truth["rms"].value) * 1e3, 3)},
        "peak_mJy_per_beam": {"measured": round(float(measured["peak_flux"].value) * 1e3, 1),
                              "expected": round(float(truth["peak_flux"].value) * 1e3, 1)},
    }
    with open(outdir / "smoke_summary.json", "w") as stream:
        json.dump(summary, stream, indent=2)
    return summary


# tool -> (description, "module:function" that takes the output directory and returns a
# summary dict, or None while the tool has no demo yet, issue that builds it)
DEMOS = {
    "casa_smoke": ("CASA smoke run: simulated ALMA line MS -> tclean cube",
                   "demo:demo_casa_smoke", 3),
    "faust_imaging": ("simulated 12m MS -> FAUST pipeline cube, moments, QA",
                      "simulate_faust:run_demo", 4),
    "clover": ("Gaussian and NH3 cubes with 0/1/2-component regions -> class and velocity maps",
               "clover:run_demo", 5),
    "autospec": ("MUSE-like cube with a blended pair -> extracted spectra",
                 "simulate_autospec:run_demo", 6),
    "racs_pipeline": ("ASKAP-like field with injected transients -> crossmatch, candidates",
                      "simulate_racs:run_demo", 7),
    "racs_web": ("the review website on the RACS demo database -> screenshots",
                 "simulate_racs:run_web_demo", 13),
    "ir_blobs": ("simulated WFC3/IR frame + median stack -> blob tiles (CSV), PNG with blobs",
                 "ir_blobs:run_demo", 16),
}


def _demo_function(target):
    """Import ``module:function`` (test-side simulators or the tools themselves)."""
    module_name, _, function_name = target.partition(":")
    if module_name == "demo":
        return globals()[function_name]
    return getattr(importlib.import_module(module_name), function_name)


def run_demo(name, outdir, overwrite):
    """Run one tool's demo into ``outdir/name``; return its summary entry."""
    text, target_name, issue = DEMOS[name]
    if target_name is None:
        return {"status": "pending", "what": text, "issue": issue}
    target = outdir / name
    if target.exists():
        if not overwrite:
            return {"status": "skipped", "what": text,
                    "reason": f"{target} exists; use --overwrite to redo it"}
        shutil.rmtree(target)
    target.mkdir(parents=True)
    start = time.perf_counter()
    try:
        result = _demo_function(target_name)(target)
    except Exception as exc:  # one demo failing must not hide the others
        log.exception("demo %s failed", name)
        return {"status": "failed", "what": text, "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "what": text, "seconds": round(time.perf_counter() - start, 1),
            "result": result}


def _print_summary(summary):
    print("\nmake demo summary")
    print("=================")
    for name, entry in summary.items():
        print(f"{name:15s} {entry['status']:8s} {entry['what']}")
        if entry["status"] == "ok":
            for key, value in (entry["result"] or {}).items():
                print(f"{'':24s}{key}: {value}")
        elif entry["status"] == "pending":
            print(f"{'':24s}not built yet (issue #{entry['issue']})" if entry["issue"]
                  else f"{'':24s}not built yet")
        else:
            print(f"{'':24s}{entry.get('error') or entry.get('reason')}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", type=Path, default=Path("demo_output"))
    parser.add_argument("--only", choices=sorted(DEMOS), action="append",
                        help="run only this tool's demo (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo demos whose output directory exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    outdir = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    summary = {name: run_demo(name, outdir, args.overwrite) for name in (args.only or DEMOS)}
    tmp = outdir / ".summary.json.part"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(outdir / "summary.json")
    _print_summary(summary)
    return 1 if any(e["status"] == "failed" for e in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
