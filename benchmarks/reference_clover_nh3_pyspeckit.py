"""Reference NH3 fits of the real G23.481 cutout with pyspeckit's ammonia model.

Fits every pixel of the observed NH3 (1,1) cube ``tests/data/nh3/ammonia_11_cutout.fits``
(20 x 20 pixels, 380 VRAD channels of 158 m/s, K) with pyspeckit's ``cold_ammonia`` model,
the way a careful user of a fitting package would, and writes a small reference table
against which clover's NH3 classification and parameters can be compared.

Per pixel (numpy indices ``[y, x]`` of the cube, 0-based):

* the noise is the robust rms (1.4826 x MAD) of the line-free channels: those outside
  ``vwin`` (default 60.5-67.5 km/s) shifted by every hyperfine offset of the line, so the
  satellite groups at about -19.5, -7.5, +7.4 and +19.5 km/s are excluded as well;
* (1,1) alone: one- and two-component fits with ``tkin`` fixed (default 15 K) and
  ``fortho = 0``; free ``tex`` (2.75 K .. tkin), ``ntot`` (log10 cm^-2, 12..17), ``width``
  (Gaussian sigma, 0.05..3 km/s) and ``xoff_v`` (inside ``vwin``). Several starting
  guesses each (three for one component, three for two: the components near 63.0 and
  65.1 km/s, the one-component solution split by +-1 sigma, and the one-component
  solution plus a second component at the other velocity); the lowest chi^2 is kept;
* the number of components (0, 1 or 2) is chosen by BIC = chi^2 + k ln n with chi^2 on the
  n fitted channels using the noise, k = 0, 4, 8 free parameters (0 = a zero model);
* (1,1) + (2,2) jointly (``pyspeckit.Spectra`` concatenation on a GHz axis) for one and two
  components, started from the (1,1)-only solutions, with free ``tkin`` (5..40 K);
  ``tex <= tkin`` is enforced: a start whose fit ends with ``tex > tkin`` is refitted with
  that component's ``tex`` tied to its ``tkin`` (the constrained optimum on the boundary).

Parameter errors are those pyspeckit reports (mpfit's ``perror`` from the covariance
matrix with the given noise); they are *not* scaled by the reduced chi^2. The 1-D spectrum
``tests/data/nh3/test_spectrum_11.fits`` (FREQ axis, no BUNIT, a different source:
G28.539) is fitted the same way (no (2,2), no joint fit) with the velocity window centred
on its brightest channel.

Outputs (no network access is needed or used)::

    tests/data/nh3/g23_pyspeckit_reference.ecsv       one row per pixel
    tests/data/nh3/test_spectrum_11_pyspeckit.ecsv    one row for the 1-D spectrum
    benchmarks/results/pyspeckit_nh3_reference.json   fit speed

Usage::

    .venv/bin/python benchmarks/reference_clover_nh3_pyspeckit.py [--nproc 2]
        [--check-plot /tmp/ref_check.png] [--max-pixels N] [--quick]

``--quick`` is a smoke run: the first 2 pixels (``--max-pixels``) and the 1-D spectrum, the
tables written to a temporary folder that is then removed, the speed JSON not written (the
stored reference tables and benchmarks/results stay as they are).

Notes
-----
pyspeckit details this script relies on (checked against the installed 1.0.4 source,
``pyspeckit/spectrum/models/ammonia.py``): ``cold_ammonia_model`` has the parameters
``tkin, tex, ntot, width, xoff_v, fortho``; ``ntot`` is log10 of the total column
(5..25 or the model raises); ``width`` is the Gaussian sigma in km/s; ``xoff_v`` is the
radio velocity of the line with respect to pyspeckit's rest frequency of each transition.
The model is evaluated on a GHz axis (an axis in km/s would be converted on every model
call) and restricted to the lines present (``line_names``), which is exact for these data
(the other inversion lines are > 25 MHz away) and several times faster than the default of
all nine lines.
"""
import argparse
import datetime
import hashlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "tests" / "data" / "nh3"
sys.path.insert(0, str(HERE))

LOG = logging.getLogger("reference_nh3_pyspeckit")

PARNAMES = ("tkin", "tex", "ntot", "width", "xoff_v", "fortho")
TEX_MIN = 2.75          # K, just above pyspeckit's TCMB = 2.7326 K
NTOT_LIM = (12.0, 17.0)  # log10 cm^-2
WIDTH_LIM = (0.05, 3.0)  # km/s (Gaussian sigma)
TKIN_LIM = (5.0, 40.0)   # K, joint fits
MAD_TO_SIGMA = 1.4826

RULES = [
    "noise: 1.4826*MAD of line-free channels (outside vwin shifted by every hyperfine offset); "
    "NaN channels dropped",
    "(1,1)-only fits: pyspeckit cold_ammonia, tkin fixed at tkin_fixed, fortho=0 fixed; free "
    "tex [2.75, tkin_fixed] K, ntot [12, 17] log10 cm-2, width (sigma) [0.05, 3] km/s, "
    "xoff_v inside vwin",
    "starts: 1 component at v_guesses and the brightest main-group channel; 2 components at "
    "(v_guesses), 1-comp solution split by +-1 sigma, 1-comp solution + the other v_guess; "
    "lowest chi2 kept",
    "model selection: BIC = chi2 + k ln n, k = 0/4/8, n = fitted (1,1) channels, chi2 with the "
    "noise; ncomp = argmin BIC over {0, 1, 2}",
    "joint (1,1)+(2,2): pyspeckit.Spectra concatenation on a GHz axis, cold_ammonia with "
    "line_names oneone+twotwo, free tkin [5, 40] K, tex [2.75, 40] K with tex <= tkin (a fit "
    "ending with tex > tkin is refitted with that tex tied to its tkin), starts tkin 12 and 20 K "
    "from the (1,1)-only solution; lowest chi2 among the constraint-satisfying fits kept",
    "components ordered by velocity (c1 = lower vlsr)",
    "tpeak: max of the component's (1,1) model on the observed channel grid",
    "errors: pyspeckit/mpfit perror (unscaled; multiply by sqrt(redchi2) to scale); a "
    "parameter at a limit gets error 0; a tied tex gets its tkin's error (pyspeckit convention)",
]


