"""Simulated ASKAP field with SUMSS/NVSS-like catalogues and injected transients.

Shared by tests/test_racs_pipeline.py, benchmarks/bench_racs.py and the demo
(:func:`run_demo`).  One sky, seen three ways:

* an ASKAP-like image (887.5 MHz, 15" x 12" beam, 2.5"/px, correlated noise of
  ``rms`` Jy/beam, blank (NaN) outside a circular footprint) centred near RA 0 so the
  field straddles the 0/360 deg wrap;
* SUMSS- (843 MHz, 2 mJy rms) and NVSS-like (1.4 GHz, 0.45 mJy rms) catalogues in Vizier
  column names (mJy, deg, arcsec), made from the same sources with spectral indices
  alpha ~ N(-0.8, 0.1), 5 % calibration scatter plus survey noise, position scatter, and
  sources beyond the image edge (to be trimmed);
* a SUMSS-like mosaic FITS image for postage stamps.

Two normal populations keep each source's truth unambiguous: faint sources (ASKAP
0.8-2.5 mJy, far below the survey limits, so in no catalogue) and bright ones
(15-500 mJy, in both catalogues).  Injected transients: ``askap_only`` (ASKAP 30-60 mJy,
in no catalogue), ``catalogue_only`` (in both catalogues at 60-90 mJy, in ASKAP at 0 or a
faint 2-2.5 sigma flux for the forced-photometry test) and ``large_ratio`` (ASKAP 6x the
spectrally scaled catalogue flux).
"""
import json
from pathlib import Path

import numpy as np

ASKAP_FREQ = 887.5e6
SUMSS_FREQ, NVSS_FREQ = 843e6, 1.4e9
SUMSS_RMS, NVSS_RMS = 2.0e-3, 0.45e-3


def _gaussian_sum(shape, x, y, peak, sx, sy, theta, half=None):
    """Add elliptical Gaussians (pixel units) to a zero image."""
    image = np.zeros(shape, dtype=np.float64)
    half = half or int(np.ceil(5 * max(sx, sy)))
    ny, nx = shape
    ct, st = np.cos(theta), np.sin(theta)
    for xi, yi, p in zip(x, y, peak):
        x0, y0 = int(round(xi)), int(round(yi))
        ys = slice(max(0, y0 - half), min(ny, y0 + half + 1))
        xs = slice(max(0, x0 - half), min(nx, x0 + half + 1))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue                                  # beyond this image
        yy, xx = np.mgrid[ys, xs]
        dx, dy = xx - xi, yy - yi
        u = dx * ct + dy * st
        v = -dx * st + dy * ct
        image[ys, xs] += p * np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return image


def _header(size, pix_arcsec, ra0, dec0, bmaj, bmin, bpa, freq):
    from astropy.io import fits
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---SIN", "DEC--SIN"
    h["CRPIX1"] = h["CRPIX2"] = size / 2.0 + 0.5
    h["CRVAL1"], h["CRVAL2"] = ra0, dec0
    h["CDELT1"], h["CDELT2"] = -pix_arcsec / 3600.0, pix_arcsec / 3600.0
    h["CUNIT1"] = h["CUNIT2"] = "deg"
    h["BMAJ"], h["BMIN"], h["BPA"] = bmaj / 3600.0, bmin / 3600.0, bpa
    h["BUNIT"] = "Jy/beam"
    if freq:
        h["RESTFRQ"] = freq
    h["TELESCOP"] = "ASKAP"
    return h


def _place(rng, n, size, min_sep_px, radius_px, taken=None, taken_sep_px=0.0):
    """Random pixel positions inside a circle, at least ``min_sep_px`` from each other
    and ``taken_sep_px`` from the positions in ``taken``."""
    taken = np.zeros((0, 2)) if taken is None else np.asarray(taken)
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200000:
            raise RuntimeError("cannot place %d sources with separation %s px" % (n, min_sep_px))
        r = radius_px * np.sqrt(rng.random())
        t = 2 * np.pi * rng.random()
        p = np.array((size / 2 + r * np.cos(t), size / 2 + r * np.sin(t)))
        if out and np.min(np.hypot(*(np.array(out) - p).T)) < min_sep_px:
            continue
        if len(taken) and np.min(np.hypot(*(taken - p).T)) < taken_sep_px:
            continue
        out.append(p)
    return np.array(out)


