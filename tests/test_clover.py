"""Tests of clover.py: simulators, shipped models (real TensorFlow inference), predict, CLI.

Accuracy tests use fresh simulated sets with seeds different from the training seed
(20191119, and 20191120 for the table in models/clover/clover_models.json).
"""
import json
import warnings

import numpy as np
import pytest

import clover
from conftest import ROOT

TEST_SEED = 777
OUTPUT_NAMES = sorted(n for n, v in clover.OUTPUT_MAPS.items() if v[2] is None)
FILES = sorted(OUTPUT_NAMES + ["table", "provenance", "model", "residual"])
# issue #5, peak S/N >= 4.  NH3 two components per spectrum: 0.93 - pairs closer than 1.5
# dispersions at S/N 4-8 are not separable by BIC from one spectrum (measured 0.941 on this
# seed; the networks alone 0.940); wide pairs are held to 0.97 below.
THRESHOLDS = {"one": 0.97, "two": 0.97, "noise": 0.99}
NH3_TWO = 0.93


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gauss_models():
    return clover.CloverModels("gauss", nproc=2)


@pytest.fixture(scope="module")
def nh3_models():
    return clover.CloverModels("nh3", nproc=2)


@pytest.fixture(scope="module")
def gauss_table(gauss_models):
    return clover.evaluate("gauss", gauss_models, n=9000, seed=TEST_SEED)


@pytest.fixture(scope="module")
def nh3_table(nh3_models):
    return clover.evaluate("nh3", nh3_models, n=4500, seed=TEST_SEED)


def write_cube(path, line="gauss", ny=12, nx=12, nchan=None, axis="vrad", vel_unit="km/s", seed=1, snr=10.0):
    """Simulated cube (noise | one | two component columns) written as FITS; returns truth."""
    cube, vel, truth = clover.simulate_cube(line, ny, nx, np.random.default_rng(seed), snr=snr, nchan=nchan)
    rest = clover.NH3_11_REST_HZ if line == "nh3" else 115.2712018e9
    clover.cube_hdu(cube, vel, axis=axis, rest_hz=rest, vel_unit=vel_unit).writeto(path)
    return cube, vel, truth


# ---------------------------------------------------------------------------
# simulators and pure functions
# ---------------------------------------------------------------------------
def test_nh3_model_matches_pyspeckit():
    from pyspeckit.spectrum.models import ammonia
    from pyspeckit.spectrum.units import SpectroscopicAxis
    freq, vel = clover.nh3_template_axis()
    xarr = SpectroscopicAxis(freq / 1e9, unit="GHz", refX=clover.NH3_11_REST_HZ / 1e9,
                             velocity_convention="radio", refX_unit="GHz")
    params = [(15.0, 14.0, 0.3, 0.5), (25.0, 13.2, 1.2, -2.0), (10.0, 14.5, 0.09, 3.0)]
    ours = clover.nh3_spectra(freq, *np.array(params).T)
    fast = clover.nh3_spectra_fast(freq, *np.array(params).T)
    for p, mine, quick in zip(params, ours, fast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ammonia.cold_ammonia(xarr, p[0], ntot=p[1], width=p[2], xoff_v=p[3])
        assert np.allclose(mine, ref, atol=1e-5 * ref.max())
        assert np.abs(quick - ref).max() < 2e-3 * ref.max()
    assert vel[1] > vel[0] and vel[499] == pytest.approx(0.0, abs=1e-9)


def test_rotational_temperature_hand_value():
    # Swift et al. 2005 eq. A6 at T_K = 20 K: e^-0.785 = 0.4561, ln(1.2737) = 0.2419,
    # 20 / (1 + 0.4857 x 0.2419) = 20 / 1.1175 = 17.90 K
    assert clover.nh3_rotational_temperature(20.0) == pytest.approx(17.90, abs=0.01)


@pytest.mark.parametrize("line", ["gauss", "nh3"])
def test_simulator_is_seeded_and_within_documented_ranges(line):
    simulate = clover.LINE_TYPES[line]["simulate"]
    a = simulate(300, np.random.default_rng(3))
    b = simulate(300, np.random.default_rng(3))
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["label"], b["label"])
    nchan = clover.LINE_TYPES[line]["nchan"]
    assert a["x"].shape == (300, nchan, 2) and a["x"].dtype == np.float32
    assert np.allclose(a["x"].max(axis=1), 1.0)                  # both inputs / their max
    assert np.bincount(a["label"]).tolist() == [100, 100, 100]   # balanced thirds
    two = a["label"] == 2
    assert np.all(a["reg2"][two, 0] <= a["reg2"][two, 1])        # component 1 = lower centroid
    # velocity increases with channel index: a one-component line peaks at its target channel
    one = a["label"] == 0
    half = (nchan - 1) / 2
    peak = np.argmax(a["x"][one, :, 0], axis=1)
    assert np.median(np.abs(peak - (a["reg1"][one, 0] * half + half))) < 2
    v = a["v"][np.isfinite(a["v"])]
    vmax = 10.0 + 5 * 0.8 if line == "gauss" else 2.5 + 2.5 + 2.0
    assert np.abs(v).max() <= vmax
    if line == "gauss":
        s = a["sigma"][np.isfinite(a["sigma"])]
        assert s.min() >= 0.15 and s.max() <= 0.8
        assert a["snr"][a["label"] != 1].min() >= 4 - 1e-9


