"""Shared simulators for the toolkit's tests, benchmarks and ``make demo``.

Everything here is deterministic for a given seed.  CASA-based simulators need the
pip ``casatools``; they import it through :func:`import_casatools`, which applies the
repository's offline CASA site configuration first.

The main simulator, :func:`simulate_alma_line_ms`, writes a tiny ALMA-like
spectral-line MeasurementSet (one field, one Band 6 spectral window around CO 2-1,
XX/YY correlations, LSRK channels of 0.5 km/s) holding a compact and an extended
Gaussian source, each with a Gaussian line, plus thermal noise of a known level.  It
returns a :class:`SimulatedMS` that carries the full injected truth.
:func:`image_and_measure` images such an MS with ``tclean`` and measures the compact
source, for the smoke test, benchmarks and the demo.

Example
-------
>>> from simulate import simulate_alma_line_ms, image_and_measure   # doctest: +SKIP
>>> sim = simulate_alma_line_ms("/tmp/sim12m.ms", array="12m", seed=1)  # doctest: +SKIP
>>> result = image_and_measure(sim, "/tmp/sim12m_cube")             # doctest: +SKIP
>>> result["measured"]["peak_channel"] == result["truth"]["peak_channel"]  # doctest: +SKIP
True
"""
# ----------------------------------------------------------------------------- imports
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.constants import c as SPEED_OF_LIGHT
from astropy.coordinates import SkyCoord

__all__ = [
    "import_casatools",
    "import_casatasks",
    "SimulationError",
    "GaussianLineSource",
    "SourceTruth",
    "SimulatedMS",
    "ARRAY_LAYOUTS",
    "default_sources",
    "channel_grid",
    "expected_image_rms",
    "expected_peak_intensity",
    "estimate_natural_beam",
    "simulate_alma_line_ms",
    "default_tclean_parameters",
    "measure_compact_source",
    "image_and_measure",
    "robust_rms",
]

# --------------------------------------------------------------------------- constants
ROOT = Path(__file__).resolve().parents[1]
SITECONFIG = ROOT / "configs" / "casasiteconfig.py"

log = logging.getLogger("astro_toolkit.simulate")

#: Local east/north/up antenna offsets (m) from the ALMA array reference position
#: (``me.observatory('ALMA')``).  At 230 GHz toward Dec +26 deg: the 12 m layout
#: (11 antennas, baselines 25.6-223 m) gives a natural beam of ~1.9" x 1.1" and a
#: largest recoverable scale 0.6 lambda / B_min ~ 6"; the 7 m layout (10 antennas,
#: 13-51 m) a beam of ~7.1" x 4.6" and LRS ~12".  Minimum separations exceed
#: D / sin(40 deg) (18.7 m, 10.9 m), so at the elevations of this transit observation
#: (>= 40 deg) no antenna is shadowed and no data are flagged.
ARRAY_LAYOUTS = {
    "12m": {
        "dish_diameter": 12.0,
        "enu": (
            (0.0, 0.0, 0.0), (24.0, -10.0, 0.2), (-20.0, 16.0, -0.1),
            (6.0, 38.0, 0.3), (50.0, 22.0, 0.1), (-42.0, -31.0, -0.2),
            (72.0, -56.0, 0.4), (-86.0, 41.0, 0.0), (21.0, -96.0, -0.3),
            (121.0, 62.0, 0.5), (-61.0, 111.0, 0.2),
        ),
    },
    "7m": {
        "dish_diameter": 7.0,
        "enu": (
            (0.0, 0.0, 0.0), (12.5, 4.0, 0.1), (-7.0, 12.0, 0.0),
            (5.0, -13.0, -0.1), (-14.0, -5.0, 0.0), (19.0, -11.0, 0.2),
            (-2.0, 24.0, 0.1), (-21.0, 14.0, -0.1), (25.0, 16.0, 0.0),
            (10.0, -26.0, 0.1),
        ),
    },
}

#: FAUST-like target: phase centre (J2000), systemic velocity (LSRK, radio).
DEFAULT_PHASE_CENTER = "04h39m53.9s +26d03m09.4s"
DEFAULT_VSYS_KMS = 5.85
#: CO J=2-1 rest frequency (GHz).
CO21_REST_FREQUENCY_GHZ = 230.538
#: Image sizes with small prime factors (fast FFTs in tclean).
GOOD_IMSIZES = (64, 72, 80, 90, 96, 100, 108, 120, 128, 144, 150, 160, 180, 192,
                200, 216, 240, 250, 256, 288, 300, 320, 360, 384, 400, 432, 480, 500,
                512)
#: A line channel counts as line-free when every source's line is below this
#: fraction of its peak there.
LINE_FREE_FRACTION = 1e-3
FWHM_PER_SIGMA = np.sqrt(8.0 * np.log(2.0))


# ------------------------------------------------------------------------ exceptions
class SimulationError(RuntimeError):
    """A simulation or imaging step did not produce what it should have."""


# ------------------------------------------------------------------------ CASA import
def import_casatools(required=True):
    """Import ``casatools`` offline, safely, and return the module.

    Sets ``CASASITECONFIG`` to the repository's offline site config when unset, hides
    ``sys.argv`` from casaconfig during the import (casaconfig parses the command line
    with abbreviations, so a ``--config FILE`` meant for us would be read as its
    ``--configfile``), and, when TensorFlow is already loaded, imports with
    ``RTLD_DEEPBIND`` so the two bundled protobuf copies do not collide.

    Parameters
    ----------
    required : bool
        Raise ImportError when casatools is missing; otherwise return None.

    Returns
    -------
    module or None
    """
    os.environ.setdefault("CASASITECONFIG", str(SITECONFIG))
    saved_argv, saved_flags = sys.argv, sys.getdlopenflags()
    sys.argv = sys.argv[:1]
    try:
        if "tensorflow" in sys.modules or "keras" in sys.modules:
            sys.setdlopenflags(os.RTLD_NOW | os.RTLD_DEEPBIND)
        import casatools
    except ImportError:
        if required:
            raise ImportError("casatools is not installed: run `make test` or "
                              "`make demo`, which install it into .venv") from None
        return None
    finally:
        sys.argv = saved_argv
        sys.setdlopenflags(saved_flags)
    return casatools