def template_header(template, size):
    """A real ASKAP header (``template`` FITS file) resized to ``size`` x ``size`` pixels.

    Every card of the real header is kept (4-D layout, FREQ/STOKES axes, DATE-OBS, the
    reference pixel, negative CRVAL1...) except NAXIS1/NAXIS2, which become ``size``;
    CRPIX1/2 move by half the size change so the real image position stays at the
    centre.  Returns ``(header, beam_table)`` with the cube's ``BEAMS`` HDU (or None).
    """
    from astropy.io import fits
    with fits.open(template) as hdul:
        header = hdul[0].header.copy()
        beams = hdul["BEAMS"].copy() if "BEAMS" in hdul else None
    for axis in (1, 2):
        header["CRPIX%d" % axis] += (size - header["NAXIS%d" % axis]) / 2.0
        header["NAXIS%d" % axis] = size
    return header, beams


def _template_beams(header, beams, nchan):
    """(nchan, 3) beams in arcsec/deg and a validity mask, from the beam table or BMAJ/BMIN."""
    if beams is None:
        one = (header["BMAJ"] * 3600.0, header["BMIN"] * 3600.0, header.get("BPA", 0.0))
        return np.tile(one, (nchan, 1)), np.ones(nchan, bool)
    table = np.column_stack([np.asarray(beams.data[c], float) for c in ("BMAJ", "BMIN", "BPA")])
    return table, (table[:, 0] > 1e-3) & (table[:, 1] > 1e-3)


def _channel_noise_pattern(template, nchan):
    """Per-channel rms of the real template divided by its median (1 for a single plane)."""
    from astropy.io import fits
    if nchan == 1:
        return np.ones(1)
    data = np.asarray(fits.getdata(template), float).reshape(nchan, -1)
    rms = np.nanstd(data, axis=1)
    return rms / np.nanmedian(rms[rms > 0])


