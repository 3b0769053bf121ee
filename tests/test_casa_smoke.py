"""CASA smoke tests: simulate a tiny ALMA line MS, image it with tclean, check the truth.

These tests exercise the shared simulator in ``tests/simulate.py`` end to end with the
pip ``casatools``/``casatasks`` (offline site config).  Each MS is simulated once per
module (well under a second) and imaged once per array with ``tclean`` (~5-8 s); the
whole file runs in well under a minute on 2 cores.

Tolerances are stated next to each assertion.  The default simulation gives a compact
source with SNR ~100 in one channel, so the statistical errors are far below them:
position ~beam / (2 SNR) ~ 0.01" (12 m), line centroid ~0.03 channel, peak flux ~1 %,
noise estimate ~1-4 % (1.4826 MAD over ~10^4 independent beams).  Any systematic slip
the tests guard against is much larger: a missing correlation factor in the noise
formula is 41 %, an off-by-one channel is a whole channel, a flipped RA sign moves the
source by 2.4" (>10 pixels).
"""
import os
from pathlib import Path

import numpy as np
import pytest

import astropy.units as u

from simulate import (ARRAY_LAYOUTS, expected_image_rms, image_and_measure,
                      import_casatools, simulate_alma_line_ms)

casatools = import_casatools(required=False)

pytestmark = [
    pytest.mark.casa,
    pytest.mark.skipif(casatools is None, reason="needs casatools/casatasks (`make test`)"),
]

SEED = 20261123
ARRAYS = ("12m", "7m")
SPEED_OF_LIGHT_M_S = 299792458.0