def test_fit_length_pads_and_clips_hand_worked():
    rng = np.random.default_rng(0)
    cube = np.ones((7, 2, 2), np.float32)
    cube[:, 0, 0] = np.nan
    out, first = clover.fit_length(cube, 10, rng)
    assert out.shape == (10, 2, 2) and first == 1             # floor(3/2) channels before
    assert np.all(out[1:8, 1, 1] == 1) and np.isnan(out[:, 0, 0]).all()   # NaN stays NaN
    # an excess of 1 clipped the whole axis in the original (slice 0:-0)
    out, first = clover.fit_length(np.arange(11.0)[:, None, None] * np.ones((1, 2, 2)), 10, rng)
    assert out.shape == (10, 2, 2) and first == 0 and out[0, 0, 0] == 0 and out[-1, 0, 0] == 9
    out, first = clover.fit_length(np.arange(13.0)[:, None, None] * np.ones((1, 1, 1)), 10, rng)
    assert first == -1 and out[0, 0, 0] == 1 and out[-1, 0, 0] == 10


def test_make_features_uses_finite_neighbours_and_flags_nan():
    cube = np.random.default_rng(1).normal(size=(50, 4, 5)).astype(np.float32)
    cube[:, 1, 1] = np.nan
    x, tmax, valid = clover.make_features(cube)
    assert valid.sum() == 19 and not valid[1, 1]
    assert x.shape == (19, 50, 2)
    centre = np.flatnonzero(valid.ravel()).tolist().index(2 * 5 + 2)     # pixel (2, 2)
    window = cube[:, 1:4, 1:4].reshape(50, 9)
    mean = np.nanmean(window, axis=1)
    assert np.allclose(x[centre, :, 1], mean / mean.max(), atol=1e-6)
    assert tmax[centre] == pytest.approx(cube[:, 2, 2].max())


# ---------------------------------------------------------------------------
# accuracy of the shipped models (real TensorFlow inference)
# ---------------------------------------------------------------------------
def _report(table):
    return json.dumps({"class": table["class_accuracy"], "bins": table["snr_bins"]})


@pytest.mark.parametrize("name", ["one", "two", "noise"])
def test_gauss_classification_accuracy(gauss_table, name):
    acc = gauss_table["class_accuracy"][name]["snr>=4"]
    assert acc >= THRESHOLDS[name], _report(gauss_table)


@pytest.mark.parametrize("name", ["one", "two", "noise"])
def test_nh3_classification_accuracy(nh3_table, name):
    acc = nh3_table["class_accuracy"][name]["snr>=4"]
    assert acc >= (NH3_TWO if name == "two" else THRESHOLDS[name]), _report(nh3_table)


@pytest.mark.parametrize("which", ["gauss", "nh3"])
@pytest.mark.parametrize("kind", ["one", "two"])
def test_regression_error_and_calibrated_uncertainties(which, kind, request):
    """Fitted values within 5 % of the line width; the reported errors are right: the pull
    spread (error / uncertainty, mad_sigma) of centroids, widths and peaks lies within
    0.8-1.25.  Measured (seed 777): Gaussian one/two components N = 1959/1081 spectra,
    0.92-0.98; NH3 N = 1017/650, 0.94-1.03; the statistical error of mad_sigma is
    1.167 / sqrt(N) <= 0.046, so the bounds sit >= 3.4 of them from every measured value
    and >= 4.3 from 1."""
    reg = request.getfixturevalue(which + "_table")["regression"][kind]
    limit = 0.05 * reg["mean_linewidth_kms"]
    assert reg["n"] > 100
    assert reg["mae_vlsr_kms"] < limit, reg
    assert reg["mae_sigma_kms"] < limit, reg
    for key in ("pull_std_vlsr", "pull_std_sigma", "pull_std_tpeak"):
        assert 0.8 < reg[key] < 1.25, reg


@pytest.mark.parametrize("which", ["gauss", "nh3"])
def test_prob_calibration_curve(which, request):
    """The prob map means what it says: in the top bin (p >= 0.99, most spectra) the
    fraction of correct classes is >= 0.97 (measured 0.998 Gaussian, 0.985 NH3) and the
    expected calibration error is < 0.05 (measured 0.004, 0.022)."""
    curve = request.getfixturevalue(which + "_table")["calibration"]
    top = curve["0.99-1"]
    assert top[2] > 0.8 * sum(c for _, _, c in curve.values()) and top[1] >= 0.97, curve
    ece = sum(c * abs(f - p) for p, f, c in curve.values()) / sum(c for _, _, c in curve.values())
    assert ece < 0.05, curve


def test_nh3_two_component_accuracy_for_resolved_pairs(nh3_table):
    """Two NH3 components separated by at least twice the larger dispersion are found at the
    issue's floor; close pairs are the hard ones."""
    bins = nh3_table["two_by_separation"]
    wide = [bins[k] for k in ("2-3", "3-inf")]
    acc = sum(a * n for a, n in wide) / sum(n for _, n in wide)
    assert acc >= THRESHOLDS["two"], bins
    assert bins["0-1.5"][0] < acc, bins