def import_casatasks():
    """Import ``casatasks`` after :func:`import_casatools` has configured CASA.

    Returns
    -------
    module

    Raises
    ------
    ImportError
        When casatools or casatasks is not installed.
    """
    import_casatools(required=True)
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]
    try:
        import casatasks
    except ImportError:
        raise ImportError("casatasks is not installed: run `make test` or `make demo`, "
                          "which install it into .venv") from None
    finally:
        sys.argv = saved_argv
    return casatasks


# ---------------------------------------------------------------------- truth classes
@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussianLineSource:
    """A source with a Gaussian shape on the sky and a Gaussian line profile.

    Parameters
    ----------
    name : str
        Label, also written into the component list.
    ra_offset, dec_offset : Quantity [angle]
        Offset from the phase centre: east (``dRA cos Dec``) and north.
    fwhm_major, fwhm_minor : Quantity [angle]
        Full widths at half maximum of the sky Gaussian (``fwhm_minor`` defaults to
        ``fwhm_major``, a circular source).
    position_angle : Quantity [angle]
        Position angle of the major axis, east of north.
    peak_flux : Quantity [flux density]
        Total (spatially integrated) flux density at the line peak.
    velocity : Quantity [speed]
        Line centre, LSRK radio velocity.
    fwhm_velocity : Quantity [speed]
        Line full width at half maximum (not sigma; see :attr:`sigma_velocity`).
    """

    name: str
    ra_offset: u.Quantity
    dec_offset: u.Quantity
    fwhm_major: u.Quantity
    fwhm_minor: u.Quantity = None
    position_angle: u.Quantity = 0.0 * u.deg
    peak_flux: u.Quantity
    velocity: u.Quantity
    fwhm_velocity: u.Quantity

    def __post_init__(self):
        minor = self.fwhm_major if self.fwhm_minor is None else self.fwhm_minor
        checks = (("ra_offset", self.ra_offset, u.arcsec),
                  ("dec_offset", self.dec_offset, u.arcsec),
                  ("fwhm_major", self.fwhm_major, u.arcsec),
                  ("fwhm_minor", minor, u.arcsec),
                  ("position_angle", self.position_angle, u.deg),
                  ("peak_flux", self.peak_flux, u.Jy),
                  ("velocity", self.velocity, u.km / u.s),
                  ("fwhm_velocity", self.fwhm_velocity, u.km / u.s))
        for field, value, unit in checks:
            object.__setattr__(self, field, _as_quantity(value, unit, field))
        for field in ("fwhm_major", "fwhm_minor", "peak_flux", "fwhm_velocity"):
            if getattr(self, field).value <= 0:
                raise ValueError(f"source {self.name!r}: {field} must be positive, got "
                                 f"{getattr(self, field)}")
        if self.fwhm_minor > self.fwhm_major:
            raise ValueError(f"source {self.name!r}: fwhm_minor ({self.fwhm_minor}) exceeds "
                             f"fwhm_major ({self.fwhm_major}); swap them and rotate "
                             "position_angle by 90 deg")

    @property
    def offset(self):
        """Offset ``[east, north]`` from the phase centre, Quantity [arcsec], shape (2,)."""
        return u.Quantity([self.ra_offset, self.dec_offset]).to(u.arcsec)

    @property
    def sigma_velocity(self):
        """Line Gaussian sigma, ``fwhm_velocity / sqrt(8 ln 2)``."""
        return self.fwhm_velocity / FWHM_PER_SIGMA

    @property
    def integrated_flux(self):
        """Velocity-integrated line flux ``peak_flux * sigma_v * sqrt(2 pi)`` [Jy km/s]."""
        return (self.peak_flux * self.sigma_velocity * np.sqrt(2 * np.pi)).to(u.Jy * u.km / u.s)

    def spectrum(self, velocities):
        """Total flux density of the source at the given velocities.

        Parameters
        ----------
        velocities : Quantity [speed], shape (n,)

        Returns
        -------
        Quantity [Jy], shape (n,)
            ``peak_flux * exp(-(v - velocity)**2 / (2 sigma_v**2))``, the line sampled at
            the channel centres (no averaging over the channel width).
        """
        x = ((velocities - self.velocity) / self.sigma_velocity).to_value(u.one)
        return (self.peak_flux * np.exp(-0.5 * x ** 2)).to(u.Jy)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SourceTruth(GaussianLineSource):
    """A :class:`GaussianLineSource` as injected into a simulated MS.

    Parameters
    ----------
    coord : SkyCoord
        Absolute position (FK5 J2000).
    channel : int
        Index of the MS channel whose centre is nearest the line centre.
    spectrum_jy : Quantity [Jy], shape (nchan,)
        Injected total flux density per MS channel.
    """

    coord: SkyCoord
    channel: int
    spectrum_jy: u.Quantity = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SimulatedMS:
    """Everything a test needs to know about a simulated spectral-line MS.

    Attributes
    ----------
    ms_path : Path
    array : str
        ``"12m"`` or ``"7m"``.
    seed : int
    phase_center : SkyCoord
        FK5 J2000 phase centre of the single field.
    rest_frequency : Quantity [GHz]
    frequencies : Quantity [Hz], shape (nchan,)
        LSRK channel centres in MS channel order (descending frequency).
    velocities : Quantity [km/s], shape (nchan,)
        LSRK radio velocities of the channel centres (ascending).
    channel_width : Quantity [km/s]
    vsys : Quantity [km/s]
        Systemic velocity, the compact source's line centre.
    sources : tuple of SourceTruth
        ``sources[0]`` is the compact source, ``sources[1]`` the extended one.
    noise_per_visibility : Quantity [Jy]
        Standard deviation of the real and of the imaginary part of each correlation
        of each visibility (``sm.setnoise`` ``simplenoise``).
    n_visibilities : int
        Unflagged (row, correlation) samples per channel.
    expected_rms : Quantity [Jy/beam]
        Expected Stokes I image noise per channel, natural weighting
        (:func:`expected_image_rms`).
    beam : tuple of Quantity
        ``(major, minor, position_angle)``: natural-weighting beam estimated from the
        uv second moments (:func:`estimate_natural_beam`); within 4 % of tclean's
        fitted beam for both default arrays.
    cell : Quantity [arcsec]
        Suggested pixel size (about a fifth of the beam minor axis).
    imsize : int
        Suggested image size, covering ~1.2 primary-beam FWHM.
    dish_diameter : Quantity [m]
    integration_time, duration : Quantity [s]
    line_free_channels : ndarray of int
        MS channels where every line is below 1e-3 of its peak.
    simulate_seconds : float
        Wall-clock time spent simulating.
    """

    ms_path: Path
    array: str
    seed: int
    phase_center: SkyCoord
    rest_frequency: u.Quantity
    frequencies: u.Quantity = dataclasses.field(repr=False)
    velocities: u.Quantity = dataclasses.field(repr=False)
    channel_width: u.Quantity
    vsys: u.Quantity
    sources: tuple
    noise_per_visibility: u.Quantity
    n_visibilities: int
    expected_rms: u.Quantity
    beam: tuple
    cell: u.Quantity
    imsize: int
    dish_diameter: u.Quantity
    integration_time: u.Quantity
    duration: u.Quantity
    line_free_channels: np.ndarray = dataclasses.field(repr=False)
    simulate_seconds: float = dataclasses.field(default=0.0, compare=False)

    @property
    def nchan(self):
        """Number of channels."""
        return len(self.frequencies)

    @property
    def compact(self):
        """Truth of the compact source."""
        return self.sources[0]

    @property
    def extended(self):
        """Truth of the extended source."""
        return self.sources[1]

    def source(self, name):
        """Truth of the source called ``name``.

        Raises
        ------
        KeyError
            When no source has that name; the message lists the names there are.
        """
        for truth in self.sources:
            if truth.name == name:
                return truth
        raise KeyError(f"no source {name!r}; sources are {[s.name for s in self.sources]}")