def simulate_field(outdir, size=1000, n_faint=150, n_bright=150, n_transients=3, rms=0.25e-3,
                   ra0=0.2, dec0=-35.0, seed=7, pix_arcsec=2.5, beam=(15.0, 12.0, 30.0),
                   mosaic=True, name="askap_sim", template=None):
    """Write the simulated image, catalogues, mosaic and truth table to ``outdir``.

    Parameters
    ----------
    template : path, optional
        A real ASKAP FITS file (``tests/data/askap``) whose header the image keeps
        (:func:`template_header`): its position, pixel size, beam, frequency, axis layout
        (4-D; a cube gets every channel painted with that channel's beam, flux
        S(nu) ~ nu^-0.8, the template's per-channel noise pattern, and blank beams as
        zero-filled planes) replace ``ra0, dec0, pix_arcsec, beam``.

    Returns
    -------
    dict
        Paths ('image', 'sumss_csv', 'nvss_csv', 'truth_csv', 'sumss_mosaic_dir') and the
        truth table ('truth', a DataFrame with ra, dec, kind, askap_flux (at the image's
        reference frequency), sumss_flux, nvss_flux, in_catalogues) plus the image 'rms',
        'frequency' (Hz) and, for a cube, 'channel_freqs' and 'channel_beams'.
    """
    import pandas as pd
    from astropy.io import fits
    from astropy.wcs import WCS
    rng = np.random.default_rng(seed)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    beam_table = None
    if template is not None:
        header, beam_table = template_header(template, size)
        wcs = WCS(header).celestial
        pix_arcsec = abs(header["CDELT2"]) * 3600.0
        nchan = int(header.get("NAXIS3", 1)) if header["NAXIS"] >= 3 else 1
        freqs = header["CRVAL3"] + (np.arange(nchan) + 1 - header["CRPIX3"]) * header["CDELT3"]
        channel_beams, good_beam = _template_beams(header, beam_table, nchan)
        beam = tuple(channel_beams[good_beam][0])
        ra0, dec0 = wcs.all_pix2world([[(size - 1) / 2, (size - 1) / 2]], 0)[0]
        image_freq = float(freqs[0])
    else:
        header = _header(size, pix_arcsec, ra0, dec0, *beam, ASKAP_FREQ)
        wcs = WCS(header)
        nchan, freqs, image_freq = 1, np.array([ASKAP_FREQ]), ASKAP_FREQ
        channel_beams, good_beam = np.array([beam]), np.ones(1, bool)
    footprint_px = 0.48 * size
    inner_px = footprint_px - 40          # sources away from the blank edge
    min_sep = 60.0 / pix_arcsec
    kinds = (["faint"] * n_faint + ["bright"] * n_bright + ["askap_only"] * n_transients
             + ["catalogue_only"] * n_transients + ["large_ratio"] * n_transients)
    n = len(kinds)
    # transients first (wider spacing), then the normal sources
    trans_idx = [k for k, kind in enumerate(kinds) if kind not in ("faint", "bright")]
    pos = np.zeros((n, 2))
    pos[trans_idx] = _place(rng, len(trans_idx), size, 150.0 / pix_arcsec, inner_px - 30)
    normal_idx = [k for k in range(n) if k not in trans_idx]
    # no normal source within 2.5 SUMSS beams of a transient (else "Likely double")
    pos[normal_idx] = _place(rng, len(normal_idx), size, min_sep, inner_px, taken=pos[trans_idx],
                             taken_sep_px=125.0 / pix_arcsec)
    ra, dec = wcs.all_pix2world(pos[:, 0], pos[:, 1], 0)
    kinds = np.array(kinds)
    alpha = rng.normal(-0.8, 0.1, n)
    askap = np.zeros(n)
    askap[kinds == "faint"] = rng.uniform(0.8e-3, 2.5e-3, (kinds == "faint").sum())
    askap[kinds == "bright"] = 15e-3 * (500 / 15) ** rng.random((kinds == "bright").sum())
    askap[kinds == "askap_only"] = rng.uniform(30e-3, 60e-3, (kinds == "askap_only").sum())
    sky_888 = askap.copy()                 # "true" catalogue-epoch flux at the image frequency
    co = np.flatnonzero(kinds == "catalogue_only")
    sky_888[co] = rng.uniform(60e-3, 90e-3, len(co))
    askap[co] = 0.0
    askap[co[1:]] = rng.uniform(2.0, 2.5, len(co) - 1) * rms     # faint, below the 5 sigma seed
    lr = np.flatnonzero(kinds == "large_ratio")
    sky_888[lr] = rng.uniform(20e-3, 40e-3, len(lr))
    askap[lr] = 6.0 * sky_888[lr]
    alpha[kinds != "bright"] = -0.8
    sumss = sky_888 * (SUMSS_FREQ / image_freq) ** alpha
    nvss = sky_888 * (NVSS_FREQ / image_freq) ** alpha
    in_cat = np.isin(kinds, ["bright", "catalogue_only", "large_ratio"])
    # --- ASKAP image (one plane per channel)
    noise_scale = _channel_noise_pattern(template, nchan) if template is not None else np.ones(1)
    yy, xx = np.mgrid[0:size, 0:size]
    outside = np.hypot(xx - size / 2, yy - size / 2) > footprint_px
    planes = []
    for c in range(nchan):
        if not good_beam[c]:
            planes.append(np.zeros((size, size)))          # a flagged channel: zero-filled
            continue
        flux_c = askap * (freqs[c] / image_freq) ** alpha
        plane = _paint_plane(size, pos, flux_c, channel_beams[c], pix_arcsec, rms * noise_scale[c], rng)
        plane[outside] = np.nan
        planes.append(plane)
    image_path = outdir / ("%s.fits" % name)
    if template is not None:
        shape = tuple(header["NAXIS%d" % k] for k in range(header["NAXIS"], 0, -1))
        data = np.stack(planes).reshape(shape).astype(np.float64 if header["BITPIX"] == -64 else np.float32)
        hdus = [fits.PrimaryHDU(data, header=header)] + ([beam_table] if beam_table is not None else [])
        fits.HDUList(hdus).writeto(image_path, overwrite=True)
    else:
        fits.PrimaryHDU(planes[0].astype(np.float32), header=header).writeto(image_path, overwrite=True)
    # --- catalogues (plus sources beyond the image, to be trimmed)
    n_out = 40
    footprint_deg = footprint_px * pix_arcsec / 3600.0      # beyond the blank edge: trimmed
    r_out = np.radians(rng.uniform(1.05, 1.6, n_out) * footprint_deg)
    t_out = rng.uniform(0, 2 * np.pi, n_out)
    ra_out = ra0 + np.degrees(r_out * np.sin(t_out)) / np.cos(np.radians(dec0))
    dec_out = dec0 + np.degrees(r_out * np.cos(t_out))
    f_out = 15e-3 * (500 / 15) ** rng.random(n_out)
    tables = {}
    for survey, nu, srms, pos_err, flux in (("sumss", SUMSS_FREQ, SUMSS_RMS, 1.5, sumss),
                                            ("nvss", NVSS_FREQ, NVSS_RMS, 1.0, nvss)):
        sel = np.flatnonzero(in_cat)
        f = np.concatenate([flux[sel], f_out * (nu / image_freq) ** -0.8])
        f_obs = f * (1 + rng.normal(0, 0.05, len(f))) + rng.normal(0, srms, len(f))
        r = np.concatenate([ra[sel], ra_out]) + rng.normal(0, pos_err, len(f)) / 3600 / np.cos(np.radians(dec0))
        d = np.concatenate([dec[sel], dec_out]) + rng.normal(0, pos_err, len(f)) / 3600
        flux_col = "St" if survey == "sumss" else "S1.4"
        table = pd.DataFrame({"_RAJ2000": np.mod(r, 360), "_DEJ2000": d, flux_col: f_obs * 1e3,
                              "e_" + flux_col: np.hypot(0.05 * f_obs, srms) * 1e3,
                              "MajAxis": 45.0 / abs(np.sin(np.radians(d))) if survey == "sumss" else 45.0,
                              "MinAxis": 45.0, "PA": 0.0})
        if survey == "sumss":
            table["Sp"] = table["St"]
            table["Mosaic"] = "J0000M36"
        tables[survey] = outdir / ("%s_%s.csv" % (name, survey))
        table.to_csv(tables[survey], index=False)
    truth = pd.DataFrame({"ra": np.mod(ra, 360), "dec": dec, "x": pos[:, 0], "y": pos[:, 1], "kind": kinds,
                          "askap_flux": askap, "sky_flux_888": sky_888, "sumss_flux": sumss,
                          "nvss_flux": nvss, "in_catalogues": in_cat, "alpha": alpha})
    truth_path = outdir / ("%s_truth.csv" % name)
    truth.to_csv(truth_path, index=False)
    result = {"image": image_path, "sumss_csv": tables["sumss"], "nvss_csv": tables["nvss"],
              "truth_csv": truth_path, "truth": truth, "rms": rms, "sumss_mosaic_dir": None,
              "frequency": image_freq, "channel_freqs": freqs, "channel_beams": channel_beams,
              "good_beams": good_beam}
    if mosaic:
        result["sumss_mosaic_dir"] = _write_mosaic(outdir / "sumss_mosaics", ra0, dec0, ra, dec,
                                                   sumss * in_cat, rng,
                                                   size=int(max(300, 1.2 * size * pix_arcsec / 11.0)))
    return result