def test_nh3_slab_fit_reproduces_lte_spectra():
    """A constant-excitation slab (A, tau, sigma, v) is the LTE cold_ammonia model: fits
    of noisy nh3_spectra recover sigma and v and leave white residuals."""
    rng = np.random.default_rng(TEST_SEED)
    freq, _ = clover.nh3_template_axis()
    n, noise = 12, 0.02            # peak S/N >= 12
    width, voff = rng.uniform(0.12, 1.0, n), rng.uniform(-2, 2, n)
    clean = clover.nh3_spectra(freq, rng.uniform(12, 28, n), rng.uniform(13.2, 14.4, n), width, voff)
    clean = clean.astype(float)
    y = clean + rng.normal(0, noise, clean.shape)
    starts = [np.column_stack([np.log(clean.max(1) * (1 + 1 / t)), np.full(n, np.log(t)),
                               np.log(1.3 * width), voff + 0.1]) for t in (0.3, 3.0)]
    q, _ = clover.fit_nh3_slabs(y, starts)
    assert np.all(np.abs(q[:, 3] - voff) < 0.03), q[:, 3] - voff
    assert np.all(np.abs(np.exp(q[:, 2]) / width - 1) < 0.08), np.exp(q[:, 2]) / width
    model = clover.nh3_slab_spectra(q)
    white = ((y - model) ** 2).mean(axis=1) / noise ** 2
    assert np.all((white > 0.9) & (white < 1.1)), white
    assert np.all(np.abs(model - clean).max(axis=1) < 1.5 * noise)


def test_refine_gaussians_recovers_injected_components():
    rng = np.random.default_rng(TEST_SEED)
    chan = np.arange(500.0)
    n = 400
    c1 = rng.uniform(150, 300, n)
    truth = np.column_stack([c1, c1 + rng.uniform(15, 40, n), rng.uniform(3, 9, n), rng.uniform(3, 9, n),
                             np.ones(n), rng.uniform(0.3, 1.0, n)])
    spec = (truth[:, 4:5] * np.exp(-0.5 * ((chan - truth[:, :1]) / truth[:, 2:3]) ** 2)
            + truth[:, 5:6] * np.exp(-0.5 * ((chan - truth[:, 1:2]) / truth[:, 3:4]) ** 2))
    noisy = spec + rng.normal(0, 0.05, spec.shape)
    start = truth * rng.normal(1, 0.03, truth.shape)               # a network-quality guess
    start[:, [0, 1]] = truth[:, [1, 0]] + rng.normal(0, 1.5, (n, 2))   # and in the wrong order
    start[:, [2, 3, 4, 5]] = start[:, [3, 2, 5, 4]]
    fit, err, ok = clover.refine_gaussians(noisy, start)
    assert ok.mean() > 0.99
    pull = (fit - truth)[ok] / err[ok]
    assert np.all(np.abs(np.median(pull, axis=0)) < 0.2), np.median(pull, axis=0)
    assert np.all((np.std(pull, axis=0) > 0.85) & (np.std(pull, axis=0) < 1.15)), np.std(pull, axis=0)
    assert np.median(np.abs(fit[:, :2] - truth[:, :2])) < np.median(np.abs(start[:, [1, 0]] - truth[:, :2])) / 3
    # a very tight prior holds the values at the start; a loose one lets the data decide
    ordered = start[:, [1, 0, 3, 2, 5, 4]]                      # lower centre first
    tight, tight_err, _ = clover.refine_gaussians(noisy, ordered, prior_sigma=np.full(truth.shape, 1e-6))
    assert np.allclose(tight, ordered, atol=1e-4) and np.all(tight_err < 2e-6)
    loose, _, _ = clover.refine_gaussians(noisy, ordered, prior_sigma=np.full(truth.shape, 1e6))
    assert np.allclose(loose, fit, atol=1e-3)
    # an impossible start (negative peak) or pure noise keeps the starting values and NaN errors
    bad = np.array([[250.0, 260.0, 5.0, 5.0, -1.0, 0.5]])
    f, e, good = clover.refine_gaussians(rng.normal(0, 1, (1, 500)), bad)
    assert not good[0] and np.array_equal(f, bad) and np.isnan(e).all()


def test_predict_refine_switch(tmp_path, gauss_models):
    """refine=False: the networks' classes and values, no model/residual; refine=True: the
    fits' values (different, as accurate), a model cube and a reduced chi2 near 1."""
    path = tmp_path / "cube.fits"
    _, _, truth = write_cube(path)
    fine = clover.predict(path, models=gauss_models, progress=False, write=False)
    raw = clover.predict(path, models=gauss_models, progress=False, write=False, refine=False)
    inner = clover.interior_pixels(truth["class"])
    assert (fine["maps"]["class"] == raw["maps"]["class"])[inner].mean() > 0.95
    two = (fine["maps"]["class"] == 2) & (truth["class"] == 2)
    assert two.sum() > 10
    assert not np.allclose(fine["maps"]["vlsr1"][two], raw["maps"]["vlsr1"][two])
    err = np.abs(fine["maps"]["vlsr1"] - truth["vlsr1"])[two]
    assert np.median(err) < 0.05
    assert raw["model"] is None and np.isnan(raw["maps"]["rchi2"]).all()
    assert fine["model"].shape == (500, 12, 12)
    assert 0.8 < np.nanmedian(fine["maps"]["rchi2"][truth["class"] != 1]) < 1.25