# ------------------------------------------------------------------- science helpers
def _as_quantity(value, unit, name):
    """Return ``value`` as a Quantity convertible to ``unit`` (plain numbers get it)."""
    quantity = u.Quantity(value, unit) if not isinstance(value, u.Quantity) else value
    if not quantity.unit.is_equivalent(unit):
        raise ValueError(f"{name} must be in units of {unit}, got {value!r}")
    return quantity.to(unit)


def default_sources(vsys=DEFAULT_VSYS_KMS * u.km / u.s):
    """The two default sources: a compact protostar-like core and an extended clump.

    Parameters
    ----------
    vsys : Quantity [speed]
        Systemic velocity, the compact source's line centre.

    Returns
    -------
    tuple of GaussianLineSource
        ``compact``: 0.3" FWHM (well below either array's beam) at (+1.2", -0.8"),
        0.5 Jy line peak, FWHM 1.5 km/s at ``vsys``.  ``extended``: 3" x 2" FWHM at PA
        30 deg (inside the 12 m array's ~7" largest recoverable scale) at (-4", +3"),
        1.5 Jy line peak, FWHM 2 km/s at ``vsys + 3 km/s``.  The two are 7.2" and
        6 channels apart, so they are separate in the 12 m cube and partly blended in
        the 7 m one (beam ~7" x 5").
    """
    vsys = _as_quantity(vsys, u.km / u.s, "vsys")
    compact = GaussianLineSource(
        name="compact", ra_offset=1.2 * u.arcsec, dec_offset=-0.8 * u.arcsec,
        fwhm_major=0.3 * u.arcsec, peak_flux=0.5 * u.Jy, velocity=vsys,
        fwhm_velocity=1.5 * u.km / u.s)
    extended = GaussianLineSource(
        name="extended", ra_offset=-4.0 * u.arcsec, dec_offset=3.0 * u.arcsec,
        fwhm_major=3.0 * u.arcsec, fwhm_minor=2.0 * u.arcsec, position_angle=30 * u.deg,
        peak_flux=1.5 * u.Jy, velocity=vsys + 3.0 * u.km / u.s,
        fwhm_velocity=2.0 * u.km / u.s)
    return compact, extended


def channel_grid(rest_frequency, vsys, channel_width, nchan, vsys_channel):
    """LSRK channel centres with channel ``vsys_channel`` exactly at ``vsys``.

    Parameters
    ----------
    rest_frequency : Quantity [frequency]
    vsys : Quantity [speed]
    channel_width : Quantity [speed]
        Positive; velocities ascend (frequencies descend) with channel index.
    nchan, vsys_channel : int

    Returns
    -------
    frequencies : Quantity [Hz], shape (nchan,)
    velocities : Quantity [km/s], shape (nchan,)

    Notes
    -----
    Radio convention, ``nu = nu0 (1 - v / c)``, so a constant velocity step is a
    constant frequency step ``-nu0 dv / c``.
    """
    if not 0 <= vsys_channel < nchan:
        raise ValueError(f"vsys_channel must lie in [0, {nchan - 1}], got {vsys_channel}")
    velocities = vsys + (np.arange(nchan) - vsys_channel) * channel_width
    frequencies = rest_frequency * (1 - (velocities / SPEED_OF_LIGHT).to_value(u.one))
    return frequencies.to(u.Hz), velocities.to(u.km / u.s)


def expected_image_rms(noise_per_visibility, n_visibilities):
    """Expected Stokes I noise per channel of a naturally weighted image.

    Parameters
    ----------
    noise_per_visibility : Quantity [Jy]
        sigma of the real and of the imaginary part of one correlation's visibility.
    n_visibilities : int
        Unflagged samples per channel, counting each correlation (rows x n_corr).

    Returns
    -------
    Quantity [Jy/beam]

    Notes
    -----
    With equal weights, ``I = (XX + YY) / 2`` and the image at a pixel is the weighted
    mean of the phase-rotated real parts of all samples, so
    ``sigma_image = sigma / sqrt(n_corr * n_baselines * n_integrations)``
    (e.g. CASA ``simulator.setnoise`` documentation; Thompson, Moran & Swenson 2017,
    eq. 6.62).  Checked on the simulated cubes: the 1.4826 MAD of the line-free
    channels came out at 0.985-1.045 times this value (3 seeds x 12 m/7 m arrays,
    dirty and lightly cleaned), and the DATA noise at sigma to 0.3 %.
    """
    if n_visibilities <= 0:
        raise ValueError(f"n_visibilities must be positive, got {n_visibilities}")
    sigma = _as_quantity(noise_per_visibility, u.Jy, "noise_per_visibility")
    return (sigma / np.sqrt(n_visibilities)).value * u.Jy / u.beam