# ----------------------------------------------------------------------------- input
def spectral_axis(header, axis):
    """Radio velocities (km/s) and frequencies (GHz) of one spectral FITS axis.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header with ``CTYPEn`` VRAD (m/s) or FREQ (Hz) and ``RESTFRQ``.
    axis : int
        FITS axis number (1-based).

    Returns
    -------
    velo_kms, freq_ghz : numpy.ndarray
        Per-channel radio velocity and frequency.
    restfreq_hz : float
        The header's rest frequency.
    """
    import astropy.units as u
    n = header[f"NAXIS{axis}"]
    pix = np.arange(n) + 1.0
    world = header[f"CRVAL{axis}"] + (pix - header[f"CRPIX{axis}"]) * header[f"CDELT{axis}"]
    ctype = header[f"CTYPE{axis}"].strip().upper()
    restfreq = float(header["RESTFRQ"]) * u.Hz
    equiv = u.doppler_radio(restfreq)
    unit = u.Unit(header.get(f"CUNIT{axis}", "m/s" if ctype.startswith("VRAD") else "Hz"))
    if ctype.startswith("VRAD"):
        velo = (world * unit).to(u.km / u.s)
        freq = velo.to(u.GHz, equivalencies=equiv)
    elif ctype.startswith("FREQ"):
        freq = (world * unit).to(u.GHz)
        velo = freq.to(u.km / u.s, equivalencies=equiv)
    else:
        raise ValueError(f"unsupported spectral axis type {ctype!r}")
    return velo.value, freq.value, restfreq.value


def load_cube(path):
    """Cube (nchan, ny, nx), velocities, frequencies and rest frequency of a FITS cube."""
    from astropy.io import fits
    data, header = fits.getdata(path, header=True)
    velo, freq, rest = spectral_axis(header, 3)
    return {"data": np.asarray(data, dtype="float64"), "velo": velo, "freq": freq,
            "restfreq": rest, "bunit": header.get("BUNIT", "").strip(), "path": str(path)}


def load_spectrum(path):
    """A 1-D spectrum as a (nchan, 1, 1) 'cube' in the same dictionary as `load_cube`."""
    from astropy.io import fits
    data, header = fits.getdata(path, header=True)
    velo, freq, rest = spectral_axis(header, 1)
    return {"data": np.asarray(data, dtype="float64")[:, None, None], "velo": velo,
            "freq": freq, "restfreq": rest, "bunit": header.get("BUNIT", "").strip(),
            "path": str(path)}


def sha256(path):
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- noise
def hyperfine_offsets(line):
    """pyspeckit's hyperfine velocity offsets (km/s) of an ammonia line ('oneone', ...)."""
    from pyspeckit.spectrum.models.ammonia_constants import voff_lines_dict
    return np.asarray(voff_lines_dict[line], dtype=float)


def line_free(velo, line, vwin):
    """True for channels outside every hyperfine group of the emission window ``vwin``."""
    voff = hyperfine_offsets(line)
    shifted = velo[:, None] - voff[None, :]
    inside = (shifted >= vwin[0]) & (shifted <= vwin[1])
    return ~inside.any(axis=1)


def robust_rms(values):
    """1.4826 x median absolute deviation of the finite values."""
    values = values[np.isfinite(values)]
    return float(MAD_TO_SIGMA * np.median(np.abs(values - np.median(values))))


# ----------------------------------------------------------------------------- fitting
_REGISTRY = None


def registry():
    """A pyspeckit fitter Registry with the two restricted-line cold_ammonia models."""
    global _REGISTRY
    if _REGISTRY is None:
        from pyspeckit.spectrum import fitters
        from pyspeckit.spectrum.models import ammonia
        reg = fitters.Registry()
        reg.add_fitter("cold_ammonia_11", ammonia.cold_ammonia_model(line_names=["oneone"]), 6)
        reg.add_fitter("cold_ammonia_1122",
                       ammonia.cold_ammonia_model(line_names=["oneone", "twotwo"]), 6)
        _REGISTRY = reg
    return _REGISTRY


def make_spectrum(spec, freq, restfreq, noise):
    """A pyspeckit Spectrum on a GHz axis with a constant error, NaN channels dropped."""
    import pyspeckit
    from pyspeckit.spectrum.units import SpectroscopicAxis
    ok = np.isfinite(spec)
    xarr = SpectroscopicAxis(freq[ok], unit="GHz", refX=restfreq, refX_unit="Hz",
                             velocity_convention="radio")
    return pyspeckit.Spectrum(data=spec[ok], xarr=xarr, error=np.full(ok.sum(), noise),
                              unit="K", header=_empty_header(), model_registry=registry())


def _empty_header():
    from astropy.io import fits
    return fits.Header()