def _paint_plane(size, pos, flux, beam, pix_arcsec, rms, rng):
    """Point sources of integrated ``flux`` (Jy) in a ``beam`` (arcsec, deg) plus
    beam-correlated noise of ``rms`` Jy/beam."""
    from scipy.ndimage import gaussian_filter
    fwhm = 2 * np.sqrt(2 * np.log(2))
    sx, sy = beam[1] / pix_arcsec / fwhm, beam[0] / pix_arcsec / fwhm
    data = _gaussian_sum((size, size), pos[:, 0], pos[:, 1], flux, sx, sy, np.radians(beam[2]))
    noise = gaussian_filter(rng.normal(size=(size, size)), (sy * 0.6, sx * 0.6))
    return data + noise / noise.std() * rms


def _write_mosaic(directory, ra0, dec0, ra, dec, flux, rng, size=300, pix=11.0):
    """A SUMSS-like mosaic (45" x 45" cosec|dec| beam, 2 mJy noise) of the same sky."""
    from astropy.io import fits
    from astropy.wcs import WCS
    directory.mkdir(parents=True, exist_ok=True)
    bmaj = 45.0 / abs(np.sin(np.radians(dec0)))
    header = _header(size, pix, ra0, dec0, bmaj, 45.0, 0.0, SUMSS_FREQ)
    x, y = WCS(header).all_world2pix(ra, dec, 0)
    fwhm = 2 * np.sqrt(2 * np.log(2))
    data = _gaussian_sum((size, size), x, y, flux, 45.0 / pix / fwhm, bmaj / pix / fwhm, 0.0)
    data += rng.normal(0, SUMSS_RMS, data.shape)
    fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(directory / "J0000M36.FITS",
                                                                   overwrite=True)
    return directory