def _gaussian_covariance(fwhm_major, fwhm_minor, position_angle):
    """2x2 sky covariance matrix (arcsec^2, east/north axes) of an elliptical Gaussian."""
    sig = np.array([fwhm_major.to_value(u.arcsec), fwhm_minor.to_value(u.arcsec)]) / FWHM_PER_SIGMA
    pa = position_angle.to_value(u.rad)
    major_axis = np.array([np.sin(pa), np.cos(pa)])      # PA is measured east of north
    minor_axis = np.array([np.cos(pa), -np.sin(pa)])
    return (sig[0] ** 2 * np.outer(major_axis, major_axis)
            + sig[1] ** 2 * np.outer(minor_axis, minor_axis))


def expected_peak_intensity(source, beam):
    """Peak image intensity of a Gaussian source observed with a Gaussian beam.

    Parameters
    ----------
    source : GaussianLineSource
    beam : tuple of Quantity
        ``(major, minor, position_angle)`` of the restoring beam.

    Returns
    -------
    Quantity [Jy/beam]
        At the line peak; multiply by the line profile for other channels.

    Notes
    -----
    ``S_peak = S_tot * sqrt(det C_beam / det(C_beam + C_source))`` with ``C`` the sky
    covariance matrices; for circular shapes this is the familiar
    ``S_tot * theta_b**2 / (theta_b**2 + theta_s**2)``.
    """
    c_beam = _gaussian_covariance(*beam)
    c_src = _gaussian_covariance(source.fwhm_major, source.fwhm_minor, source.position_angle)
    ratio = np.sqrt(np.linalg.det(c_beam) / np.linalg.det(c_beam + c_src))
    return (source.peak_flux * ratio).to_value(u.Jy) * u.Jy / u.beam


def estimate_natural_beam(uv_wavelengths):
    """Natural-weighting beam from the second moments of the uv coverage.

    Parameters
    ----------
    uv_wavelengths : ndarray, shape (n, 2)
        (u, v) of every unflagged, equally weighted sample, in wavelengths.

    Returns
    -------
    tuple of Quantity
        ``(major, minor, position_angle)``.

    Notes
    -----
    The dirty beam's curvature at its centre is ``-4 pi^2 <u u^T>`` (Hermitian
    coverage, so the mean is zero); the Gaussian with the same curvature has sky
    covariance ``(4 pi^2 <u u^T>)^-1``.  Fitted CASA beams are usually within ~20 %.
    """
    moment = (uv_wavelengths.T @ uv_wavelengths) / len(uv_wavelengths)
    c_sky = np.linalg.inv(4 * np.pi ** 2 * moment)           # rad^2, axes (east, north)
    eigval, eigvec = np.linalg.eigh(c_sky)
    fwhm = FWHM_PER_SIGMA * np.sqrt(eigval) * u.rad
    east, north = eigvec[:, 1]                                  # major-axis direction
    pa = np.degrees(np.arctan2(east, north)) % 180.0
    return fwhm[1].to(u.arcsec), fwhm[0].to(u.arcsec), pa * u.deg


def _nice_cell(beam_minor):
    """A round pixel size close to a fifth of ``beam_minor`` (1, 2, 2.5 or 5 x 10^k)."""
    target = beam_minor.to_value(u.arcsec) / 5.0
    exponent = np.floor(np.log10(target))
    mantissas = np.array([1.0, 2.0, 2.5, 5.0, 10.0])
    best = mantissas[mantissas <= target / 10 ** exponent].max()
    return best * 10 ** exponent * u.arcsec


def _suggest_imsize(cell, dish_diameter, frequency, fov_in_pb_fwhm=1.2):
    """Smallest FFT-friendly size covering ``fov_in_pb_fwhm`` primary-beam FWHMs."""
    pb_fwhm = (1.13 * (SPEED_OF_LIGHT / frequency) / dish_diameter).to(u.one) * u.rad
    needed = (fov_in_pb_fwhm * pb_fwhm / cell).to_value(u.one)
    return next((n for n in GOOD_IMSIZES if n >= needed), GOOD_IMSIZES[-1])


def _line_free_channels(sources, velocities):
    """Channels where every source's line is below LINE_FREE_FRACTION of its peak."""
    relative = np.array([(s.spectrum(velocities) / s.peak_flux).to_value(u.one) for s in sources])
    return np.flatnonzero(relative.max(axis=0) < LINE_FREE_FRACTION)


def robust_rms(values):
    """Robust standard deviation ``1.4826 * MAD`` of the finite values.

    Parameters
    ----------
    values : array_like

    Returns
    -------
    float
    """
    finite = np.asarray(values)[np.isfinite(values)]
    return float(1.4826 * np.median(np.abs(finite - np.median(finite))))


# ----------------------------------------------------------------------- CASA pieces
def _quantity_string(quantity, unit):
    """``'<value><unit>'`` string for CASA, with full double precision."""
    return f"{float(quantity.to_value(unit))!r}{unit}"


def _source_truths(sources, phase_center, velocities):
    """Attach position, channel and per-channel spectrum to each source."""
    truths = []
    for source in sources:
        channel = int(np.argmin(np.abs(velocities - source.velocity)))
        if not (velocities.min() <= source.velocity <= velocities.max()):
            raise ValueError(f"source {source.name!r}: line centre {source.velocity} lies "
                             f"outside the band {velocities.min()} .. {velocities.max()}; "
                             "raise nchan or move vsys_channel")
        coord = phase_center.spherical_offsets_by(source.ra_offset, source.dec_offset)
        fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(GaussianLineSource)}
        truths.append(SourceTruth(**fields, coord=coord, channel=channel,
                                  spectrum_jy=source.spectrum(velocities)))
    return tuple(truths)