def run_fit(make_sp, fittype, guesses, fixed, minpars, maxpars, tied=None):
    """One pyspeckit ``specfit`` call on a fresh Spectrum.

    A fresh Spectrum is used for every fit because ``Specfit`` keeps the keyword
    arguments of earlier calls (``fitkwargs``), e.g. a ``tied`` list would leak into the
    next fit on the same object.

    Returns
    -------
    dict or None
        ``values``, ``errors`` (arrays over all parameters), ``chi2``, ``npix``,
        ``status`` (mpfit), ``nlim`` (free parameters at a limit), ``model`` and the
        Spectrum; None if pyspeckit raised.
    """
    npar = len(guesses)
    tied = list(tied) if tied is not None else [""] * npar
    sp = make_sp()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sp.specfit(fittype=fittype, guesses=list(guesses), fixed=list(fixed),
                       limitedmin=[True] * npar, limitedmax=[True] * npar,
                       minpars=list(minpars), maxpars=list(maxpars), tied=tied,
                       verbose=False, plot=False)
    except Exception as exc:  # mpfit status 0 / model ValueError: record as a failed start
        LOG.debug("fit failed (%s): %s", fittype, exc)
        return None
    pinfo = sp.specfit.parinfo
    values = np.array(pinfo.values, dtype=float)
    errors = np.array(pinfo.errors, dtype=float)
    free = ~np.asarray(fixed, bool) & np.array([t == "" for t in tied])
    lo, hi = np.asarray(minpars, float), np.asarray(maxpars, float)
    at_lim = free & ((np.abs(values - lo) < 1e-6) | (np.abs(values - hi) < 1e-6))
    return {"values": values, "errors": errors, "chi2": float(sp.specfit.chi2),
            "npix": int(sp.specfit.npix_fitted), "status": int(sp.specfit.fitter.mp.status),
            "nlim": int(at_lim.sum()), "model": np.asarray(sp.specfit.model), "sp": sp}


def _clip(value, lo, hi, margin):
    return float(min(max(value, lo + margin), hi - margin))


def one_comp_guess(v, tex, ntot, width, cfg, tkin=None):
    """Six parameters of one component, clipped inside the (1,1)-only limits."""
    tkin = cfg["tkin_fixed"] if tkin is None else tkin
    return [tkin, _clip(tex, TEX_MIN, cfg["tkin_fixed"], 0.05),
            _clip(ntot, *NTOT_LIM, 0.01), _clip(width, *WIDTH_LIM, 0.005),
            _clip(v, cfg["vwin"][0], cfg["vwin"][1], 0.05), 0.0]


def limits_11(ncomp, cfg):
    """fixed, minpars, maxpars for an ncomp (1,1)-only fit."""
    fixed = [True, False, False, False, False, True] * ncomp
    minpars = [2.73, TEX_MIN, NTOT_LIM[0], WIDTH_LIM[0], cfg["vwin"][0], 0.0] * ncomp
    maxpars = [max(40.0, cfg["tkin_fixed"]), cfg["tkin_fixed"], NTOT_LIM[1], WIDTH_LIM[1],
               cfg["vwin"][1], 1.0] * ncomp
    return fixed, minpars, maxpars


def limits_joint(ncomp, cfg):
    """fixed, minpars, maxpars for an ncomp joint (1,1)+(2,2) fit."""
    fixed = [False, False, False, False, False, True] * ncomp
    minpars = [TKIN_LIM[0], TEX_MIN, NTOT_LIM[0], WIDTH_LIM[0], cfg["vwin"][0], 0.0] * ncomp
    maxpars = [TKIN_LIM[1], TKIN_LIM[1], NTOT_LIM[1], WIDTH_LIM[1], cfg["vwin"][1], 1.0] * ncomp
    return fixed, minpars, maxpars


def best_of_starts(make_sp, fittype, starts, limits):
    """Fit every start; return the lowest-chi2 result (None if every start failed)."""
    fixed, minpars, maxpars = limits
    best = None
    for guess in starts:
        res = run_fit(make_sp, fittype, guess, fixed, minpars, maxpars)
        if res is not None and (best is None or res["chi2"] < best["chi2"]):
            best = res
    return best


def fit_joint(make_sp, start_pars, ncomp, cfg):
    """Joint (1,1)+(2,2) fit with free tkin and tex <= tkin, from (1,1)-only parameters."""
    limits = limits_joint(ncomp, cfg)
    fixed, minpars, maxpars = limits
    best = None
    for tk0 in cfg["joint_tkin_starts"]:
        guess = []
        for c in range(ncomp):
            p = start_pars[6 * c:6 * c + 6]
            guess += [tk0, _clip(min(p[1], tk0 - 0.5), TEX_MIN, TKIN_LIM[1], 0.05),
                      _clip(p[2], *NTOT_LIM, 0.01), _clip(p[3], *WIDTH_LIM, 0.005),
                      _clip(p[4], cfg["vwin"][0], cfg["vwin"][1], 0.05), 0.0]
        res = run_fit(make_sp, "cold_ammonia_1122", guess, fixed, minpars, maxpars)
        if res is None:
            continue
        vals = res["values"]
        bad = [c for c in range(ncomp) if vals[6 * c + 1] > vals[6 * c] + 1e-6]
        res["ntied"] = 0
        if bad:
            tied = [""] * (6 * ncomp)
            guess2 = list(vals)
            for c in bad:
                tied[6 * c + 1] = f"p[{6 * c}]"
                guess2[6 * c + 1] = guess2[6 * c]
            res = run_fit(make_sp, "cold_ammonia_1122", guess2, fixed, minpars, maxpars,
                          tied=tied)
            if res is None:
                continue
            res["ntied"] = len(bad)
        if best is None or res["chi2"] < best["chi2"]:
            best = res
    return best


def component_peak(freq, restfreq, pars):
    """Peak (K) of one component's (1,1) model on the given GHz channel grid."""
    from pyspeckit.spectrum.models import ammonia
    from pyspeckit.spectrum.units import SpectroscopicAxis
    xarr = SpectroscopicAxis(freq, unit="GHz", refX=restfreq, refX_unit="Hz",
                             velocity_convention="radio")
    kw = dict(zip(PARNAMES, pars))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ammonia.cold_ammonia(xarr, line_names=["oneone"], **kw)
    return float(np.max(model))