PARSET = """[GENERAL]
nice = 0
[ANALYSIS]
rms_box = 125
[CATALOGUES]
sumss_csv = {sumss}
nvss_csv = {nvss}
write_ann = true
produce_overlays = {overlays}
[TRANSIENTS]
transients = true
[POSTAGESTAMPS]
postage_stamps = {stamps}
postage_stamp_selection = transients
postage_stamp_ncores = 2
sumss_mosaic_dir = {mosaic}
[DATABASE]
db_tag = demo
"""


def write_parset(sim, path, overlays=True, stamps=False):
    """A parset pointing the pipeline at the simulated catalogues."""
    Path(path).write_text(PARSET.format(sumss=sim["sumss_csv"], nvss=sim["nvss_csv"],
                                        overlays=str(overlays).lower(), stamps=str(stamps).lower(),
                                        mosaic=sim["sumss_mosaic_dir"] or ""))
    return Path(path)


def score_candidates(master, truth, radius=20.0):
    """Compare the pipeline's candidates with the injected transients.

    Returns a dict: per kind the number injected / found with the right class, and the
    number of false candidates (no injected transient within ``radius`` arcsec).
    """
    import racs_pipeline as racs
    kinds = {"askap_only": "askap_only", "catalogue_only": "catalogue_only", "large_ratio": "large_ratio"}
    cand = master[master["candidate"]]
    out = {"n_sources": int(len(truth)), "n_candidates": int(len(cand))}
    trans = truth[truth["kind"].isin(list(kinds))].reset_index(drop=True)
    idx, _ = racs.crossmatch_nearest(trans["ra"], trans["dec"], cand["ra"], cand["dec"], max_sep=radius)
    for kind in kinds:
        rows = np.flatnonzero(trans["kind"] == kind)
        found = [(idx[r] >= 0) and cand["transient_class"].iloc[idx[r]] == kind for r in rows]
        out[kind] = {"injected": int(len(rows)), "found": int(np.sum(found))}
    back, _ = racs.crossmatch_nearest(cand["ra"], cand["dec"], trans["ra"], trans["dec"], max_sep=radius)
    out["false_candidates"] = int(np.sum(back < 0))
    return out


def run_demo(outdir, size=1000, seed=7, db_url=None, stamps="transients"):
    """Simulate a field, run ``racs_pipeline process`` on it, and summarise the recovery.

    Parameters
    ----------
    db_url : str, optional
        Database to write (default: the SQLite file in the output folder).
    stamps : {'transients', 'all'}
        Which rows get postage stamps.

    Returns
    -------
    dict
        exit code, output directory, database URL, pipeline summary, candidate scoring
        (per injected kind: injected / found; false candidates) and the wall time.
    """
    import time
    import racs_pipeline as racs
    outdir = Path(outdir)
    sim = simulate_field(outdir / "input", size=size, seed=seed)
    parset = write_parset(sim, outdir / "input" / "demo_parset.in", stamps=True)
    stem = Path(sim["image"]).stem
    db_url = db_url or "sqlite:///%s" % (outdir / (stem + "_results") / "racs.sqlite").resolve()
    start = time.perf_counter()
    code = racs.main(["process", "-q", "-c", str(parset), "--output-dir", str(outdir), "--db-url", db_url,
                      "--postage-stamp-selection", stamps, "--overwrite", str(sim["image"])])
    elapsed = time.perf_counter() - start
    result = {"exit_code": code, "output_dir": str(outdir), "wall_s": round(elapsed, 1), "db_url": db_url,
              "truth_csv": str(sim["truth_csv"])}
    if code == 0:
        results = outdir / (stem + "_results")
        summary = json.loads((results / (stem + "_summary.json")).read_text())
        master = racs.read_table(results / "transients" / "transients_master.csv")
        result.update({"summary": {k: summary[k] for k in ("n_askap", "surveys", "n_candidates",
                                                             "candidates", "median_flux_ratio")},
                       "scoring": score_candidates(master, sim["truth"])})
    return result