def test_shipped_models_metadata_and_size():
    meta = json.loads((ROOT / "models" / "clover" / "clover_models.json").read_text())
    assert meta["seed"] == 20191119 and set(meta["lines"]) == {"gauss", "nh3"}
    for line in meta["lines"].values():
        assert len(line["classifier"]["members"]) == 6
        assert "accuracy" in line and line["classifier"]["members"][0]["n_train"] > 1000
    total = sum(p.stat().st_size for p in (ROOT / "models" / "clover").iterdir())
    assert total < 30e6


# ---------------------------------------------------------------------------
# predict end to end
# ---------------------------------------------------------------------------
def _check_outputs(result, truth, cube_path, bunit="K"):
    from astropy.io import fits
    from astropy.wcs import WCS
    assert sorted(result["paths"]) == FILES
    ref = WCS(fits.getheader(cube_path)).celestial
    pixels = np.array([[0, 0], [5.5, 3.0], [11, 7]])
    for name, path in result["paths"].items():
        if name in ("table", "provenance", "model", "residual"):
            continue
        with fits.open(path) as hdul:
            hdr, data = hdul[0].header, hdul[0].data
        assert data.shape == truth["class"].shape
        assert WCS(hdr).naxis == 2 and list(WCS(hdr).wcs.ctype) == list(ref.wcs.ctype)
        assert np.allclose(WCS(hdr).all_pix2world(pixels, 0), ref.all_pix2world(pixels, 0), rtol=0, atol=1e-12)
        kind = clover.OUTPUT_MAPS[name][0]
        assert hdr["BUNIT"] == {"vel": "km/s", "width": "km/s", "peak": bunit}.get(kind, "")
    maps = result["maps"]
    inner = clover.interior_pixels(truth["class"])      # the 3x3 mean blurs sharp region edges
    assert (maps["class"] == truth["class"])[inner].mean() >= 0.95
    two = truth["class"] == 2
    assert np.nanmedian(np.abs(maps["vlsr1"] - truth["vlsr1"])[two]) < 0.1
    assert np.nanmedian(np.abs(maps["vlsr2"] - truth["vlsr2"])[two]) < 0.1
    one = truth["class"] == 0
    assert np.nanmedian(np.abs(maps["vlsr"] - truth["vlsr"])[one]) < 0.1
    assert np.isnan(maps["vlsr1"][maps["class"] != 2]).all()
    # dominant component: wherever there is emission; the brighter of two
    emission = maps["ncomp"] > 0
    assert np.isfinite(maps["vlsr_dom"][emission]).all() and np.isnan(maps["vlsr_dom"][~emission]).all()
    two = maps["ncomp"] == 2
    brighter = np.where(maps["tpeak1"] >= maps["tpeak2"], maps["vlsr1"], maps["vlsr2"])
    assert np.array_equal(maps["vlsr_dom"][two], brighter[two])
    # positive widths (>= one channel) and peaks; model = data minus residual
    for name in ("sig1", "sig2", "sig", "tpeak1", "tpeak2", "tpeak"):
        assert (maps[name][np.isfinite(maps[name])] > 0).all(), name
    assert len(result["table"]) == np.isfinite(maps["class"]).sum()


def test_predict_velocity_axis_500_channels(tmp_path, gauss_models):
    path = tmp_path / "cube.fits"
    _, _, truth = write_cube(path)
    result = clover.predict(path, outdir=tmp_path / "out", models=gauss_models, progress=False)
    assert not (tmp_path / "out" / "cube_clover.fits").exists()      # axis used as it is
    assert result["paths"]["class"].name == "cube_class.fits"
    _check_outputs(result, truth, path)


def test_predict_frequency_axis_with_padding(tmp_path, gauss_models):
    from astropy.io import fits
    path = tmp_path / "freq.fits"
    _, vel, truth = write_cube(path, nchan=301, axis="freq")
    result = clover.predict(path, models=gauss_models, progress=False, block_pixels=100)
    padded = tmp_path / "freq_clover.fits"
    # fixed names whatever the mode: the maps keep the cube's name when the axis is padded
    assert result["paths"]["vlsr1"].name == "freq_vlsr1.fits"
    with fits.open(padded) as hdul:
        h, data = hdul[0].header, hdul[0].data
    assert data.shape[0] == 500 and h["CTYPE3"] == "VRAD" and h["CUNIT3"] == "km/s"
    # the padded cube's axis still puts the original channels at their velocities
    first = (500 - 301) // 2
    assert h["CRVAL3"] + (first + 1 - h["CRPIX3"]) * h["CDELT3"] == pytest.approx(vel[0], abs=1e-9)
    assert np.array_equal(data[first:first + 301], fits.getdata(path)[::-1] if vel[1] < vel[0] else fits.getdata(path))
    _check_outputs(result, truth, path)