def order_by_velocity(values, errors, ncomp):
    """Reorder the components of a parameter vector by increasing xoff_v."""
    if ncomp < 2:
        return values, errors
    order = np.argsort([values[6 * c + 4] for c in range(ncomp)])
    idx = np.concatenate([np.arange(6 * c, 6 * c + 6) for c in order])
    return values[idx], errors[idx]


def fit_one_spectrum(s11, s22, cfg, y=0, x=0):
    """All fits of one pixel; returns a flat dict (one table row).

    Parameters
    ----------
    s11 : dict
        ``spec`` (1,1) spectrum, ``freq`` (GHz), ``velo`` (km/s), ``restfreq`` (Hz).
    s22 : dict or None
        The same for (2,2); None skips the joint fits.
    cfg : dict
        Run settings (``vwin``, ``v_guesses``, ``tkin_fixed``, ``joint_tkin_starts``).
    """
    row = {"y": y, "x": x}
    spec11 = s11["spec"]
    ok11 = np.isfinite(spec11)
    noise11 = robust_rms(spec11[ok11 & line_free(s11["velo"], "oneone", cfg["vwin"])])
    row["noise_11"] = noise11
    row["peak_snr_11"] = float(np.nanmax(spec11) / noise11)
    n = int(ok11.sum())
    row["nchan_11"] = n

    def make11():
        return make_spectrum(spec11, s11["freq"], s11["restfreq"], noise11)

    # zero model
    chi2_0 = float(np.sum((spec11[ok11] / noise11) ** 2))
    row["m0_chi2"] = chi2_0
    row["m0_bic"] = chi2_0

    # starting values from the data: the brightest channel of the main hyperfine group
    vel = s11["velo"]
    inwin = ok11 & (vel >= cfg["vwin"][0]) & (vel <= cfg["vwin"][1])
    ipk = np.flatnonzero(inwin)[np.argmax(spec11[inwin])]
    vpk, tpk = float(vel[ipk]), float(max(spec11[ipk], noise11))
    tex0 = 2.73 + 1.5 * tpk + 1.0
    vg = list(cfg["v_guesses"])

    # --- one component, (1,1) only
    t0 = time.perf_counter()
    starts1 = [one_comp_guess(v, tex0, 14.5, 0.3, cfg) for v in vg + [vpk]]
    m1 = best_of_starts(make11, "cold_ammonia_11", starts1, limits_11(1, cfg))
    row["m1_time"] = time.perf_counter() - t0

    # --- two components, (1,1) only
    t0 = time.perf_counter()
    starts2 = [one_comp_guess(vg[0], tex0, 14.3, 0.3, cfg)
               + one_comp_guess(vg[-1], tex0, 14.3, 0.3, cfg)]
    if m1 is not None:
        p = m1["values"]
        sig = p[3]
        split_w = max(0.6 * sig, 0.08)
        starts2.append(one_comp_guess(p[4] - sig, p[1], p[2] - 0.3, split_w, cfg)
                       + one_comp_guess(p[4] + sig, p[1], p[2] - 0.3, split_w, cfg))
        other = vg[-1] if abs(p[4] - vg[0]) < abs(p[4] - vg[-1]) else vg[0]
        starts2.append(one_comp_guess(p[4], p[1], p[2], p[3], cfg)
                       + one_comp_guess(other, 0.5 * (p[1] + TEX_MIN) + 0.5, p[2] - 0.5, 0.3,
                                        cfg))
    m2 = best_of_starts(make11, "cold_ammonia_11", starts2, limits_11(2, cfg))
    row["m2_time"] = time.perf_counter() - t0

    lnn = np.log(n)
    for name, res, ncomp in (("m1", m1, 1), ("m2", m2, 2)):
        k = 4 * ncomp
        if res is None:
            vals = errs = np.full(6 * ncomp, np.nan)
            row.update({f"{name}_chi2": np.nan, f"{name}_redchi2": np.nan,
                        f"{name}_bic": np.inf, f"{name}_status": -1, f"{name}_nlim": -1})
        else:
            vals, errs = order_by_velocity(res["values"], res["errors"], ncomp)
            row.update({f"{name}_chi2": res["chi2"], f"{name}_redchi2": res["chi2"] / (n - k),
                        f"{name}_bic": res["chi2"] + k * lnn, f"{name}_status": res["status"],
                        f"{name}_nlim": res["nlim"]})
        for c in range(ncomp):
            pre = f"{name}_" if ncomp == 1 else f"{name}_c{c + 1}_"
            p, e = vals[6 * c:6 * c + 6], errs[6 * c:6 * c + 6]
            row.update({pre + "vlsr": p[4], pre + "vlsr_err": e[4],
                        pre + "sigma": p[3], pre + "sigma_err": e[3],
                        pre + "tex": p[1], pre + "tex_err": e[1],
                        pre + "logn": p[2], pre + "logn_err": e[2],
                        pre + "tpeak": (component_peak(s11["freq"][ok11], s11["restfreq"], p)
                                        if np.isfinite(p).all() else np.nan)})
    bics = [row["m0_bic"], row["m1_bic"], row["m2_bic"]]
    row["ncomp"] = int(np.argmin(bics))

    # --- joint (1,1)+(2,2)
    if s22 is not None:
        spec22 = s22["spec"]
        ok22 = np.isfinite(spec22)
        noise22 = robust_rms(spec22[ok22 & line_free(s22["velo"], "twotwo", cfg["vwin"])])
        row["noise_22"] = noise22
        row["peak_snr_22"] = float(np.nanmax(spec22) / noise22)

        def make_joint():
            import pyspeckit
            a = make_spectrum(spec11, s11["freq"], s11["restfreq"], noise11)
            b = make_spectrum(spec22, s22["freq"], s22["restfreq"], noise22)
            return pyspeckit.Spectra([a, b], model_registry=registry())

        nj = int(ok11.sum() + ok22.sum())
        row["nchan_joint"] = nj
        for name, base, ncomp in (("j1", m1, 1), ("j2", m2, 2)):
            t0 = time.perf_counter()
            res = None
            if base is not None:
                res = fit_joint(make_joint, base["values"], ncomp, cfg)
            row[f"{name}_time"] = time.perf_counter() - t0
            k = 5 * ncomp
            if res is None:
                vals = errs = np.full(6 * ncomp, np.nan)
                row.update({f"{name}_chi2": np.nan, f"{name}_redchi2": np.nan,
                            f"{name}_status": -1, f"{name}_nlim": -1, f"{name}_ntied": -1})
            else:
                vals, errs = order_by_velocity(res["values"], res["errors"], ncomp)
                k -= res["ntied"]
                row.update({f"{name}_chi2": res["chi2"],
                            f"{name}_redchi2": res["chi2"] / (nj - k),
                            f"{name}_status": res["status"], f"{name}_nlim": res["nlim"],
                            f"{name}_ntied": res["ntied"]})
            for c in range(ncomp):
                pre = f"{name}_" if ncomp == 1 else f"{name}_c{c + 1}_"
                p, e = vals[6 * c:6 * c + 6], errs[6 * c:6 * c + 6]
                row.update({pre + "tkin": p[0], pre + "tkin_err": e[0],
                            pre + "tex": p[1], pre + "tex_err": e[1],
                            pre + "logn": p[2], pre + "logn_err": e[2],
                            pre + "sigma": p[3], pre + "sigma_err": e[3],
                            pre + "vlsr": p[4], pre + "vlsr_err": e[4]})
    return row