# ---------------------------------------------------------------------------
# the review website: set up, serve in a subprocess, drive headless Chromium
# (shared by tests/test_racs_web_browser.py, the demo and benchmarks/bench_racs_web.py)
# ---------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
WEB_PASSWORD = "vetting-2026"
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_executable():
    """The system Chromium (Debian package ``chromium``), or None."""
    import shutil
    for path in ("/usr/lib/chromium/chromium", "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if path and Path(path).exists():
            return str(path)
    return None


def web_environment(tmp_dir):
    """Environment of a racs_web subprocess: offline CASA config, a test SECRET_KEY, no proxies."""
    import os
    env = dict(os.environ, CASASITECONFIG=str(ROOT / "configs" / "casasiteconfig.py"), MPLBACKEND="Agg",
               RACS_WEB_SECRET_KEY="test-only-secret-" + "x" * 32, XDG_CONFIG_HOME=str(Path(tmp_dir) / "xdg"))
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(key, None)
    return env


def web_cli(args, env, stdin=None):
    """``racs_pipeline.py web ...`` in a subprocess; raises with its output when it fails."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(ROOT / "racs_pipeline.py"), "web", *map(str, args)], env=env,
                          input=stdin, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError("web %s failed (%d): %s" % (" ".join(map(str, args)), done.returncode,
                                                     done.stdout + done.stderr))
    return done


def web_setup(db_url, env, users=(("vetter", True), ("helper", False))):
    """Migrate ``db_url`` and create users (password ``WEB_PASSWORD``) through the command line."""
    web_cli(["migrate", "--db", db_url], env)
    for name, staff in users:
        web_cli(["createuser", "--db", db_url, "--username", name, "--password-stdin"]
                + (["--staff"] if staff else []), env, stdin=WEB_PASSWORD + "\n")


class WebServer:
    """``racs_pipeline.py web serve`` in a subprocess on a free loopback port (a context manager)."""

    def __init__(self, db_url, env, extra=(), log_path=None):
        self.db_url, self.env, self.extra = db_url, env, list(extra)
        self.log_path = log_path
        self.process = None
        self.url = None

    def __enter__(self):
        import socket
        import subprocess
        import sys
        import time
        import urllib.request
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = "http://127.0.0.1:%d/" % port
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen([sys.executable, str(ROOT / "racs_pipeline.py"), "web", "serve", "--db",
                                         self.db_url, "--port", str(port), *self.extra], env=self.env,
                                        stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("web serve exited with %s" % self.process.returncode)
            try:
                urllib.request.urlopen(self.url + "accounts/login/", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise RuntimeError("web serve did not answer on %s" % self.url)

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except Exception:  # noqa: BLE001 - it did not stop: kill it
                self.process.kill()
        return False


def browser_login(page, base_url, username="vetter", password=WEB_PASSWORD):
    """Log in through the site's login form."""
    page.goto(base_url + "accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(base_url)


def web_screenshots(db_url, outdir, tmp_dir=None):
    """Serve ``db_url`` for a moment and save screenshots of the candidates page and a source page.

    Returns the written PNG paths (nothing when no Chromium is installed).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    browser_path = chromium_executable()
    if browser_path is None:
        return []
    from playwright.sync_api import sync_playwright
    env = web_environment(tmp_dir or outdir)
    web_setup(db_url, env, users=(("demo", True),))
    written = []
    with WebServer(db_url, env, log_path=outdir / "serve.log") as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        browser_login(page, server.url, "demo")
        page.click("#runs a >> nth=0")
        page.click("text=Candidates")
        written.append(outdir / "candidates.png")
        page.screenshot(path=str(written[-1]), full_page=True)
        page.click("a.source-link >> nth=0")
        written.append(outdir / "source.png")
        page.screenshot(path=str(written[-1]), full_page=True)
        browser.close()
    return written


def run_web_demo(outdir):
    """The review website on the pipeline demo's database: served for a moment, screenshots of
    the candidates page and a source page under ``outdir`` (make demo: demo_output/racs_web/)."""
    import shutil
    outdir = Path(outdir)
    source = outdir.parent / "racs_pipeline" / "askap_sim_results" / "racs.sqlite"
    if not source.is_file():                       # run on its own: make the pipeline demo here
        run_demo(outdir / "pipeline")
        source = outdir / "pipeline" / "askap_sim_results" / "racs.sqlite"
    database = outdir / "racs_review.sqlite"
    shutil.copy(source, database)
    url = "sqlite:///%s" % database.resolve()
    if chromium_executable() is None:
        return {"database": str(database), "screenshots": "skipped: no Chromium (apt-get install chromium)"}
    shots = web_screenshots(url, outdir)
    return {"database": str(database), "screenshots": [str(p) for p in shots],
            "serve": "python racs_pipeline.py web serve --db %s" % url}


if __name__ == "__main__":
    import sys
    print(json.dumps(run_demo(sys.argv[1] if len(sys.argv) > 1 else "racs_demo"), indent=2, default=str))
