"""Write and post-process a CASA cube larger than a memory limit (tests/test_faust_imaging.py).

``python faust_bigcube.py make DIR NX NCHAN`` writes DIR/big.image / .residual / .pb / .mask
plane by plane (a compact Gaussian line source of known peak on noise, per-plane beams that
grow with channel, a Gaussian primary beam); ``python faust_bigcube.py post DIR LIMIT_MB``
sets RLIMIT_AS to the address space in use plus LIMIT_MB and runs the post-processing chain
(residual check, pbcor, common beam, FITS export, QA summary, moments), printing a JSON
summary with the peak resident memory; ``control DIR LIMIT_MB`` shows that reading the whole
cube at once fails under the same limit.
"""
import importlib
import json
import resource
import sys
from pathlib import Path

import numpy as np

RMS = 0.01          # Jy/beam
PEAK = 0.5          # Jy/beam line peak at the centre channel
VSYS = 5.0          # km/s


def _vm_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1])
    return 0


def make(out_dir, nx, nchan):
    import casatools
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cs = casatools.coordsys()
    csys = cs.newcoordsys(direction=True, spectral=True, stokes=["I"])
    csys.setreferencecode("J2000", "direction")
    csys.setunits(["rad", "rad"], "direction")
    csys.setincrement([-0.2 / 206264.806, 0.2 / 206264.806], "direction")
    csys.setreferencepixel([nx / 2, nx / 2], "direction")
    csys.setreferencevalue([1.0, -0.5], "direction")
    csys.setrestfrequency(230.538e9)
    csys.setreferencevalue([230.538e9 * (1 - VSYS / 299792.458)], "spectral")
    csys.setreferencepixel([nchan // 2], "spectral")
    csys.setincrement([-0.1 / 299792.458 * 230.538e9], "spectral")   # 0.1 km/s channels
    rng = np.random.default_rng(1)
    x = np.arange(nx) - nx / 2
    r2 = x[:, None] ** 2 + x[None, :] ** 2
    pb = np.exp(-4 * np.log(2) * r2 / (0.9 * nx) ** 2).astype(np.float32)
    source = np.exp(-4 * np.log(2) * r2 / 5.0 ** 2)
    ia = casatools.image()
    for ext in ("image", "residual", "pb", "mask"):
        ia.fromshape(outfile=str(out_dir / ("big." + ext)), shape=[nx, nx, 1, nchan], csys=csys.torecord(),
                     overwrite=True)
        if ext in ("image", "residual"):
            ia.setbrightnessunit("Jy/beam")
            for ix in range(nchan):
                major = 1.0 + 0.2 * ix / nchan
                ia.setrestoringbeam(major="%garcsec" % major, minor="%garcsec" % (0.8 * major), pa="20deg",
                                    channel=ix, polarization=0)
        for ix in range(nchan):
            line = PEAK * np.exp(-0.5 * ((ix - nchan // 2) / 4.0) ** 2)
            if ext == "pb":
                plane = pb
            elif ext == "mask":
                plane = (source * line > 3 * RMS).astype(np.float32)
            else:
                noise = rng.normal(0.0, RMS, (nx, nx)).astype(np.float32)
                plane = noise + (source * line * pb).astype(np.float32) if ext == "image" else noise
            ia.putchunk(pixels=plane.reshape(nx, nx, 1, 1), blc=[0, 0, 0, ix])
        if ext == "pb":
            ia.calcmask('"%s" > 0.2' % str(out_dir / "big.pb"), name="mask0")
        ia.close()
    ia.done()
    cs.done()
    csys.done()


def _limit_address_space(limit_mb):
    limit = _vm_kb() * 1024 + int(limit_mb) * 1024 ** 2
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


def control(out_dir, limit_mb):
    """The control: reading the whole cube at once must fail under the same limit."""
    importlib.import_module("casatools")       # the libraries are mapped before the limit
    import faust_imaging as fi
    base = str(Path(out_dir) / "big")
    with fi.ImageManager(base + ".pb") as ia:
        ia.shape()
    _limit_address_space(limit_mb)
    try:
        fi._read_cube(base + ".image")
    except MemoryError:
        print(json.dumps({"control": "MemoryError"}))
        return
    print(json.dumps({"control": "read"}))


def post(out_dir, limit_mb):
    importlib.import_module("casatools")       # the libraries are mapped before the limit
    import faust_imaging as fi
    out_dir = Path(out_dir)
    base = str(out_dir / "big")
    with fi.ImageManager(base + ".pb") as ia:       # touch CASA once before the limit
        ia.shape()
    limit = _limit_address_space(limit_mb)
    residual = fi.check_max_residual(base)
    fi.primary_beam_correct(base)
    beam = fi.common_beam_of_image(base + ".image")
    for ext in (".image", ".image.pbcor"):
        common = fi.smooth_cube_to_common_beam(base + ext, beam=beam)
        fi.copy_pb_mask(common, base + ".pb")
    fi.export_fits(base + ".image.pbcor.common")
    qa = fi.make_qa_summary(base, residual_check=residual)
    cfg = fi.get_config(None, Paths__PROD_DIR=str(out_dir))
    maps = fi.MomentMapper(base + ".image.common", VSYS, vwin=1.0, out_dir=out_dir / "moments",
                           config=cfg).make_moments()
    from astropy.io import fits
    peak_max = float(np.nanmax(fits.getdata(maps["max"])))
    print(json.dumps({"limit_mb_above_start": int(limit_mb), "vm_start_mb": (limit - int(limit_mb) * 1024 ** 2) / 1024 ** 2,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rms": qa["rms_jy_beam"], "residual_rms": residual["rms"], "peak": qa["peak_jy_beam"],
                      "mom_max_peak": peak_max, "nchan": qa["nchan"]}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "control":
        control(sys.argv[2], sys.argv[3])
    else:
        post(sys.argv[2], sys.argv[3])