# ----------------------------------------------------------------------------- workers
_W = {}


def _init_worker(cube11, cube22, cfg, loglevel):
    """Pool initializer: keep the cubes in the worker and quieten pyspeckit."""
    _quiet()
    logging.getLogger().setLevel(loglevel)
    _W.update(cube11=cube11, cube22=cube22, cfg=cfg)


def _quiet():
    from astropy import log as alog
    alog.setLevel("ERROR")
    warnings.filterwarnings("ignore", message=".*tex > trot.*")


def _fit_pixel(yx):
    y, x = yx
    c11, c22 = _W["cube11"], _W["cube22"]
    s11 = {"spec": c11["data"][:, y, x], "freq": c11["freq"], "velo": c11["velo"],
           "restfreq": c11["restfreq"]}
    s22 = None
    if c22 is not None:
        s22 = {"spec": c22["data"][:, y, x], "freq": c22["freq"], "velo": c22["velo"],
               "restfreq": c22["restfreq"]}
    if not np.isfinite(s11["spec"]).any():
        return None
    t0 = time.perf_counter()
    row = fit_one_spectrum(s11, s22, _W["cfg"], y=y, x=x)
    row["time_total"] = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------- table
UNITS = {"noise": "K", "tpeak": "K", "vlsr": "km/s", "sigma": "km/s", "tex": "K",
         "tkin": "K", "time": "s"}
DESCRIPTIONS = {
    "x": "pixel column (0-based numpy index [y, x] of the cube)",
    "y": "pixel row (0-based numpy index [y, x] of the cube)",
    "noise_11": "robust rms (1.4826 MAD) of line-free (1,1) channels",
    "noise_22": "robust rms (1.4826 MAD) of line-free (2,2) channels",
    "peak_snr_11": "max (1,1) channel / noise_11",
    "peak_snr_22": "max (2,2) channel / noise_22",
    "nchan_11": "finite (1,1) channels fitted (n in BIC)",
    "nchan_joint": "finite (1,1) + (2,2) channels fitted jointly",
    "ncomp": "components chosen by min BIC over {0,1,2} ((1,1)-only fits)",
    "time_total": "wall time of all fits of this pixel (one process)",
}


def _unit_for(name):
    if name.endswith("_err") and ("logn" in name):
        return "dex"
    if name.endswith("logn"):
        return "dex(cm-2)"
    for key, unit in UNITS.items():
        if key in name.split("_") or name.startswith(key) or f"_{key}" in name:
            return unit
    return None


def round_sig(values, digits):
    """Round to ``digits`` significant digits (keeps the ECSV file small); NaN/inf kept."""
    values = np.asarray(values, dtype=float)
    out = values.copy()
    good = np.isfinite(values) & (values != 0)
    mag = np.floor(np.log10(np.abs(values[good])))
    scale = 10.0 ** (digits - 1 - mag)
    out[good] = np.round(values[good] * scale) / scale
    return out


def rows_to_table(rows, meta):
    """Rows (dicts) to an astropy Table with units, descriptions and rounded floats."""
    import astropy.units as u
    from astropy.table import Table
    names = list(rows[0].keys())
    for r in rows[1:]:
        for k in r:
            if k not in names:
                names.append(k)
    names = order_columns(names)
    cols = {}
    for name in names:
        vals = [r.get(name, np.nan) for r in rows]
        if name in ("x", "y", "ncomp", "nchan_11", "nchan_joint") or name.endswith(
                ("_status", "_nlim", "_ntied", "_nchan")):
            cols[name] = np.array(vals, dtype=np.int32)
        else:
            arr = np.array(vals, dtype=float)
            digits = 2 if name.endswith("_err") else (3 if "time" in name else 5)
            cols[name] = round_sig(arr, digits)
    tab = Table(cols, meta=meta)
    for name in tab.colnames:
        unit = _unit_for(name)
        if unit is not None and not name.endswith(("_status", "_nlim", "_ntied", "_nchan")):
            tab[name].unit = u.Unit(unit) if unit != "dex(cm-2)" else u.dex(u.cm ** -2)
        tab[name].description = DESCRIPTIONS.get(name, describe(name))
    return tab