def test_predict_spectral_axis_first_with_stokes(tmp_path, gauss_models):
    """FITS axes (FREQ, RA, DEC, STOKES): same maps and the same padded cube as (RA, DEC, FREQ)."""
    from astropy.io import fits
    from astropy.wcs import WCS
    ref_path = tmp_path / "ref.fits"
    write_cube(ref_path, nchan=301, axis="freq")
    with fits.open(ref_path) as hdul:
        data, hdr = hdul[0].data, hdul[0].header
    wcs = WCS(hdr).swapaxes(0, 2).swapaxes(1, 2)            # FITS axes (FREQ, RA, DEC)
    wcs = WCS(wcs.to_header())
    moved = np.moveaxis(data, 0, -1)                         # numpy (dec, ra, freq)
    head = wcs.to_header()
    head.update(CTYPE4="STOKES", CRVAL4=1.0, CDELT4=1.0, CRPIX4=1.0, BUNIT="K", RESTFRQ=hdr["RESTFRQ"])
    odd = tmp_path / "odd.fits"
    fits.PrimaryHDU(moved[None], head).writeto(odd)
    ref = clover.predict(ref_path, outdir=tmp_path / "a", models=gauss_models, progress=False)
    out = clover.predict(odd, outdir=tmp_path / "b", models=gauss_models, progress=False)
    assert np.array_equal(ref["maps"]["class"], out["maps"]["class"], equal_nan=True)
    for name in OUTPUT_NAMES:   # the header round trip may move the axis in the last bits
        assert np.allclose(ref["maps"][name], out["maps"][name], rtol=1e-5, atol=1e-6, equal_nan=True)
    with fits.open(ref["paths"]["model"]) as a, fits.open(out["paths"]["model"]) as b:
        assert b[0].data.shape == a[0].data.shape == (301, 12, 12)
        assert np.allclose(a[0].data, b[0].data, atol=1e-5, equal_nan=True)
        wa, wb = WCS(a[0].header), WCS(b[0].header)
        assert wb.naxis == 3 and wb.wcs.ctype[2] == "FREQ"     # the model is on the input's own axis
        pix = np.array([[0, 0, 0], [3, 7, 150], [11, 11, 300]], float)
        assert np.allclose(wa.all_pix2world(pix, 0), wb.all_pix2world(pix, 0), rtol=1e-12)


def _block_velocity_cube(path, velocities, nchan=900, ny=6, block=5, seed=3, sigma=0.4):
    """One Gaussian component (dispersion ``sigma`` km/s, S/N 20); x blocks of ``block``
    columns, each at its own centroid (km/s).  Returns the centroid map."""
    rng = np.random.default_rng(seed)
    vel = (np.arange(nchan) - (nchan - 1) / 2) * clover.TEMPLATE_DV_KMS
    v0 = np.repeat(np.asarray(velocities, float), block)[None, :] * np.ones((ny, 1))
    cube = np.exp(-0.5 * ((vel[:, None, None] - v0[None]) / sigma) ** 2) + rng.normal(0, 0.05, (nchan,) + v0.shape)
    clover.cube_hdu(cube.astype(np.float32), vel).writeto(path)
    return v0


def test_tile_mode_follows_a_large_velocity_gradient(tmp_path, gauss_models):
    """Blocks at -22, -7, 7, 22 km/s: the central 500-channel window (+-18 km/s) misses the
    outer blocks and warns; 5x5 tiles with their own windows recover every block."""
    path = tmp_path / "gradient.fits"
    v0 = _block_velocity_cube(path, [-22.0, -7.0, 7.0, 22.0])
    inner = clover.interior_pixels(v0)          # 3x3 windows inside one block
    with pytest.warns(clover.CentroidRangeWarning):
        plain = clover.predict(path, models=gauss_models, progress=False, write=False)
    ok = (plain["maps"]["class"] == 0) & (np.abs(plain["maps"]["vlsr"] - v0) < 0.05)
    assert not ok[inner & (np.abs(v0) > 20)].any() and ok[inner & (np.abs(v0) < 10)].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", clover.CentroidRangeWarning)
        tiled = clover.predict(path, models=gauss_models, progress=False, tile=5, outdir=tmp_path / "t")
    assert (tiled["maps"]["class"][inner] == 0).all()
    assert np.abs(tiled["maps"]["vlsr"] - v0)[inner].max() < 0.05
    assert not (tmp_path / "t" / "gradient_clover.fits").exists() and tiled["paths"]["vlsr"].name == "gradient_vlsr.fits"
    # a 300-channel cube (+-10.8 km/s) with lines near its edges: windows padded unequally
    short = tmp_path / "short.fits"
    v_short = _block_velocity_cube(short, [-9.5, 9.5], nchan=300)
    res = clover.predict(short, models=gauss_models, progress=False, tile=5, write=False)
    inner = clover.interior_pixels(v_short)
    assert np.abs(res["maps"]["vlsr"] - v_short)[inner].max() < 0.05