def _write_component_list(casatools, path, truths, frequencies):
    """Write the sources as Gaussian components with tabular (line) spectra."""
    order = np.argsort(frequencies)                     # tabular spectra want ascending nu
    cl = casatools.componentlist()
    try:
        for truth in truths:
            ra, dec = float(truth.coord.ra.deg), float(truth.coord.dec.deg)
            cl.addcomponent(
                flux=[1.0, 0.0, 0.0, 0.0], fluxunit="Jy", polarization="Stokes",
                dir=f"J2000 {ra!r}deg {dec!r}deg", shape="gaussian",
                majoraxis=_quantity_string(truth.fwhm_major, "arcsec"),
                minoraxis=_quantity_string(truth.fwhm_minor, "arcsec"),
                positionangle=_quantity_string(truth.position_angle, "deg"),
                freq=_quantity_string(frequencies[order][0], "Hz"), label=truth.name)
            cl.setspectrum(which=cl.length() - 1, type="tabular",
                           tabularfreqs=frequencies[order].to_value(u.Hz).tolist(),
                           tabularflux=truth.spectrum_jy[order].to_value(u.Jy).tolist(),
                           tabularframe="LSRK")
        cl.rename(str(path))
    finally:
        cl.close()


def _observe(sm, me, layout, phase_center, frequencies, integration_time, duration):
    """Set up array, spectral window, field and times, and write the empty MS."""
    enu = np.asarray(layout["enu"], dtype=float)
    nant = len(enu)
    sm.setconfig(telescopename="ALMA", x=enu[:, 0].tolist(), y=enu[:, 1].tolist(),
                 z=enu[:, 2].tolist(), dishdiameter=[layout["dish_diameter"]] * nant,
                 mount=["ALT-AZ"] * nant, antname=[f"SIM{i:02d}" for i in range(nant)],
                 padname=[f"P{i:02d}" for i in range(nant)], coordsystem="local",
                 referencelocation=me.observatory("ALMA"))
    step = frequencies[1] - frequencies[0]
    sm.setspwindow(spwname="CO21", freq=_quantity_string(frequencies[0], "Hz"),
                   deltafreq=_quantity_string(step, "Hz"),
                   freqresolution=_quantity_string(abs(step), "Hz"), refcode="LSRK",
                   nchannels=len(frequencies), stokes="XX YY")
    sm.setfeed(mode="perfect X Y", pol=[""])
    ra, dec = float(phase_center.ra.deg), float(phase_center.dec.deg)
    sm.setfield(sourcename="FAUST_SIM",
                sourcedirection=me.direction("J2000", f"{ra!r}deg", f"{dec!r}deg"))
    sm.setlimits(shadowlimit=0.001, elevationlimit="10deg")
    sm.setauto(autocorrwt=0.0)
    sm.settimes(integrationtime=_quantity_string(integration_time, "s"), usehourangle=True,
                referencetime=me.epoch("UTC", "2024/11/15/00:00:00"))
    half = float(duration.to_value(u.s)) / 2
    sm.observe(sourcename="FAUST_SIM", spwname="CO21", starttime=f"{-half!r}s",
               stoptime=f"{half!r}s")


def _read_uv_and_count(casatools, ms_path, frequency):
    """Unflagged (row, correlation) count per channel and uv samples in wavelengths."""
    tb = casatools.table()
    tb.open(str(ms_path))
    try:
        flags = tb.getcol("FLAG")                       # (ncorr, nchan, nrow)
        uvw = tb.getcol("UVW")                          # (3, nrow)
    finally:
        tb.close()
    per_channel = (~flags).sum(axis=(0, 2))
    if per_channel.min() != per_channel.max():
        raise SimulationError(f"{ms_path}: flags differ between channels "
                              f"({per_channel.min()}..{per_channel.max()} samples)")
    rows = ~flags.all(axis=(0, 1))
    wavelength = (SPEED_OF_LIGHT / frequency).to_value(u.m)
    uv = uvw[:2, rows].T / wavelength
    return int(per_channel[0]), np.vstack([uv, -uv])


def _run_simulator(casatools, ms_path, layout, phase_center, frequencies, truths,
                   noise, seed, times):
    """Write the MS: observe, predict the component list, add noise."""
    sm, me = casatools.simulator(), casatools.measures()
    with tempfile.TemporaryDirectory(prefix="simcl-") as scratch:
        component_list = Path(scratch) / "sky.cl"
        _write_component_list(casatools, component_list, truths, frequencies)
        try:
            sm.open(str(ms_path))
            _observe(sm, me, layout, phase_center, frequencies, *times)
            sm.setvp(dovp=False)                # no primary beam: truth = visibilities
            sm.predict(complist=str(component_list))
            if noise.value > 0:
                sm.setseed(seed)
                sm.setnoise(mode="simplenoise", simplenoise=_quantity_string(noise, "Jy"))
                sm.corrupt()
        finally:
            sm.close()
            me.done()
    if not (ms_path / "table.dat").exists():
        raise SimulationError(f"CASA did not write {ms_path}; see the CASA log")


