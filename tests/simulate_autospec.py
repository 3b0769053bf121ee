"""MUSE-like IFU cube simulator for AutoSpec's tests, benchmark and demo.

A cube on a TAN WCS with a slice of the MUSE range (4750-9350 Angstrom, 1.25 Angstrom
channels), a Moffat PSF, Gaussian sky noise with a known variance (STAT), and galaxies
of known continuum + emission-line spectra, two of them blended; a catalogue; an extra
broad-band image on another grid (IMG) and a segmentation map on the cube's grid (SEG).

Use::

    from simulate_autospec import Scene, default_scene, write_scene
    scene = default_scene()
    files = write_scene(scene, tmp_path)          # cube.fits, catalogue.txt, ...
    scene.truth[ID]["spectrum"], scene.truth[ID]["profile"]

``run_demo(outdir)`` simulates, runs autospec and plots extracted vs true spectra.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Galaxy", "Scene", "default_scene", "benchmark_scene", "moffat_profile",
           "write_scene", "write_cube", "write_image", "write_segmentation",
           "write_catalogue", "run_demo"]

RA0, DEC0 = 150.1, 2.2
BUNIT = "10**(-20)*erg/s/cm**2/Angstrom"


@dataclass
class Galaxy:
    """A compact galaxy: position (pixels), continuum and emission lines."""

    ID: int
    x: float
    y: float
    continuum: float                 # flux per channel at the blue end
    slope: float = 0.0               # fractional change over the band
    lines: tuple = ()                # ((wavelength, total flux per channel peak, sigma_A), ...)
    fwhm: float = 0.7                # arcsec


@dataclass
class Scene:
    """A simulated field: geometry, galaxies, noise, and the noiseless truth."""

    nx: int = 40
    ny: int = 40
    nwave: int = 300
    lmin: float = 6000.0
    dlam: float = 1.25
    pixscale: float = 0.2
    sigma: float = 1.0
    beta: float = 2.8
    seed: int = 1
    galaxies: list = field(default_factory=list)
    truth: dict = field(default_factory=dict)

    @property
    def wave(self):
        return self.lmin + self.dlam * np.arange(self.nwave)

    def radec(self, x, y):
        """Sky position (deg) of pixel (x, y) (0-based) on the TAN grid."""
        return tuple(float(v) for v in self.celestial_wcs().wcs_pix2world([[x, y]], 0)[0])

    def celestial_wcs(self, pixscale=None, nx=None, ny=None):
        from astropy.wcs import WCS
        pixscale = pixscale or self.pixscale
        nx, ny = nx or self.nx, ny or self.ny
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [RA0, DEC0]
        w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
        w.wcs.cd = np.array([[-pixscale / 3600.0, 0], [0, pixscale / 3600.0]])
        w.wcs.cunit = ["deg", "deg"]
        return w

    def sigma_spectrum(self):
        """Noise per channel: flat, with a few sky-line bumps."""
        wave = self.wave
        bumps = sum(np.exp(-0.5 * ((wave - w0) / 1.5) ** 2)
                    for w0 in (self.lmin + 0.3 * (wave[-1] - self.lmin),
                               self.lmin + 0.77 * (wave[-1] - self.lmin)))
        return self.sigma * (1.0 + 2.0 * bumps)


def moffat_profile(shape, x0, y0, fwhm_pix, beta=2.8):
    """Moffat profile sampled at pixel centres, normalised to unit total flux on the sky.

    :math:`I(r) = (\\beta-1)/(\\pi\\alpha^2) (1 + r^2/\\alpha^2)^{-\\beta}` with
    :math:`\\alpha = \\mathrm{FWHM} / (2\\sqrt{2^{1/\\beta}-1})` (Moffat 1969); the sum over
    a finite image is the fraction of the flux that falls on it.
    """
    alpha = fwhm_pix / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    yy, xx = np.indices(shape, dtype=float)
    r2 = (xx - x0) ** 2 + (yy - y0) ** 2
    return (beta - 1.0) / (np.pi * alpha ** 2) * (1.0 + r2 / alpha ** 2) ** (-beta)


def galaxy_spectrum(galaxy, wave):
    """Total flux per channel: linear continuum plus Gaussian emission lines."""
    t = (wave - wave[0]) / (wave[-1] - wave[0])
    spec = galaxy.continuum * (1.0 + galaxy.slope * t)
    for centre, peak, sigma in galaxy.lines:
        spec = spec + peak * np.exp(-0.5 * ((wave - centre) / sigma) ** 2)
    return spec


def default_scene(seed=1):
    """Small test scene (60 x 60 x 300): 2 bright + 2 faint isolated galaxies, a blended pair.

    IDs 1, 2 bright isolated; 3, 4 faint isolated; 5 and 6 a blended pair 1.0 arcsec
    apart whose emission lines differ (6150 and 6300 Angstrom).
    """
    scene = Scene(nx=60, ny=60, seed=seed)
    scene.galaxies = [
        Galaxy(1, 15.0, 14.5, 60.0, 0.3, ((6100.0, 400.0, 2.0),)),
        Galaxy(2, 44.2, 15.0, 40.0, -0.2, ((6200.0, 300.0, 2.0), (6250.0, 150.0, 2.0))),
        Galaxy(3, 14.0, 45.0, 3.0, 0.0, ((6120.0, 40.0, 2.0),)),
        Galaxy(4, 29.0, 30.0, 1.0, 0.1, ((6220.0, 40.0, 2.0),)),
        Galaxy(5, 40.0, 46.0, 40.0, 0.0, ((6150.0, 300.0, 2.0),)),
        Galaxy(6, 45.0, 46.0, 25.0, 0.0, ((6300.0, 300.0, 2.0),)),
    ]
    return scene


def benchmark_scene(nx=200, ny=200, nwave=1000, nobj=210, seed=7):
    """Large scene for the benchmark: >= 200 x 200 x 1000 with >= 200 galaxies on a jittered grid."""
    rng = np.random.default_rng(seed)
    scene = Scene(nx=nx, ny=ny, nwave=nwave, lmin=4750.0, seed=seed)
    ncol = int(np.ceil(np.sqrt(nobj)))
    spacing = (nx - 16) / ncol
    wave = scene.wave
    for i in range(nobj):
        gx = 8 + spacing * (i % ncol + 0.5) + rng.uniform(-2, 2)
        gy = 8 + spacing * (i // ncol + 0.5) + rng.uniform(-2, 2)
        line = rng.uniform(wave[50], wave[-50])
        scene.galaxies.append(Galaxy(i + 1, gx, gy, float(rng.uniform(2, 40)),
                                     float(rng.uniform(-0.3, 0.3)),
                                     ((line, float(rng.uniform(30, 300)), 2.0),)))
    return scene


def render(scene):
    """Noiseless cube, data cube, variance cube; fills ``scene.truth``."""
    rng = np.random.default_rng(scene.seed)
    wave = scene.wave
    model = np.zeros((scene.nwave, scene.ny, scene.nx), dtype=np.float32)
    for gal in scene.galaxies:
        spec = galaxy_spectrum(gal, wave)
        half = int(min(max(scene.nx, scene.ny), 40))
        x0, x1 = max(int(gal.x) - half, 0), min(int(gal.x) + half + 1, scene.nx)
        y0, y1 = max(int(gal.y) - half, 0), min(int(gal.y) + half + 1, scene.ny)
        prof = moffat_profile((y1 - y0, x1 - x0), gal.x - x0, gal.y - y0,
                              gal.fwhm / scene.pixscale, scene.beta)
        model[:, y0:y1, x0:x1] += (spec[:, None, None] * prof[None]).astype(np.float32)
        full = np.zeros((scene.ny, scene.nx))
        full[y0:y1, x0:x1] = prof
        ra, dec = scene.radec(gal.x, gal.y)
        scene.truth[gal.ID] = {"spectrum": spec, "profile": full, "ra": ra, "dec": dec,
                               "x": gal.x, "y": gal.y, "galaxy": gal}
    sigma = scene.sigma_spectrum().astype(np.float32)
    var = np.broadcast_to((sigma ** 2)[:, None, None], model.shape).astype(np.float32)
    noise = rng.standard_normal(model.shape, dtype=np.float32) * sigma[:, None, None]
    return model, model + noise, var


def _cube_header(scene):
    from astropy.io import fits
    header = scene.celestial_wcs().to_header()
    hdr = fits.Header()
    for key in header:
        hdr[key.replace("PC1_1", "CD1_1").replace("PC2_2", "CD2_2")] = header[key]
    hdr["CTYPE3"], hdr["CUNIT3"] = "AWAV", "Angstrom"
    hdr["CRVAL3"], hdr["CRPIX3"], hdr["CD3_3"] = scene.lmin, 1.0, scene.dlam
    hdr["CD1_3"] = hdr["CD2_3"] = hdr["CD3_1"] = hdr["CD3_2"] = 0.0
    hdr["CD1_2"] = hdr["CD2_1"] = 0.0
    hdr["BUNIT"] = BUNIT
    for key in ("PC1_1", "PC2_2", "CDELT1", "CDELT2"):
        hdr.remove(key, ignore_missing=True)
    return hdr


def write_cube(scene, path, form="muse", data=None, var=None, fsf=False):
    """Write the cube.

    form : 'muse' (DATA + STAT extensions, INSTRUME=MUSE), 'novar' (DATA only),
    'primary' (data in the primary HDU, variance in extension 1: DATA_EXT = (0, 1)),
    'named' (extensions SCI and ERRV: DATA_EXT = ('SCI', 'ERRV')).
    fsf : bool
        Also write MUSE FSF keywords (mpdaf ``MoffatModel2``, FSFMODE = 2) of the scene's
        PSF (the galaxies' FWHM, constant with wavelength, and ``scene.beta``) in the
        primary header, so that AutoSpec makes its PSF extraction.
    """
    from astropy.io import fits
    if data is None:
        _, data, var = render(scene)
    hdr = _cube_header(scene)
    primary = fits.Header({"INSTRUME": "MUSE"}) if form in ("muse", "novar") else fits.Header()
    if fsf:
        from mpdaf.MUSE import MoffatModel2
        fwhm = float(np.mean([g.fwhm for g in scene.galaxies])) if scene.galaxies else 0.7
        MoffatModel2([fwhm], [scene.beta], (float(scene.wave[0]), float(scene.wave[-1])),
                     scene.pixscale).to_header(primary)
    if form in ("muse", "novar"):
        hdus = [fits.PrimaryHDU(header=primary), fits.ImageHDU(data, hdr, name="DATA")]
        if form == "muse":
            hdus.append(fits.ImageHDU(var, hdr, name="STAT"))
    elif form == "primary":
        hdus = [fits.PrimaryHDU(data, hdr), fits.ImageHDU(var, hdr, name="ERRVAR")]
    elif form == "named":
        hdus = [fits.PrimaryHDU(), fits.ImageHDU(data, hdr, name="SCI"),
                fits.ImageHDU(var, hdr, name="ERRV")]
    else:
        raise ValueError("unknown cube form %r" % form)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return Path(path)


def write_image(scene, path, pixscale=0.1, fwhm=0.35, noise=0.05, seed=3):
    """A broad-band image of the galaxies' continuum on a finer grid (for IMG)."""
    from astropy.io import fits
    factor = scene.pixscale / pixscale
    nx, ny = int(scene.nx * factor), int(scene.ny * factor)
    image = np.zeros((ny, nx))
    for gal in scene.galaxies:
        x = (gal.x + 0.5) * factor - 0.5
        y = (gal.y + 0.5) * factor - 0.5
        flux = galaxy_spectrum(gal, scene.wave).sum() / scene.nwave
        image += flux * moffat_profile((ny, nx), x, y, fwhm / pixscale, scene.beta)
    image += np.random.default_rng(seed).normal(0, noise, image.shape)
    header = scene.celestial_wcs(pixscale, nx, ny).to_header()
    fits.PrimaryHDU(image.astype(np.float32), header).writeto(path, overwrite=True)
    return Path(path)


def write_segmentation(scene, path, threshold=0.004, ids=None):
    """A segmentation map on the cube's grid from the true profiles (for SEG)."""
    from astropy.io import fits
    if not scene.truth:
        render(scene)
    seg = np.zeros((scene.ny, scene.nx), dtype=np.int32)
    best = np.zeros((scene.ny, scene.nx))
    for ident, truth in scene.truth.items():
        if ids is not None and ident not in ids:
            continue
        prof = truth["profile"]
        take = (prof > threshold) & (prof > best)
        seg[take], best[take] = ident, prof[take]
    header = scene.celestial_wcs().to_header()
    fits.PrimaryHDU(seg, header).writeto(path, overwrite=True)
    return Path(path)


def write_catalogue(scene, path, mode="param", extra_rows=(), size=5.0, ref=""):
    """Catalogue 'ID RA DEC' (param mode) or 'ID RA DEC SIZE REF' (cat mode)."""
    if not scene.truth:
        render(scene)
    lines = ["#ID RA DEC" + (" SIZE REF" if mode == "cat" else "")]
    for ident, truth in scene.truth.items():
        line = "%d %.8f %.8f" % (ident, truth["ra"], truth["dec"])
        if mode == "cat":
            line += " %.1f %s" % (size, ref or "white")
        lines.append(line)
    lines.extend(extra_rows)
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def write_scene(scene, directory, form="muse"):
    """Cube + catalogue in ``directory``; returns their paths; fills ``scene.truth``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, data, var = render(scene)
    cube = write_cube(scene, directory / "cube.fits", form, data, var)
    catalogue = write_catalogue(scene, directory / "catalogue.txt")
    return {"cube": cube, "catalogue": catalogue, "model": model}


def run_demo(outdir):
    """Simulate a cube with a blended pair, run autospec, plot extracted vs true spectra.

    Returns a summary dict: output directory, PNG path, per-object status and the ratio
    of extracted to true flux (inside the object mask) of the final spectrum.
    """
    import sys
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import autospec
    outdir = Path(outdir)
    scene = default_scene()
    files = write_scene(scene, outdir / "input")
    result = autospec.run(DATACUBE=files["cube"], CATALOG=files["catalogue"], APER=[1.0, 2.0],
                          OUTPUT=outdir / "autospec_output", PLOTS=False, overwrite=True,
                          progress=False)
    from mpdaf.sdetect import Source
    fig, axes = plt.subplots(len(result["rows"]), 1, figsize=(9, 2.2 * len(result["rows"])),
                             squeeze=False)
    ratios = {}
    for ax, row in zip(axes[:, 0], result["rows"]):
        truth = scene.truth[row["ID"]]
        src = Source.from_file(row["FILE"])
        name = "%s_TOT_SKYSUB" % "MUSE"
        mask = src.images["MASK_OBJ"].data.filled(0).astype(bool)
        stamp_truth = truth["spectrum"] * _mask_fraction(src, truth, mask)
        spec = src.spectra[row["FINAL_SPECTRUM"]].data.filled(np.nan)
        ax.plot(scene.wave, src.spectra[name].data, lw=0.5, color="0.6", label="mask sum")
        ax.plot(scene.wave, spec, lw=0.7, color="C0", label=row["FINAL_SPECTRUM"])
        ax.plot(scene.wave, stamp_truth, lw=1.0, color="C3", label="truth (in mask)")
        ax.set_title("ID %d (%s)" % (row["ID"], row["STATUS"]))
        ax.legend(fontsize=6, loc="upper right")
        ratios[row["ID"]] = round(float(np.nansum(src.spectra["MUSE_WHITE_SKYSUB"].data)
                                        / stamp_truth.sum()), 2)
    axes[-1, 0].set_xlabel("wavelength (Angstrom)")
    fig.tight_layout()
    png = outdir / "autospec_demo.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return {"outdir": str(outdir), "png": str(png), "n_objects": len(result["rows"]),
            "status": {r["ID"]: r["STATUS"] for r in result["rows"]},
            # white-weighted flux / injected flux in the mask: ~1 for isolated bright
            # objects; noisy for faint ones, above 1 where a neighbour contaminates
            "white_flux_ratio": ratios, "elapsed_s": round(result["elapsed_s"], 1)}


def _mask_fraction(src, truth, mask):
    """Fraction of a galaxy's flux inside a Source's object mask (on the full grid)."""
    from mpdaf.obj import WCS  # noqa: F401  (mpdaf present when Sources are read)
    image = src.images["MASK_OBJ"]
    y0, x0 = (int(round(v)) for v in _stamp_origin(image, truth))
    prof = truth["profile"][y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
    return float(prof[mask[:prof.shape[0], :prof.shape[1]]].sum())


def _stamp_origin(image, truth):
    """Pixel (y, x) on the full grid of a stamp's first pixel (same pixel scale)."""
    yx = image.wcs.sky2pix([[truth["dec"], truth["ra"]]])[0]
    return truth["y"] - yx[0], truth["x"] - yx[1]