def test_emission_channel_and_centred_fit_length():
    rng = np.random.default_rng(TEST_SEED)
    noise = rng.normal(0, 1, (400, 3, 3))
    assert clover.emission_channel(noise) is None
    line = noise.copy()
    line[300:306] += 5.0
    assert abs(clover.emission_channel(line) - 302.5) <= 1
    out, first = clover.fit_length(line, 100, rng, centre=302)
    assert first == -252 and out.shape[0] == 100 and np.array_equal(out[50], line[302])
    out, first = clover.fit_length(line, 100, rng, centre=10)       # clipped at the band edge
    assert first == 0 and np.array_equal(out, line[:100])
    out, first = clover.fit_length(line[:50], 100, rng, centre=5)  # padded mostly before
    assert first == 45 and np.array_equal(out[45:95], line[:50])


def test_predict_clips_odd_excess(tmp_path, gauss_models):
    from astropy.io import fits
    path = tmp_path / "long.fits"
    write_cube(path, nchan=None, vel_unit="m/s")
    with fits.open(path) as hdul:      # 501 channels: one more than the models take
        data = np.concatenate([hdul[0].data, hdul[0].data[-1:]], axis=0)
        fits.PrimaryHDU(data, hdul[0].header).writeto(path, overwrite=True)
    clover.predict(path, models=gauss_models, progress=False)
    assert fits.getdata(tmp_path / "long_clover.fits").shape[0] == 500


def test_predict_nh3_mode(tmp_path, nh3_models):
    path = tmp_path / "nh3.fits"
    _, _, truth = write_cube(path, line="nh3", ny=9, nx=12, axis="freq")
    result = clover.predict(path, nh3=True, models=nh3_models, progress=False)
    _check_outputs(result, truth, path)


def _close_pair_nh3_cube(path, rng, ny=8, nx=16, sep=1.2):
    """NH3 cube: left half one component, right half two components ``sep`` x the larger
    width apart (closer than the Gaussian set's 1.5, as the NH3 set allows); S/N ~ 15."""
    from astropy.io import fits
    freq, vel = clover.nh3_template_axis()
    yy, xx = np.mgrid[0:ny, 0:nx]
    m = ny * nx
    v1 = -0.3 + 0.02 * yy.ravel()
    a = clover.nh3_spectra(freq, np.full(m, 14.0), np.full(m, 13.6), np.full(m, 0.25), v1)
    b = clover.nh3_spectra(freq, np.full(m, 12.0), np.full(m, 13.5), np.full(m, 0.3), v1 + sep * 0.3)
    two = xx >= nx // 2
    spec = a + np.where(two.ravel()[:, None], b, 0)
    cube = spec.T.reshape(-1, ny, nx) + rng.normal(0, 0.1, (freq.size, ny, nx))
    fits.HDUList([clover.cube_hdu(cube.astype(np.float32), vel, axis="vrad")]).writeto(path)
    return np.where(two, 2, 0)


def test_close_nh3_pairs_use_neighbour_evidence_only_without_a_beam(tmp_path, nh3_models):
    """End to end: close NH3 pairs (1.5 dispersions apart, S/N ~15; measured: ensemble 0.58
    two-component) are found by the fits with the 3x3 neighbours' evidence when the pixels
    are independent (no beam in the header: 0.80); with a 10-pixel beam in the header the
    neighbours repeat the central spectrum and count nothing, and one spectrum alone does
    not support the pair (0.08).  One-component pixels stay one (1.00)."""
    from astropy.io import fits
    path = tmp_path / "pairs.fits"
    truth = _close_pair_nh3_cube(path, np.random.default_rng(TEST_SEED), sep=1.5)
    half = truth.shape[1] // 2
    maps = {}
    for refine in (False, True):
        out = tmp_path / ("refine" if refine else "plain")
        maps[refine] = clover.predict(path, nh3=True, models=nh3_models, progress=False, refine=refine,
                                      outdir=out)["maps"]["class"]
    two = {k: float((v[:, half:] == 2).mean()) for k, v in maps.items()}
    assert two[True] >= max(0.7, two[False] + 0.1), two
    assert (maps[True][:, :half] == 0).mean() >= 0.95, maps[True]
    with fits.open(path, mode="update") as hdul:        # the same pixels, declared beam-correlated
        hdul[0].header["BMAJ"] = hdul[0].header["BMIN"] = 3.0 * abs(hdul[0].header["CDELT1"])
    beam = clover.predict(path, nh3=True, models=nh3_models, progress=False, write=False)["maps"]["class"]
    assert float((beam[:, half:] == 2).mean()) < two[True] - 0.3, (beam, two)
    assert (beam[:, :half] == 0).mean() >= 0.95


def test_nan_spectra_give_nan_and_refuse_overwrite(tmp_path, gauss_models):
    """Blank (all-NaN) and mostly blank spectra give NaN; a few blank channels do not."""
    from astropy.io import fits
    path = tmp_path / "holes.fits"
    _, _, truth = write_cube(path)
    with fits.open(path, mode="update") as hdul:
        hdul[0].data[:, 3, 5] = np.nan
        hdul[0].data[:300, 4, 8] = np.nan            # 60 % blank: not filled
        hdul[0].data[10, 6, 1] = np.nan              # one blank channel: filled with noise
    result = clover.predict(path, models=gauss_models, progress=False)
    for name in OUTPUT_NAMES:
        assert np.isnan(result["maps"][name][3, 5]) and np.isnan(result["maps"][name][4, 8])
    assert np.isfinite(result["maps"]["class"]).sum() == 144 - 2
    assert result["maps"]["class"][6, 1] == truth["class"][6, 1]
    with pytest.raises(clover.OutputExistsError, match="overwrite"):
        clover.predict(path, models=gauss_models, progress=False)
    clover.predict(path, models=gauss_models, progress=False, overwrite=True)