# ---------------------------------------------------------------------- simulator
def simulate_alma_line_ms(ms_path, *, array="12m", nchan=48, seed=42,
                          noise_per_visibility=0.3 * u.Jy, sources=None,
                          vsys=DEFAULT_VSYS_KMS * u.km / u.s, vsys_channel=None,
                          channel_width=0.5 * u.km / u.s,
                          rest_frequency=CO21_REST_FREQUENCY_GHZ * u.GHz,
                          phase_center=DEFAULT_PHASE_CENTER,
                          integration_time=30 * u.s, duration=20 * u.min,
                          overwrite=False):
    """Simulate a tiny ALMA-like Band 6 spectral-line MeasurementSet.

    One field, one spectral window of ``nchan`` LSRK channels (XX, YY) around the
    rest frequency, observed symmetrically about transit with 10-11 antennas
    (:data:`ARRAY_LAYOUTS`).  Each source is a Gaussian component whose flux density
    follows a Gaussian line sampled at the channel centres (tabular spectrum); it is
    predicted exactly (analytic Fourier transform, no primary-beam attenuation), and
    Gaussian noise of known sigma is added with ``sm.setnoise('simplenoise')``.

    Parameters
    ----------
    ms_path : str or Path
        MeasurementSet to write.
    array : {"12m", "7m"}
        12 m main array (11 x 12 m dishes, baselines 26-223 m) or 7 m ACA-like array
        (10 x 7 m dishes, 13-51 m); both observe the same field and band.
    nchan : int
        Number of channels (at least 8).
    seed : int
        Seed for the noise (``sm.setseed``); the same seed gives an identical MS.
    noise_per_visibility : Quantity [Jy]
        sigma of the real and of the imaginary part of each correlation; 0 for none.
    sources : sequence of GaussianLineSource, optional
        Defaults to :func:`default_sources` at ``vsys``.  The first is treated as the
        compact source by :func:`image_and_measure`.
    vsys : Quantity [speed]
        Systemic velocity; channel ``vsys_channel`` is centred on it exactly.
    vsys_channel : int, optional
        Defaults to ``2 * nchan // 5``, leaving room for the red-shifted extended line.
    channel_width : Quantity [speed]
        Positive velocity width of a channel (velocity rises with channel index).
    rest_frequency : Quantity [frequency]
    phase_center : str or SkyCoord
        Field centre; strings are read as FK5 J2000.
    integration_time, duration : Quantity [time]
    overwrite : bool
        Replace an existing ``ms_path``; otherwise an existing path is an error.

    Returns
    -------
    SimulatedMS

    Raises
    ------
    ValueError
        For an unknown array, too few channels, or a line outside the band.
    FileExistsError
        When ``ms_path`` exists and ``overwrite`` is False.
    SimulationError
        When CASA leaves flagged data or fails to write the MS.

    Notes
    -----
    Expected natural-weighting image noise per channel:
    ``sigma_image = noise_per_visibility / sqrt(n_corr * n_baselines * n_integrations)``
    (:func:`expected_image_rms`).  With the defaults (11 antennas, 40 x 30 s, 2 corr)
    that is 0.3 Jy / sqrt(4400) = 4.5 mJy/beam for the 12 m array (5.0 mJy/beam for
    the 7 m one), so the compact source peaks at SNR ~100.

    The sky is not attenuated by a primary beam, so the truth is what the
    visibilities hold.  A primary-beam-corrected image (tclean ``pbcor=True``; tclean
    uses a 25.8"/45.5" FWHM beam for these 12 m/7 m MSs) therefore over-estimates the
    fluxes by 1/PB: ~1 % for the compact source, ~11 % (12 m) and ~3 % (7 m) for the
    extended one 5" from the centre.  Compare uncorrected images with the truth.

    Takes ~0.2-0.3 s on 2 cores for the defaults.

    Examples
    --------
    >>> sim = simulate_alma_line_ms("/tmp/sim7m.ms", array="7m", seed=7)  # doctest: +SKIP
    >>> sim.compact.channel, sim.velocities[sim.compact.channel]         # doctest: +SKIP
    (19, <Quantity 5.85 km / s>)
    >>> sim.expected_rms                                                 # doctest: +SKIP
    <Quantity 0.005 Jy / beam>
    """
    # -- checks
    if array not in ARRAY_LAYOUTS:
        raise ValueError(f"array must be one of {sorted(ARRAY_LAYOUTS)}, got {array!r}")
    if int(nchan) < 8:
        raise ValueError(f"nchan must be at least 8, got {nchan}")
    ms_path = Path(ms_path).resolve()
    if ms_path.exists() and not overwrite:
        raise FileExistsError(f"{ms_path} exists; pass overwrite=True to replace it")
    noise = _as_quantity(noise_per_visibility, u.Jy, "noise_per_visibility")
    if noise.value < 0:
        raise ValueError(f"noise_per_visibility must be >= 0, got {noise}")
    vsys = _as_quantity(vsys, u.km / u.s, "vsys")
    channel_width = _as_quantity(channel_width, u.km / u.s, "channel_width")
    if channel_width.value <= 0:
        raise ValueError(f"channel_width must be positive, got {channel_width}")
    rest_frequency = _as_quantity(rest_frequency, u.GHz, "rest_frequency")
    integration_time = _as_quantity(integration_time, u.s, "integration_time")
    duration = _as_quantity(duration, u.s, "duration")
    if not isinstance(phase_center, SkyCoord):
        phase_center = SkyCoord(phase_center, frame="fk5", equinox="J2000")
    phase_center = phase_center.transform_to("fk5")
    vsys_channel = 2 * int(nchan) // 5 if vsys_channel is None else int(vsys_channel)

    # -- truth
    frequencies, velocities = channel_grid(rest_frequency, vsys, channel_width,
                                           int(nchan), vsys_channel)
    sources = default_sources(vsys) if sources is None else tuple(sources)
    truths = _source_truths(sources, phase_center, velocities)

    # -- simulate
    start = time.perf_counter()
    casatools = import_casatools(required=True)
    if ms_path.exists():
        shutil.rmtree(ms_path)
    layout = ARRAY_LAYOUTS[array]
    _run_simulator(casatools, ms_path, layout, phase_center, frequencies, truths,
                   noise, int(seed), (integration_time, duration))
    n_vis, uv = _read_uv_and_count(casatools, ms_path, rest_frequency)
    beam = estimate_natural_beam(uv)
    cell = _nice_cell(beam[1])
    dish = layout["dish_diameter"] * u.m
    elapsed = time.perf_counter() - start
    log.info("simulated %s (%s array, %d channels) in %.1f s", ms_path, array, nchan, elapsed)
    return SimulatedMS(
        ms_path=ms_path, array=array, seed=int(seed), phase_center=phase_center,
        rest_frequency=rest_frequency, frequencies=frequencies, velocities=velocities,
        channel_width=channel_width, vsys=vsys, sources=truths,
        noise_per_visibility=noise, n_visibilities=n_vis,
        expected_rms=expected_image_rms(noise, n_vis), beam=beam, cell=cell,
        imsize=_suggest_imsize(cell, dish, rest_frequency), dish_diameter=dish,
        integration_time=integration_time, duration=duration.to(u.s),
        line_free_channels=_line_free_channels(truths, velocities),
        simulate_seconds=elapsed)