BASE_COLUMNS = ["y", "x", "noise_11", "peak_snr_11", "nchan_11", "noise_22", "peak_snr_22",
                "nchan_joint", "ncomp", "m0_chi2", "m0_bic"]
FIT_STATS = ["chi2", "redchi2", "bic", "status", "nlim", "ntied", "time"]


def order_columns(names):
    """Column order: pixel and noise, ncomp, then per model its statistics and parameters."""
    def key(item):
        i, name = item
        if name in BASE_COLUMNS:
            return (0, BASE_COLUMNS.index(name), i)
        if name == "time_total":
            return (9, 0, i)
        prefix, rest = name.split("_", 1)
        group = 1 + ["m1", "m2", "j1", "j2"].index(prefix) if prefix in ("m1", "m2", "j1", "j2") \
            else 8
        rank = FIT_STATS.index(rest) if rest in FIT_STATS else len(FIT_STATS)
        return (group, rank, i)
    return [name for _, name in sorted(enumerate(names), key=key)]


def describe(name):
    """A short description of a fit column from its name."""
    parts = name.split("_")
    model = {"m0": "(1,1) zero model", "m1": "(1,1)-only 1-component fit (tkin fixed)",
             "m2": "(1,1)-only 2-component fit (tkin fixed)",
             "j1": "joint (1,1)+(2,2) 1-component fit", "j2": "joint (1,1)+(2,2) 2-component fit"}
    what = {"chi2": "chi^2 on the fitted channels with the noise",
            "redchi2": "chi^2 / (n - k)", "bic": "chi^2 + k ln n",
            "time": "wall time of all starts", "status": "mpfit status of the kept fit (-1 failed)",
            "nlim": "free parameters at a limit", "ntied": "components with tex tied to tkin",
            "nchan": "channels fitted", "vlsr": "xoff_v (radio LSRK velocity)",
            "sigma": "width (Gaussian sigma)", "tex": "excitation temperature",
            "logn": "log10 total para-NH3 column ntot", "tpeak": "peak of the (1,1) component model",
            "tkin": "kinetic temperature"}
    desc = model.get(parts[0], "")
    comp = [p for p in parts if p in ("c1", "c2")]
    if comp:
        desc += f", component {comp[0][1]} ({'lower' if comp[0] == 'c1' else 'higher'} vlsr)"
    key = parts[-2] if parts[-1] == "err" else parts[-1]
    desc += ": " + what.get(key, key)
    if parts[-1] == "err":
        desc += " error (pyspeckit, unscaled)"
    return desc