def test_blank_band_edges_and_channels_are_filled(tmp_path, gauss_models):
    """Band edges blanked in every pixel (common in interferometer cubes; trimmed) and
    scattered blank channels (filled with noise for the networks, left out of the fits):
    the same classes and centroids as the clean cube (the original lost every pixel)."""
    from astropy.io import fits
    clean = tmp_path / "clean.fits"
    _, _, truth = write_cube(clean, nchan=420)
    holes = tmp_path / "holes.fits"
    with fits.open(clean) as hdul:
        data = hdul[0].data.copy()
        data[:4] = data[-3:] = np.nan
        chans = np.random.default_rng(TEST_SEED).choice(420, (12, 12, 6))     # 6 per spectrum
        yy, xx = np.mgrid[0:12, 0:12]
        data[chans, yy[..., None], xx[..., None]] = np.nan
        fits.PrimaryHDU(data, hdul[0].header).writeto(holes)
    a = clover.predict(clean, models=gauss_models, progress=False, outdir=tmp_path / "a")
    b = clover.predict(holes, models=gauss_models, progress=False, outdir=tmp_path / "b")
    inner = clover.interior_pixels(truth["class"])
    assert np.isfinite(b["maps"]["class"]).all()
    assert (b["maps"]["class"] == a["maps"]["class"])[inner].mean() >= 0.97
    two = inner & (a["maps"]["class"] == 2) & (b["maps"]["class"] == 2)
    assert np.nanmedian(np.abs(b["maps"]["vlsr1"] - truth["vlsr1"])[two]) < 0.1
    written = fits.getdata(tmp_path / "b" / "holes_clover.fits")      # what the networks saw
    assert written.shape == (500, 12, 12) and np.isfinite(written).all()
    residual = fits.getdata(b["paths"]["residual"])                  # on the input's channels
    assert residual.shape == data.shape and np.isnan(residual).sum() == np.isnan(data).sum()


def test_warns_when_emission_outside_trained_range(tmp_path, gauss_models):
    path = tmp_path / "shifted.fits"
    cube, vel, _ = clover.simulate_cube("gauss", 6, 6, np.random.default_rng(2))
    clover.cube_hdu(np.roll(cube, 220, axis=0), vel).writeto(path)     # +16 km/s
    with pytest.warns(clover.CentroidRangeWarning, match="outside the trained range"):
        clover.predict(path, models=gauss_models, progress=False, write=False)