# -------------------------------------------------------------------- imaging + checks
@contextlib.contextmanager
def _working_directory(path):
    """Run a block inside ``path`` so CASA's stray outputs land there, not in the cwd."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def default_tclean_parameters(sim, imagename):
    """``tclean`` arguments for a natural-weighting LSRK cube of a simulated MS.

    The cube keeps the MS channels one to one (same frame, no regridding), is cleaned
    lightly down to 4 x the expected rms with a common restoring beam, and is not
    primary-beam corrected.

    Parameters
    ----------
    sim : SimulatedMS
    imagename : str or Path
        Image name prefix (made absolute).

    Returns
    -------
    dict
    """
    return dict(
        vis=str(sim.ms_path), imagename=str(Path(imagename).resolve()), field="", spw="",
        specmode="cube", outframe="LSRK", veltype="radio",
        restfreq=_quantity_string(sim.rest_frequency, "Hz"), nchan=-1, start="", width="",
        imsize=[sim.imsize, sim.imsize], cell=_quantity_string(sim.cell, "arcsec"),
        gridder="standard", deconvolver="hogbom", weighting="natural",
        niter=500, threshold=_quantity_string(4 * sim.expected_rms * u.beam, "Jy"),
        restoringbeam="common", pbcor=False, savemodel="none", interactive=False,
        parallel=False)


def _restoring_beam(ia, image_path):
    """Single restoring beam of an open image as (major, minor, position_angle)."""
    beam = ia.restoringbeam()
    if "major" not in beam:
        raise SimulationError(f"{image_path} has no single restoring beam; image with "
                              "restoringbeam='common'")
    return tuple(u.Quantity(beam[key]["value"], beam[key]["unit"]).to(unit)
                 for key, unit in (("major", u.arcsec), ("minor", u.arcsec),
                                   ("positionangle", u.deg)))


def _read_cube(casatools, image_path):
    """Read a CASA image cube.

    Returns
    -------
    data : ndarray, shape (nx, ny, nchan)
        First Stokes plane (direction axes first, as tclean writes them).
    frequencies : Quantity [Hz], shape (nchan,)
    beam : tuple of Quantity
    cs : coordsys tool
        The caller must call ``cs.done()``.
    """
    ia = casatools.image()
    ia.open(str(image_path))
    try:
        beam = _restoring_beam(ia, image_path)
        cs = ia.coordsys()
        names = list(cs.names())
        data = ia.getchunk()
    finally:
        ia.close()
    spectral = names.index("Frequency")
    if "Stokes" in names:
        data = np.moveaxis(data, names.index("Stokes"), -1)[..., 0]
        names.remove("Stokes")
    data = np.moveaxis(data, names.index("Frequency"), -1)
    ref, inc = cs.referencevalue()["numeric"], cs.increment()["numeric"]
    refpix = cs.referencepixel()["numeric"]
    channels = np.arange(data.shape[-1])
    frequencies = ref[spectral] + (channels - refpix[spectral]) * inc[spectral]
    return data, frequencies * u.Hz, beam, cs


def _pixel_to_coord(cs, x, y):
    """Sky position (FK5 J2000) of fractional pixel (x, y) of the direction axes."""
    world = cs.toworld([x, y] + [0] * (len(cs.names()) - 2), "n")["numeric"]
    return SkyCoord(world[0] * u.rad, world[1] * u.rad, frame="fk5", equinox="J2000")


def _coord_to_pixel(cs, coord):
    """Fractional pixel (x, y) of a sky position."""
    world = cs.referencevalue()["numeric"]
    world[0], world[1] = coord.ra.rad, coord.dec.rad
    return cs.topixel(list(world))["numeric"][:2]


def _map_to_ms_channels(sim, frequencies, image_path):
    """MS channel index of every cube channel (tclean may reverse the order)."""
    ms_channel = np.array([np.argmin(np.abs(sim.frequencies - f)) for f in frequencies])
    mismatch = np.max(np.abs(sim.frequencies[ms_channel] - frequencies))
    if mismatch > 1e-3 * abs(sim.frequencies[1] - sim.frequencies[0]):
        raise SimulationError(f"{image_path}: channels are off the MS grid by "
                              f"{mismatch.to(u.kHz):.3g}; image with outframe='LSRK' and "
                              "the default start/width so cube and MS channels match")
    return ms_channel


def _parabolic_peak(values):
    """Sub-pixel offset of the extremum of three samples around the central one."""
    left, centre, right = values
    denominator = left - 2 * centre + right
    if denominator == 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / denominator, -0.5, 0.5))


def _find_compact_peak(data, cs, sim, ms_channel, radius):
    """Brightest voxel near the compact source: (x, y, cube channel, refined SkyCoord).

    The search covers pixels within ``radius`` of the true position and channels
    within one line FWHM of the true line centre, so that the extended source
    (blended with the compact one in the 7 m array's beam) is not picked up.
    """
    compact = sim.compact
    nx, ny = data.shape[:2]
    truth_x, truth_y = _coord_to_pixel(cs, compact.coord)
    pixel = abs(cs.increment()["numeric"][0]) * u.rad
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    near = np.hypot(xx - truth_x, yy - truth_y) * pixel <= radius
    in_line = np.abs(sim.velocities[ms_channel] - compact.velocity) <= compact.fwhm_velocity
    masked = np.where(near[..., None] & in_line[None, None, :], data, -np.inf)
    x, y, chan = np.unravel_index(np.argmax(masked), masked.shape)
    dx = _parabolic_peak(data[x - 1:x + 2, y, chan]) if 0 < x < nx - 1 else 0.0
    dy = _parabolic_peak(data[x, y - 1:y + 2, chan]) if 0 < y < ny - 1 else 0.0
    return int(x), int(y), int(chan), _pixel_to_coord(cs, x + dx, y + dy)


def _centroid_channel(spectrum, peak, half_width, threshold):
    """Intensity-weighted channel of the run above ``threshold`` around ``peak``.

    The run is limited to ``peak +- half_width`` channels, so a neighbouring line
    blended at the same position does not drag the centroid.
    """
    lo = hi = peak
    while lo > max(0, peak - half_width) and spectrum[lo - 1] > threshold:
        lo -= 1
    while hi < min(len(spectrum) - 1, peak + half_width) and spectrum[hi + 1] > threshold:
        hi += 1
    weights = spectrum[lo:hi + 1]
    return float(np.sum(np.arange(lo, hi + 1) * weights) / np.sum(weights))


def _compact_truth(sim, beam):
    """Truth dict for the compact source, for comparison with the measured one."""
    compact = sim.compact
    profile = (compact.spectrum_jy[compact.channel] / compact.peak_flux).to_value(u.one)
    exact_channel = compact.channel + ((compact.velocity - sim.velocities[compact.channel])
                                       / sim.channel_width).to_value(u.one)
    return {
        "offset": compact.offset,
        "peak_channel": compact.channel,
        "centroid_channel": float(exact_channel),
        "velocity": compact.velocity,
        "peak_flux": expected_peak_intensity(compact, beam) * profile,
        "rms": sim.expected_rms,
    }


def measure_compact_source(sim, image_path, search_radius=None):
    """Measure the compact source, the noise and the beam in a cube of ``sim``.

    Parameters
    ----------
    sim : SimulatedMS
    image_path : str or Path
        CASA image cube (e.g. ``<imagename>.image``) with a single restoring beam and
        channels on the MS grid.
    search_radius : Quantity [angle], optional
        The peak is searched within this distance of the compact source's true
        position (default: the beam major axis) and within one line FWHM of its true
        line centre.

    Returns
    -------
    dict
        ``beam``: (major, minor, position_angle) of the restoring beam; ``measured``
        and ``truth``: dicts with the keys ``offset`` (Quantity [arcsec], (east,
        north) from the phase centre; measured at the peak pixel refined by a 3-point
        parabola per axis), ``peak_channel`` (MS channel index), ``centroid_channel``
        (intensity-weighted over the channels above 3 rms within one line FWHM of the
        peak channel, at the peak pixel), ``velocity`` (at the centroid), ``peak_flux``
        (Jy/beam; truth from :func:`expected_peak_intensity` with the measured beam)
        and ``rms`` (Jy/beam; measured as 1.4826 MAD over all pixels of the line-free
        channels).  ``measured`` also has ``peak_pixel`` (x, y) and ``n_noise_pixels``.

    Raises
    ------
    SimulationError
        When the cube has no line-free channels or its channels are off the MS grid.
    """
    casatools = import_casatools(required=True)
    data, frequencies, beam, cs = _read_cube(casatools, image_path)
    try:
        ms_channel = _map_to_ms_channels(sim, frequencies, image_path)
        line_free = np.isin(ms_channel, sim.line_free_channels)
        if not line_free.any():
            raise SimulationError(f"{image_path}: no line-free channels to measure the "
                                  "noise; simulate with more channels")
        radius = beam[0] if search_radius is None else search_radius
        x, y, chan, peak_coord = _find_compact_peak(data, cs, sim, ms_channel, radius)
    finally:
        cs.done()

    rms = robust_rms(data[..., line_free])
    half_width = int(np.ceil((sim.compact.fwhm_velocity / sim.channel_width).to_value(u.one)))
    centroid = _centroid_channel(data[x, y, :], chan, half_width, 3 * rms)
    # cube and MS channels are both uniform, so map the fractional index linearly
    centroid_ms = float(np.interp(centroid, np.arange(len(ms_channel)), ms_channel))
    velocity = np.interp(centroid_ms, np.arange(sim.nchan), sim.velocities.to_value(u.km / u.s))
    d_east, d_north = sim.phase_center.spherical_offsets_to(peak_coord)
    measured = {
        "offset": u.Quantity([d_east, d_north]).to(u.arcsec),
        "peak_pixel": (x, y),
        "peak_channel": int(ms_channel[chan]),
        "centroid_channel": centroid_ms,
        "velocity": velocity * u.km / u.s,
        "peak_flux": float(data[x, y, chan]) * u.Jy / u.beam,
        "rms": rms * u.Jy / u.beam,
        "n_noise_pixels": int(data[..., line_free].size),
    }
    return {"beam": beam, "measured": measured, "truth": _compact_truth(sim, beam)}


TCLEAN_PRODUCTS = (".image", ".mask", ".model", ".pb", ".psf", ".residual", ".sumwt",
                   ".weight", ".image.pbcor")


def _remove_products(imagename, overwrite):
    """Delete earlier tclean products of ``imagename`` or refuse to touch them."""
    existing = [Path(imagename + ext) for ext in TCLEAN_PRODUCTS
                if Path(imagename + ext).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists (tclean would continue from it); "
                              "pass overwrite=True or choose another imagename")
    for path in existing:
        shutil.rmtree(path)


def image_and_measure(sim, imagename, *, overwrite=False, **tclean_overrides):
    """Image a simulated MS with ``tclean`` (cube) and measure the compact source.

    Parameters
    ----------
    sim : SimulatedMS
    imagename : str or Path
        Image name prefix; its directory must exist.  ``tclean`` runs with that
        directory as the working directory, so nothing lands in the caller's cwd.
    overwrite : bool
        Delete earlier products of ``imagename`` first; otherwise they are an error.
    **tclean_overrides
        Replace any of :func:`default_tclean_parameters` (e.g. ``weighting="briggs"``,
        ``niter=0``).

    Returns
    -------
    dict
        :func:`measure_compact_source`'s dict plus ``image`` (Path of the restored
        cube) and ``tclean_seconds``.

    Raises
    ------
    FileExistsError
        When products of ``imagename`` exist and ``overwrite`` is False.
    SimulationError
        When ``tclean`` writes no image.

    Examples
    --------
    >>> sim = simulate_alma_line_ms("/tmp/demo.ms", seed=3)             # doctest: +SKIP
    >>> res = image_and_measure(sim, "/tmp/demo_cube", niter=0)          # doctest: +SKIP
    >>> res["measured"]["rms"] / res["truth"]["rms"]                     # doctest: +SKIP
    <Quantity 0.99...>
    """
    casatasks = import_casatasks()
    params = default_tclean_parameters(sim, imagename)
    params.update(tclean_overrides)
    _remove_products(params["imagename"], overwrite)
    image_path = Path(params["imagename"] + ".image")
    start = time.perf_counter()
    with _working_directory(image_path.parent):
        casatasks.tclean(**params)
    elapsed = time.perf_counter() - start
    if not image_path.exists():
        raise SimulationError(f"tclean wrote no {image_path}; see the CASA log")
    log.info("tclean %s in %.1f s", image_path, elapsed)
    result = measure_compact_source(sim, image_path)
    result.update(image=image_path, tclean_seconds=elapsed)
    return result