# ----------------------------------------------------------------------------- check plot
def check_plot(path, tab, cube11, cube22, picks):
    """Data vs the table's chosen (1,1) model and the joint (2,2) model for a few pixels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pyspeckit.spectrum.models import ammonia
    from pyspeckit.spectrum.units import SpectroscopicAxis

    def model(cube, line, pars_list):
        xarr = SpectroscopicAxis(cube["freq"], unit="GHz", refX=cube["restfreq"],
                                 refX_unit="Hz", velocity_convention="radio")
        total = np.zeros(cube["freq"].size)
        for pars in pars_list:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                total += ammonia.cold_ammonia(xarr, line_names=[line],
                                              **dict(zip(PARNAMES, pars)))
        return total

    fig, axes = plt.subplots(len(picks), 2, figsize=(14, 2.6 * len(picks)), squeeze=False)
    for ax, (y, x) in zip(axes, picks):
        r = tab[(tab["y"] == y) & (tab["x"] == x)][0]
        nc = int(r["ncomp"])
        pars, jpars = [], []
        if nc == 1:
            pars = [[15.0, r["m1_tex"], r["m1_logn"], r["m1_sigma"], r["m1_vlsr"], 0.0]]
            jpars = [[r["j1_tkin"], r["j1_tex"], r["j1_logn"], r["j1_sigma"], r["j1_vlsr"], 0]]
        elif nc == 2:
            pars = [[15.0, r[f"m2_c{c}_tex"], r[f"m2_c{c}_logn"], r[f"m2_c{c}_sigma"],
                     r[f"m2_c{c}_vlsr"], 0.0] for c in (1, 2)]
            jpars = [[r[f"j2_c{c}_tkin"], r[f"j2_c{c}_tex"], r[f"j2_c{c}_logn"],
                      r[f"j2_c{c}_sigma"], r[f"j2_c{c}_vlsr"], 0.0] for c in (1, 2)]
        for a, cube, line, pl, lab in ((ax[0], cube11, "oneone", pars, "(1,1) tkin=15 K"),
                                       (ax[1], cube22, "twotwo", jpars, "(2,2) joint")):
            a.step(cube["velo"], cube["data"][:, y, x], where="mid", color="k", lw=0.7)
            if pl:
                a.plot(cube["velo"], model(cube, line, pl), color="r", lw=1.0)
            a.set_title(f"[y={y}, x={x}] {lab}: ncomp={nc} "
                        + (f"Tk={np.round([p[0] for p in jpars], 1)}" if line == "twotwo"
                           and jpars else ""), fontsize=8)
            a.set_xlim(35, 92)
    axes[-1, 0].set_xlabel("v (km/s)")
    axes[-1, 1].set_xlabel("v (km/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    LOG.info("wrote %s", path)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Reference pyspeckit NH3 fits of the real G23.481 cutout "
                    "(see the module docstring for the rules).")
    parser.add_argument("--cube11", default=str(DATA / "ammonia_11_cutout.fits"),
                        help="NH3 (1,1) cube (K, VRAD axis)")
    parser.add_argument("--cube22", default=str(DATA / "ammonia_22_cutout.fits"),
                        help="NH3 (2,2) cube of the same field ('' skips the joint fits)")
    parser.add_argument("--spectrum", default=str(DATA / "test_spectrum_11.fits"),
                        help="1-D (1,1) spectrum fitted separately ('' to skip)")
    parser.add_argument("--out", default=str(DATA / "g23_pyspeckit_reference.ecsv"),
                        help="per-pixel ECSV table")
    parser.add_argument("--out-spectrum", default=str(DATA / "test_spectrum_11_pyspeckit.ecsv"),
                        help="ECSV table of the 1-D spectrum")
    parser.add_argument("--results-name", default="pyspeckit_nh3_reference",
                        help="benchmarks/results/<name>.json")
    parser.add_argument("--nproc", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--tkin-fixed", type=float, default=15.0,
                        help="tkin (K) of the (1,1)-only fits")
    parser.add_argument("--vwin", type=float, nargs=2, default=(60.5, 67.5),
                        help="main-group velocity window (km/s) of the cube: xoff_v limits "
                             "and, shifted by the hyperfine offsets, the line mask")
    parser.add_argument("--v-guesses", type=float, nargs=2, default=(63.0, 65.1),
                        help="starting velocities of the two components (km/s)")
    parser.add_argument("--spectrum-halfwin", type=float, default=3.5,
                        help="half width (km/s) of the 1-D spectrum's window around its "
                             "brightest channel")
    parser.add_argument("--max-pixels", type=int, default=0,
                        help="fit only the first N pixels (testing)")
    parser.add_argument("--check-plot", default="",
                        help="PNG with data vs model for a few pixels")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--quick", action="store_true",
                        help="2 pixels + the 1-D spectrum, tables to a temporary folder, no results "
                             "JSON (a smoke run)")
    args = parser.parse_args(argv)
    if not args.quick:
        return run(args)
    import shutil
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="reference-nh3-quick-"))
    args.max_pixels = args.max_pixels or 2
    args.out, args.out_spectrum = str(tmp / "reference.ecsv"), str(tmp / "spectrum.ecsv")
    if args.check_plot:
        args.check_plot = str(tmp / "check.png")
    try:
        return run(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args):
    """Fit, write the tables and (without ``--quick``) the speed JSON."""

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    _quiet()
    import astropy
    import pyspeckit
    from benchutil import write_results

    cfg = {"vwin": tuple(args.vwin), "v_guesses": tuple(args.v_guesses),
           "tkin_fixed": args.tkin_fixed, "joint_tkin_starts": (12.0, 20.0)}
    cube11 = load_cube(args.cube11)
    cube22 = load_cube(args.cube22) if args.cube22 else None
    ny, nx = cube11["data"].shape[1:]
    pixels = [(y, x) for y in range(ny) for x in range(nx)]
    if args.max_pixels:
        pixels = pixels[:args.max_pixels]
    LOG.info("fitting %d pixels of %s with %d process(es)", len(pixels), args.cube11, args.nproc)

    t_start = time.perf_counter()
    rows = []
    if args.nproc > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.nproc, initializer=_init_worker,
                                         initargs=(cube11, cube22, cfg, args.log_level)) as pool:
            for i, row in enumerate(pool.imap_unordered(_fit_pixel, pixels, chunksize=2)):
                if row is not None:
                    rows.append(row)
                if (i + 1) % 20 == 0:
                    LOG.info("%d/%d pixels (%.0f s)", i + 1, len(pixels),
                             time.perf_counter() - t_start)
    else:
        _init_worker(cube11, cube22, cfg, args.log_level)
        for i, yx in enumerate(pixels):
            row = _fit_pixel(yx)
            if row is not None:
                rows.append(row)
            if (i + 1) % 20 == 0:
                LOG.info("%d/%d pixels (%.0f s)", i + 1, len(pixels),
                         time.perf_counter() - t_start)
    wall_cube = time.perf_counter() - t_start
    rows.sort(key=lambda r: (r["y"], r["x"]))

    def timing(rs, keys):
        return {k: {"sum_s": float(np.sum([r[k] for r in rs])),
                    "median_s": float(np.median([r[k] for r in rs])),
                    "mean_s": float(np.mean([r[k] for r in rs]))} for k in keys}

    tkeys = ["m1_time", "m2_time", "j1_time", "j2_time", "time_total"]
    tstats = timing(rows, [k for k in tkeys if k in rows[0]])
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    counts = {int(k): int(np.sum([r["ncomp"] == k for r in rows])) for k in (0, 1, 2)}
    common_meta = {
        "description": "pyspeckit cold_ammonia reference fits, written by "
                       "benchmarks/reference_clover_nh3_pyspeckit.py",
        "pyspeckit_version": pyspeckit.__version__,
        "astropy_version": astropy.__version__, "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "date_utc": now, "fitter": "mpfit (pyspeckit default), maxiter 200",
        "rules": RULES,
        "errors_scaled_by_redchi2": False,
        "errors_note": "pyspeckit/mpfit perror from the covariance with the given noise, "
                       "NOT scaled by the reduced chi2",
        "tkin_fixed_K": args.tkin_fixed, "fortho": 0.0, "vwin_kms": list(args.vwin),
        "tex_limits_K": [TEX_MIN, "tkin"], "ntot_limits_log10cm2": list(NTOT_LIM),
        "width_limits_kms": list(WIDTH_LIM), "tkin_limits_joint_K": list(TKIN_LIM),
        "joint_tkin_starts_K": list(cfg["joint_tkin_starts"]),
        "bic_k": {"0": 0, "1": 4, "2": 8},
    }
    meta = dict(common_meta)
    meta.update({
        "input_11": os.path.relpath(args.cube11, ROOT), "input_11_sha256": sha256(args.cube11),
        "input_22": os.path.relpath(args.cube22, ROOT) if cube22 else "",
        "input_22_sha256": sha256(args.cube22) if cube22 else "",
        "pixel_index": "x, y are 0-based numpy indices data[:, y, x] of the cube",
        "v_guesses_kms": list(args.v_guesses),
        "n_pixels": len(rows), "ncomp_counts": counts,
        "nproc": args.nproc, "wall_time_total_s": round(wall_cube, 2),
        "fit_time_per_spectrum_s": {k: {kk: round(vv, 4) for kk, vv in v.items()}
                                    for k, v in tstats.items()},
    })
    tab = rows_to_table(rows, meta)
    tab.write(args.out, format="ascii.ecsv", overwrite=True)
    os.chmod(args.out, 0o644)
    LOG.info("wrote %s (%d rows, %d columns, %.0f kB); ncomp counts %s", args.out, len(tab),
             len(tab.colnames), Path(args.out).stat().st_size / 1024, counts)

    # ---- the 1-D spectrum
    spec_rows = []
    if args.spectrum:
        sp1 = load_spectrum(args.spectrum)
        data = sp1["data"][:, 0, 0]
        ipk = int(np.nanargmax(data))
        vpk = float(sp1["velo"][ipk])
        cfg1 = dict(cfg, vwin=(vpk - args.spectrum_halfwin, vpk + args.spectrum_halfwin),
                    v_guesses=(vpk - 1.0, vpk + 1.0))
        _init_worker({"data": sp1["data"], "freq": sp1["freq"], "velo": sp1["velo"],
                      "restfreq": sp1["restfreq"]}, None, cfg1, args.log_level)
        t0 = time.perf_counter()
        row = _fit_pixel((0, 0))
        t_spec = time.perf_counter() - t0
        row.pop("x"), row.pop("y")
        spec_rows = [row]
        meta1 = dict(common_meta)
        meta1.update({
            "input": os.path.relpath(args.spectrum, ROOT), "input_sha256": sha256(args.spectrum),
            "input_bunit": sp1["bunit"] or "(none)",
            "units_note": "the file has no BUNIT; its values (peak ~0.03) are fitted as if they "
                          "were K, so tex/logn are not physical (the values are probably Jy/beam "
                          "of a viewer region mean)",
            "vwin_kms": [round(v, 3) for v in cfg1["vwin"]],
            "v_guesses_kms": [round(v, 3) for v in cfg1["v_guesses"]],
            "wall_time_total_s": round(t_spec, 3),
        })
        tab1 = rows_to_table(spec_rows, meta1)
        tab1.write(args.out_spectrum, format="ascii.ecsv", overwrite=True)
        os.chmod(args.out_spectrum, 0o644)
        LOG.info("wrote %s: ncomp=%d", args.out_spectrum, row["ncomp"])

    # ---- speed
    n = len(rows)
    speed_rows = []
    for label, key in (("one-component (1,1)", "m1_time"), ("two-component (1,1)", "m2_time"),
                       ("joint (1,1)+(2,2), one component", "j1_time"),
                       ("joint (1,1)+(2,2), two components", "j2_time"),
                       ("all fits of a pixel", "time_total")):
        if key in tstats:
            s = tstats[key]["sum_s"]
            speed_rows.append({"fit": label, "spectra_per_s_one_process": n / s,
                               "median_s_per_spectrum": tstats[key]["median_s"],
                               "cpu_seconds": s})
    joint_sum = tstats.get("j1_time", {}).get("sum_s", 0) + tstats.get("j2_time", {}).get("sum_s", 0)
    for row in speed_rows:
        LOG.info("%s: %.3g spectra/s (one process), median %.3g s per spectrum", row["fit"],
                 row["spectra_per_s_one_process"], row["median_s_per_spectrum"])
    if args.quick:
        LOG.info("--quick: a smoke run, benchmarks/results/%s.json not written", args.results_name)
    else:
        path = write_results(
            args.results_name, speed_rows, n_spectra=n, nproc=args.nproc,
            wall_seconds_total=wall_cube, spectra_per_s_wall=n / wall_cube,
            joint_spectra_per_s_one_process=(n / joint_sum if joint_sum else None),
            starts={"one": 3, "two": 3, "joint": len(cfg["joint_tkin_starts"])},
            pyspeckit_version=pyspeckit.__version__, ncomp_counts=counts,
            test_spectrum_seconds=(spec_rows[0]["time_total"] if spec_rows else None))
        LOG.info("wrote %s", path)

    if args.check_plot and cube22 is not None:
        picks = pick_check_pixels(tab)
        check_plot(args.check_plot, tab, cube11, cube22, picks)
    return 0


def pick_check_pixels(tab):
    """A few pixels for the check plot: brightest, one-component, faintest, median Tkin."""
    picks = []
    order = np.argsort(-np.asarray(tab["peak_snr_11"]))
    picks.append(order[0])
    one = np.flatnonzero(tab["ncomp"] == 1)
    if one.size:
        picks.append(one[np.argmax(tab["peak_snr_11"][one])])
        picks.append(one[np.argmin(tab["peak_snr_11"][one])])
    two = np.flatnonzero(tab["ncomp"] == 2)
    if two.size:
        picks.append(two[np.argmin(tab["peak_snr_11"][two])])
        picks.append(two[np.argmax(tab["peak_snr_22"][two])])
    picks.append(order[-1])
    seen, out = set(), []
    for i in picks:
        yx = (int(tab["y"][i]), int(tab["x"][i]))
        if yx not in seen:
            seen.add(yx)
            out.append(yx)
    return out


if __name__ == "__main__":
    sys.exit(main())