def test_cli_predict_writes_outputs(tmp_path):
    path = tmp_path / "cli.fits"
    write_cube(path, ny=6, nx=6)
    assert clover.main(["predict", str(path), "--outdir", str(tmp_path / "o"), "--nproc", "2", "-q"]) == 0
    names = sorted("cli_%s.fits" % n for n in OUTPUT_NAMES + ["model", "residual"]) + ["cli_table.ecsv",
                                                                                        "cli_provenance.json"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(names)
    assert clover.main(["predict", str(path), "--outdir", str(tmp_path / "o"), "-q"]) == 2   # exists
    # tile mode and no refinement from the command line; a negative tile size is refused
    assert clover.main(["predict", str(path), "--outdir", str(tmp_path / "t"), "--tile", "3",
                        "--no-refine", "-q"]) == 0
    assert len(list((tmp_path / "t").iterdir())) == len(OUTPUT_NAMES) + 2     # maps, table, provenance
    assert clover.main(["predict", str(path), "--outdir", str(tmp_path / "n"), "--tile", "-1"]) == 2
    assert not (tmp_path / "n").exists()


def test_provenance_records_how_the_maps_were_made(tmp_path):
    """<name>_provenance.json beside the maps: tool, version, the resolved configuration
    (file value and command-line override), the call's arguments, the input's SHA-256
    (checked against hashlib) and the list of products."""
    import hashlib
    path = tmp_path / "prov.fits"
    write_cube(path, ny=6, nx=6)
    cfg = tmp_path / "clover.cfg"
    cfg.write_text("[Predict]\nseed = 3\nmin_snr = 4.5\n")
    out = tmp_path / "o"
    assert clover.main(["predict", str(path), "--config", str(cfg), "--outdir", str(out), "--tile", "3", "-q"]) == 0
    record = json.loads((out / "prov_provenance.json").read_text())
    assert record["tool"] == "clover" and record["version"] == clover.__version__
    assert record["config"]["Predict"]["seed"] == 3 and record["config"]["Predict"]["tile"] == 0
    assert record["predict"]["tile"] == 3 and record["predict"]["seed"] == 3 and record["predict"]["refine"] is True
    assert record["predict"]["settings"]["min_snr"] == 4.5
    assert record["inputs"]["cube_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["rest_frequency_hz"] == pytest.approx(115.2712018e9)
    assert record["models"]["line"] == "gauss" and record["models"]["members"] == 6
    written = sorted(p.name for p in out.iterdir() if p.name != "prov_provenance.json")
    assert record["outputs"] == written


def test_cli_evaluate_writes_table_and_figure(tmp_path, capsys):
    out = tmp_path / "eval"
    assert clover.main(["evaluate", "--lines", "gauss", "--n", "300", "--outdir", str(out), "-q"]) == 0
    table = json.loads((out / "clover_accuracy.json").read_text())["gauss"]
    assert table["n"] == 300 and sum(map(sum, table["confusion"])) == 300
    assert table["class_accuracy"]["noise"]["all"] >= 0.99       # a real table, not a placeholder
    assert (out / "clover_accuracy.png").stat().st_size > 5000
    assert "class_accuracy" in capsys.readouterr().out
    assert clover.main(["evaluate", "--lines", "gauss", "--n", "300", "--outdir", str(out), "-q"]) == 2
    assert clover.main(["evaluate", "--lines", "co", "--outdir", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------------------
# bad input: clear error, exit code 2, nothing written
# ---------------------------------------------------------------------------
def _bad_inputs(tmp_path):
    from astropy.io import fits
    cube, vel, _ = clover.simulate_cube("gauss", 4, 4, np.random.default_rng(1), nchan=60)
    good = clover.cube_hdu(cube, vel)
    cases = {}
    fits.PrimaryHDU(cube[0]).writeto(tmp_path / "image2d.fits")
    cases["image2d"] = "no spectral axis"
    h = good.header.copy()
    h["CTYPE3"] = "LINEAR"
    fits.PrimaryHDU(cube, h).writeto(tmp_path / "nospec.fits")
    cases["nospec"] = "no spectral axis"
    fits.PrimaryHDU(cube * np.nan, good.header).writeto(tmp_path / "allnan.fits")
    cases["allnan"] = "all NaN"
    h = good.header.copy()
    h["CUNIT3"] = "furlong/fortnight"
    fits.PrimaryHDU(cube, h).writeto(tmp_path / "badunit.fits")
    cases["badunit"] = "unit"
    cases["missing"] = "does not exist"
    return cases


def test_bad_inputs_exit_two_and_write_nothing(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    for name, message in cases.items():
        out = tmp_path / ("out_" + name)
        assert clover.main(["predict", str(tmp_path / (name + ".fits")), "--outdir", str(out)]) == 2, name
        assert message in capsys.readouterr().err, name
        assert not out.exists(), name
    with pytest.raises(clover.InputError, match="no spectral axis"):
        clover.predict(tmp_path / "image2d.fits")


def test_models_of_the_other_line_type_are_refused(tmp_path, gauss_models):
    path = tmp_path / "nh3.fits"
    write_cube(path, line="nh3", ny=4, nx=4, axis="freq")
    for tile in (0, 2):
        with pytest.raises(clover.InputError, match="models are for 'gauss'"):
            clover.predict(path, nh3=True, models=gauss_models, tile=tile, outdir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_frequency_axis_without_rest_frequency_is_an_input_error(tmp_path):
    path = tmp_path / "norest.fits"
    cube, vel, _ = clover.simulate_cube("gauss", 4, 4, np.random.default_rng(1), nchan=60)
    hdu = clover.cube_hdu(cube, vel, axis="freq", rest_hz=100e9)
    del hdu.header["RESTFRQ"]
    hdu.writeto(path)
    with pytest.raises(clover.InputError, match="rest frequency"):
        clover.read_cube(path)
    assert clover.read_cube(path, rest_frequency=100e9).velocity[0] == pytest.approx(vel[0])


# ---------------------------------------------------------------------------
# training path: reproducible from the seed
# ---------------------------------------------------------------------------
def test_training_is_reproducible_from_the_seed(tmp_path):
    settings = dict(seed=5, lines=["gauss"], ensemble_size=1, n_class=600, n_reg=600, n_val=300,
                    n_test=300, epochs=1, threads=2)
    meta_a = clover.train(model_dir=tmp_path / "a", **settings)
    meta_b = clover.train(model_dir=tmp_path / "b", **settings)
    a, b = meta_a["lines"]["gauss"], meta_b["lines"]["gauss"]
    assert a["classifier"]["members"][0]["val_loss"] == pytest.approx(b["classifier"]["members"][0]["val_loss"], rel=1e-5)
    assert a["reg2"]["mean"] == b["reg2"]["mean"]
    with pytest.raises(clover.OutputExistsError, match="overwrite"):
        clover.train(model_dir=tmp_path / "a", **settings)


def test_run_demo_makes_figure_and_summary(tmp_path):
    summary = clover.run_demo(tmp_path, ny=9, nx=9)
    assert (tmp_path / "clover_demo.png").stat().st_size > 10000
    for line in ("gauss", "nh3"):
        assert summary[line]["class_accuracy_interior"] >= 0.9, summary
        assert summary[line]["median_abs_vlsr1_err_kms"] < 0.1, summary