# -- tolerances (see the module docstring for the statistical errors behind them)
POSITION_TOL_PIXELS = 0.5       # 0.1" (12 m, beam ~1.9" x 1.1") / 0.25" (7 m, ~7" x 5")
CENTROID_TOL_CHANNELS = 0.2     # noise gives ~0.03-0.09 channel
NOISE_TOL = 0.15                # measured/expected rms; observed within 0.985-1.045
PEAK_FLUX_TOL = 0.10            # observed within 2.5 % (SNR ~100, light clean)
BEAM_ESTIMATE_TOL = 0.15        # uv-moment beam vs tclean's fitted beam; observed < 4 %
NOISE_SIGMA_TOL = 0.02          # std of ~2x10^5 noise samples is good to ~0.2 %
VISIBILITY_TOL_JY = 1e-4        # DATA is float32 (1e-7 relative); analytic model exact


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch directory that is also the working directory for the whole module.

    CASA tasks may drop files (``*.last``, logs) into the cwd; running from here keeps
    them out of the repository.  ``stray_files`` then checks the original cwd.
    """
    path = tmp_path_factory.mktemp("casa_smoke")
    original = Path.cwd()
    before = set(os.listdir(original))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        yield {"path": path, "original_cwd": original, "before": before}


@pytest.fixture(scope="module")
def simulations(workdir):
    """One MS per array, same field and seed."""
    return {array: simulate_alma_line_ms(workdir["path"] / f"sim_{array}.ms", array=array,
                                         seed=SEED)
            for array in ARRAYS}


@pytest.fixture(scope="module")
def noise_free(workdir):
    """The 12m MS without noise (same sky, same uv coverage)."""
    return simulate_alma_line_ms(workdir["path"] / "noise_free.ms", array="12m",
                                 noise_per_visibility=0 * u.Jy)


@pytest.fixture(scope="module")
def images(simulations, workdir):
    """tclean cube (natural weighting, light clean) + measurements, per array."""
    return {array: image_and_measure(sim, workdir["path"] / f"cube_{array}")
            for array, sim in simulations.items()}


def _read_ms(path, columns=("DATA", "UVW", "FLAG")):
    """Main-table columns of an MS as a dict of arrays."""
    tb = casatools.table()
    tb.open(str(path))
    try:
        return {name: tb.getcol(name) for name in columns}
    finally:
        tb.close()


def _analytic_visibilities(sim, uvw, frequencies):
    """Exact visibilities of the injected Gaussian sources, shape (nchan, nrow).

    ``V = sum_k S_k(nu) exp(-2 pi^2 u^T C_k u) exp(+2 pi i (u l_k + v m_k))`` with
    ``C_k`` the sky covariance of source k, ``(l, m)`` its direction cosines relative
    to the phase centre, and the phase sign that goes with the UVW of CASA
    MeasurementSets (w-term negligible for arcsec offsets).
    """
    ra0, dec0 = sim.phase_center.ra.rad, sim.phase_center.dec.rad
    uv = uvw[:2, None, :] * frequencies[None, :, None] / SPEED_OF_LIGHT_M_S
    model = np.zeros(uv.shape[1:], dtype=complex)
    for src in sim.sources:
        ra, dec = src.coord.ra.rad, src.coord.dec.rad
        l = np.cos(dec) * np.sin(ra - ra0)
        m = np.sin(dec) * np.cos(dec0) - np.cos(dec) * np.sin(dec0) * np.cos(ra - ra0)
        sig = np.array([src.fwhm_major.to_value(u.rad), src.fwhm_minor.to_value(u.rad)])
        sig /= np.sqrt(8 * np.log(2))
        pa = src.position_angle.to_value(u.rad)
        axes = np.array([[np.sin(pa), np.cos(pa)], [np.cos(pa), -np.sin(pa)]])
        cov = axes.T @ np.diag(sig ** 2) @ axes
        quad = np.einsum("inr,ij,jnr->nr", uv, cov, uv)
        phase = 2j * np.pi * (uv[0] * l + uv[1] * m)
        model += src.spectrum_jy.to_value(u.Jy)[:, None] * np.exp(-2 * np.pi ** 2 * quad + phase)
    return model


# ------------------------------------------------------------------- simulator checks
def test_hand_worked_truth(simulations):
    """Channel grid and line truth agree with values worked out by hand."""
    sim = simulations["12m"]
    compact = sim.compact
    # vsys_channel = 2 * 48 // 5 = 19 sits exactly on vsys = 5.85 km/s
    assert compact.channel == 19
    assert sim.velocities[19].to_value(u.km / u.s) == pytest.approx(5.85, abs=1e-9)
    assert np.diff(sim.velocities).to_value(u.km / u.s) == pytest.approx(0.5, abs=1e-9)
    # 0.5 km/s at 230.538 GHz is 230.538e9 * 0.5 / 299792.458 = 384.495 kHz
    assert np.diff(sim.frequencies).to_value(u.kHz) == pytest.approx(-384.4953, abs=1e-3)
    # 0.5 Jy x 1.5 km/s x sqrt(pi / (4 ln 2)) = 0.79836 Jy km/s
    assert compact.integrated_flux.to_value(u.Jy * u.km / u.s) == pytest.approx(0.79836, rel=1e-4)
    # extended line at vsys + 3 km/s = 6 channels up
    assert sim.extended.channel == 25
    # 11 antennas -> 55 baselines x 40 integrations x 2 correlations, nothing flagged
    assert sim.n_visibilities == 55 * 40 * 2
    assert sim.expected_rms.to_value(u.Jy / u.beam) == pytest.approx(0.3 / np.sqrt(4400))


def test_ms_spectral_setup(simulations):
    """The MS has the LSRK channels of the truth and XX/YY correlations."""
    sim = simulations["12m"]
    tb = casatools.table()
    tb.open(str(sim.ms_path / "SPECTRAL_WINDOW"))
    try:
        chan_freq = tb.getcol("CHAN_FREQ")[:, 0]
        frame = int(tb.getcol("MEAS_FREQ_REF")[0])
    finally:
        tb.close()
    tb.open(str(sim.ms_path / "POLARIZATION"))
    try:
        corr_type = list(tb.getcol("CORR_TYPE")[:, 0])
    finally:
        tb.close()
    assert frame == 1                               # casacore MFrequency::LSRK
    np.testing.assert_allclose(chan_freq, sim.frequencies.to_value(u.Hz), rtol=0, atol=1.0)
    assert corr_type == [9, 12]                     # Stokes::XX, Stokes::YY
    assert not _read_ms(sim.ms_path, ("FLAG",))["FLAG"].any()


def test_noise_free_visibilities_match_analytic_model(noise_free):
    """Without noise, DATA equals the analytic Fourier transform of the sky truth."""
    cols = _read_ms(noise_free.ms_path)
    model = _analytic_visibilities(noise_free, cols["UVW"],
                                   noise_free.frequencies.to_value(u.Hz))
    for corr in range(2):                           # XX = YY = I for an unpolarised sky
        assert np.max(np.abs(cols["DATA"][corr] - model)) < VISIBILITY_TOL_JY


def test_noise_per_visibility(simulations, noise_free):
    """DATA minus the noise-free prediction has the requested sigma in Re and Im."""
    sim = simulations["12m"]
    noise = (_read_ms(sim.ms_path, ("DATA",))["DATA"]
             - _read_ms(noise_free.ms_path, ("DATA",))["DATA"])
    sigma = sim.noise_per_visibility.to_value(u.Jy)
    assert noise.real.std() == pytest.approx(sigma, rel=NOISE_SIGMA_TOL)
    assert noise.imag.std() == pytest.approx(sigma, rel=NOISE_SIGMA_TOL)


def test_same_seed_gives_identical_data(workdir, simulations):
    """The same seed reproduces DATA bit for bit; another seed does not."""
    sim = simulations["12m"]
    again = simulate_alma_line_ms(workdir["path"] / "again.ms", array="12m", seed=SEED)
    other = simulate_alma_line_ms(workdir["path"] / "other.ms", array="12m", seed=SEED + 1)
    data = _read_ms(sim.ms_path, ("DATA",))["DATA"]
    assert np.array_equal(data, _read_ms(again.ms_path, ("DATA",))["DATA"])
    assert not np.array_equal(data, _read_ms(other.ms_path, ("DATA",))["DATA"])


@pytest.mark.parametrize("array", ARRAYS)
def test_dish_diameters(simulations, array):
    """The 12m MS has 12 m dishes and the 7m MS 7 m dishes (msmd)."""
    msmd = casatools.msmetadata()
    msmd.open(str(simulations[array].ms_path))
    try:
        diameters = {q["value"] for q in msmd.antennadiameter(-1).values()}
        nant = msmd.nantennas()
    finally:
        msmd.done()
    expected = ARRAY_LAYOUTS[array]["dish_diameter"]
    assert diameters == {expected}
    assert nant == len(ARRAY_LAYOUTS[array]["enu"])
    assert simulations[array].dish_diameter.to_value(u.m) == expected


def test_same_field_in_both_arrays(simulations):
    """Both arrays observe the same phase centre, channels and sources."""
    sim12, sim7 = simulations["12m"], simulations["7m"]
    assert sim12.phase_center.separation(sim7.phase_center).to_value(u.arcsec) < 1e-6
    np.testing.assert_array_equal(sim12.frequencies, sim7.frequencies)
    for a, b in zip(sim12.sources, sim7.sources):
        assert a.coord.separation(b.coord).to_value(u.arcsec) < 1e-6


def test_bad_arguments_are_rejected(workdir, simulations, images):
    """Clear errors for an unknown array, an existing MS and existing images."""
    with pytest.raises(ValueError, match="array must be one of"):
        simulate_alma_line_ms(workdir["path"] / "bad.ms", array="15m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        simulate_alma_line_ms(simulations["12m"].ms_path)
    with pytest.raises(ValueError, match="n_visibilities must be positive"):
        expected_image_rms(0.3 * u.Jy, 0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        image_and_measure(simulations["12m"], workdir["path"] / "cube_12m")


# --------------------------------------------------------------------- imaging checks
@pytest.mark.parametrize("array", ARRAYS)
def test_compact_source_position(images, simulations, array):
    """Peak position is within half a pixel of the injected offset."""
    result, sim = images[array], simulations[array]
    error = result["measured"]["offset"] - result["truth"]["offset"]
    assert np.all(np.abs(error) < POSITION_TOL_PIXELS * sim.cell), error


@pytest.mark.parametrize("array", ARRAYS)
def test_line_centre_channel(images, array):
    """The compact line peaks in exactly the injected channel; centroid within 0.2."""
    measured, truth = images[array]["measured"], images[array]["truth"]
    assert measured["peak_channel"] == truth["peak_channel"]
    assert measured["centroid_channel"] == pytest.approx(truth["centroid_channel"],
                                                         abs=CENTROID_TOL_CHANNELS)


@pytest.mark.parametrize("array", ARRAYS)
def test_image_noise_matches_formula(images, array):
    """Line-free rms (1.4826 MAD) is within 15 % of sigma / sqrt(n_corr n_bl n_int)."""
    measured, truth = images[array]["measured"], images[array]["truth"]
    ratio = (measured["rms"] / truth["rms"]).to_value(u.one)
    assert abs(ratio - 1) < NOISE_TOL, ratio


@pytest.mark.parametrize("array", ARRAYS)
def test_peak_flux(images, array):
    """Peak intensity is within 10 % of the source flux diluted by the fitted beam."""
    measured, truth = images[array]["measured"], images[array]["truth"]
    ratio = (measured["peak_flux"] / truth["peak_flux"]).to_value(u.one)
    assert abs(ratio - 1) < PEAK_FLUX_TOL, ratio


@pytest.mark.parametrize("array", ARRAYS)
def test_beam_estimate(images, simulations, array):
    """The uv-moment beam estimate is within 15 % of tclean's restoring beam."""
    estimate, fitted = simulations[array].beam, images[array]["beam"]
    for est, fit in zip(estimate[:2], fitted[:2]):
        assert abs((est / fit).to_value(u.one) - 1) < BEAM_ESTIMATE_TOL


def test_no_stray_files_in_cwd(images, workdir):
    """Simulating and imaging leave nothing in the directory pytest started in."""
    assert set(os.listdir(workdir["original_cwd"])) == workdir["before"]
