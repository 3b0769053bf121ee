"""Simulated spectral cubes for clover tests and benchmarks: any channel width, any line width,
independent or beam-correlated noise, written with a real header when one is given.

Regions (left to right): noise, one component, two components (resolved: 3 dispersions apart),
with gentle gradients along y.  ``truth`` maps follow clover's output names.
"""
import numpy as np

import clover

__all__ = ["domain_cube", "write_cube_fits", "map_metrics", "pooled_pulls", "beam_noise"]


def beam_noise(rng, shape, beam_px):
    """Unit-rms noise (nchan, ny, nx), smoothed spatially by a Gaussian of ``beam_px`` (sigma)."""
    noise = rng.standard_normal(shape)
    if beam_px > 0:
        from scipy.ndimage import gaussian_filter
        noise = gaussian_filter(noise, (0, beam_px, beam_px), mode="wrap")
        noise /= noise.std()
    return noise


def domain_cube(line="gauss", dv_kms=clover.TEMPLATE_DV_KMS, sigma_kms=0.3, ny=12, nx=12, rng=None,
                snr=10.0, beam_px=0.0, v0=0.0, nchan=None):
    """Cube of Gaussian or NH3 (1,1) lines on an axis of ``dv_kms`` channels.

    Returns
    -------
    cube : (nchan, ny, nx) float32, velocity increasing
    velocity : (nchan,) km/s
    truth : dict of (ny, nx) maps (class, ncomp, vlsr1, vlsr2, sig1, sig2, tpeak1, tpeak2, vlsr, sig, tpeak)
    """
    rng = rng or np.random.default_rng(0)
    yy, xx = np.mgrid[0:ny, 0:nx]
    ncomp = np.where(xx < nx // 3, 0, np.where(xx < 2 * nx // 3, 1, 2))
    grad = yy / max(ny - 1, 1) - 0.5
    sig1 = sigma_kms * (1 + 0.1 * grad)
    sig2 = 1.2 * sigma_kms * np.ones_like(sig1)
    v1 = v0 + 4 * sigma_kms * 0.3 * grad
    v2 = v1 + 3.0 * np.maximum(sig1, sig2)
    span = 12 * sigma_kms + 8 * sigma_kms + (45.0 if line == "nh3" else 0.0)
    nchan = nchan or int(max(256, np.ceil(span / dv_kms)))
    vel = v0 + (np.arange(nchan) - (nchan - 1) / 2) * dv_kms + 1.5 * sigma_kms
    m = ny * nx
    if line == "gauss":
        noise = 1.0 / snr
        a1, a2 = np.where(ncomp > 0, 1.0, 0.0), np.where(ncomp == 2, 0.6, 0.0)
        spec = clover.gaussian_profiles(vel, np.column_stack([a1.ravel(), a2.ravel()]),
                                        np.column_stack([v1.ravel(), v2.ravel()]),
                                        np.column_stack([sig1.ravel(), sig2.ravel()]))
        t1, t2 = a1, a2
    else:
        noise = 0.1
        freq = clover.NH3_11_REST_HZ * (1 - vel / clover.C_KMS)
        a = clover.nh3_spectra(freq, np.full(m, 15.0), np.full(m, 14.0), sig1.ravel(), v1.ravel())
        b = clover.nh3_spectra(freq, np.full(m, 12.0), np.full(m, 13.8), sig2.ravel(), v2.ravel())
        a[(ncomp == 0).ravel()] = 0
        b[(ncomp < 2).ravel()] = 0
        spec = a + b
        t1, t2 = a.max(1).reshape(ny, nx), b.max(1).reshape(ny, nx)
    cube = spec.T.reshape(nchan, ny, nx) + noise * beam_noise(rng, (nchan, ny, nx), beam_px)
    nan = lambda a, keep: np.where(keep, a, np.nan)  # noqa: E731
    two, one = ncomp == 2, ncomp == 1
    truth = {"class": np.choose(ncomp, [1, 0, 2]).astype(float), "ncomp": ncomp.astype(float),
             "vlsr1": nan(v1, two), "vlsr2": nan(v2, two), "sig1": nan(sig1, two), "sig2": nan(sig2, two),
             "tpeak1": nan(t1, two), "tpeak2": nan(t2, two), "vlsr": nan(v1, one), "sig": nan(sig1, one),
             "tpeak": nan(t1, one), "noise": noise}
    return cube.astype(np.float32), vel, truth


def write_cube_fits(path, cube, velocity, line="gauss", beam_px=0.0, template=None):
    """Write a simulated cube; with ``template`` (a FITS path) its header is kept (spectral
    axis and size replaced), else clover.cube_hdu's.  BMAJ/BMIN describe the noise
    correlation (FWHM of the correlation of noise smoothed by ``beam_px``)."""
    from astropy.io import fits
    rest = clover.NH3_11_REST_HZ if line == "nh3" else 115.2712018e9
    hdu = clover.cube_hdu(cube, velocity, rest_hz=rest)
    if template is not None:
        hdr = fits.getheader(template).copy()
        for key in ("NAXIS1", "NAXIS2", "NAXIS3", "CRVAL3", "CDELT3", "CRPIX3", "CTYPE3", "CUNIT3"):
            hdr[key] = hdu.header[key]
        hdr["RESTFRQ"] = rest
        hdu = fits.PrimaryHDU(cube.astype(np.float32), hdr)
    if beam_px > 0:
        pix = abs(hdu.header["CDELT1"])
        hdu.header["BMAJ"] = hdu.header["BMIN"] = 2.3548 * np.sqrt(2) * beam_px * pix
        hdu.header["BPA"] = 0.0
    elif "BMAJ" in hdu.header and template is not None:
        pix = abs(hdu.header["CDELT1"])
        hdu.header["BMAJ"] = hdu.header["BMIN"] = 0.5 * pix    # independent pixels
    hdu.writeto(path, overwrite=True)
    return path


def _matched(maps, truth):
    """(selection, names) of the interior pixels where clover found the true number of
    components: two-component pixels (vlsr1, vlsr2) and one-component pixels (vlsr)."""
    inner = clover.interior_pixels(truth["class"])
    return [(inner & (truth["ncomp"] == k) & (maps["ncomp"] == k), names)
            for k, names in ((2, ("vlsr1", "vlsr2")), (1, ("vlsr",)))]


def pooled_pulls(maps_and_truths):
    """Finite centroid pulls (fit - truth) / error of one or several (maps, truth) pairs."""
    pulls = [((maps[n] - truth[n]) / maps[n + "_err"])[sel]
             for maps, truth in maps_and_truths for sel, names in _matched(maps, truth) for n in names]
    pulls = np.concatenate(pulls)
    return pulls[np.isfinite(pulls)]


def map_metrics(maps, truth, dv_kms):
    """Interior class accuracy and kinematic errors of clover maps against the truth; the
    centroid pull spread is clover.mad_sigma of :func:`pooled_pulls` (one map)."""
    inner = clover.interior_pixels(truth["class"])
    out = {"class_accuracy": float((maps["class"] == truth["class"])[inner].mean())}
    dv, ds = [], []
    for sel, names in _matched(maps, truth):
        for name in names:
            dv.append(np.abs(maps[name] - truth[name])[sel])
            sname = name.replace("vlsr", "sig")
            ds.append(np.abs(maps[sname] - truth[sname])[sel] / truth[sname][sel])
    dv, ds = (np.concatenate(a) if a else np.array([np.nan]) for a in (dv, ds))
    pull = pooled_pulls([(maps, truth)])
    out.update({"mae_v_kms": float(np.nanmedian(dv)), "mae_v_channels": float(np.nanmedian(dv) / dv_kms),
                "mae_sigma_rel": float(np.nanmedian(ds)), "pull_std_v": float(clover.mad_sigma(pull)),
                "pull_median_v": float(np.median(pull)) if pull.size else float("nan"), "n_pulls": int(pull.size)})
    return out
