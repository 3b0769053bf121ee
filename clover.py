"""CLOVER: ConvNet classification of spectra (noise / one / two components) and kinematics.

Re-creation of CLOVER (ConvNet Line-fitting Of Velocities in Emission-line Regions;
Keown et al. 2019, ApJ 884, 4, arXiv:1909.08727; github.com/jakeown/astroclover) on
TensorFlow/Keras, with compact self-trained models shipped in ``models/clover/``:

1. *Classification* of every pixel's spectrum into one-component (code 0), noise
   (code 1) or two-component (code 2) emission by an ensemble of ``ensemble_size``
   (default 6) independently trained 1-D ConvNets whose softmax vectors are summed
   (the original's combination rule).
2. *Regression* of the centroid velocity, velocity dispersion and peak intensity of
   each component (component 1 = lower centroid) for two-component pixels, and - new
   here - of the single component of one-component pixels.  Each regressor predicts a
   mean and a variance per parameter (heteroscedastic Gaussian likelihood, Nix &
   Weigend 1994; Kendall & Gal 2017), written as ``*_err`` uncertainty maps (1 sigma).
3. *Spectral domain* (new): the cube's channel width and the width of its bright lines
   (measured on smoothed spectra, :func:`measure_line_width`) decide the axis the
   networks see: NH3 is resampled to the trained 0.0724 km/s channels (the hyperfine
   pattern is fixed in km/s), Gaussian lines to channels on which they span the trained
   2-11 channels (:func:`spectral_domain`, flux-conserving :func:`resample_spectra`);
   blank band edges are trimmed.  Results are reported on the cube's own axis; a
   ``domain`` flag map marks what stays outside the trained domain.
4. *Checked against the data* (new, on by default; ``refine=False`` turns it off): every
   emission spectrum is fitted on its own channels with zero, one and two components
   (Gaussians, or NH3 (1,1) constant-excitation slabs with the 18 hyperfines), seeded by
   the networks (:func:`check_against_data`).  The number of components maximises
   ``-BIC/2 + w ln P(network)`` plus the beam-weighted evidence of the 3x3 neighbours
   (independent samples from BMAJ/BMIN and the pixel size, :func:`neighbour_evidence`);
   a component with a matched-filter S/N below 5 is dropped (:func:`select_components`).
   Values and errors are the fits' (errors scaled by sqrt(reduced chi^2)); model and
   residual cubes and a reduced-chi^2 map are written.  On the real VLA+GBT NH3 map of
   G23.481 the classes agree with pyspeckit's BIC selection for 97.5 % of the pixels and
   the kinematics to 0.0005 km/s (tests/test_clover_realdata.py).
5. *NH3 (1,1)+(2,2)* (new, ``nh3_22=``): joint fits of the components found give T_kin,
   T_ex, N(NH3) and tau per component (pyspeckit's cold_ammonia, :func:`fit_nh3_joint`).

Two line types: Gaussian lines (e.g. CO; 500-channel spectra) and NH3 (1,1) with its
18 hyperfine components (1000-channel spectra, ``nh3=True``).

Inputs of the networks (Keown et al. 2019, Sect. 2): for every pixel, the central
spectrum divided by its maximum and the mean of the 3x3 neighbourhood divided by its
maximum, stacked as two channels of one 1-D signal, velocity increasing with index.

Training sets (``simulate_gaussian``, ``simulate_nh3``; seeded numpy Generators)
-------------------------------------------------------------------------------
Gaussian lines, 500 channels of 0.07237 km/s (the NH3 template axis of the original,
channels 250:-250, i.e. 5.72 kHz at 23.6944955 GHz; R = astroclover gauss_testcubes.py):

==========================  ==================================  =======================
quantity                    range used here                     source
==========================  ==================================  =======================
class                       thirds: noise / one / two           R (balanced thirds)
centroid V1                 U(-10, 10) km/s (central 276 ch.)   R; seed README (~275 ch.)
dispersion sigma1, sigma2   U(0.15, 0.8) km/s (2.1-11 channels) R
separation V2 - V1          +-max(sigma1, sigma2) x U(1.5, 5)   R; issue #5
peak of the brighter comp.  1 (spectra are scaled to it)        R
peak of the other comp.     U(3 x noise, 1)                     R has U(2 x noise, 1);
                                                                raised as R's
                                                                ``remove_low_snr``
peak S/N (brighter comp.)   log-uniform in [4, 30]              R: noise U(0.05, 0.25)
                                                                = S/N 4-20; issue: ~4-20+
3x3 gradients (per comp.)   T, sigma: x(1 + g dx + g' dy),      R (scale 0.05); each
                            V: + g dx + g' dy km/s, g ~ N(0,    component its own
                            0.05)                               gradient (R: defect)
noise                       white Gaussian, same rms in 3x3     R
==========================  ==================================  =======================

NH3 (1,1), 1000 channels of 5.72 kHz around 23.6944955 GHz (R: nh3_testcubes_GAS.py,
the GAS survey set-up; pyspeckit ``cold_ammonia`` model, Friesen et al. 2017):

==========================  ==================================  =======================
quantity                    range used here                     source
==========================  ==================================  =======================
kinetic temperature         U(8, 25) K + 5 K, floor 2.74 K      R
T_rot                       Swift et al. 2005 eq. A6 from Tkin  pyspeckit cold_ammonia
T_ex                        = T_rot (LTE), ortho fraction 0     pyspeckit defaults, R
log10 N(NH3) / cm^-2        U(13, 14.5)                         R
velocity offset V1          U(-2.5, 2.5) km/s                   R
V2                          V1 + U(-2.5, 2.5) km/s, moved       R (remove_low_sep=True)
                            apart by max(width) when closer
width (sigma)               sqrt(0.1 exp(1.5 N(0,1)) + 0.08^2)  R
                            km/s, capped at 2 km/s here
3x3 gradients T, w, V, logN N(0, 0.2), N(0, 0.1), N(0, 0.1),    R
                            N(0, 0.01)
noise rms                   0.1 K                               R
==========================  ==================================  =======================

Use
---
As a module::

    import clover
    maps = clover.predict("cube.fits", nh3=False, nproc=2, outdir="out")
    clover.main(["predict", "cube.fits", "--outdir", "out"])

From the shell::

    python clover.py predict cube.fits [--nh3] [--nproc N] [--outdir DIR] [--overwrite]
                                       [--tile N] [--no-refine] [--rest-frequency F]
                                       [--force-rest] [--nh3-22 CUBE22]
    python clover.py predict spectrum.fits|spectrum.txt ...      # 1-D spectra: 1 x 1 maps
    python clover.py train [--quick] [--lines gauss,nh3] [--parts class,reg] [--overwrite]

``--tile N`` gives every N x N-pixel tile its own 500/1000-channel window centred on
the tile's emission - the sub-cube splitting the original's README asks users to do
by hand for cubes with large velocity gradients.

Outputs (fixed names): ``<name>_<map>.fits`` for every :data:`OUTPUT_MAPS` entry (class,
ncomp, prob, per-component and dominant-component velocity / width / peak with ``_err``,
rchi2, rms, domain; with ``--nh3-22`` also tkin, tex, logn, tau), ``<name>_table.ecsv``
(one row per spectrum), ``<name>_provenance.json`` (version, command line, configuration,
inputs with SHA-256 digests), ``<name>_model.fits`` and ``<name>_residual.fits`` on the
cube's own axis, and ``<name>_clover.fits`` (the cube as the networks saw it) when its axis
was changed.

Spectral axes are read with astropy's WCS (``WCS(header).spectral``, SpectralCoord): any
FITS spectral type (FREQ, VRAD, VOPT, VELO, WAVE, AWAV, ...) in any unit, CDELT or CD/PC
matrices, AIPS-convention ``VELO-LSR``/``FREQ-LSR`` as wcslib translates them; velocities
are radio-convention km/s for the rest frequency of ``--rest-frequency``, else RESTFRQ
(RESTFREQ, RESTWAV).

Inside a CASA 6 session: ``execfile("clover.py")`` defines the functions and runs nothing.
TensorFlow, astropy, scipy and pyspeckit are imported only by the functions that need
them.

Configuration
-------------
An optional INI file (``configs/clover.cfg``; ``--write-config FILE`` writes a
template) with the sections ``[Predict]`` and ``[Train]``.
"""
import argparse
import configparser
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "main",
    "CONFIG_SCHEMA",
    "ToolError",
    "ConfigError",
    "InputError",
    "OutputExistsError",
    "ConfigKey",
    "Config",
    "load_config",
    "setup_logging",
    "CloverWarning",
    "CentroidRangeWarning",
    "LineWidthWarning",
    "LineTypeWarning",
    "LINE_TYPES",
    "OUTPUT_MAPS",
    "simulate_gaussian",
    "simulate_nh3",
    "nh3_spectra",
    "nh3_spectra_fast",
    "build_network",
    "gaussian_nll",
    "recentre_kernel",
    "evaluate",
    "evaluation_report",
    "simulate_cube",
    "interior_pixels",
    "cube_hdu",
    "make_features",
    "recentre",
    "fit_length",
    "fill_blank_channels",
    "CloverModels",
    "predict_spectra",
    "refine_gaussians",
    "nh3_profile",
    "nh3_slab_spectra",
    "fit_nh3_slabs",
    "SpectralDomain",
    "DOMAIN_BITS",
    "DATA_CHECK",
    "spectral_domain",
    "measure_line_width",
    "resample_spectra",
    "trim_blank_edges",
    "check_against_data",
    "select_components",
    "neighbour_evidence",
    "beam_pixels",
    "assemble_components",
    "model_spectra",
    "network_components",
    "dominant_component",
    "network_pass",
    "read_text_spectrum",
    "check_nh3_rest",
    "write_native_cube",
    "write_network_cube",
    "nh3_joint_spectra",
    "fit_nh3_joint",
    "joint_starts",
    "emission_channel",
    "read_cube",
    "predict",
    "train",
    "run_demo",
    "mad_sigma",
    "import_casa",
    "file_digest",
    "jsonable",
    "StageLedger",
    "write_provenance",
    "cli_main",
]
__version__ = "1.1.0"

log = logging.getLogger("clover")

# ===========================================================================
# Constants
# ===========================================================================
# the source file: __file__, or the file CASA's execfile compiled (it may not set __file__)
HERE = Path(globals().get("__file__") or sys._getframe(0).f_code.co_filename).resolve().parent
MODEL_DIR = HERE / "models" / "clover"
GAUSSIAN_NCHAN = 500   # spectral length the Gaussian-line models take (seed: Usage)
NH3_NCHAN = 1000       # spectral length the NH3 (1,1) models take (seed: Usage)
CLASS_CODES = {"one": 0, "noise": 1, "two": 2}  # output codes of the original
C_KMS = 299792.458
NH3_11_REST_HZ = 23.6944955e9   # NH3 (1,1) rest frequency (pyspeckit freq_dict['oneone'])
NH3_22_REST_HZ = 23.722633335e9  # NH3 (2,2) rest frequency (pyspeckit freq_dict['twotwo'])
NH3_CHANNEL_HZ = 5.72e3         # GAS / original training channel spacing
TEMPLATE_DV_KMS = NH3_CHANNEL_HZ / NH3_11_REST_HZ * C_KMS   # 0.07237 km/s per channel

GAUSS_RANGES = {
    "v_kms": (-10.0, 10.0), "sigma_kms": (0.15, 0.8), "sep_factor": (1.5, 5.0),
    "peak2_min_snr": 3.0, "snr": (4.0, 30.0), "gradient": 0.05,
}
NH3_RANGES = {
    "tkin_k": (8.0, 25.0), "tkin_offset_k": 5.0, "tkin_floor_k": 2.74,
    "logn": (13.0, 14.5), "v_kms": (-2.5, 2.5), "dv2_kms": (-2.5, 2.5),
    "width_cap_kms": 2.0, "gradient": (0.2, 0.1, 0.1, 0.01), "noise_k": 0.1,
}
# ---------------------------------------------------------------------------
# Settings of check_against_data / select_components (the [Predict] keys of the same names
# override them).  min_snr: the matched-filter S/N a fitted component needs, sqrt(sum of its
# model spectrum squared) / rms (a 5-sigma detection of it as a whole); min_sigma_channels: floor of
# the fitted dispersions; network_weight: how much the ensemble's ln P(class) counts next to
# -BIC/2 (halved when the networks saw a resampled axis, outside their training domain);
# prior_floor: ln P is floored there so the data can always overrule the networks;
# temperature: softmax temperature of the prob map; emission_prob: spectra with at least
# this ensemble probability of emission are fitted.  network_weight 1 and temperature 2
# from benchmarks/calibrate_clover_data_check.py (seed 555): S/N >= 4 accuracy Gaussian
# noise / one / two 1.000 / 1.000 / 0.985, NH3 1.000 / 1.000 / 0.963; expected
# calibration error of the prob map 0.003 (Gaussian), 0.020 (NH3).
DATA_CHECK = {"min_snr": 5.0, "min_sigma_channels": 1.0, "network_weight": 1.0, "prior_floor": -7.0,
              "temperature": 2.0, "emission_prob": 0.05}

# >>> shared conventions >>>
# This block is identical in all five modules of the toolkit (each module must stay
# self-contained, so it cannot be imported from a common file); tests/test_conventions.py
# checks that the copies agree.  Change it in all five files at once.
# ---------------------------------------------------------------------------
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")
_NONE_WORDS = ("", "none", "null")
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class ToolError(Exception):
    """Base class of this tool's errors (exit code 1 from the command line)."""

    exit_code = EXIT_FAILURE


class ConfigError(ToolError):
    """A configuration file, option or value is missing or invalid (exit code 2)."""

    exit_code = EXIT_USAGE


class InputError(ToolError):
    """An input file or argument cannot be used as given (exit code 2)."""

    exit_code = EXIT_USAGE


class OutputExistsError(InputError):
    """An output exists already and ``overwrite`` was not requested (exit code 2)."""


@dataclass(frozen=True)
class ConfigKey:
    """One entry of a configuration schema.

    Parameters
    ----------
    section, key : str
        INI section and key (keys are matched case-insensitively).
    type : {'str', 'int', 'float', 'bool', 'path', 'list', 'floatlist'}
        How the raw text is converted; lists are comma separated.
    default : object
        Value used when the key is absent (``None`` = not set).
    allowed : tuple or None
        Allowed values for choices, or ``(min, max)`` bounds (either may be None)
        for numbers when ``bounds`` is true.
    help : str
        One-line description, written into config templates and ``--help``.
    bounds : bool
        Interpret ``allowed`` as a numeric ``(min, max)`` interval.
    """

    section: str
    key: str
    type: str = "str"
    default: object = None
    allowed: tuple = None
    help: str = ""
    bounds: bool = False

    def describe_allowed(self):
        """Human-readable statement of the values this key accepts."""
        kind = {"bool": "one of true/false/yes/no/on/off/1/0", "int": "an integer",
                "float": "a number", "list": "a comma-separated list",
                "floatlist": "a comma-separated list of numbers", "path": "a path",
                "str": "a string"}[self.type]
        if self.bounds:
            low, high = self.allowed
            return "%s in [%s, %s]" % (kind, "-inf" if low is None else low,
                                       "inf" if high is None else high)
        if self.allowed:
            return "one of " + ", ".join(repr(a) for a in self.allowed)
        return kind

    def parse(self, raw):
        """Convert raw text to a value of this key's type; ValueError if invalid."""
        if isinstance(raw, str) and raw.strip().lower() in _NONE_WORDS:
            if self.type in ("list", "floatlist"):
                return []
            if self.type != "str":
                return None
        value = _CONVERTERS[self.type](raw)
        self.check(value)
        return value

    def check(self, value):
        """Raise ValueError when ``value`` lies outside ``allowed``."""
        if value is None or not self.allowed:
            return
        if self.bounds:
            low, high = self.allowed
            for item in (value if isinstance(value, list) else [value]):
                if (low is not None and item < low) or (high is not None and item > high):
                    raise ValueError("out of range")
        elif value not in self.allowed:
            raise ValueError("not allowed")


def parse_bool(raw):
    """Parse a boolean the way people write them in INI files and on the command line."""
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError("not a boolean")


def _parse_list(raw, item=str):
    if isinstance(raw, (list, tuple)):
        return [item(v) for v in raw]
    return [item(v.strip()) for v in str(raw).split(",") if v.strip()]


_CONVERTERS = {
    "str": lambda raw: str(raw).strip(),
    "path": lambda raw: Path(os.path.expandvars(str(raw).strip())).expanduser(),
    "int": lambda raw: int(str(raw).strip()),
    "float": lambda raw: float(str(raw).strip()),
    "bool": parse_bool,
    "list": _parse_list,
    "floatlist": lambda raw: _parse_list(raw, float),
}


class Config:
    """Validated configuration: ``config[section][key]`` with the schema's types.

    Build it with :func:`load_config`; ``sources`` lists the files that were read.
    """

    def __init__(self, schema, values, sources=()):
        self.schema = tuple(schema)
        self._values = values
        self.sources = tuple(str(s) for s in sources)

    def __getitem__(self, section):
        return self._values[section]

    def get(self, section, key):
        """Value of ``key`` in ``section`` (KeyError when not in the schema)."""
        return self._values[section][key]

    def as_dict(self):
        """Plain ``{section: {key: value}}`` copy (paths as strings), for provenance."""
        return {sec: {k: (str(v) if isinstance(v, Path) else v) for k, v in keys.items()}
                for sec, keys in self._values.items()}

    def __repr__(self):
        return "Config(sources=%r, %r)" % (list(self.sources), self.as_dict())


def _schema_lookup(schema):
    return {(k.section.lower(), k.key.lower()): k for k in schema}


def _read_config_file(path, lookup, raw, errors):
    """Read one INI (or TOML) file into ``raw``; unknown sections/keys go to ``errors``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file %s does not exist (give an existing file with "
                          "--config, or write a template with --write-config FILE)" % path)
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        try:
            with path.open("rb") as stream:
                sections = tomllib.load(stream)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("config file %s is not valid TOML: %s" % (path, exc)) from None
    else:
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
        parser.optionxform = str
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise ConfigError("config file %s is not a valid INI file: %s" % (path, exc)) from None
        sections = {name: dict(parser[name]) for name in parser.sections()}
    known_sections = sorted({s for s, _ in lookup})
    for section, items in sections.items():
        if section.lower() not in known_sections:
            errors.append("%s: unknown section [%s]; known sections are %s"
                          % (path, section, ", ".join("[%s]" % s for s in _section_names(lookup))))
            continue
        for key, value in (items.items() if isinstance(items, dict) else ()):
            entry = lookup.get((section.lower(), key.lower()))
            if entry is None:
                known = sorted(k.key for (s, _), k in lookup.items() if s == section.lower())
                errors.append("%s: [%s] unknown key %r; known keys are %s"
                              % (path, section, key, ", ".join(known)))
            else:
                raw[(entry.section, entry.key)] = (value, "%s: [%s] %s" % (path, section, key))


def _section_names(lookup):
    seen = []
    for entry in lookup.values():
        if entry.section not in seen:
            seen.append(entry.section)
    return seen


def load_config(schema, path=None, overrides=None, validators=()):
    """Read, type-check and validate a configuration; report every problem at once.

    Parameters
    ----------
    schema : sequence of ConfigKey
        The tool's declared keys (the only ones accepted).
    path : str or Path, optional
        INI file (``.toml`` files are read as TOML).  Without it, the defaults are used.
    overrides : dict, optional
        ``{(section, key): raw value}`` from the command line; they win over the file.
    validators : sequence of callables
        Cross-key checks run after the per-key pass: ``f(config) -> list of messages``.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        Naming the file, section, key, bad value and what is allowed, for every problem.
    """
    lookup = _schema_lookup(schema)
    raw, errors = {}, []
    if path is not None:
        _read_config_file(path, lookup, raw, errors)
    for (section, key), value in (overrides or {}).items():
        entry = lookup.get((section.lower(), key.lower()))
        if entry is None:
            errors.append("command line: unknown option [%s] %s" % (section, key))
        else:
            raw[(entry.section, entry.key)] = (value, "command line: [%s] %s" % (section, key))
    values = {}
    for entry in schema:
        value = entry.default
        if (entry.section, entry.key) in raw:
            text, where = raw[(entry.section, entry.key)]
            try:
                value = entry.parse(text)
            except (ValueError, TypeError):
                errors.append("%s = %r is invalid: expected %s"
                              % (where, text, entry.describe_allowed()))
        values.setdefault(entry.section, {})[entry.key] = value
    config = Config(schema, values, [path] if path is not None else [])
    if not errors:
        for validator in validators:
            errors.extend(validator(config))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return config


def parse_overrides(items):
    """Turn ``--set SECTION.KEY=VALUE`` strings into a ``load_config`` overrides dict."""
    overrides = {}
    for item in items or ():
        target, sep, value = item.partition("=")
        section, dot, key = target.partition(".")
        if not (sep and dot and section.strip() and key.strip()):
            raise ConfigError("--set %r is malformed: expected SECTION.KEY=VALUE" % item)
        overrides[(section.strip(), key.strip())] = value
    return overrides


def format_config_template(schema, title):
    """A commented INI template listing every key with its default and allowed values."""
    lines = ["# %s" % title, "# Every key is optional; the value shown is the default.", ""]
    section = None
    for entry in schema:
        if entry.section != section:
            section = entry.section
            lines += (["", "[%s]" % section] if lines[-1] != "" else ["[%s]" % section])
        lines.append("# %s (%s)" % (entry.help, entry.describe_allowed()))
        default = entry.default
        if isinstance(default, (list, tuple)):
            default = ", ".join(str(v) for v in default)
        text = "" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(("%s = %s" % (entry.key, text)).rstrip() if default is not None
                     else "# %s =" % entry.key)
    return "\n".join(lines).rstrip() + "\n"


@contextmanager
def atomic_path(path, overwrite=False, suffix=".part"):
    """Yield a temporary sibling path for ``path``; rename it into place on success.

    For writers that take a file name (``fits.writeto``, ``Table.write``,
    ``savefig``).  Raises OutputExistsError when ``path`` exists and ``overwrite`` is
    false; on any error the temporary file is removed, so no half-written output is
    ever left.  ``suffix`` ends the temporary name (e.g. ``.fits`` for writers that
    infer the format from it).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError("%s exists already; use --overwrite to replace it" % path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_output(path, overwrite=False, mode="w"):
    """Open a file for writing through :func:`atomic_path` (same guarantees)."""
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, mode) as stream:
            yield stream


def setup_logging(verbose=0, quiet=False, logfile=None):
    """Configure this tool's logger (only ``main`` calls this; library code never does).

    Parameters
    ----------
    verbose : int
        0 = INFO, 1 or more = DEBUG.
    quiet : bool
        Only warnings and errors.
    logfile : str or Path, optional
        Also write the log (at DEBUG level) to this file.
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    log.setLevel(logging.DEBUG)
    for handler in list(log.handlers):
        if getattr(handler, "_toolkit_handler", False):
            log.removeHandler(handler)
            handler.close()
    handlers = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(level)
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile))
        handlers[-1].setLevel(logging.DEBUG)
    for handler in handlers:
        handler._toolkit_handler = True
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
        handler.addFilter(_remember_message)
        log.addHandler(handler)
    log.propagate = False
    return log


_RECENT_MESSAGES = []      # the last messages the tool logged (so a warning is not shown twice)


def _remember_message(record):
    _RECENT_MESSAGES.append(record.getMessage())
    del _RECENT_MESSAGES[:-50]
    return True


def _warning_as_log(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` on the command line: one log line, no source line; a warning
    whose text the tool has just logged is not repeated."""
    text = str(message)
    if text not in _RECENT_MESSAGES:
        log.warning("%s (%s)", text, category.__name__)


def add_common_arguments(parser, config_help="configuration file (INI, or .toml)"):
    """Add the options every subcommand shares: --config, --set, -v, -q, --overwrite."""
    group = parser.add_argument_group("common options")
    group.add_argument("-c", "--config", metavar="FILE", help=config_help)
    group.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                       help="override one configuration value (repeatable)")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="more output (debug messages)")
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    group.add_argument("--overwrite", action="store_true",
                       help="replace existing outputs instead of skipping or refusing")
    group.add_argument("--logfile", metavar="FILE", help="also write a debug log to FILE")
    return group


def build_cli(description, subcommands, version, schema):
    """Argument parser with one sub-parser per entry of ``subcommands``.

    ``subcommands`` maps a name to ``(help, function, add_arguments)``; the function
    receives the parsed namespace and the loaded Config and returns an exit code.
    """
    parser = argparse.ArgumentParser(prog=log.name, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + version)
    parser.add_argument("--write-config", metavar="FILE",
                        help="write a commented configuration template to FILE ('-' = stdout)")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (text, func, add_arguments) in subcommands.items():
        child = sub.add_parser(name, help=text, description=text)
        add_arguments(child)
        add_common_arguments(child)
        child.set_defaults(func=func)
    parser.set_defaults(func=None, _schema=schema)
    return parser


def run_cli(parser, argv, validators=()):
    """Parse ``argv``, load the config, call the subcommand; return the exit code.

    Exit codes: 0 success, 1 failure, 2 usage or configuration error.  Never calls
    ``sys.exit``, so it is safe inside a CASA session or a notebook.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    try:
        if args.write_config:
            return _write_config_template(args)
        if args.func is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        setup_logging(args.verbose, args.quiet, args.logfile)
        log.debug("%s %s: %s", log.name, __version__, " ".join(map(str, argv or sys.argv[1:])))
        config = load_config(args._schema, args.config, parse_overrides(args.set), validators)
        log.debug("configuration: %r", config)
        with warnings.catch_warnings():
            warnings.showwarning = _warning_as_log
            return int(args.func(args, config) or EXIT_OK)
    except ToolError as exc:
        if log.handlers:
            log.error("%s", exc)
        else:
            print("%s: error: %s" % (log.name, exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _write_config_template(args):
    text = format_config_template(args._schema, "%s %s configuration" % (log.name, __version__))
    if args.write_config == "-":
        sys.stdout.write(text)
    else:
        with atomic_output(args.write_config) as out:
            out.write(text)
    return EXIT_OK


def not_yet_implemented(issue=None):
    """Subcommand placeholder that fails clearly until its issue lands."""
    where = "see issue #%d" % issue if issue else "planned"

    def placeholder(args, config):
        raise ToolError("'%s %s' is not implemented yet (%s)" % (log.name, args.command, where))
    return placeholder


def invoked_as_script(namespace):
    """True when run as ``python tool.py``, False on import or CASA ``execfile``.

    CASA's ``execfile`` may run the file with ``__name__ == '__main__'`` inside the
    session's namespace, which already holds ``casalog``; the CLI must not start then.
    """
    return namespace.get("__name__") == "__main__" and "casalog" not in namespace

def tool_file(namespace):
    """The tool's source file: ``__file__``, else (CASA ``execfile`` without it) the file the
    exec'd code was compiled from; None when neither is an existing file."""
    path = namespace.get("__file__")
    if not path:
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals is not namespace:
            frame = frame.f_back
        path = frame.f_code.co_filename if frame is not None else None
    return Path(path).resolve() if path and os.path.isfile(path) else None


def adopt_into_session(namespace, module_name):
    """After a CASA ``execfile``: give the tool a module of its own in the session.

    Exec'd code keeps the session's namespace as its globals, so a second tool exec'd into
    it would replace the first one's ``log``, ``get_config`` or ``main`` inside the first
    one's functions.  The file is loaded once more as the module ``module_name`` and every
    name the exec bound is pointed at the module's object (whose globals are the module's),
    and the module itself is bound as ``module_name``: ``faust_imaging.main([...])`` works
    whatever is exec'd after it (a bare name is the last exec'd tool's).  Nothing happens on
    a real import, a script run, or when the file cannot be found.

    Returns
    -------
    module or None
    """
    import importlib.util
    if namespace.get("__name__") == module_name or invoked_as_script(namespace):
        return None
    path = tool_file(namespace)
    if path is None:
        return None
    module = sys.modules.get(module_name)
    if module is None or Path(getattr(module, "__file__", "") or "").resolve() != path:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    for key, value in vars(module).items():
        if key in namespace and not (key.startswith("__") and key.endswith("__")):
            namespace[key] = value
    namespace[module_name] = module
    return module

# ---------------------------------------------------------------------------
# Noise, CASA, stage ledger, provenance, main(): what every tool needs the same way
# ---------------------------------------------------------------------------
def mad_sigma(values, axis=None):
    """Gaussian-equivalent sigma, ``1.4826 x`` the median absolute deviation (astropy's
    ``mad_std``), NaNs ignored; NaN where a slice has no finite value.

    >>> round(float(mad_sigma([1.0, 2.0, 3.0, 4.0, float("nan")])), 4)
    1.4826
    """
    import numpy as np
    from astropy.stats import mad_std
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN slices give NaN
        result = mad_std(np.asarray(values, dtype=float), axis=axis, ignore_nan=True)
    return float(result) if np.ndim(result) == 0 else np.asarray(result)


def import_casa():
    """Import and return ``(casatools, casatasks)``, offline and safely.

    Inside a CASA session the session's modules are returned.  Elsewhere the repository's
    ``configs/casasiteconfig.py`` (beside the tool) is used through ``CASASITECONFIG``
    unless that is set already (so no data update is attempted); ``sys.argv`` is hidden
    during the import, because casaconfig parses it and would *execute* a file given to
    this tool's ``--config`` (an abbreviation of its ``--configfile``); and when
    TensorFlow is loaded already the import uses ``RTLD_DEEPBIND`` (the two bundled
    protobuf libraries abort the process otherwise).

    Raises
    ------
    ImportError
        When casatools/casatasks are not installed, saying how to install them.
    """
    here = tool_file(globals())
    siteconfig = here.parent / "configs" / "casasiteconfig.py" if here is not None else None
    if siteconfig is not None and siteconfig.is_file():
        os.environ.setdefault("CASASITECONFIG", str(siteconfig))
    saved_argv, saved_flags = sys.argv, sys.getdlopenflags()
    sys.argv = sys.argv[:1]
    try:
        if "tensorflow" in sys.modules or "keras" in sys.modules:
            sys.setdlopenflags(os.RTLD_NOW | os.RTLD_DEEPBIND)
        import casatasks
        import casatools
    except ImportError as exc:
        raise ImportError("%s needs casatools and casatasks (%s); install them with `make demo` "
                          "or `make test` (pinned in requirements.lock) or run inside a CASA 6 "
                          "session" % (log.name, exc)) from None
    finally:
        sys.argv = saved_argv
        sys.setdlopenflags(saved_flags)
    return casatools, casatasks


_DIGESTS = {}


def file_digest(path):
    """SHA-256 (hex) of a file's content; of a directory (a measurement set, a CASA image):
    of the names, sizes and modification times of the files in it.  File digests are cached
    per (path, size, modification time) within a process."""
    import hashlib
    path = Path(path)
    if path.is_dir():          # not cached: a change deep inside leaves the top's mtime alone
        digest = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            info = item.stat()
            digest.update(("%s %d %d\n" % (item.relative_to(path), info.st_size,
                                           info.st_mtime_ns)).encode())
        return "dir:" + digest.hexdigest()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        with path.open("rb") as stream:
            _DIGESTS[key] = hashlib.file_digest(stream, "sha256").hexdigest()
    return _DIGESTS[key]


def jsonable(value):
    """``value`` with numpy scalars, paths, tuples and sets made plain JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


class StageLedger:
    """How each stage's products were made, so that a re-run reuses only what the same
    inputs and settings made.

    ``path`` is one JSON file for every stage (``outdir/racs_stages.json``) or, when it
    contains ``{stage}``, one file per stage (``<imagebase>.{stage}.done.json``).  A stage
    is current only when its record has this tool's version, the same settings, the same
    inputs (``file_digest``) and all its outputs exist; otherwise the log says which
    setting or input changed.  Outputs without a record are never reused; ``overwrite``
    reruns every stage.  Extra ``meta`` given to ``record`` (an rms, a count) is kept at the
    top level of the record and returned by ``meta``.
    """

    def __init__(self, path, overwrite=False):
        self.template = str(path)
        self.per_stage = "{stage}" in self.template
        self.path = None if self.per_stage else Path(self.template)
        self.overwrite = overwrite
        self.status = {}
        self.entries = {} if self.per_stage else self._load(self.path)

    def file(self, stage):
        """The JSON file holding ``stage``'s record."""
        return Path(self.template.replace("{stage}", stage)) if self.per_stage else self.path

    @staticmethod
    def _load(path):
        import json
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            log.warning("stage record %s is unreadable; its stages run again", path)
            return {}

    def entry(self, stage):
        """The record of ``stage`` (a dict), or None."""
        if self.per_stage:
            return self._load(self.file(stage)) or None
        return self.entries.get(stage)

    @staticmethod
    def describe(settings, inputs=None):
        """``(settings, {name: digest})`` as they are stored (JSON types)."""
        import json
        digests = {name: (file_digest(p) if p is not None and Path(p).exists() else None)
                   for name, p in sorted((inputs or {}).items())}
        return json.loads(json.dumps(jsonable(settings), sort_keys=True, default=str)), digests

    @staticmethod
    def _changes(now, then):
        keys = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        return ", ".join("%s: %s -> %s" % (k, _short(then.get(k)), _short(now.get(k)))
                         for k in keys[:6])

    def why_not_current(self, stage, outputs, settings, inputs=None):
        """Why ``stage`` must run (a sentence), or None when its products can be reused."""
        settings, digests = self.describe(settings, inputs)
        entry = self.entry(stage)
        if self.overwrite:
            return "overwrite requested"
        if entry is None:
            return ("its outputs exist but there is no record of how they were made"
                    if any(Path(p).exists() for p in outputs) else "no record of an earlier run")
        if entry.get("version") != __version__:
            return "made by %s %s" % (log.name, entry.get("version"))
        if entry.get("settings") != settings:
            return "settings changed (%s)" % self._changes(settings, entry.get("settings") or {})
        if (entry.get("inputs") or {}) != digests:
            return "input(s) changed: %s" % ", ".join(
                sorted(k for k in set(digests) | set(entry.get("inputs") or {})
                       if digests.get(k) != (entry.get("inputs") or {}).get(k)))
        missing = [Path(p).name for p in outputs if not Path(p).exists()]
        return "output missing: %s" % ", ".join(missing) if missing else None

    def current(self, stage, outputs, settings, inputs=None):
        """True (logged) when ``stage`` can be reused as it is; else False (reason logged)."""
        reason = self.why_not_current(stage, outputs, settings, inputs)
        if reason is None:
            log.info("stage %s: reusing %s (same inputs and settings)", stage,
                     ", ".join(Path(p).name for p in outputs) or "its result")
            self.status[stage] = "reused"
            return True
        quiet = reason.startswith("no record") or self.overwrite
        log.log(logging.INFO if quiet else logging.WARNING, "stage %s: running (%s)", stage, reason)
        return False

    def record(self, stage, outputs, settings, inputs=None, **meta):
        """Record (atomically) that ``stage`` made ``outputs`` from ``settings`` and ``inputs``."""
        import json
        import time
        settings, digests = self.describe(settings, inputs)
        entry = {"stage": stage, "version": __version__, "settings": settings, "inputs": digests,
                 "outputs": [Path(p).name for p in outputs],
                 "made": time.strftime("%Y-%m-%dT%H:%M:%S"), **jsonable(meta)}
        self.status[stage] = "ran"
        if self.per_stage:
            content = entry
        else:
            self.entries[stage] = entry
            content = self.entries
        with atomic_output(self.file(stage), overwrite=True) as stream:
            json.dump(content, stream, indent=1, sort_keys=True, default=str)

    def meta(self, stage):
        """The stored record of ``stage`` ({} when there is none)."""
        return self.entry(stage) or {}

    def clear(self, stage):
        """Forget ``stage`` (before its products are remade)."""
        if self.per_stage:
            self.file(stage).unlink(missing_ok=True)
        elif self.entries.pop(stage, None) is not None:
            import json
            with atomic_output(self.path, overwrite=True) as stream:
                json.dump(self.entries, stream, indent=1, sort_keys=True, default=str)


def _short(value, width=60):
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def write_provenance(path, config=None, **extra):
    """Write how the products beside ``path`` were made (JSON, atomically): tool, version,
    command line, working directory, date, Python, the resolved configuration and ``extra``.

    Returns
    -------
    pathlib.Path
    """
    import json
    import platform
    import time
    info = {"tool": log.name, "version": __version__, "argv": list(sys.argv),
            "cwd": os.getcwd(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "config": config.as_dict() if config is not None else None, **jsonable(extra)}
    with atomic_output(path, overwrite=True) as out:
        json.dump(info, out, indent=2, default=str)
    return Path(path)


def cli_main(argv, subcommands, schema, validators=(), prepare_argv=None):
    """The body of every tool's ``main()``: build the command line from ``subcommands`` and
    run it; return the exit code (0 ok, 1 failure, 2 usage or configuration error).

    ``argv`` None reads ``sys.argv[1:]``; ``prepare_argv(argv)`` may rewrite it first;
    ``validators`` is a sequence of config validators or a function of the final ``argv``
    returning one.  The parsed namespace carries ``_argv`` (the list, or None for
    ``sys.argv``).
    """
    given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if prepare_argv is not None:
        argv = prepare_argv(argv)
    parser = build_cli(__doc__.strip().splitlines()[0], subcommands, __version__, schema)
    parser.set_defaults(_argv=None if given is None else list(given))
    return run_cli(parser, argv, validators=validators(argv) if callable(validators) else validators)

# ---------------------------------------------------------------------------
# TensorFlow / keras, imported lazily and quietly (clover, ir_blobs)
# ---------------------------------------------------------------------------
# What TensorFlow's C++ libraries print on file descriptor 2 while they load.  absl writes
# it before absl::InitializeLog() is called, so TF_CPP_MIN_LOG_LEVEL does not reach it
# (TensorFlow 2.21: the oneDNN notice of port.cc prints at every level 0-3, twice, each after
# absl's pre-initialisation line; measured).  TF_ENABLE_ONEDNN_OPTS=0 would silence the
# notice, but ir_blobs' predict then runs 1.7-2.8x slower (probabilities equal to 1.5e-7), so
# it is left alone.  The import's console output is caught and sorted instead.
_ABSL_LINE = r"(?P<severity>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "    # absl's prefix
_TF_LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<severity>[IWEF]) \S+:\d+\] "  # TF < 2.16
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_CONTINUATIONS = ("To enable the following instructions:",)   # cpu_feature_guard's second line
_SEVERITIES = "IWEF"                                           # TF_CPP_MIN_LOG_LEVEL 0 1 2 3


def _own_log_line(text):
    """True when ``text`` is a line of this tool's log (``HH:MM:SS LEVEL tool: ...``)."""
    import re
    return re.match(r"\d\d:\d\d:\d\d [A-Z]+ +%s: " % re.escape(log.name), text) is not None


def _triage_startup_lines(lines, min_level=3):
    """Sort what TensorFlow's import printed on the console into ``[(level, text)]``.

    A C++ log line (absl's ``I0000 00:00:00.000000 123 file.cc:153] `` prefix, or the
    ``date: I file.cc:153] `` one of older TensorFlow) whose severity is below ``min_level``
    (TF_CPP_MIN_LOG_LEVEL: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL), its known continuation
    lines and absl's pre-initialisation notice are start-up noise: level DEBUG.  A line of
    this tool's own log gets level None (to be printed as it is).  Anything else (a FATAL
    line, an unexpected message) is a WARNING.

    Examples
    --------
    >>> _triage_startup_lines(["I0000 00:00:1796.02 14997 port.cc:153] oneDNN custom operations are on.",
    ...                        "boom"], min_level=3)
    [(10, 'I0000 00:00:1796.02 14997 port.cc:153] oneDNN custom operations are on.'), (30, 'boom')]
    """
    import re
    out, previous_hidden = [], False
    for text in (line.rstrip() for line in lines):
        if not text:
            continue
        match = re.match(_ABSL_LINE, text) or re.match(_TF_LINE, text)
        if match:
            hidden = _SEVERITIES.index(match["severity"]) < min_level
        elif text.startswith(_ABSL_PREAMBLE):
            hidden = min_level > 0
        else:
            hidden = previous_hidden and text.startswith(_CONTINUATIONS)
        if _own_log_line(text):
            out.append((None, text))
        else:
            out.append((logging.DEBUG if hidden else logging.WARNING, text))
        previous_hidden = hidden
    return out


def _tf_min_log_level():
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0 when unset or not a number)."""
    try:
        return min(max(int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")), 0), 3)
    except ValueError:
        return 0


def _flush_stderr():
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):     # closed, or an object without flush
        pass


@contextmanager
def _captured_fd2(lines):
    """Collect what is written to file descriptor 2 (C++ libraries and Python) into ``lines``.

    File descriptor 2 itself is redirected (to a temporary file), so this works where
    ``sys.stderr`` is some other object (CASA's logger, pytest's capture) too; a no-op when
    the process has no descriptor 2.  A process that dies inside (an abort in a C++
    library) loses what was collected.
    """
    _flush_stderr()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


def _report_startup_lines(lines, min_level):
    """Pass TensorFlow's import-time console lines on: noise to the log at DEBUG, the rest as
    WARNINGs (``tensorflow: ...``), this tool's own log lines to stderr unchanged."""
    for level, text in _triage_startup_lines(lines, min_level):
        if level is None:
            print(text, file=sys.stderr)
        else:
            log.log(level, "tensorflow: %s", text)


def _import_keras(threads=None):
    """Import keras (TensorFlow backend) lazily and quietly; set the CPU thread pools once.

    Before the first import TF_CPP_MIN_LOG_LEVEL defaults to 3 (TensorFlow's C++ INFO,
    WARNING and ERROR lines off: at 2, TF 2.21 with keras 3.15 prints an ERROR line about a
    NodeDef attribute, ``use_unbounded_threadpool``, at every ``fit``); TensorFlow's own
    failures reach Python as exceptions.  What the import prints on the console is sorted by
    :func:`_triage_startup_lines` and passed on (start-up notices at DEBUG, anything else as
    a WARNING); the Python loggers of TensorFlow and absl are set to ERROR.
    TF_ENABLE_ONEDNN_OPTS is left alone (it changes the numerics).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "tensorflow" not in sys.modules:
        import importlib
        lines = []
        try:
            with _captured_fd2(lines):
                importlib.import_module("tensorflow")
                importlib.import_module("keras")
        finally:
            _report_startup_lines(lines, _tf_min_log_level())
    import tensorflow as tf
    import keras
    tf.get_logger().setLevel("ERROR")
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # absl comes with TensorFlow; nothing to quieten without it
        pass
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(threads))
        except RuntimeError:  # already initialised in this process: keep its pools
            log.debug("TensorFlow thread pools already set; nproc=%s ignored", threads)
    return keras
# <<< shared conventions <<<

# ===========================================================================
# Warnings about the user's data (filter them with warnings.simplefilter)
# ===========================================================================
class CloverWarning(UserWarning):
    """Base class of clover's warnings about the input data."""


class CentroidRangeWarning(CloverWarning):
    """Emission lies outside the centroid range the networks were trained on."""


class LineWidthWarning(CloverWarning):
    """The cube's lines are much narrower or wider (in channels) than the training set's."""


class LineTypeWarning(CloverWarning):
    """A cube run in Gaussian mode is of a line with hyperfine structure (NH3)."""


# ===========================================================================
# Configuration schema (the only keys accepted; see --write-config)
# ===========================================================================
CONFIG_SCHEMA = (
    ConfigKey("Predict", "nh3", "bool", False, help="the cube is NH3 (1,1) rather than a Gaussian line"),
    ConfigKey("Predict", "nproc", "int", 1, (1, None), "CPU threads for TensorFlow (all ensemble members run in one graph)", bounds=True),
    ConfigKey("Predict", "batch_size", "int", 2048, (1, None), "spectra per inference batch", bounds=True),
    ConfigKey("Predict", "model_dir", "path", None, help="directory of trained models (default: shipped models/clover)"),
    ConfigKey("Predict", "outdir", "path", None, help="output directory (default: next to the cube)"),
    ConfigKey("Predict", "seed", "int", 0, help="seed of the noise used to pad short spectral axes"),
    ConfigKey("Predict", "rest_frequency", "float", None, (0.0, None), "rest frequency in Hz, overriding the header's RESTFRQ (NH3 mode defaults to 23.6944955 GHz when there is none)", bounds=True),
    ConfigKey("Predict", "block_pixels", "int", 20000, (100, None), "pixels per processing block (memory and progress-bar granularity)", bounds=True),
    ConfigKey("Predict", "progress", "bool", True, help="show a tqdm progress bar for cubes of more than one block"),
    ConfigKey("Predict", "tile", "int", 0, (0, None), "0: one spectral window for the cube (central channels); N: a window per N x N-pixel tile centred on its emission", bounds=True),
    ConfigKey("Predict", "refine", "bool", True, help="check the networks' answer against the data: 0/1/2-component fits of every emission spectrum on its own channels, seeded by the networks, choose the number of components by BIC with the networks' probabilities as a prior; values, errors, model and residual cubes from the fits"),
    ConfigKey("Predict", "force_rest", "bool", False, help="NH3: accept a cube whose rest frequency is not NH3 (1,1)"),
    ConfigKey("Predict", "nh3_22", "path", None, help="NH3 (2,2) cube of the same field and grid for joint (1,1)+(2,2) fits (Tkin, Tex, N, tau)"),
    ConfigKey("Predict", "min_snr", "float", DATA_CHECK["min_snr"], (0.0, None), "matched-filter S/N a fitted component needs (sqrt(sum of its model squared) / rms), else it is dropped and the class lowered", bounds=True),
    ConfigKey("Predict", "min_sigma_channels", "float", DATA_CHECK["min_sigma_channels"], (0.05, None), "smallest dispersion a fit may reach, in channels of the cube", bounds=True),
    ConfigKey("Predict", "network_weight", "float", DATA_CHECK["network_weight"], (0.0, None), "weight of the networks' ln P(class) next to -BIC/2 (halved when the axis was resampled)", bounds=True),
    ConfigKey("Train", "seed", "int", 20191119, help="seed of the training-set generator and of the weights"),
    ConfigKey("Train", "ensemble_size", "int", 6, (1, None), "members of the classifier ensemble", bounds=True),
    ConfigKey("Train", "lines", "list", ["gauss", "nh3"], help="line types to train (gauss, nh3)"),
    ConfigKey("Train", "model_dir", "path", None, help="where to write the models (default: models/clover)"),
    ConfigKey("Train", "n_class", "int", 54000, (300, None), "training spectra per Gaussian classifier member (thirds per class)", bounds=True),
    ConfigKey("Train", "n_reg", "int", 54000, (300, None), "training spectra per Gaussian regressor", bounds=True),
    ConfigKey("Train", "nh3_fraction", "float", 0.75, (0.01, 1.0), "NH3 set sizes as a fraction of the Gaussian ones", bounds=True),
    ConfigKey("Train", "n_val", "int", 6000, (300, None), "validation spectra per model (early stopping)", bounds=True),
    ConfigKey("Train", "n_test", "int", 9000, (300, None), "test spectra for the accuracy table written to the metadata", bounds=True),
    ConfigKey("Train", "epochs", "int", 24, (1, None), "maximum epochs per model", bounds=True),
    ConfigKey("Train", "patience", "int", 5, (1, None), "early-stopping patience on the validation loss (epochs); the learning rate drops x0.3 after patience - 2", bounds=True),
    ConfigKey("Train", "batch_size", "int", 128, (8, None), "training batch size", bounds=True),
    ConfigKey("Train", "learning_rate", "float", 1.5e-3, (1e-6, 1.0), "Adam learning rate", bounds=True),
    ConfigKey("Train", "threads", "int", 2, (1, None), "CPU threads for TensorFlow while training", bounds=True),
)


def _validate_config(config):
    """Cross-key checks (second pass of load_config)."""
    bad = [v for v in config["Train"]["lines"] if v not in LINE_TYPES]
    if bad:
        return ["[Train] lines = %r: unknown line type(s) %s; use a subset of %s"
                % (config["Train"]["lines"], bad, ", ".join(LINE_TYPES))]
    return []


# ===========================================================================
# Science: simulated spectra (training sets, tests, demo)
# ===========================================================================
def _centre_channel(nchan):
    """Channel index of zero velocity on a training axis (0.5-channel convention)."""
    return (nchan - 1) / 2.0


def gaussian_profiles(vel, amp, centre, sigma):
    r"""Sum of Gaussian components on a velocity axis, vectorised over spectra.

    Parameters
    ----------
    vel : ndarray, shape (nchan,)
        Velocity axis (km/s).
    amp, centre, sigma : ndarray, shape (m, k)
        Peak, centroid (km/s) and dispersion (km/s) of ``k`` components of ``m`` spectra.

    Returns
    -------
    ndarray, shape (m, nchan), float32

    Notes
    -----
    :math:`T(v) = \sum_k A_k \exp[-(v - v_k)^2 / 2\sigma_k^2]`.
    """
    out = np.zeros((amp.shape[0], vel.size), np.float32)
    for k in range(amp.shape[1]):
        arg = (vel[None, :] - centre[:, k, None]) / sigma[:, k, None]
        out += (amp[:, k, None] * np.exp(-0.5 * arg * arg)).astype(np.float32)
    return out


_NH3_CONSTANTS = {}


def _nh3_constants():
    """NH3 (1,1) hyperfine offsets, weights and rate constants from pyspeckit (cached)."""
    if not _NH3_CONSTANTS:
        try:
            from pyspeckit.spectrum.models import ammonia_constants as c
        except ImportError as exc:  # pragma: no cover - pyspeckit is in the lock file
            raise ToolError("NH3 simulation needs pyspeckit (pip install pyspeckit): %s" % exc)
        wts = np.asarray(c.tau_wts_dict["oneone"], float)
        _NH3_CONSTANTS.update(
            voff=np.asarray(c.voff_lines_dict["oneone"], float), wts=wts / wts.sum(),
            freq=c.freq_dict["oneone"], aval=c.aval_dict["oneone"], h=c.h, kb=c.kb,
            ckms=c.ckms, ccms=c.ccms, brot=c.Brot, crot=c.Crot, jpara=np.asarray(c.Jpara),
            index=c.line_name_indices["oneone"], tcmb=c.TCMB)
    return _NH3_CONSTANTS


def nh3_rotational_temperature(tkin):
    r"""Rotational temperature of the (1,1)-(2,2) ladder from the kinetic temperature.

    Notes
    -----
    :math:`T_{rot} = T_K / [1 + (T_K/41.18)\ln(1 + 0.6 e^{-15.7/T_K})]` (Swift et al.
    2005, eq. A6), as pyspeckit's ``cold_ammonia``.
    """
    tkin = np.asarray(tkin, float)
    return tkin / (1 + (tkin / 41.18) * np.log(1 + 0.6 * np.exp(-15.7 / tkin)))


def nh3_spectra(freq_hz, tkin, logn, width, voff):
    r"""NH3 (1,1) brightness temperature spectra, vectorised (pyspeckit ``cold_ammonia``).

    Parameters
    ----------
    freq_hz : ndarray, shape (nchan,)
        Frequency axis (Hz).
    tkin, logn, width, voff : ndarray, shape (m,)
        Kinetic temperature (K), log10 column density (cm^-2), velocity dispersion and
        centroid offset (km/s).

    Returns
    -------
    ndarray, shape (m, nchan), float32
        Brightness temperature (K), with T_ex = T_rot and an ortho fraction of 0.

    Notes
    -----
    Same equations as pyspeckit 1.0.4 ``ammonia`` (Rosolowsky et al. 2008; Friesen et
    al. 2017): the (1,1) optical depth
    :math:`\tau = N_{(1,1)} \frac{c^2 A}{8\pi\nu^2}\tanh(h\nu/2kT_{ex})\frac{c}{\sigma_v\nu\sqrt{2\pi}}`
    is spread over the 18 hyperfine components with their relative strengths, and
    :math:`T_B = [J(T_{ex}) - J(T_{bg})](1 - e^{-\tau(\nu)})`.  The test suite checks it
    against pyspeckit itself.
    """
    c = _nh3_constants()
    tkin, logn, width, voff = (np.atleast_1d(np.asarray(a, float)) for a in (tkin, logn, width, voff))
    trot = nh3_rotational_temperature(tkin)
    jp = c["jpara"]
    zpara = (2 * jp + 1) * np.exp(-c["h"] * (c["brot"] * jp * (jp + 1) + (c["crot"] - c["brot"]) * jp ** 2)
                                  / (c["kb"] * trot[:, None]))
    population = 10.0 ** logn * zpara[:, c["index"]] / zpara.sum(axis=1)
    frq = c["freq"]
    expterm = np.tanh(c["h"] * frq / (2 * c["kb"] * trot))
    tau = (population * (c["ccms"] ** 2 * c["aval"] / (8 * np.pi * frq ** 2)) * expterm
           * c["ckms"] / (width * frq * np.sqrt(2 * np.pi)))
    f_ghz = np.asarray(freq_hz, float) / 1e9
    lines = (1 - c["voff"] / c["ckms"]) * frq / 1e9
    tauprof = np.zeros((tkin.size, f_ghz.size))
    for kk, line in enumerate(lines):
        nuwidth = np.abs(width / c["ckms"] * line)
        nuoff = voff / c["ckms"] * line
        arg = (f_ghz[None, :] + nuoff[:, None] - line) / nuwidth[:, None]
        tauprof += (tau * c["wts"][kk])[:, None] * np.exp(-0.5 * arg * arg)
    t0 = c["h"] * f_ghz * 1e9 / c["kb"]
    jnu = t0[None, :] / np.expm1(t0[None, :] / trot[:, None]) - (t0 / np.expm1(t0 / c["tcmb"]))[None, :]
    return (jnu * -np.expm1(-tauprof)).astype(np.float32)


def _nh3_profile_table(sigma_ch, x_step=0.1, x_max=700.0):
    """Tabulated hyperfine optical-depth profile on a channel grid (cached per grid)."""
    key = ("table", float(sigma_ch[0]), float(sigma_ch[-1]), len(sigma_ch))
    if key not in _NH3_CONSTANTS:
        c = _nh3_constants()
        centres = -c["voff"] / c["ckms"] * c["freq"] / NH3_CHANNEL_HZ     # channels from f0
        x = np.arange(-x_max, x_max + x_step / 2, x_step)
        table = np.zeros((len(sigma_ch), x.size), np.float32)
        for w, mu in zip(c["wts"], centres):
            table += (w * np.exp(-0.5 * ((x[None, :] - mu) / sigma_ch[:, None]) ** 2)).astype(np.float32)
        _NH3_CONSTANTS[key] = (x, table)
    return _NH3_CONSTANTS[key]


def nh3_profile(freq_hz, width, voff):
    """NH3 (1,1) hyperfine profile: the 18 components' relative strengths times unit-peak
    Gaussians of dispersion ``width`` (km/s) centred at ``voff`` (km/s), tabulated.

    Parameters
    ----------
    freq_hz : ndarray, shape (nchan,) or (m, nchan)
        Frequency axis (Hz), or one per profile; offsets from the line are interpolated
        in a table of 0.1 :data:`NH3_CHANNEL_HZ` steps.
    width, voff : ndarray, shape (m,)

    Returns
    -------
    ndarray, shape (m, nchan), float32
        Shape of the optical depth, tau(nu) / tau_total (strengths sum to 1).
    """
    return _nh3_profile(freq_hz, width, voff)[0]


def _nh3_profile(freq_hz, width, voff, slopes=False):
    """:func:`nh3_profile` and, with ``slopes``, its exact derivatives with respect to
    ``voff`` (per km/s) and ln ``width`` (those of the bilinear interpolant)."""
    c = _nh3_constants()
    width, voff = (np.atleast_1d(np.asarray(a, float)) for a in (width, voff))
    sig_grid = np.exp(np.linspace(np.log(0.5), np.log(40.0), 200))
    xg, table = _nh3_profile_table(sig_grid)
    frq = c["freq"]
    sig_ch = np.clip(width / c["ckms"] * frq / NH3_CHANNEL_HZ, sig_grid[0], sig_grid[-1])
    pos = np.interp(np.log(sig_ch), np.log(sig_grid), np.arange(sig_grid.size))
    i0 = np.minimum(pos.astype(int), sig_grid.size - 2)
    fs = (pos - i0).astype(np.float32)[:, None]
    x = (np.atleast_2d(np.asarray(freq_hz, float) - frq) + (voff / c["ckms"] * frq)[:, None]) / NH3_CHANNEL_HZ
    xi = (x - xg[0]) / (xg[1] - xg[0])
    j0 = np.clip(xi.astype(int), 0, xg.size - 2)
    fx = (xi - j0).astype(np.float32)
    flat = table.ravel()                      # 1-D gathers: faster than 2-D indexing
    k = j0 + i0[:, None] * xg.size
    r0, r1, r2, r3 = flat[k], flat[k + 1], flat[k + xg.size], flat[k + xg.size + 1]
    phi = (1 - fs) * ((1 - fx) * r0 + fx * r1) + fs * ((1 - fx) * r2 + fx * r3)
    if not slopes:
        return phi, None, None
    per_kms = np.float32(frq / (c["ckms"] * NH3_CHANNEL_HZ * (xg[1] - xg[0])))      # table steps per km/s
    d_v = ((1 - fs) * (r1 - r0) + fs * (r3 - r2)) * per_kms
    inside = ((sig_ch > sig_grid[0]) & (sig_ch < sig_grid[-1])).astype(np.float32)[:, None]
    per_ln = np.float32((sig_grid.size - 1) / np.log(sig_grid[-1] / sig_grid[0]))   # grid rows per e-fold
    d_lnw = ((1 - fx) * (r2 - r0) + fx * (r3 - r1)) * (per_ln * inside)
    return phi, d_v, d_lnw


def nh3_spectra_fast(freq_hz, tkin, logn, width, voff):
    """As :func:`nh3_spectra` from a tabulated profile (~5x faster; used for training sets).

    Notes
    -----
    All 18 hyperfine components share the main line's frequency width and shift
    (relative differences < 2e-4); the profile is interpolated linearly in channel offset
    (0.1-channel grid) and in log dispersion (200 values from 0.5 to 40 channels).
    Agrees with :func:`nh3_spectra` to < 1e-3 of the peak (tested).
    """
    c = _nh3_constants()
    tkin, logn, width, voff = (np.atleast_1d(np.asarray(a, float)) for a in (tkin, logn, width, voff))
    trot = nh3_rotational_temperature(tkin)
    jp = c["jpara"]
    zpara = (2 * jp + 1) * np.exp(-c["h"] * (c["brot"] * jp * (jp + 1) + (c["crot"] - c["brot"]) * jp ** 2)
                                  / (c["kb"] * trot[:, None]))
    frq = c["freq"]
    tau = (10.0 ** logn * zpara[:, c["index"]] / zpara.sum(axis=1)
           * (c["ccms"] ** 2 * c["aval"] / (8 * np.pi * frq ** 2)) * np.tanh(c["h"] * frq / (2 * c["kb"] * trot))
           * c["ckms"] / (width * frq * np.sqrt(2 * np.pi)))
    tauprof = tau.astype(np.float32)[:, None] * nh3_profile(freq_hz, width, voff)
    f = np.asarray(freq_hz, float)
    t0 = c["h"] * f / c["kb"]
    jnu = t0[None, :] / np.expm1(t0[None, :] / trot[:, None]) - (t0 / np.expm1(t0 / c["tcmb"]))[None, :]
    return (jnu.astype(np.float32) * -np.expm1(-tauprof)).astype(np.float32)


def nh3_template_axis():
    """The NH3 training axis: frequency (Hz, decreasing) and velocity (km/s, increasing).

    1000 channels of 5.72 kHz around the (1,1) rest frequency (the original's
    ``linspace(-500, 499, 1000) * 5.72 kHz``), ordered so that the radio velocity
    increases with index.
    """
    freq = NH3_11_REST_HZ + np.arange(499, -501, -1) * NH3_CHANNEL_HZ
    return freq, _nh3_velocity(freq)


def gaussian_template_axis():
    """The Gaussian training axis: 500 channels of 0.07237 km/s centred on 0 km/s."""
    return (np.arange(GAUSSIAN_NCHAN) - _centre_channel(GAUSSIAN_NCHAN)) * TEMPLATE_DV_KMS


def _class_codes(n, rng, classes):
    """Class code per spectrum: balanced thirds (shuffled), one fixed code, or given."""
    if classes is None:
        codes = np.arange(n) % 3
        rng.shuffle(codes)
        return codes
    codes = np.asarray(classes, int)
    return np.full(n, int(codes)) if codes.ndim == 0 else codes


def _ncomp(codes):
    """Number of components for class codes (0 = one, 1 = noise, 2 = two)."""
    return np.choose(codes, [1, 0, 2])


def _neighbourhood_offsets():
    dy, dx = np.mgrid[-1:2, -1:2]
    return dx.ravel().astype(float), dy.ravel().astype(float)   # index 4 = centre


def _features_from_windows(windows):
    """(m, 9, nchan) windows -> (m, nchan, 2) inputs and the central maxima."""
    local = windows[:, 4]
    mean = windows.mean(axis=1)
    lmax = _safe_max(local)
    x = np.stack([local / lmax[:, None], mean / _safe_max(mean)[:, None]], axis=-1)
    return x.astype(np.float32), lmax


def _safe_max(spectra):
    """Per-spectrum maximum used for normalisation (|max| fallback; never 0)."""
    peak = spectra.max(axis=-1)
    alt = np.abs(spectra).max(axis=-1)
    peak = np.where(peak > 0, peak, alt)
    return np.where(peak > 0, peak, 1.0).astype(np.float32)


def _sorted_targets(centre, sigma, peak, nchan, dv):
    """Regression targets in channel units, components sorted by centroid.

    Returns (m, 6): normalised centroids in [-1, 1] (channel (N-1)/2 -> 0), dispersions
    in channels, peaks relative to the central spectrum's maximum.
    """
    order = np.argsort(centre, axis=1)
    c = np.take_along_axis(centre, order, 1)
    s = np.take_along_axis(sigma, order, 1)
    p = np.take_along_axis(peak, order, 1)
    half = _centre_channel(nchan)
    return np.concatenate([c / dv / half, s / dv, p], axis=1)


def simulate_gaussian(n, rng, classes=None, chunk=4000):
    """Simulate CLOVER training spectra of Gaussian lines (500 channels).

    Parameters
    ----------
    n : int
        Number of spectra (each with its 3x3 neighbourhood).
    rng : numpy.random.Generator
        Source of every random number (seed it for reproducible sets).
    classes : None, int or array of int
        ``None`` = balanced thirds of noise / one / two components; an int = all of
        that class code (0 one, 1 noise, 2 two); an array = the code per spectrum.
    chunk : int
        Spectra generated at a time (memory bound: chunk x 9 x 500 floats).

    Returns
    -------
    dict
        ``x`` (n, 500, 2) float32 network inputs; ``label`` (n,) class codes;
        ``reg2`` (n, 6) and ``reg1`` (n, 3) targets (normalised centroid, dispersion
        in channels, peak / central maximum; components sorted by centroid);
        ``snr`` (n,) peak S/N of the brightest component and ``snr_min`` (n,) of the
        weakest (0 for noise); ``v``, ``sigma``, ``peak`` (n, 2) truth in km/s and
        brightness units (NaN for absent components); ``tmax`` (n,).

    Notes
    -----
    Ranges in the module docstring (GAUSS_RANGES); after Keown et al. (2019) and the
    original's ``gauss_testcubes.py``.

    Examples
    --------
    >>> sim = simulate_gaussian(30, np.random.default_rng(1))
    >>> sim["x"].shape
    (30, 500, 2)
    """
    codes = _class_codes(n, rng, classes)
    parts = [_simulate_gaussian_chunk(codes[i:i + chunk], rng)
             for i in range(0, n, chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _simulate_gaussian_chunk(codes, rng):
    r = GAUSS_RANGES
    m = codes.size
    ncomp = _ncomp(codes)
    vel = gaussian_template_axis()
    v1 = rng.uniform(*r["v_kms"], m)
    sig = rng.uniform(*r["sigma_kms"], (m, 2))
    sep = sig.max(1) * rng.uniform(*r["sep_factor"], m) * rng.choice([-1.0, 1.0], m)
    centre = np.column_stack([v1, v1 + sep])
    snr = np.exp(rng.uniform(*np.log(r["snr"]), m))
    noise = 1.0 / snr
    peak = np.column_stack([np.ones(m), rng.uniform(np.minimum(r["peak2_min_snr"] * noise, 1.0), 1.0)])
    present = np.arange(2)[None, :] < ncomp[:, None]
    peak = np.where(present, peak, 0.0)
    dx, dy = _neighbourhood_offsets()
    g = rng.normal(0, r["gradient"], (m, 2, 3, 2))   # comp, (T, sigma, V), (x, y)
    amp9 = peak[:, None, :] * (1 + g[:, None, :, 0, 0] * dx[None, :, None] + g[:, None, :, 0, 1] * dy[None, :, None])
    sig9 = sig[:, None, :] * (1 + g[:, None, :, 1, 0] * dx[None, :, None] + g[:, None, :, 1, 1] * dy[None, :, None])
    cen9 = centre[:, None, :] + g[:, None, :, 2, 0] * dx[None, :, None] + g[:, None, :, 2, 1] * dy[None, :, None]
    spec = gaussian_profiles(vel, amp9.reshape(-1, 2), cen9.reshape(-1, 2), np.abs(sig9).reshape(-1, 2))
    spec = spec.reshape(m, 9, -1) + (rng.standard_normal((m, 9, vel.size)) * noise[:, None, None]).astype(np.float32)
    x, tmax = _features_from_windows(spec)
    return _pack_truth(x, codes, centre, sig, peak, present, noise, tmax, GAUSSIAN_NCHAN, TEMPLATE_DV_KMS)


def _pack_truth(x, codes, centre, sig, peak, present, noise, tmax, nchan, dv):
    """Common dictionary of inputs, targets and truth of the simulators."""
    nan = np.where(present, 1.0, np.nan)
    c2, s2, p2 = centre * nan, sig * nan, peak * nan
    fill = lambda a: np.where(present, a, np.where(present[:, :1], a[:, :1], 0.0))  # noqa: E731
    reg2 = _sorted_targets(fill(centre), fill(sig), fill(peak) / tmax[:, None], nchan, dv)
    reg1 = _sorted_targets(centre[:, :1], sig[:, :1], peak[:, :1] / tmax[:, None], nchan, dv)
    p0 = np.where(present, peak, np.inf)
    snr = np.where(present, peak, 0.0).max(axis=1) / noise
    snr_min = np.where(present.any(axis=1), p0.min(axis=1), 0.0) / noise
    return {"x": x, "label": codes.astype(np.int8), "reg2": reg2.astype(np.float32),
            "reg1": reg1.astype(np.float32), "snr": snr, "snr_min": snr_min,
            "v": c2, "sigma": s2, "peak": p2, "tmax": tmax, "noise": noise}


def simulate_nh3(n, rng, classes=None, chunk=1500, windows=False):
    """Simulate CLOVER training spectra of NH3 (1,1) (1000 channels, 18 hyperfines).

    Parameters
    ----------
    n, rng, classes, chunk
        As :func:`simulate_gaussian`.
    windows : bool
        Also return the nine spectra of each 3x3 neighbourhood (K; 36 kB a spectrum).

    Returns
    -------
    dict
        As :func:`simulate_gaussian` with ``x`` of shape (n, 1000, 2); ``peak`` is the
        component's peak brightness (K) in the central pixel, ``sigma`` its width;
        with ``windows``, ``windows`` of shape (n, 9, 1000) (index 4 = centre).

    Notes
    -----
    Ranges in the module docstring (NH3_RANGES), after the original's
    ``nh3_testcubes_GAS.py`` (GAS survey, Friesen et al. 2017).  Two components add
    their brightness (as the original; no radiative transfer between them).

    Examples
    --------
    >>> sim = simulate_nh3(6, np.random.default_rng(1))
    >>> sim["x"].shape
    (6, 1000, 2)
    """
    codes = _class_codes(n, rng, classes)
    parts = [_simulate_nh3_chunk(codes[i:i + chunk], rng, windows) for i in range(0, n, chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _nh3_parameters(m, rng):
    """Per-component (m, 2) Tkin, logN, width, centroid of the NH3 training set."""
    r = NH3_RANGES
    tkin = rng.uniform(*r["tkin_k"], (m, 2))
    logn = rng.uniform(*r["logn"], (m, 2))
    width = np.sqrt(0.1 * np.exp(1.5 * rng.standard_normal((m, 2))) + 0.08 ** 2)
    width = np.minimum(width, r["width_cap_kms"])
    v1 = rng.uniform(*r["v_kms"], m)
    v2 = v1 + rng.uniform(*r["dv2_kms"], m)
    wmax = width.max(1)
    close = np.abs(v1 - v2) < wmax        # the original's remove_low_sep
    lo, hi = np.minimum(v1, v2), np.maximum(v1, v2)
    v1 = np.where(close, lo - wmax / 2, v1)
    v2 = np.where(close, hi + wmax / 2, v2)
    return tkin, logn, width, np.column_stack([v1, v2])


def _simulate_nh3_chunk(codes, rng, windows=False):
    r = NH3_RANGES
    m = codes.size
    ncomp = _ncomp(codes)
    present = np.arange(2)[None, :] < ncomp[:, None]
    tkin, logn, width, centre = _nh3_parameters(m, rng)
    dx, dy = _neighbourhood_offsets()
    g = rng.standard_normal((m, 2, 4, 2)) * np.asarray(r["gradient"])[None, None, :, None]
    lin = lambda q: g[:, None, :, q, 0] * dx[None, :, None] + g[:, None, :, q, 1] * dy[None, :, None]  # noqa: E731
    t9 = np.maximum(tkin[:, None, :] * (1 + lin(0)) + r["tkin_offset_k"], r["tkin_floor_k"])
    w9 = np.abs(width[:, None, :] * (1 + lin(1)))
    v9 = centre[:, None, :] + lin(2)
    n9 = logn[:, None, :] * (1 + lin(3))
    freq, _ = nh3_template_axis()
    spec = np.zeros((m, 9, freq.size), np.float32)
    peak = np.zeros((m, 2))
    for k in range(2):
        rows = np.flatnonzero(present[:, k])
        if rows.size:
            s = nh3_spectra_fast(freq, t9[rows, :, k].ravel(), n9[rows, :, k].ravel(),
                            w9[rows, :, k].ravel(), v9[rows, :, k].ravel())
            s = s.reshape(rows.size, 9, -1)
            spec[rows] += s
            peak[rows, k] = s[:, 4].max(axis=1)
    noise = np.full(m, r["noise_k"])
    spec += (rng.standard_normal(spec.shape) * r["noise_k"]).astype(np.float32)
    x, tmax = _features_from_windows(spec)
    # centroids are offsets from the channel of 0 km/s (index 499 of 0..999), converted
    # to the 0.5-channel convention of the targets: centre channel = 499.5
    shift = (499 - _centre_channel(NH3_NCHAN)) * TEMPLATE_DV_KMS
    out = _pack_truth(x, codes, centre + shift, width, peak, present, noise, tmax, NH3_NCHAN, TEMPLATE_DV_KMS)
    out["v"] = out["v"] - shift
    if windows:
        out["windows"] = spec
    return out


# ===========================================================================
# Registries: line types and output maps
# ===========================================================================
# line type -> spectral length, training channel width, simulator, trained centroid
# range (channels from the band centre; seed README: ~275 / ~140 central channels)
LINE_TYPES = {
    # centroid_range: (half-width, unit) of the trained centroids around the window centre,
    # in the unit the networks work in - channels for Gaussian lines (trained +-10 km/s in
    # 0.0724 km/s channels, + 5 dispersions), km/s for NH3 (fixed channel width)
    "gauss": {"nchan": GAUSSIAN_NCHAN, "dv_kms": TEMPLATE_DV_KMS, "simulate": simulate_gaussian,
              "centroid_range": ((10.0 + 5 * 0.8) / TEMPLATE_DV_KMS, "channels"), "rest_hz": None,
              "what": "Gaussian line (e.g. CO)"},
    "nh3": {"nchan": NH3_NCHAN, "dv_kms": TEMPLATE_DV_KMS, "simulate": simulate_nh3,
            "centroid_range": (5.0 + 1.0, "km/s"), "rest_hz": NH3_11_REST_HZ,
            "what": "NH3 (1,1) with hyperfine structure"},
}

# domain flag bits (the ``domain`` map; 0 = inside the trained domain)
DOMAIN_BITS = {
    1: "spectral axis resampled for the networks (channel width or line width outside the trained range)",
    2: "line width outside the trained range even after resampling, or at the one-channel floor (unresolved)",
    4: "centroid outside the trained centroid range of the networks' window",
    8: "spectrum partly blank (blank channels filled with noise for the networks)",
    16: "a model fit did not converge or reached a bound (values from the networks or dropped)",
}
# output map -> (kind of unit, description, needs).  kind: 'class' (code), 'count', 'prob',
# 'vel' (km/s), 'width' (km/s), 'peak' (cube BUNIT), 'flags', 'ratio' (dimensionless), 'K',
# 'logcm2'; needs: None (always
# written) or 'joint' (only with an NH3 (2,2) cube).  Components 1/2 are sorted by centroid.
OUTPUT_MAPS = {
    "class": ("class", "class: 0 one component, 1 noise, 2 two components (the original's codes)", None),
    "ncomp": ("count", "number of components: 0, 1 or 2", None),
    "prob": ("prob", "probability of the chosen number of components", None),
    "vlsr1": ("vel", "centroid velocity of the lower-velocity component (two-component pixels)", None),
    "vlsr2": ("vel", "centroid velocity of the higher-velocity component (two-component pixels)", None),
    "sig1": ("width", "velocity dispersion of component 1 (two-component pixels)", None),
    "sig2": ("width", "velocity dispersion of component 2 (two-component pixels)", None),
    "tpeak1": ("peak", "peak intensity of component 1 (two-component pixels)", None),
    "tpeak2": ("peak", "peak intensity of component 2 (two-component pixels)", None),
    "vlsr": ("vel", "centroid velocity of one-component pixels", None),
    "sig": ("width", "velocity dispersion of one-component pixels", None),
    "tpeak": ("peak", "peak intensity of one-component pixels", None),
    "vlsr_dom": ("vel", "centroid velocity of the dominant (brighter) component, every emission pixel", None),
    "sig_dom": ("width", "velocity dispersion of the dominant component", None),
    "tpeak_dom": ("peak", "peak intensity of the dominant component", None),
    "rchi2": ("ratio", "reduced chi-square of the chosen model over its lines' channels", None),
    "rms": ("peak", "rms noise per channel (from the fit residuals)", None),
    "domain": ("flags", "domain flag bits: " + "; ".join("%d %s" % kv for kv in DOMAIN_BITS.items()), None),
}
for _name in [n for n in OUTPUT_MAPS if OUTPUT_MAPS[n][0] in ("vel", "width", "peak") and n != "rms"]:
    OUTPUT_MAPS[_name + "_err"] = (OUTPUT_MAPS[_name][0], "1-sigma uncertainty of " + _name, None)
NH3_JOINT_MAPS = {"tkin": ("K", "kinetic temperature"), "tex": ("K", "excitation temperature"),
                  "logn": ("logcm2", "log10 NH3 column density"), "tau": ("ratio", "total (1,1) optical depth")}
for _base, (_kind, _text) in NH3_JOINT_MAPS.items():
    for _suffix, _which in (("1", " of component 1 (two-component pixels)"), ("2", " of component 2"),
                            ("", " (one-component pixels)"), ("_dom", " of the dominant component")):
        OUTPUT_MAPS[_base + _suffix] = (_kind, _text + _which + " from the joint (1,1)+(2,2) fit", "joint")
        OUTPUT_MAPS[_base + _suffix + "_err"] = (_kind, "1-sigma uncertainty of " + _base + _suffix, "joint")
REG_TARGETS = {"reg2": ("vlsr1", "vlsr2", "sig1", "sig2", "tpeak1", "tpeak2"),
               "reg1": ("vlsr", "sig", "tpeak")}
META_FILE = "clover_models.json"


# ===========================================================================
# Science: networks
# ===========================================================================
def build_network(nchan, n_out, head="class", dense=32):
    """Compact 1-D ConvNet on (nchan, 2) inputs (local and 3x3-mean spectra).

    Parameters
    ----------
    nchan : int
        Spectral length (500 Gaussian, 1000 NH3).
    n_out : int
        Outputs: 3 class probabilities, or 2k (mean and log-variance of k parameters).
    head : {'class', 'reg'}
        Softmax classifier or linear regression head.
    dense : int
        Units of the hidden dense layer.

    Returns
    -------
    keras.Model

    Notes
    -----
    Conv1D(8, 7) - pool - Conv1D(16, 5) - pool - Conv1D(16, 5) - pool [- Conv1D(16, 5) -
    pool for 1000 channels] - flatten (62 x 16) - Dense(dense) - output.  The two input
    spectra are two channels of one signal, so every filter sees local and neighbourhood
    emission at the same velocity (the original used two separate branches with
    Conv1D(16, 3) x 2 and two dense layers of 3000 units, ~3e7 weights; this one has
    ~3.5e4 for the classifier).
    """
    keras = _import_keras()
    layers = keras.layers
    inputs = keras.Input((nchan, 2), name="spectra")
    x = inputs
    stages = [(8, 7), (16, 5), (16, 5)] + ([(16, 5)] if nchan > 600 else [])
    for filters, width in stages:
        x = layers.Conv1D(filters, width, padding="same", activation="relu")(x)
        x = layers.MaxPooling1D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(dense, activation="relu")(x)
    outputs = layers.Dense(n_out, activation="softmax" if head == "class" else None)(x)
    return keras.Model(inputs, outputs)


def gaussian_nll(y_true, y_pred):
    r"""Heteroscedastic Gaussian negative log-likelihood (per-parameter variances).

    Notes
    -----
    With outputs :math:`(\mu_k, s_k = \ln\sigma_k^2)`:
    :math:`L = \frac{1}{K}\sum_k [\tfrac12 e^{-s_k}(y_k-\mu_k)^2 + \tfrac12 s_k]`
    (Nix & Weigend 1994; Kendall & Gal 2017).
    """
    from keras import ops
    k = ops.shape(y_true)[-1]
    mu, s = y_pred[..., :k], ops.clip(y_pred[..., k:], -12.0, 8.0)
    return ops.mean(0.5 * ops.exp(-s) * ops.square(y_true - mu) + 0.5 * s, axis=-1)


class CloverModels:
    """The shipped (or given) networks of one line type, loaded for inference.

    Parameters
    ----------
    line : {'gauss', 'nh3'}
        Line type (key of LINE_TYPES).
    model_dir : str or Path, optional
        Directory with ``clover_models.json`` and the weight files (default models/clover).
    nproc : int
        CPU threads for TensorFlow (all ensemble members run in one graph).

    Raises
    ------
    InputError
        When the directory, the metadata or a weight file is missing (run
        ``python clover.py train``).
    """

    def __init__(self, line="gauss", model_dir=None, nproc=1):
        if line not in LINE_TYPES:
            raise InputError("unknown line type %r; use one of %s" % (line, ", ".join(LINE_TYPES)))
        self.line, self.nproc = line, int(nproc)
        self.model_dir = Path(model_dir) if model_dir else MODEL_DIR
        self.meta = _read_meta(self.model_dir, line)
        self.nchan = int(self.meta["nchan"])
        keras = _import_keras(self.nproc)
        members = [self._load(entry) for entry in self.meta["classifier"]["members"]]
        if len(members) == 1:
            self.classifier = members[0]
        else:  # one graph: the members run side by side on the thread pool
            inputs = keras.Input((self.nchan, 2))
            self.classifier = keras.Model(inputs, keras.layers.Average()([m(inputs) for m in members]))
        self.n_members = len(members)
        self.regressors = {kind: self._load(self.meta[kind]) for kind in REG_TARGETS}

    def _load(self, entry):
        path = self.model_dir / entry["file"]
        if not path.is_file():
            raise InputError("model weights %s are missing; run 'python clover.py train' "
                             "or give model_dir=" % path)
        model = build_network(self.nchan, entry["n_out"], entry["head"], entry["dense"])
        model.load_weights(path)
        return model

    def __repr__(self):
        return ("CloverModels(line=%r, model_dir=%r, members=%d, nchan=%d, nproc=%d)"
                % (self.line, str(self.model_dir), self.n_members, self.nchan, self.nproc))

    def classify(self, x, batch_size=2048):
        """Ensemble mean class probabilities, shape (n, 3) (columns: one, noise, two)."""
        return _batched(self.classifier, x, batch_size, 3)

    def regress(self, kind, x, batch_size=2048):
        """Regression of ``kind`` ('reg1' or 'reg2') in training units: (mean, sigma)."""
        entry = self.meta[kind]
        k = len(REG_TARGETS[kind])
        xr, shift = recentre(x, self.meta.get("recentre"))
        out = _batched(self.regressors[kind], xr, batch_size, 2 * k)
        mean, sd = np.asarray(entry["mean"]), np.asarray(entry["std"])
        mu = out[:, :k] * sd + mean
        mu[:, :k // 3] += (shift / _centre_channel(self.nchan))[:, None]
        err = np.exp(0.5 * np.clip(out[:, k:], -12, 8)) * sd
        return mu, err


def _batched(model, x, batch_size, n_out):
    """Run ``model`` over ``x`` in batches; short batches are padded to a power of two so
    that TensorFlow traces only a few input shapes."""
    out = np.empty((len(x), n_out), np.float32)
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        size = min(batch_size, max(64, 1 << int(np.ceil(np.log2(len(chunk))))))
        if size > len(chunk):
            chunk = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        out[start:start + batch_size] = np.asarray(model.predict_on_batch(chunk))[:min(batch_size, len(x) - start)]
    return out


def recentre(x, kernel=None, smooth=5):
    """Roll each spectrum so its emission peak sits at channel N//2.

    Parameters
    ----------
    x : ndarray, shape (n, nchan, 2)
    kernel : dict, optional
        Matched filter ``{'offsets_ch': [...], 'weights': [...], 'sigma_ch': s}``: the
        peak of the 3x3-mean input's cross-correlation with this comb of Gaussians is
        used (NH3: the 18 hyperfine components, so that a bright satellite group does
        not pass for the main one).  Without it, the peak of a ``smooth``-channel boxcar.
    smooth : int
        Boxcar width (channels).

    Returns
    -------
    rolled : ndarray, shape (n, nchan, 2)
    shift : ndarray of int, shape (n,)
        Channels moved: new channel ``j`` holds old channel ``j + shift`` (mod nchan).

    Notes
    -----
    Makes the regressors' task translation-free: they predict centroids relative to
    the emission peak, which a small dense head does far better than absolute
    positions (the wrapped-around edge channels hold noise).  Cross-correlation by FFT:
    :math:`c(s) = \\sum_j m(j) k(j - s) = \\mathcal{F}^{-1}[M \\bar K](s)`.
    """
    n, nchan, _ = x.shape
    if kernel:
        j = np.arange(nchan)
        j = np.where(j > nchan // 2, j - nchan, j)          # wrapped lags
        comb = sum(w * np.exp(-0.5 * ((j - o) / kernel["sigma_ch"]) ** 2)
                   for o, w in zip(kernel["offsets_ch"], kernel["weights"]))
        corr = np.fft.irfft(np.fft.rfft(x[:, :, 1], axis=1) * np.conj(np.fft.rfft(comb))[None, :], nchan, axis=1)
        peak = np.argmax(corr, axis=1)
    else:
        c = np.cumsum(np.pad(x[:, :, 1], ((0, 0), (smooth // 2 + 1, smooth // 2))), axis=1)
        peak = np.argmax(c[:, smooth:] - c[:, :-smooth], axis=1)
    shift = (peak - nchan // 2).astype(int)
    idx = (np.arange(nchan)[None, :] + shift[:, None]) % nchan
    return np.take_along_axis(x, idx[:, :, None], axis=1), shift


def recentre_kernel(line):
    """Matched filter used by :func:`recentre` for a line type (None = boxcar peak)."""
    if line != "nh3":
        return None
    c = _nh3_constants()
    return {"offsets_ch": (c["voff"] / TEMPLATE_DV_KMS).tolist(), "weights": c["wts"].tolist(),
            "sigma_ch": 3.0}


def _shift_targets(y, shift, kind, nchan):
    """Centroid targets relative to the recentred axis (normalised units)."""
    y = np.array(y, np.float32, copy=True)
    ncomp = len(REG_TARGETS[kind]) // 3
    y[:, :ncomp] -= (shift / _centre_channel(nchan))[:, None]
    return y


def _read_meta(model_dir, line):
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise InputError("no trained models in %s (%s missing); run 'python clover.py train'"
                         % (model_dir, META_FILE))
    meta = json.loads(path.read_text())
    if line not in meta.get("lines", {}):
        raise InputError("%s has no %r models (trained: %s); run 'python clover.py train "
                         "--lines %s'" % (path, line, ", ".join(meta.get("lines", {})) or "none", line))
    return meta["lines"][line]


def _gaussians_and_jacobian(chan, p, k):
    """Sum of k Gaussians (centres, sigmas, peaks in ``p``) on per-row channels ``chan``
    (n, w), and its Jacobian (n, 3k, w)."""
    c, s, a = p[:, :k, None], p[:, k:2 * k, None], p[:, 2 * k:, None]
    d = (chan[:, None, :] - c) / s
    g = np.exp(-0.5 * d * d)
    ag = a * g
    jac = np.concatenate([ag * d / s, ag * d * d / s, g], axis=1)
    return ag.sum(axis=1), jac


def _component_extent(p, k, nchan, span=5.0):
    """Per-row first and last channel covering every component +- ``span`` sigma."""
    c, s = p[:, :k], np.clip(np.abs(p[:, k:2 * k]), 0.3, nchan / 4)
    return np.floor((c - span * s).min(axis=1)), np.ceil((c + span * s).max(axis=1))


def _fit_windows(p, k, nchan):
    """Per-row channel windows covering every component (common width)."""
    lo, hi = _component_extent(p, k, nchan)
    width = int(min(nchan, max(8 * k + 1, np.nanmax(hi - lo, initial=0) + 1)))
    first = np.clip(np.nan_to_num(lo), 0, nchan - width).astype(int)
    return first[:, None] + np.arange(width)[None, :]


def refine_gaussians(spectra, params, prior_sigma=None, n_iter=12, chunk=1024, noise=None,
                     min_sigma=0.3, return_chi2=False):
    """Levenberg-Marquardt refinement of Gaussian components, vectorised over spectra.

    Parameters
    ----------
    spectra : ndarray, shape (n, nchan)
        The spectra (any brightness scale; channel index is the abscissa).
    params : ndarray, shape (n, 3k)
        Starting values (the network's): k centres (channels), k dispersions
        (channels), k peaks.
    prior_sigma : ndarray, shape (n, 3k), optional
        1-sigma uncertainties of ``params``: they then also act as a Gaussian prior
        (maximum a posteriori fit), so the result combines the spectrum with what the
        starting values already knew.  None: a plain least-squares fit.
    n_iter : int
        Iterations (each tries one damped Gauss-Newton step per spectrum and keeps it
        only if it lowers the objective).
    chunk : int
        Spectra refined at a time (memory: chunk x 3k x window doubles); rows are
        grouped by the window width they need.
    noise : ndarray, shape (n,), optional
        Noise of each spectrum (default: from first differences, see Notes).
    min_sigma : float
        Smallest dispersion allowed (channels).
    return_chi2 : bool
        Also return the chi^2 of the data term (in units of ``noise``).

    Returns
    -------
    params : ndarray, shape (n, 3k)
        Refined values, components sorted by centre; rows whose fit left the allowed
        region (peak <= 0, dispersion < 0.3 or > nchan/4 channels, centre off the axis)
        keep their starting values.
    errors : ndarray, shape (n, 3k)
        1-sigma errors from the inverse of the objective's curvature matrix
        ``J^T J / s^2 (+ diag(prior_sigma^-2))``; NaN for rows that kept their starting
        values.
    refined : ndarray of bool, shape (n,)
    chi2 : ndarray, shape (n,)
        Only with ``return_chi2``.

    Notes
    -----
    Non-finite channels are left out of the fit.  The noise ``s`` of each spectrum is
    :func:`mad_sigma` of its first differences / sqrt(2) (robust to lines wider than a few
    channels).  Each spectrum is fitted in a
    window of channels covering its components +- 5 sigma of the starting values (a
    common width within a chunk).  Starting from the network's estimate, a few steps
    converge, at a small fraction of the cost of a fit from scratch with model selection
    (benchmarks/bench_clover.py).

    Examples
    --------
    >>> chan = np.arange(100.0)
    >>> y = np.exp(-0.5 * ((chan - 40.3) / 3.0) ** 2)[None]
    >>> p, e, ok = refine_gaussians(y, np.array([[41.0, 3.5, 0.9]]))
    >>> bool(ok[0]), np.round(p[0], 3).tolist()
    (True, [40.3, 3.0, 1.0])
    """
    spectra = np.asarray(spectra, np.float64)
    params = np.asarray(params, np.float64)
    weight = np.zeros_like(params) if prior_sigma is None else 1.0 / np.maximum(
        np.nan_to_num(np.asarray(prior_sigma, np.float64), nan=np.inf), 1e-12) ** 2
    noise = _difference_noise(spectra) if noise is None else np.asarray(noise, np.float64)
    out, err = params.copy(), np.full(params.shape, np.nan)
    refined = np.zeros(len(params), bool)
    chi2 = np.full(len(params), np.inf)
    lo, hi = _component_extent(params, params.shape[1] // 3, spectra.shape[1])
    order = np.argsort(np.nan_to_num(hi - lo), kind="stable")     # chunks of similar window width
    for start in range(0, len(params), chunk):
        rows = order[start:start + chunk]
        out[rows], err[rows], refined[rows], chi2[rows] = _refine_chunk(
            spectra[rows] / noise[rows, None], params[rows], weight[rows], noise[rows], n_iter, min_sigma)
    return (out, err, refined, chi2) if return_chi2 else (out, err, refined)


def _refine_chunk(y, p, weight, noise, n_iter, min_sigma=0.3):
    """MAP fit of ``y`` (in units of its noise; NaN channels left out); the peaks in ``p``
    are in data units.  Returns params, errors, refined, chi^2 of the data term."""
    nchan = y.shape[1]
    k = p.shape[1] // 3
    p = np.nan_to_num(p)
    idx = _fit_windows(p, k, nchan)          # fit only where the components are
    y = np.take_along_axis(y, idx, axis=1)
    mask = np.isfinite(y).astype(np.float64)
    y = np.nan_to_num(y)
    chan = idx.astype(np.float64)
    scale = np.concatenate([np.ones((len(p), 2 * k)), np.repeat(noise[:, None], k, axis=1)], axis=1)
    prior = p / scale                        # work with peaks in noise units
    weight = weight * scale ** 2
    q = prior.copy()
    lam = np.full(len(q), 1e-3)

    def evaluate(q):
        model, jac = _gaussians_and_jacobian(chan, q, k)
        model, jac = model * mask, jac * mask[:, None, :]
        return model, jac, ((y - model) ** 2).sum(axis=1) + (weight * (q - prior) ** 2).sum(axis=1)

    model, jac, obj = evaluate(q)
    eye = np.eye(3 * k)
    for _ in range(n_iter):
        normal = jac @ jac.transpose(0, 2, 1) + weight[:, :, None] * eye
        grad = (jac @ (y - model)[:, :, None])[:, :, 0] + weight * (prior - q)
        damped = normal + lam[:, None, None] * normal * eye
        try:
            step = np.linalg.solve(damped, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:   # a singular row: fall back to gradient steps
            step = grad / np.maximum(np.einsum("nii->ni", normal), 1e-30)
        trial = q + step
        ok = _allowed(trial, k, nchan, min_sigma)
        t_model, t_jac, t_obj = evaluate(np.where(ok[:, None], trial, q))
        better = ok & (t_obj < obj)
        q = np.where(better[:, None], trial, q)
        model = np.where(better[:, None], t_model, model)
        jac = np.where(better[:, None, None], t_jac, jac)
        obj = np.where(better, t_obj, obj)
        lam = np.where(better, lam * 0.3, lam * 10.0)
    refined = _allowed(q, k, nchan, min_sigma) & np.isfinite(obj)
    chi2 = ((y - model) ** 2).sum(axis=1)
    with np.errstate(all="ignore"):
        cov = np.linalg.pinv(jac @ jac.transpose(0, 2, 1) + weight[:, :, None] * eye)
        err = np.sqrt(np.abs(np.einsum("nii->ni", cov))) * scale
    q = np.where(refined[:, None], q * scale, p)
    err = np.where(refined[:, None], err, np.nan)
    order = np.argsort(q[:, :k], axis=1)
    idx = np.concatenate([order + j * k for j in range(3)], axis=1)
    return np.take_along_axis(q, idx, 1), np.take_along_axis(err, idx, 1), refined, chi2


def _allowed(p, k, nchan, min_sigma=0.3):
    """Rows whose Gaussians stay physical: positive peaks, min_sigma <= sigma <= nchan/4,
    centre on the axis."""
    c, s, a = p[:, :k], p[:, k:2 * k], p[:, 2 * k:]
    return ((a > 0) & (s >= min_sigma) & (s <= nchan / 4) & (c >= 0) & (c <= nchan - 1)).all(axis=1) \
        & np.isfinite(p).all(axis=1)


# bounds of the slab parameters: ln A (A in units of the spectrum's maximum), ln tau,
# ln sigma (km/s); the centroid's are the fitted axis' velocity range (_slab_bounds)
_SLAB_BOUNDS = (np.array([-7.0, np.log(0.01), np.log(0.03), -np.inf]),
                np.array([7.0, np.log(60.0), np.log(3.0), np.inf]))


def nh3_slab_spectra(q, freq_hz=None):
    """Sum of constant-excitation NH3 (1,1) slabs, ``sum_i A_i (1 - exp(-tau_i phi_i))``.

    Parameters
    ----------
    q : ndarray, shape (m, 4k)
        Per component: ln A (brightness scale), ln tau (total optical depth of the 18
        components), ln sigma (km/s), centroid (km/s).
    freq_hz : ndarray, optional
        Frequency axis (default: the training axis, :func:`nh3_template_axis`).

    Returns
    -------
    ndarray, shape (m, nchan)

    Notes
    -----
    Over 1000 channels (5.7 MHz) ``J(T_ex) - J(T_bg)`` is constant to 2e-4, so each
    component of :func:`nh3_spectra` is exactly such a slab with
    ``A = J(T_ex) - J(T_bg)``; the (A, tau) pair replaces (T_kin, log N), which fixes
    the scale that the spectra normalised by their maximum no longer have.
    """
    return _slabs_and_jacobian(np.asarray(q, float), _nh3_freq(freq_hz), jacobian=False)[0]


def _nh3_freq(freq_hz):
    return nh3_template_axis()[0] if freq_hz is None else np.asarray(freq_hz, float)


def _slabs_and_jacobian(q, freq, jacobian=True):
    """Slab model (m, nchan) and its Jacobian (m, 4k, nchan), analytic (the profile's
    derivatives are those of its tabulated interpolant)."""
    model, jac = 0.0, []
    for i in range(q.shape[1] // 4):
        amp, tau, sig, v = np.exp(q[:, 4 * i]), np.exp(q[:, 4 * i + 1]), np.exp(q[:, 4 * i + 2]), q[:, 4 * i + 3]
        phi, d_v, d_lnw = _nh3_profile(freq, sig, v, slopes=jacobian)
        e = np.exp(-tau[:, None] * phi)
        comp = amp[:, None] * (1 - e)
        model = model + comp
        if jacobian:
            slope = (amp * tau)[:, None] * e
            jac += [comp, slope * phi, slope * d_lnw, slope * d_v]
    return model, (np.stack(jac, axis=1) if jacobian else None)


def _difference_noise(spectra):
    """Per-spectrum noise: :func:`mad_sigma` of the first differences / sqrt(2) (robust to
    lines wider than a few channels; blank channels left out); never zero."""
    noise = np.nan_to_num(mad_sigma(np.diff(spectra, axis=1), axis=1) / np.sqrt(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        top = np.nan_to_num(np.nanmax(np.abs(spectra), axis=1))
    return np.maximum(noise, 1e-6 * top + 1e-30)


def fit_nh3_slabs(spectra, starts, freq_hz=None, n_iter=25, chunk=256, weight=None, min_sigma=None):
    """Least-squares fits of NH3 (1,1) slab models, vectorised over spectra.

    Parameters
    ----------
    spectra : ndarray, shape (n, nchan)
        Spectra on ``freq_hz`` (any brightness scale).
    starts : sequence of ndarray, shape (n, 4k)
        Starting values (see :func:`nh3_slab_spectra`); every start is fitted and the
        best result kept.
    freq_hz : ndarray, shape (nchan,) or (n, nchan), optional
        Frequency axis, or one per spectrum (default: the training axis).
    n_iter : int
        Levenberg-Marquardt iterations (one damped Gauss-Newton trial per spectrum each,
        kept only when it lowers chi^2).
    chunk : int
        Spectra fitted at a time (memory: chunk x 4k x nchan floats).
    weight : ndarray, shape (n,) or (n, nchan), optional
        1 / noise per spectrum or per channel (0 leaves a channel out); default 1 /
        the noise from first differences.
    min_sigma : float, optional
        Smallest dispersion (km/s; default 0.03).

    Returns
    -------
    q : ndarray, shape (n, 4k)
        Best parameters.
    chi2 : ndarray, shape (n,)
        Their chi^2 with these weights.

    Examples
    --------
    >>> truth = np.array([[0.0, np.log(2.0), np.log(0.3), 0.4]])
    >>> y = nh3_slab_spectra(truth)
    >>> q, chi2 = fit_nh3_slabs(y + 0.001 * np.sin(np.arange(1000)), [truth + [0.2, -0.3, 0.2, 0.1]])
    >>> np.round(np.exp(q[0, :3]), 2).tolist(), round(float(q[0, 3]), 3)
    ([1.0, 2.0, 0.3], 0.4)
    """
    spectra = np.asarray(spectra, np.float64)
    freq = _nh3_freq(freq_hz)
    weight = 1.0 / _difference_noise(spectra) if weight is None else np.asarray(weight, np.float64)
    weight = np.broadcast_to(weight[:, None] if weight.ndim == 1 else weight, spectra.shape)
    best_q, best_chi = None, np.full(len(spectra), np.inf)
    for start in starts:
        q = np.empty(np.shape(start))
        chi = np.empty(len(spectra))
        for lo in range(0, len(spectra), chunk):
            rows = slice(lo, lo + chunk)
            q[rows], chi[rows] = _fit_slab_chunk(spectra[rows], weight[rows], np.asarray(start[rows], float),
                                                 freq[rows] if freq.ndim == 2 else freq, n_iter, min_sigma)
        if best_q is None:
            best_q = q
        better = chi < best_chi
        best_q[better], best_chi[better] = q[better], chi[better]
    return best_q, best_chi


def _fit_slab_chunk(y, w, q, freq, n_iter, min_sigma=None):
    """Levenberg-Marquardt of slab models; ``w`` (m, nchan) weights, ``freq`` (nchan,) or (m, nchan)."""
    k = q.shape[1] // 4
    lo, hi = _slab_bounds(freq, len(q), k)
    if min_sigma:
        lo[:, 2::4] = np.log(min_sigma)
    q = np.clip(np.nan_to_num(q), lo, hi)
    model, jac = _slabs_and_jacobian(q, freq)
    chi = (((y - model) * w) ** 2).sum(axis=1)
    lam = np.full(len(q), 1e-2)
    eye = np.eye(4 * k)
    for _ in range(n_iter):
        jw = jac * w[:, None, :]
        normal = jw @ jw.transpose(0, 2, 1)
        grad = (jw @ ((y - model) * w)[:, :, None])[:, :, 0]
        diag = np.einsum("nii->ni", normal)
        damped = normal + (lam[:, None] * diag + 1e-12)[:, :, None] * eye
        step = np.linalg.solve(damped, grad[:, :, None])[:, :, 0]
        trial = np.clip(q + np.nan_to_num(step), lo, hi)
        t_model, t_jac = _slabs_and_jacobian(trial, freq)
        t_chi = (((y - t_model) * w) ** 2).sum(axis=1)
        better = t_chi < chi
        q[better], model[better], chi[better], jac[better] = trial[better], t_model[better], t_chi[better], t_jac[better]
        lam = np.where(better, lam / 3.0, lam * 4.0)
    return q, chi


def _slab_bounds(freq, m, k):
    """Per-row bounds (m, 4k) of k slab components on the axis ``freq`` ((nchan,) or
    (m, nchan)): :data:`_SLAB_BOUNDS`, centroids within the axis' velocity range."""
    vel = np.atleast_2d(_nh3_velocity(freq))
    lo, hi = np.tile(_SLAB_BOUNDS[0], (m, k)), np.tile(_SLAB_BOUNDS[1], (m, k))
    lo[:, 3::4] = np.broadcast_to(vel.min(axis=1), (m,))[:, None]
    hi[:, 3::4] = np.broadcast_to(vel.max(axis=1), (m,))[:, None]
    return lo, hi


def _nh3_velocity(freq_hz):
    """Radio velocity (km/s) relative to the NH3 (1,1) rest frequency."""
    return C_KMS * (1 - np.asarray(freq_hz, float) / NH3_11_REST_HZ)


def predict_spectra(x, models, batch_size=2048, emission_prob=None):
    """Classify spectra and regress their components with the networks (training units).

    Parameters
    ----------
    x : ndarray, shape (n, nchan, 2)
        Network inputs (see :func:`make_features`).
    models : CloverModels
    batch_size : int
    emission_prob : float, optional
        Both regressors run on every spectrum whose ensemble probability of emission
        (one or two components) is at least this (default ``DATA_CHECK['emission_prob']``),
        so that the fits of :func:`check_against_data` have starting values for either
        number of components.

    Returns
    -------
    dict
        ``probs`` (n, 3) ensemble probabilities (one, noise, two); ``class`` (n,) codes
        (argmax of the summed member softmax vectors, as the original); ``prob`` (n,);
        ``reg2``, ``reg2_err`` (n, 6) and ``reg1``, ``reg1_err`` (n, 3) (NaN where not
        regressed): normalised centroid, dispersion (channels), peak / maximum.
    """
    emission_prob = DATA_CHECK["emission_prob"] if emission_prob is None else emission_prob
    probs = models.classify(x, batch_size)
    result = {"probs": probs, "class": probs.argmax(axis=1), "prob": probs.max(axis=1)}
    rows = np.flatnonzero(1.0 - probs[:, CLASS_CODES["noise"]] >= emission_prob)
    for kind in ("reg2", "reg1"):
        k = len(REG_TARGETS[kind])
        mu = np.full((len(x), k), np.nan, np.float32)
        err = np.full((len(x), k), np.nan, np.float32)
        if rows.size:
            mu[rows], err[rows] = models.regress(kind, x[rows], batch_size)
        result[kind], result[kind + "_err"] = mu, err
    return result


# ===========================================================================
# Science: the spectral domain of the networks (any channel width, any line width)
# ===========================================================================
@dataclass
class SpectralDomain:
    """How a cube's spectral axis is brought into the networks' trained domain.

    Attributes
    ----------
    line : str
        Line type.
    native_dv_kms : float
        The cube's channel width.
    network_dv_kms : float
        Channel width the networks see (equal to ``native_dv_kms`` when no resampling).
    line_sigma_kms : float
        Measured dispersion of the bright lines (NaN: not measured).
    n_measured : int
        Spectra the width was measured on.
    note : str
        What was done and why (logged, and written to the output headers).
    in_domain : bool
        False when the lines stay outside the trained widths after resampling.
    """

    line: str
    native_dv_kms: float
    network_dv_kms: float
    line_sigma_kms: float = float("nan")
    n_measured: int = 0
    note: str = ""
    in_domain: bool = True

    @property
    def factor(self):
        """Network channel width / native channel width (> 1: channels averaged)."""
        return self.network_dv_kms / self.native_dv_kms

    @property
    def resampled(self):
        """True when the networks see a resampled spectral axis."""
        return abs(self.factor - 1.0) > 1e-3

    def as_dict(self):
        """Plain values for the table metadata."""
        return {"line": self.line, "native_dv_kms": self.native_dv_kms, "network_dv_kms": self.network_dv_kms,
                "line_sigma_kms": self.line_sigma_kms, "n_measured": self.n_measured, "note": self.note,
                "in_domain": self.in_domain, "factor": self.factor}


GAUSS_SIGMA_CH = tuple(v / TEMPLATE_DV_KMS for v in GAUSS_RANGES["sigma_kms"])   # trained widths, channels
NH3_SIGMA_KMS = (0.08, 2.0)                                                       # trained NH3 widths, km/s
_WIDTH_SCALES = (1, 2, 4, 8, 16, 32, 64)


def channel_width(velocity):
    """Mean channel width (km/s, positive) of a linear velocity axis."""
    return abs(float(velocity[-1] - velocity[0])) / max(len(velocity) - 1, 1)


def measure_line_width(data, min_snr=5.0, max_pixels=20000):
    """Dispersion (channels) of a cube's bright lines, on spectra smoothed to detect them.

    Parameters
    ----------
    data : ndarray, shape (nchan, ...)
    min_snr : float
        A spectrum counts when its peak exceeds ``min_snr`` x its noise at one of the
        boxcar smoothing scales 1, 2, 4, ..., 64 channels (so wide, faint lines are
        measured too, not only lines above ``min_snr`` per channel).
    max_pixels : int
        Spectra examined at most (evenly spaced).

    Returns
    -------
    sigma : float
        Median over the detected spectra of the FWHM / 2.355 of the smoothed spectrum
        at its best scale, with the boxcar's variance ``(w^2 - 1) / 12`` removed (NaN:
        no spectrum detected).
    count : int

    Examples
    --------
    >>> chan = np.arange(400.0)
    >>> rng = np.random.default_rng(3)
    >>> cube = np.exp(-0.5 * ((chan - 200) / 30.0) ** 2)[:, None] * 0.5 + rng.normal(0, 0.3, (400, 50))
    >>> s, n = measure_line_width(cube)
    >>> bool(21 < s < 27), n > 40       # true sigma 30: biased low at a peak S/N of 1.7 per channel
    (True, True)

    The width is biased low for faint lines (noise lifts the peak, so the half-maximum
    level sits too high): about -20 % at a peak S/N of 1.7 per channel, -13 % at 3.3, -2 %
    at 17 (5 noise draws each).
    """
    flat = np.asarray(data, np.float64).reshape(data.shape[0], -1)
    cols = np.flatnonzero(np.isfinite(flat).all(axis=0))
    if cols.size > max_pixels:
        cols = cols[np.linspace(0, cols.size - 1, max_pixels).astype(int)]
    spec = flat[:, cols]
    if spec.shape[1] == 0 or spec.shape[0] < 16:
        return float("nan"), 0
    spec = spec - np.median(spec, axis=0)
    noise = _difference_noise(spec.T)
    best = np.zeros(spec.shape[1])
    width = np.full(spec.shape[1], np.nan)
    for w in _WIDTH_SCALES:
        if 4 * w > spec.shape[0]:
            break
        smooth = _boxcar(spec, w)
        peak = np.argmax(smooth, axis=0)
        snr = smooth[peak, np.arange(spec.shape[1])] / (noise / np.sqrt(w))
        better = snr > best
        sig = np.sqrt(np.maximum(_half_max_sigma(smooth, peak) ** 2 - (w * w - 1) / 12.0, 0.09))
        best, width = np.where(better, snr, best), np.where(better, sig, width)
    good = best > min_snr
    return (float(np.median(width[good])), int(good.sum())) if good.any() else (float("nan"), 0)


def _boxcar(spec, w):
    """Running mean over ``w`` channels along axis 0 (same length, edges shortened)."""
    if w <= 1:
        return spec
    c = np.cumsum(np.pad(spec, ((w // 2 + 1, w - w // 2 - 1), (0, 0)), mode="edge"), axis=0)
    return (c[w:] - c[:-w]) / w


def spectral_domain(data, velocity, line):
    """Decide the channel width at which the networks see a cube.

    Parameters
    ----------
    data : ndarray, shape (nchan, ny, nx)
    velocity : ndarray, shape (nchan,)
        km/s.
    line : {'gauss', 'nh3'}

    Returns
    -------
    SpectralDomain

    Notes
    -----
    NH3: the hyperfine pattern is fixed in km/s, so the networks must see the trained
    0.0724 km/s channels; a cube whose channels differ by more than 10 % is resampled to
    them.  Gaussian lines: the networks work in channels (trained dispersions 2.1-11
    channels); the bright lines' width is measured (:func:`measure_line_width`) and,
    when it lies outside 1.15x inside that range, the axis is resampled so that the lines
    span the geometric middle of the range (4.8 channels).  Resampling uses flux-
    conserving channel averages when the new channels are wider, linear interpolation
    when they are narrower (:func:`resample_spectra`); at most 4x narrower.
    """
    dv = channel_width(velocity)
    if line == "nh3":
        target = TEMPLATE_DV_KMS if abs(dv / TEMPLATE_DV_KMS - 1) > 0.1 else dv
        note = ("NH3 channels of %.4f km/s resampled to the trained %.4f km/s" % (dv, target)
                if target != dv else "NH3 channels of %.4f km/s (trained %.4f)" % (dv, TEMPLATE_DV_KMS))
        return SpectralDomain(line, dv, target, note=note)
    sigma, count = measure_line_width(data)
    lo, hi = GAUSS_SIGMA_CH
    if not np.isfinite(sigma):
        return SpectralDomain(line, dv, dv, note="no line bright enough to measure its width; "
                              "channels used as they are")
    if lo * 1.15 <= sigma <= hi / 1.15:
        return SpectralDomain(line, dv, dv, sigma * dv, count,
                              "lines of %.1f channels (trained %.1f-%.1f): channels used as they are"
                              % (sigma, lo, hi))
    factor = max(sigma / np.sqrt(lo * hi), 0.25)
    new_sigma = sigma / factor
    inside = lo <= new_sigma <= hi
    note = ("lines of %.1f channels (dispersion, median of %d spectra; trained %.1f-%.1f): channels "
            "of %.4g km/s %s to %.4g km/s for the networks (lines of %.1f channels)"
            % (sigma, count, lo, hi, dv, "averaged" if factor > 1 else "interpolated", dv * factor, new_sigma))
    return SpectralDomain(line, dv, float(dv * factor), float(sigma * dv), count, note, bool(inside))


def resample_spectra(data, velocity, new_dv):
    """Resample spectra (axis 0, velocity increasing) to channels of ``new_dv`` km/s.

    Parameters
    ----------
    data : ndarray, shape (nchan, ...)
        Finite values.
    velocity : ndarray, shape (nchan,)
        Increasing, linear.
    new_dv : float

    Returns
    -------
    data : ndarray, shape (m, ...), float32
    velocity : ndarray, shape (m,)
        New channel centres, covering the old band.

    Notes
    -----
    Wider channels: the exact average of the piecewise-constant spectrum over each new
    channel (the integral is conserved: sum(T dv) is unchanged).  Narrower channels:
    linear interpolation between channel centres.

    Examples
    --------
    >>> y = np.arange(8.0)[:, None]
    >>> out, v = resample_spectra(y, np.arange(8.0), 2.0)
    >>> out[:, 0].tolist(), v.tolist()
    ([0.5, 2.5, 4.5, 6.5], [0.5, 2.5, 4.5, 6.5])
    """
    data = np.asarray(data)
    n, dv = data.shape[0], channel_width(velocity)
    lo_edge = velocity[0] - dv / 2
    m = int(np.floor(n * dv / new_dv + 1e-9))
    centres = lo_edge + new_dv * (np.arange(m) + 0.5)
    flat = data.reshape(n, -1).astype(np.float64)
    if new_dv >= dv:
        cum = np.concatenate([np.zeros((1, flat.shape[1])), np.cumsum(flat, axis=0)])   # integral / dv
        t = np.clip(np.arange(m + 1) * new_dv / dv, 0, n)
        i = np.minimum(t.astype(int), n - 1)
        at = cum[i] + (t - i)[:, None] * flat[i]
        out = (at[1:] - at[:-1]) * (dv / new_dv)
    else:
        f = np.clip((centres - velocity[0]) / dv, 0, n - 1)
        i = np.minimum(f.astype(int), n - 2)
        w = (f - i)[:, None]
        out = flat[i] * (1 - w) + flat[i + 1] * w
    return out.reshape((m,) + data.shape[1:]).astype(np.float32), centres


def trim_blank_edges(data):
    """Slice of the channels between the first and last that are finite somewhere.

    Band edges blanked in every pixel (a common product of imagers and regridding) are
    cut before the networks see the spectra, instead of being filled with noise.
    """
    finite = np.array([np.isfinite(plane).any() for plane in data])
    idx = np.flatnonzero(finite)
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


# ===========================================================================
# Science: the networks' answer checked against the data (model selection by fits)
# ===========================================================================


def check_against_data(spectra, velocity, net, line, settings=None, freq_hz=None):
    """Fit zero, one and two components to every emission spectrum, seeded by the networks.

    Parameters
    ----------
    spectra : ndarray, shape (m, nchan)
        The spectra on the cube's own channels (NaN = no data), velocity increasing.
    velocity : ndarray, shape (nchan,)
        km/s, increasing, linear.
    net : dict
        Network output in physical units: ``probs`` (m, 3) (one, noise, two); ``one``
        (m, 3) centroid (km/s), dispersion (km/s), peak; ``two`` (m, 6) v1, v2, s1, s2,
        p1, p2 (NaN rows: not regressed).
    line : {'gauss', 'nh3'}
    settings : dict, optional
        Keys of :data:`DATA_CHECK`.
    freq_hz : ndarray, shape (nchan,), optional
        NH3: the frequency axis (default from ``velocity`` and the (1,1) rest frequency).

    Returns
    -------
    dict
        ``bic`` (m, 3) Bayesian information criteria of 0, 1, 2 components (inf: not
        fitted) and ``aic`` (m, 3) the same with Akaike's penalty (2 per parameter: what
        a free parameter gains on noise; for the neighbours' evidence); ``params`` {1: (m, 3), 2: (m, 6)} and ``errors`` (physical: v, sigma,
        peak; errors scaled by sqrt(reduced chi^2) when it exceeds 1); ``ok`` {1, 2}
        fits that converged inside the bounds; ``noise`` (m,) rms per channel from the
        residuals; ``nchan`` (m,) finite channels; ``fitted`` (m,) rows fitted;
        ``rchi2`` {0, 1, 2} reduced chi^2 per model; ``q``, ``tmax`` (NH3) the slab
        parameters :func:`model_spectra` draws the chosen models from.

    Notes
    -----
    ``BIC_k = chi^2_k c + p_k ln n`` with ``p_k`` = 3 (Gaussian) or 4 (NH3 slab: A, tau,
    sigma, v) per component, ``n`` the finite channels, ``chi^2`` with the rms of the
    line-free residuals, and ``c`` 1, or the cube's median ratio of first-difference to
    residual noise variance when it is below 0.7 (correlated channels, e.g. Hanning
    smoothing, carry less independent evidence; a warning says so).  Fits: several
    starts (the networks' values, the moment of the spectrum, the one-component fit split
    in two), Levenberg-Marquardt, best chi^2 kept; dispersions >= ``min_sigma_channels``
    channels, peaks > 0.
    """
    cfg = dict(DATA_CHECK, **(settings or {}))
    y = np.asarray(spectra, np.float64)
    m = len(y)
    probs = np.asarray(net["probs"], float)
    fitted = (1.0 - probs[:, CLASS_CODES["noise"]]) >= cfg["emission_prob"]
    fitted &= np.isfinite(y).sum(axis=1) >= 16
    out = {"bic": np.full((m, 3), np.inf), "params": {1: np.full((m, 3), np.nan), 2: np.full((m, 6), np.nan)},
           "errors": {1: np.full((m, 3), np.nan), 2: np.full((m, 6), np.nan)},
           "ok": {1: np.zeros(m, bool), 2: np.zeros(m, bool)}, "snr": {1: np.zeros((m, 1)), 2: np.zeros((m, 2))},
           "noise": _difference_noise(y),
           "nchan": np.isfinite(y).sum(axis=1), "fitted": fitted, "line": line,
           "rchi2": {k: np.full(m, np.nan) for k in (0, 1, 2)}, "q": {1: np.full((m, 4), np.nan),
                                                                       2: np.full((m, 8), np.nan)},
           "tmax": np.ones(m)}
    finite = np.isfinite(y)
    out["bic"][:, 0] = np.where(finite.any(axis=1), np.nansum(y * y, axis=1) / out["noise"] ** 2, np.inf)
    out["aic"] = out["bic"].copy()
    with np.errstate(all="ignore"):
        out["rchi2"][0] = out["bic"][:, 0] / np.maximum(out["nchan"], 1)
    rows = np.flatnonzero(fitted)
    if not rows.size:
        return out
    fit = _gauss_fit_models if line == "gauss" else _nh3_fit_models
    res = fit(y[rows], velocity, {k: np.asarray(net[k], float)[rows] for k in ("one", "two")}, cfg, freq_hz)
    models = res.pop("models")                       # {k: (rows, nchan) model spectra}
    best = np.where(res["ok"][2][:, None], models[2], np.where(res["ok"][1][:, None], models[1], 0.0))
    noise = _residual_noise(y[rows], best, out["noise"][rows])
    corr = _channel_correlation(out["noise"][rows], noise)
    n = np.maximum(out["nchan"][rows], 1)
    per = 3 if line == "gauss" else 4
    out["bic"][rows, 0] = corr * np.nansum(y[rows] ** 2, axis=1) / noise ** 2
    out["aic"][rows, 0] = out["bic"][rows, 0]
    for k in (1, 2):
        chi = np.nansum((y[rows] - models[k]) ** 2, axis=1) / noise ** 2
        out["bic"][rows, k] = np.where(res["ok"][k], corr * chi + per * k * np.log(n), np.inf)
        out["aic"][rows, k] = np.where(res["ok"][k], corr * chi + 2 * per * k, np.inf)
        rchi = _window_rchi2(y[rows], models[k], noise, per * k)
        out["rchi2"][k][rows] = rchi
        scale = np.sqrt(np.maximum(np.nan_to_num(rchi, nan=1.0), 1.0)) * noise / res["noise_used"]
        out["params"][k][rows] = res["params"][k]
        out["errors"][k][rows] = res["errors"][k] * scale[:, None]
        out["ok"][k][rows] = res["ok"][k]
        out["snr"][k][rows] = res["energy"][k] / noise[:, None]
    out["noise"][rows] = noise
    out["rchi2"][0][rows] = out["bic"][rows, 0] / n
    state = res.get("state", {})
    if "q" in state:                       # NH3: slab parameters to redraw the models
        for k in (1, 2):
            out["q"][k][rows] = state["q"][k]
        out["tmax"][rows] = state["tmax"]
    return out


def _residual_noise(y, model, fallback, min_free=20):
    """rms per channel (:func:`mad_sigma`) of the residuals in the line-free channels (model
    below 1 % of its peak), or of all residuals when fewer than ``min_free`` are line-free."""
    resid = y - model
    free = np.abs(model) < 0.01 * np.abs(model).max(axis=1, keepdims=True) + 1e-30
    free &= np.isfinite(resid)
    use = np.where((free.sum(axis=1) >= min_free)[:, None], free, np.isfinite(resid))
    s_res = mad_sigma(np.where(use, resid, np.nan), axis=1)
    return np.where(np.isfinite(s_res) & (s_res > 0), s_res, fallback)


def _channel_correlation(s_diff, s_res, limit=0.7):
    """chi^2 scale for correlated channels: the cube's median (s_diff / s_res)^2 when it is
    below ``limit`` (first differences see less noise when neighbouring channels are
    correlated, e.g. Hanning smoothing: 0.5), else 1 (white noise within the scatter of
    real data)."""
    ratio = float(np.median((s_diff / s_res) ** 2)) if len(s_res) else 1.0
    if ratio >= limit:
        return 1.0
    log.warning("neighbouring channels are correlated (first-difference / residual noise variance "
                "%.2f; Hanning-smoothed cube?): the fits' chi^2 evidence is scaled by %.2f", ratio, ratio)
    return max(ratio, 0.25)


def _window_rchi2(y, model, noise, npar):
    """Reduced chi^2 over the channels where ``model`` exceeds 1e-3 of its peak (+-3 channels)."""
    peak = np.abs(model).max(axis=1, keepdims=True)
    near = np.abs(model) > 1e-3 * np.maximum(peak, 1e-30)
    for shift in (1, 2, 3):
        near[:, shift:] |= near[:, :-shift].copy()
        near[:, :-shift] |= near[:, shift:].copy()
    near &= np.isfinite(y)
    cnt = near.sum(axis=1)
    chi = np.where(near, (np.nan_to_num(y) - model) ** 2, 0.0).sum(axis=1) / noise ** 2
    return np.where(cnt > npar, chi / np.maximum(cnt - npar, 1), np.nan)


def _gauss_fit_models(y, velocity, net, cfg, freq_hz=None):
    """One- and two-Gaussian fits of spectra ``y`` (m, n) on their own channels."""
    v0, dv = velocity[0], channel_width(velocity)
    noise = _difference_noise(y)
    floor = cfg["min_sigma_channels"]
    to_ch = lambda p, k: np.column_stack([(p[:, :k] - v0) / dv, p[:, k:2 * k] / dv, p[:, 2 * k:]])  # noqa: E731
    starts1 = [to_ch(net["one"], 1), _moment_start(y)]
    p1, e1, ok1 = _best_gauss_fit(y, starts1, noise, floor)
    starts2 = [to_ch(net["two"], 2)] + _split_starts(np.where(ok1[:, None], p1, starts1[1]))
    p2, e2, ok2 = _best_gauss_fit(y, starts2, noise, floor)
    back = lambda p, k: np.column_stack([v0 + p[:, :k] * dv, p[:, k:2 * k] * dv, p[:, 2 * k:]])  # noqa: E731
    models = {k: np.where(ok[:, None], _channel_gaussians(p, y.shape[1]), 0.0) for k, p, ok in ((1, p1, ok1), (2, p2, ok2))}
    scale_e = lambda e, k: np.column_stack([e[:, :k] * dv, e[:, k:2 * k] * dv, e[:, 2 * k:]])  # noqa: E731
    # matched-filter S/N of each component: sqrt(sum of its model squared) / noise
    energy = {k: np.column_stack([np.sqrt(2 * np.sqrt(np.pi) * np.abs(p[:, k + i])) * np.abs(p[:, 2 * k + i])
                                  for i in range(k)]) for k, p in ((1, p1), (2, p2))}
    return {"params": {1: back(p1, 1), 2: back(p2, 2)}, "errors": {1: scale_e(e1, 1), 2: scale_e(e2, 2)},
            "ok": {1: ok1, 2: ok2}, "models": models, "noise_used": noise, "energy": energy}


def _channel_gaussians(p, nchan):
    """Gaussians (centres, sigmas, peaks in channel units, (m, 3k)) on channels 0..nchan-1."""
    k = p.shape[1] // 3
    p = np.nan_to_num(np.asarray(p, float))
    sig = np.where(p[:, k:2 * k] > 0, p[:, k:2 * k], 1.0)
    return gaussian_profiles(np.arange(nchan, dtype=float), p[:, 2 * k:], p[:, :k], sig).astype(np.float64)


def _best_gauss_fit(y, starts, noise, floor):
    """Best of several least-squares Gaussian fits per row (chi^2 over the whole spectrum:
    each start is fitted in its own channel window, so window chi^2 values do not compare)."""
    best = None
    for start in starts:
        good = np.isfinite(start).all(axis=1)
        start = np.where(good[:, None], start, starts[-1])
        start = _clip_start(start, y.shape[1], floor)
        p, e, ok = refine_gaussians(y, start, noise=noise, min_sigma=floor)
        model = _channel_gaussians(p, y.shape[1])
        chi = np.where(ok, np.nansum((y - model) ** 2, axis=1) / noise ** 2, np.inf)
        if best is None:
            best = [p, e, ok, chi]
            continue
        better = chi < best[3]
        for i, new in enumerate((p, e, ok, chi)):
            best[i] = np.where(better[:, None] if new.ndim == 2 else better, new, best[i])
    return best[0], best[1], best[2]


def _clip_start(p, nchan, floor):
    """Starting values inside the allowed region of :func:`refine_gaussians`."""
    k = p.shape[1] // 3
    p = np.nan_to_num(np.array(p, float))
    p[:, :k] = np.clip(p[:, :k], 1, nchan - 2)
    p[:, k:2 * k] = np.clip(p[:, k:2 * k], floor * 1.05, nchan / 5)
    p[:, 2 * k:] = np.maximum(p[:, 2 * k:], 1e-6)
    return p


def _moment_start(y, smooth=5):
    """One-Gaussian start from each spectrum's smoothed peak: channel, half-max width, peak."""
    s = _boxcar(np.nan_to_num(y).T, smooth)
    peak = np.argmax(s, axis=0)
    width = np.clip(_half_max_sigma(s, peak), 1.0, y.shape[1] / 6)
    return np.column_stack([peak.astype(float), width, np.maximum(s[peak, np.arange(len(peak))], 1e-6)])


def _split_starts(p1):
    """Two-component starts from a one-component fit: split at +-0.6 sigma and +-1.5 sigma."""
    c, s, a = p1[:, 0], p1[:, 1], p1[:, 2]
    return [np.column_stack([c - f * s, c + f * s, s * w, s * w, a * 0.8, a * r])
            for f, w, r in ((0.6, 0.7, 0.6), (1.5, 0.8, 0.4))]


def _nh3_fit_models(y, velocity, net, cfg, freq_hz=None):
    """One- and two-component NH3 (1,1) slab fits of spectra ``y`` (m, n) on their own channels."""
    freq = NH3_11_REST_HZ * (1 - velocity / C_KMS) if freq_hz is None else np.asarray(freq_hz, float)
    tmax = _safe_max(np.nan_to_num(y))
    yn = y / tmax[:, None]
    noise = _difference_noise(yn)
    weight = np.where(np.isfinite(yn), 1.0 / noise[:, None], 0.0)
    yn = np.nan_to_num(yn)
    floor = np.log(max(cfg["min_sigma_channels"] * channel_width(velocity), 0.03))
    starts1 = _slab_starts_physical(net["one"], 1, freq, tmax)
    starts2 = _slab_starts_physical(net["two"], 2, freq, tmax)
    near = _line_channels(np.concatenate([starts1[0], starts2[0]], axis=1), velocity) & (weight > 0)
    q1, q2 = np.empty((len(y), 4)), np.empty((len(y), 8))
    order = np.argsort(near.sum(axis=1), kind="stable")          # chunks of similar channel counts
    for lo in range(0, len(y), 256):
        rows = order[lo:lo + 256]
        width = max(int(near[rows].sum(axis=1).max(initial=0)), 16)
        idx = np.sort(np.argsort(~near[rows], axis=1, kind="stable")[:, :width], axis=1)
        w = np.where(np.take_along_axis(near[rows], idx, axis=1), np.take_along_axis(weight[rows], idx, axis=1), 0.0)
        yy, ff = np.take_along_axis(yn[rows], idx, axis=1), freq[idx]
        q1[rows] = fit_nh3_slabs(yy, [s[rows] for s in starts1], ff, weight=w, min_sigma=np.exp(floor))[0]
        nested = []
        for side in (1.0, -1.0):
            second = q1[rows].copy()
            second[:, 0] -= np.log(3.0)
            second[:, 3] += side * 1.5 * np.exp(second[:, 2])
            nested.append(np.concatenate([q1[rows], second], axis=1))
        q2[rows] = fit_nh3_slabs(yy, [s[rows] for s in starts2] + nested, ff, weight=w, min_sigma=np.exp(floor))[0]
    out = {"params": {}, "errors": {}, "ok": {}, "models": {}, "noise_used": noise * tmax,
           "state": {"q": {}, "tmax": tmax, "freq": freq}}
    for k, q in ((1, q1), (2, q2)):
        q = _sort_slabs(q)
        model, jac = _slabs_and_jacobian(q, freq)
        lo, hi = _slab_bounds(freq, len(q), k)
        # converged with the centroids inside the axis (the dispersion may sit on the floor
        # of min_sigma_channels or the 3 km/s cap, A and tau on their bounds: the optically
        # thin limit is degenerate; such components are judged by their evidence)
        ok = np.isfinite(q).all(axis=1)
        ok &= ((q[:, 3::4] > lo[:, 3::4] + 1e-6) & (q[:, 3::4] < hi[:, 3::4] - 1e-6)).all(axis=1)
        params, errors = _slab_physical(q, jac, weight, k)
        out["params"][k] = np.column_stack([params[:, :2 * k], params[:, 2 * k:] * tmax[:, None]])
        out["errors"][k] = np.column_stack([errors[:, :2 * k], errors[:, 2 * k:] * tmax[:, None]])
        out["ok"][k] = ok
        out["models"][k] = np.where(ok[:, None], model * tmax[:, None], 0.0)
        out["state"]["q"][k] = q
        comps = jac[:, 0::4]                      # d model / d ln A_i = component i itself
        out.setdefault("energy", {})[k] = np.sqrt((np.where(weight[:, None] > 0, comps, 0.0) ** 2).sum(axis=2)) * tmax[:, None]
    return out


def _line_channels(q, vel, span=5.0, margin_kms=1.0):
    """Mask (m, nchan) of the channels (velocities ``vel``, km/s) within ``span``
    dispersions + ``margin_kms`` of any hyperfine line of the slab components in ``q``
    (both models vanish elsewhere, so the fits leave those channels out)."""
    c = _nh3_constants()
    centre = (q[:, 3::4, None] + c["voff"][None, None, :]).reshape(len(q), -1)       # km/s
    reach = np.repeat(span * np.exp(q[:, 2::4]) + margin_kms, c["voff"].size, axis=1)
    near = np.zeros((len(q), len(vel)), bool)
    for j in range(centre.shape[1]):
        near |= np.abs(vel[None, :] - centre[:, j:j + 1]) <= reach[:, j:j + 1]
    return near


def _sort_slabs(q):
    """Slab components sorted by centroid."""
    order = np.argsort(q[:, 3::4], axis=1)
    idx = np.concatenate([(order * 4 + j)[:, :, None] for j in range(4)], axis=2).reshape(len(q), -1)
    return np.take_along_axis(q, idx, axis=1)


def _slab_physical(q, jac, weight, k):
    """Centroid, dispersion and peak (units of the fitted spectrum) of each slab component
    and their 1-sigma errors from the curvature matrix ``J^T W J``."""
    jw = jac * weight[:, None, :]
    with np.errstate(all="ignore"):
        cov = np.linalg.pinv(jw @ jw.transpose(0, 2, 1))
    v, sig, peak = np.empty((len(q), k)), np.empty((len(q), k)), np.empty((len(q), k))
    ev, es, ep = np.empty_like(v), np.empty_like(v), np.empty_like(v)
    for i in range(k):
        j = 4 * i
        v[:, i], sig[:, i] = q[:, j + 3], np.exp(q[:, j + 2])
        ev[:, i] = np.sqrt(np.abs(cov[:, j + 3, j + 3]))
        es[:, i] = sig[:, i] * np.sqrt(np.abs(cov[:, j + 2, j + 2]))
        comp = jac[:, j]                              # d model / d ln A = the component itself
        top = np.argmax(comp, axis=1)
        peak[:, i] = comp[np.arange(len(q)), top]
        grad = jac[np.arange(len(q)), j:j + 4, top]   # d peak / d (ln A, ln tau, ln sigma, v) at the peak channel
        sub = cov[:, j:j + 4, j:j + 4]
        ep[:, i] = np.sqrt(np.abs(np.einsum("ni,nij,nj->n", grad, sub, grad)))
    return np.column_stack([v, sig, peak]), np.column_stack([ev, es, ep])


def _slab_starts_physical(p, k, freq, tmax, taus=(0.3, 3.0)):
    """Slab starting values from physical (v, sigma, peak) network output."""
    p = np.nan_to_num(np.asarray(p, float))
    v = p[:, :k]
    sig = np.clip(p[:, k:2 * k], 0.05, 2.5)
    peak = np.clip(p[:, 2 * k:] / tmax[:, None], 0.02, 2.0)
    starts = []
    for tau in taus:
        cols = []
        for i in range(k):
            pmax = nh3_profile(freq, sig[:, i], v[:, i]).max(axis=1)
            amp = peak[:, i] / -np.expm1(-tau * np.maximum(pmax, 1e-3))
            cols.append(np.column_stack([np.log(amp), np.full(len(p), np.log(tau)), np.log(sig[:, i]), v[:, i]]))
        starts.append(np.concatenate(cols, axis=1))
    return starts


def select_components(check, probs, settings=None, neighbour_evidence=None, resampled=False):
    """Number of components per spectrum from the fits' BIC and the ensemble's probabilities.

    Parameters
    ----------
    check : dict
        :func:`check_against_data` output.
    probs : ndarray, shape (m, 3)
        Ensemble probabilities (one, noise, two).
    settings : dict, optional
        Keys of :data:`DATA_CHECK`.
    neighbour_evidence : ndarray, shape (m, 3), optional
        Beam-weighted sum of the neighbours' AIC differences (:func:`neighbour_evidence`).
    resampled : bool
        The networks saw a resampled axis: their probabilities count half.

    Returns
    -------
    ncomp : ndarray of int, shape (m,)
    prob : ndarray, shape (m,)
        Probability of the chosen number of components,
        ``softmax_k[(-BIC_k / 2 + w ln P_k) / T]``.
    lowered : ndarray of bool, shape (m,)
        Spectra whose best-scoring model had a component the data do not support
        (matched-filter S/N, ``sqrt(sum model_i^2) / rms``, below ``min_snr``, or a fit
        that did not converge): that component is dropped and the class lowered.

    Notes
    -----
    ``ln P_k`` is floored at ``prior_floor`` so that the data can always overrule the
    networks.  Spectra not fitted keep the networks' decision.
    """
    cfg = dict(DATA_CHECK, **(settings or {}))
    probs = np.asarray(probs, float)
    prior = np.maximum(np.log(probs[:, [1, 0, 2]] + 1e-12), cfg["prior_floor"])
    w = cfg["network_weight"] * (0.5 if resampled else 1.0)
    bic = check["bic"] - np.min(check["bic"], axis=1, keepdims=True)
    if neighbour_evidence is not None:
        bic = bic + neighbour_evidence
    score = (-0.5 * np.where(np.isfinite(bic), bic, 1e6) + w * prior) / cfg["temperature"]
    supported = np.ones(score.shape, bool)
    for k in (1, 2):
        supported[:, k] = check["ok"][k] & (np.nan_to_num(check["snr"][k]) >= cfg["min_snr"]).all(axis=1)
    best_any = np.argmax(score, axis=1)
    score = np.where(supported, score, -np.inf)
    soft = np.exp(score - score.max(axis=1, keepdims=True))
    soft /= soft.sum(axis=1, keepdims=True)
    ncomp = np.argmax(soft, axis=1)
    fitted = check["fitted"]
    net = np.choose(probs.argmax(axis=1), [1, 0, 2])
    prob = np.where(fitted, soft[np.arange(len(ncomp)), ncomp], probs.max(axis=1))
    lowered = fitted & (ncomp < best_any)
    return np.where(fitted, ncomp, net), prob, lowered


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def neighbour_evidence(aic_map, valid, beam_pixels):
    """Beam-weighted sum of the 3x3 neighbours' information-criterion differences, per pixel.

    Parameters
    ----------
    aic_map : ndarray, shape (ny, nx, 3)
        AIC of 0, 1, 2 components per pixel (inf: not fitted): each neighbour is a fit of
        its own, and a parameter it adds costs what it gains on noise (2), so neighbours
        that only repeat noise add evidence against more components; the central
        spectrum's BIC (with its stronger ln n penalty) is added by the caller.
    valid : ndarray of bool, shape (ny, nx)
    beam_pixels : float or None
        Beam area in pixels, ``pi / (4 ln 2) BMAJ BMIN / pixel^2`` (None: pixels
        independent).

    Returns
    -------
    ndarray, shape (ny, nx, 3)
        ``lambda sum_nb (AIC_k - min_k AIC)`` with ``lambda = (n_ind - 1) / n_nb``,
        ``n_nb`` the valid neighbours and ``n_ind = clip((1 + n_nb) / beam_pixels, 1,
        1 + n_nb)`` the independent samples in the 3x3 window: with a beam of 9 pixels
        or more the neighbours add nothing (their spectra repeat the central one's
        information); with pixels that sample the sky independently each neighbour
        counts once.  Each term is clipped to 50 so a bright neighbour cannot decide alone.
    """
    ny, nx, _ = aic_map.shape
    rel = aic_map - np.min(aic_map, axis=2, keepdims=True)
    rel = np.where(np.isfinite(rel), np.minimum(rel, 50.0), 50.0)
    rel = np.where(valid[:, :, None], rel, 0.0)
    pad = np.pad(rel, ((1, 1), (1, 1), (0, 0)))
    cnt = np.pad(valid.astype(float), 1)
    total, count = np.zeros_like(rel), np.zeros((ny, nx))
    for dy, dx in _NEIGHBOURS:
        total += pad[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
        count += cnt[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
    n_ind = np.clip((1 + count) / (beam_pixels or 1.0), 1.0, 1 + count)
    lam = np.where(count > 0, (n_ind - 1) / np.maximum(count, 1), 0.0)
    return lam[:, :, None] * total


def _quiet_wcs(header):
    """astropy WCS of ``header`` without FITSFixedWarning chatter (OBSGEO, DATE fixes)."""
    from astropy.wcs import WCS, FITSFixedWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def beam_pixels(header):
    """Beam area in pixels from BMAJ/BMIN (deg) and the pixel size, or None."""
    try:
        bmaj, bmin = float(header["BMAJ"]), float(header["BMIN"])
        from astropy.wcs.utils import proj_plane_pixel_scales
        scale = proj_plane_pixel_scales(_quiet_wcs(header).celestial)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if len(scale) < 2 or not np.all(np.isfinite(scale)) or bmaj <= 0 or bmin <= 0:
        return None
    return float(np.pi / (4 * np.log(2)) * bmaj * bmin / (scale[0] * scale[1]))


def assemble_components(check, ncomp):
    """Final components of every spectrum after :func:`select_components`.

    Parameters
    ----------
    check : dict
        :func:`check_against_data` output.
    ncomp : ndarray of int, shape (m,)

    Returns
    -------
    comp, comp_err : ndarray, shape (m, 2, 3)
        (centroid km/s, dispersion km/s, peak) of components 1 and 2 sorted by
        centroid; NaN for absent components.
    rchi2 : ndarray, shape (m,)
        Reduced chi^2 of the chosen model over the channels of its lines (over the
        whole spectrum for no component).
    """
    m = len(ncomp)
    comp, err = np.full((m, 2, 3), np.nan), np.full((m, 2, 3), np.nan)
    rchi2 = np.array(check["rchi2"][0], float)
    for k in (1, 2):
        sel = np.flatnonzero((ncomp == k) & check["fitted"])
        if not sel.size:
            continue
        p, e = check["params"][k][sel], check["errors"][k][sel]
        for q in range(3):
            comp[sel, :k, q], err[sel, :k, q] = p[:, q * k:(q + 1) * k], e[:, q * k:(q + 1) * k]
        rchi2[sel] = check["rchi2"][k][sel]
    return comp, err, rchi2


def model_spectra(check, ncomp, comp, velocity, line, freq_hz=None):
    """Model spectra (m, nchan) float32 of the chosen components on ``velocity``.

    Gaussian lines from ``comp`` (:func:`assemble_components`); NH3 from the fitted slab
    parameters kept in ``check`` (optical depth included), on ``freq_hz`` (default from
    ``velocity`` and the (1,1) rest frequency).
    """
    m = len(ncomp)
    model = np.zeros((m, len(velocity)), np.float32)
    if line == "gauss":
        rows = np.flatnonzero(ncomp > 0)
        if rows.size:
            model[rows] = gaussian_model_spectra(comp[rows], velocity)
        return model
    freq = NH3_11_REST_HZ * (1 - np.asarray(velocity, float) / C_KMS) if freq_hz is None else freq_hz
    for k in (1, 2):
        rows = np.flatnonzero((ncomp == k) & check["fitted"])
        if rows.size:
            model[rows] = nh3_slab_spectra(check["q"][k][rows], freq) * check["tmax"][rows, None]
    return model


def network_components(net, ncomp):
    """Components (m, 2, 3) and errors from the networks alone (``refine=False``)."""
    m = len(ncomp)
    comp, err = np.full((m, 2, 3), np.nan), np.full((m, 2, 3), np.nan)
    for k, key in ((1, "one"), (2, "two")):
        sel = ncomp == k
        p, e = net[key][sel], net[key + "_err"][sel]
        for q in range(3):
            comp[sel, :k, q], err[sel, :k, q] = p[:, q * k:(q + 1) * k], e[:, q * k:(q + 1) * k]
    return comp, err


def gaussian_model_spectra(comp, velocity):
    """Sum of the Gaussian components ``comp`` (m, 2, 3) on ``velocity`` (km/s)."""
    amp = np.nan_to_num(comp[:, :, 2])
    sig = np.where(np.isfinite(comp[:, :, 1]) & (comp[:, :, 1] > 0), comp[:, :, 1], 1.0)
    return gaussian_profiles(np.asarray(velocity, float), amp, np.nan_to_num(comp[:, :, 0]), sig)


def dominant_component(comp, comp_err):
    """The brighter component of each spectrum (the only one of one-component spectra).

    Returns
    -------
    dom, dom_err : ndarray, shape (m, 3)
        (centroid, dispersion, peak); NaN where there is no component.
    """
    peak = np.where(np.isfinite(comp[:, :, 2]), comp[:, :, 2], -np.inf)
    j = np.argmax(peak, axis=1)
    rows = np.arange(len(comp))
    return comp[rows, j], comp_err[rows, j]


# ===========================================================================
# Science: NH3 beyond CLOVER - joint (1,1) + (2,2) fits (T_kin, T_ex, N, tau)
# ===========================================================================
# pyspeckit's cold_ammonia model (pyspeckit 1.0.4, fortho = 0; Rosolowsky et al. 2008,
# Friesen et al. 2017) on the two lines' own frequency axes; per component, in this order:
# tkin (K), tex (K), log10 N(NH3) (cm^-2), sigma (km/s), v (km/s, radio velocity relative
# to each line's rest frequency, pyspeckit's xoff_v).  Checked against pyspeckit's model
# (1e-10 of the peak) and its fits (tests/test_clover_realdata.py).
_NH3_JOINT_LINES = ("oneone", "twotwo")
_NH3_JOINT = {}
NH3_TKIN_BOUNDS = (2.8, 80.0)      # K
NH3_LOGN_BOUNDS = (11.0, 17.0)     # log10 cm^-2
NH3_MIN_SIGMA_KMS = 0.02
NH3_EDM_TOL = 1e-3                 # converged: the Gauss-Newton step would lower chi^2 by less


def _joint_constants():
    """Constants of the (1,1) and (2,2) lines from pyspeckit's tables (cached)."""
    if not _NH3_JOINT:
        try:
            from pyspeckit.spectrum.models import ammonia_constants as c
        except ImportError as exc:  # pragma: no cover - pyspeckit is in the lock file
            raise ToolError("NH3 (2,2) fits need pyspeckit (pip install pyspeckit): %s" % exc)
        jp = np.asarray(c.Jpara, float)
        lines = []
        for name in _NH3_JOINT_LINES:
            f0, wts = c.freq_dict[name], np.asarray(c.tau_wts_dict[name], float)
            nu = (1 - np.asarray(c.voff_lines_dict[name], float) / c.ckms) * f0
            strength = c.ccms ** 2 * c.aval_dict[name] / (8 * np.pi * f0 ** 2) * c.ckms / (f0 * np.sqrt(2 * np.pi))
            lines.append(dict(f0=f0, dnu=nu - f0, nu=nu, wts=wts / wts.sum(),
                              level=c.line_name_indices[name], strength=strength))
        _NH3_JOINT.update(lines=lines, g=2 * jp + 1, hk=c.h / c.kb, ckms=c.ckms, tbg=c.TCMB,
                      energy=c.h * (c.Brot * jp * (jp + 1) + (c.Crot - c.Brot) * jp ** 2) / c.kb)
    return _NH3_JOINT


def _joint_trot(tkin):
    r"""Rotational temperature and :math:`dT_{rot}/dT_K` (Swift et al. 2005, eq. A6):
    :math:`T_{rot} = T_K / D`, :math:`D = 1 + (T_K/41.18)\ln(1 + 0.6 e^{-15.7/T_K})`."""
    e = 0.6 * np.exp(-15.7 / tkin)
    d = 1 + tkin / 41.18 * np.log1p(e)
    dd = np.log1p(e) / 41.18 + e * 15.7 / (41.18 * tkin * (1 + e))
    return tkin / d, (d - tkin * dd) / d ** 2


def _nh3_line_tau(line, tkin, tex, logn, sigma):
    r"""Total optical depth of one line and :math:`\partial\ln\tau/\partial T_K`,
    :math:`\partial\ln\tau/\partial T_{ex}` (arrays (m,)).

    :math:`\tau = N \frac{Z_J}{Q}\frac{c^2 A}{8\pi\nu_0^2}\tanh\frac{h\nu_0}{2kT_{ex}}
    \frac{c}{\sigma\nu_0\sqrt{2\pi}}`, :math:`Z_J = (2J+1)e^{-E_J/kT_{rot}}` over the para
    levels (J = 1, 2, 4, 5, ...), :math:`Q = \sum Z_J`; hence
    :math:`\partial\ln\tau/\partial T_{rot} = (E_J - \langle E\rangle)/kT_{rot}^2` and, with
    :math:`y = h\nu_0/2kT_{ex}`, :math:`\partial\ln\tau/\partial T_{ex} = -2y/(T_{ex}\sinh 2y)`.
    """
    c = _joint_constants()
    trot, slope = _joint_trot(tkin)
    z = c["g"] * np.exp(-c["energy"] / trot[:, None])
    q = z.sum(axis=1)
    mean_e = (z * c["energy"]).sum(axis=1) / q
    y = 0.5 * c["hk"] * line["f0"] / tex
    tau = 10.0 ** logn * z[:, line["level"]] / q * line["strength"] * np.tanh(y) / sigma
    return tau, (c["energy"][line["level"]] - mean_e) / trot ** 2 * slope, -2 * y / (np.sinh(2 * y) * tex)


def _hyperfine_sums(line, freq, sigma, v, slopes=True):
    r"""Hyperfine sums :math:`S_p = \sum_i w_i g_i x_i^p` (p = 0, 1, 2), arrays (m, n).

    :math:`x_i = [\nu - \nu_i(1 - v/c)] / (\nu_i\sigma/c)` and :math:`g_i = e^{-x_i^2/2}`:
    the optical-depth profile is :math:`\tau(\nu) = \tau S_0` (weights sum to 1), and
    :math:`\partial S_0/\partial v = -S_1/\sigma`, :math:`\partial S_0/\partial\sigma = S_2/\sigma`.
    """
    ck = _joint_constants()["ckms"]
    df = freq - line["f0"]
    sums = [np.zeros((len(sigma), freq.shape[1])) for _ in range(3)]
    for dnu, nu, wt in zip(line["dnu"], line["nu"], line["wts"]):
        x = (df - (dnu - nu * v / ck)[:, None]) / (nu * sigma / ck)[:, None]
        g = x * x
        g *= -0.5
        np.exp(np.maximum(g, -700.0, out=g), out=g)   # no underflow: denormals are slow
        g *= wt
        for s in sums[:3 if slopes else 1]:
            s += g
            g *= x
    return sums


def _joint_model(p, freqs, jacobian=False):
    r"""Joint model (m, n11 + n22) and, optionally, its Jacobian (m, 5k, n11 + n22) with
    respect to the physical parameters.

    Per component and line, :math:`T = \Delta J(1 - e^{-\tau S_0})`,
    :math:`\Delta J = J(T_{ex}) - J(T_{bg})`, :math:`J(T) = T_0/(e^{T_0/T} - 1)`,
    :math:`T_0 = h\nu/k` at each channel; :math:`dT = \Delta J e^{-\tau S_0}\,d(\tau S_0)
    + (1 - e^{-\tau S_0})\,dJ(T_{ex})` with :math:`dJ/dT_{ex} = [a / 2\sinh(a/2)]^2`,
    :math:`a = T_0/T_{ex}`.  Components add in brightness (pyspeckit's ``n_ammonia``).
    """
    c = _joint_constants()
    m, k = p.shape[0], p.shape[1] // 5
    models, jacs = [], []
    for line, freq in zip(c["lines"], freqs):
        t0 = c["hk"] * freq
        jbg = t0 / np.expm1(t0 / c["tbg"])
        model = np.zeros((m, freq.shape[1]))
        jac = np.zeros((m, 5 * k, freq.shape[1])) if jacobian else None
        for i in range(k):
            tkin, tex, logn, sigma, v = p[:, 5 * i:5 * i + 5].T
            tau, dl_tkin, dl_tex = _nh3_line_tau(line, tkin, tex, logn, sigma)
            s0, s1, s2 = _hyperfine_sums(line, freq, sigma, v, jacobian)
            taunu = tau[:, None] * s0
            a = t0 / tex[:, None]
            dj = t0 / np.expm1(a) - jbg
            absorbed = -np.expm1(-taunu)
            model += dj * absorbed
            if jacobian:
                b = dj * (1 - absorbed)
                jac[:, 5 * i] = b * taunu * dl_tkin[:, None]
                jac[:, 5 * i + 1] = b * taunu * dl_tex[:, None] + absorbed * (0.5 * a / np.sinh(0.5 * a)) ** 2
                jac[:, 5 * i + 2] = b * taunu * np.log(10.0)
                jac[:, 5 * i + 3] = b * (tau / sigma)[:, None] * (s2 - s0)
                jac[:, 5 * i + 4] = -b * (tau / sigma)[:, None] * s1
        models.append(model)
        jacs.append(jac)
    return np.concatenate(models, axis=1), (np.concatenate(jacs, axis=2) if jacobian else None)


def _joint_axes(freq11_hz, freq22_hz):
    return [np.atleast_2d(np.asarray(f, float)) for f in (freq11_hz, freq22_hz)]


def nh3_joint_spectra(freq11_hz, freq22_hz, params):
    """NH3 (1,1) and (2,2) brightness-temperature spectra of k components, vectorised.

    Parameters
    ----------
    freq11_hz, freq22_hz : ndarray, shape (n,) or (m, n)
        Frequency axes (Hz) around each line, shared or one per spectrum.
    params : ndarray, shape (m, 5k)
        Per component: tkin (K), tex (K), log10 N(NH3) (cm^-2), sigma (km/s), v (km/s).

    Returns
    -------
    model11 : ndarray, shape (m, n11)
    model22 : ndarray, shape (m, n22)

    Notes
    -----
    pyspeckit's ``cold_ammonia`` (``fortho = 0``, background 2.7326 K), component by
    component, summed: see :func:`_nh3_line_tau`, :func:`_hyperfine_sums` and
    :func:`_joint_model` for the equations.  Only each axis' own line is computed (the
    other inversion lines lie > 28 MHz, hundreds of line widths, away).
    """
    freqs = _joint_axes(freq11_hz, freq22_hz)
    model = _joint_model(np.atleast_2d(np.asarray(params, float)), freqs)[0]
    return model[:, :freqs[0].shape[1]], model[:, freqs[0].shape[1]:]


def _joint_bounds(freqs, m, k, min_sigma):
    """Box bounds (m, 5k) of the internal parameters tkin, f, log N, ln sigma, v; the
    centroid within the velocity range both axes cover, sigma up to a quarter of it."""
    c = _joint_constants()
    vel = [c["ckms"] * (1 - f / line["f0"]) for f, line in zip(freqs, c["lines"])]
    vlo = np.maximum(vel[0].min(axis=1), vel[1].min(axis=1)) * np.ones(m)
    vhi = np.minimum(vel[0].max(axis=1), vel[1].max(axis=1)) * np.ones(m)
    lo = np.tile([NH3_TKIN_BOUNDS[0], 0.0, NH3_LOGN_BOUNDS[0], np.log(max(NH3_MIN_SIGMA_KMS, min_sigma)), 0.0], (m, k))
    hi = np.tile([NH3_TKIN_BOUNDS[1], 1.0, NH3_LOGN_BOUNDS[1], 0.0, 0.0], (m, k))
    lo[:, 4::5], hi[:, 4::5] = vlo[:, None], vhi[:, None]
    hi[:, 3::5] = np.log(np.maximum(0.25 * (vhi - vlo), np.exp(lo[:, 3]) * 2))[:, None]
    return lo, hi


def _joint_to_internal(p):
    q = p.copy()
    tbg = _joint_constants()["tbg"]
    q[:, 1::5] = (p[:, 1::5] - tbg) / (p[:, 0::5] - tbg)
    q[:, 3::5] = np.log(p[:, 3::5])
    return q


def _joint_to_physical(q):
    p = q.copy()
    tbg = _joint_constants()["tbg"]
    p[:, 1::5] = tbg + q[:, 1::5] * (q[:, 0::5] - tbg)
    p[:, 3::5] = np.exp(q[:, 3::5])
    return p


def _joint_internal_jacobian(jac, q, p):
    """Chain rule: d/dtkin at fixed f gains f d/dtex; d/df = (tkin - T_bg) d/dtex;
    d/dln sigma = sigma d/dsigma."""
    jq = jac.copy()
    jq[:, 0::5] += q[:, 1::5, None] * jac[:, 1::5]
    jq[:, 1::5] *= (p[:, 0::5] - _joint_constants()["tbg"])[:, :, None]
    jq[:, 3::5] *= p[:, 3::5, None]
    return jq


def _joint_noise(spectra):
    """Per-spectrum noise from first differences (:func:`mad_sigma` / sqrt 2), NaN-aware."""
    noise = mad_sigma(np.diff(spectra, axis=1), axis=1) / np.sqrt(2)
    return np.where(np.isfinite(noise) & (noise > 0), noise, np.inf)


def _joint_weights(spec, noise):
    """1 / noise per channel; 0 for NaN data and non-finite or non-positive noise."""
    noise = _joint_noise(spec) if noise is None else np.asarray(noise, float)
    noise = noise[:, None] if noise.ndim == 1 else noise
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.broadcast_to(np.where(noise > 0, 1.0 / noise, 0.0), spec.shape)
    return np.where(np.isfinite(spec) & np.isfinite(w), w, 0.0)


def fit_nh3_joint(spec11, spec22, freq11_hz, freq22_hz, starts, noise11=None, noise22=None,
                  n_iter=30, chunk=256, min_sigma=0.0):
    r"""Joint least-squares fits of k-component NH3 (1,1)+(2,2) models, vectorised.

    Parameters
    ----------
    spec11, spec22 : ndarray, shape (m, n11), (m, n22)
        Brightness-temperature spectra (K); NaN channels are ignored (weight 0).
    freq11_hz, freq22_hz : ndarray, shape (n,) or (m, n)
        Their frequency axes (Hz).
    starts : sequence of ndarray, shape (m, 5k)
        Starting values (see :func:`nh3_joint_spectra`, :func:`joint_starts`); every start
        is fitted and the lowest chi^2 kept.
    noise11, noise22 : float or ndarray, shape (m,) or (m, n), optional
        1-sigma noise (K); default from first differences of each spectrum.
    n_iter : int
        Levenberg-Marquardt iterations (one damped Gauss-Newton trial per spectrum each,
        kept only when it lowers chi^2).
    chunk : int
        Spectra fitted at a time (memory: about 8 chunk x 5k x (n11 + n22) x 8 bytes).
    min_sigma : float
        Floor of sigma (km/s) besides 0.02 km/s, e.g. a fraction of the channel width.

    Returns
    -------
    dict
        ``params`` (m, 5k), components in increasing velocity; ``errors`` (m, 5k),
        1-sigma from the inverse curvature matrix :math:`(J^T W J)^{-1}`, times
        :math:`\sqrt{\chi^2/\nu}` where that exceeds 1; ``errors_formal`` (unscaled);
        ``chi2``, ``dof`` (m,) (channels with weight > 0 less 5k); ``edm`` (m,), the
        chi^2 decrease a further Gauss-Newton step predicts; ``ok`` (m,) bool: ``edm`` <
        :data:`NH3_EDM_TOL` (converged), finite errors and no parameter at a bound.

    Notes
    -----
    Bounds: 2.8 <= tkin <= 80 K, T_bg (2.7326 K) <= tex <= tkin, 11 <= log N <= 17,
    max(0.02, min_sigma) <= sigma <= a quarter of the velocity range, v within the axes.
    The iterations run on internal parameters (tkin, f, log N, ln sigma, v) with
    :math:`T_{ex} = T_{bg} + f(T_K - T_{bg})`, :math:`0 \le f \le 1`: the tex <= tkin
    constraint becomes a box, so a trial step is simply clipped into it (a projection,
    accepted only if chi^2 falls) and nothing leaves the physical domain; ln sigma
    keeps the steps scale-free.  The errors are those of the physical parameters at the
    solution (no transformation bias); they are meaningful only when ``ok``.  A row
    stops iterating once a near-Gauss-Newton step (damping <= 1) gains < 1e-6 in chi^2.

    Examples
    --------
    >>> v = (np.arange(380) - 190) * 0.158
    >>> f11, f22 = (f0 * (1 - v / 299792.458) for f0 in (23.6944955e9, 23.722633335e9))
    >>> y11, y22 = nh3_joint_spectra(f11, f22, [[15.0, 6.0, 14.5, 0.3, 0.5]])
    >>> fit = fit_nh3_joint(y11, y22, f11, f22, joint_starts([0.4], [0.35], [y11.max()], 1), 0.1, 0.1)
    >>> np.round(fit["params"], 4).tolist(), bool(fit["ok"][0])
    ([[15.0, 6.0, 14.5, 0.3, 0.5]], True)
    """
    spec = np.concatenate([np.atleast_2d(np.asarray(s, float)) for s in (spec11, spec22)], axis=1)
    w = np.concatenate([_joint_weights(np.atleast_2d(np.asarray(s, float)), n)
                        for s, n in ((spec11, noise11), (spec22, noise22))], axis=1)
    y = np.where(w > 0, np.nan_to_num(spec), 0.0)
    freqs, m = _joint_axes(freq11_hz, freq22_hz), len(spec)
    best = None
    for start in starts:
        start = np.asarray(start, float)
        res = {key: np.empty((m, start.shape[1])) for key in ("params", "errors_formal")}
        res.update(chi2=np.empty(m), edm=np.empty(m), ok=np.empty(m, bool))
        for lo in range(0, m, chunk):
            rows = slice(lo, lo + chunk)
            f_rows = [f[rows] if len(f) > 1 else f for f in freqs]
            out = _fit_joint_chunk(y[rows], w[rows], start[rows], f_rows, n_iter, min_sigma)
            for key, val in zip(("params", "errors_formal", "chi2", "edm", "ok"), out):
                res[key][rows] = val
        if best is None:
            best = res
        better = res["chi2"] < best["chi2"]
        for key in best:
            best[key][better] = res[key][better]
    k = best["params"].shape[1] // 5
    order = (np.argsort(best["params"][:, 4::5], axis=1)[:, :, None] * 5 + np.arange(5)).reshape(m, 5 * k)
    for key in ("params", "errors_formal"):                # components by velocity
        best[key] = np.take_along_axis(best[key], order, axis=1)
    best["dof"] = (w > 0).sum(axis=1) - 5 * k
    scale = np.sqrt(np.maximum(best["chi2"] / np.maximum(best["dof"], 1), 1.0))
    best["errors"] = best["errors_formal"] * scale[:, None]
    return best


def _fit_joint_chunk(y, w, p, freqs, n_iter, min_sigma):
    """Levenberg-Marquardt on internal parameters; returns params, formal errors,
    chi2, edm and ok for the rows of one chunk."""
    m, npar = p.shape
    lo, hi = _joint_bounds(freqs, m, npar // 5, min_sigma)
    p = np.nan_to_num(p, nan=10.0)
    p[:, 0::5] = np.clip(p[:, 0::5], *NH3_TKIN_BOUNDS)
    p[:, 1::5] = np.clip(p[:, 1::5], _joint_constants()["tbg"], p[:, 0::5])
    p[:, 3::5] = np.maximum(p[:, 3::5], 1e-3)
    q = np.clip(_joint_to_internal(p), lo, hi)

    def evaluate(q, rows):
        """chi^2, curvature matrix and gradient (internal parameters) at q for ``rows``."""
        phys = _joint_to_physical(q)
        model, jac = _joint_model(phys, [f[rows] if len(f) > 1 else f for f in freqs], jacobian=True)
        jw = _joint_internal_jacobian(jac, q, phys) * w[rows, None, :]
        resid = (y[rows] - model) * w[rows]
        return (resid ** 2).sum(axis=1), jw @ jw.transpose(0, 2, 1), (jw @ resid[:, :, None])[:, :, 0]

    chi, normal, grad = evaluate(q, slice(None))
    lam, active = np.full(m, 1e-2), np.ones(m, bool)
    for _ in range(n_iter):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        diag = np.einsum("nii->ni", normal[idx])
        damped = normal[idx] + (lam[idx, None] * diag + 1e-12)[:, :, None] * np.eye(npar)
        trial = np.clip(q[idx] + np.nan_to_num(np.linalg.solve(damped, grad[idx, :, None])[:, :, 0]), lo[idx], hi[idx])
        t_chi, t_normal, t_grad = evaluate(trial, idx)
        better = t_chi < chi[idx]
        settled = better & (chi[idx] - t_chi < 1e-6) & (lam[idx] <= 1.0)   # a ~Gauss-Newton step gains nothing
        acc = idx[better]
        q[acc], chi[acc], normal[acc], grad[acc] = trial[better], t_chi[better], t_normal[better], t_grad[better]
        lam[idx] = np.clip(np.where(better, lam[idx] / 3.0, lam[idx] * 4.0), 1e-9, 1e9)
        active[idx] = ~settled & (lam[idx] < 1e9)
    p = _joint_to_physical(q)
    errors, edm = _joint_errors(y, w, p, freqs)
    margin = 1e-6 * (hi - lo)
    inside = ((q > lo + margin) & (q < hi - margin)).all(axis=1)
    return p, errors, chi, edm, inside & (edm < NH3_EDM_TOL) & np.isfinite(errors).all(axis=1)


def _joint_errors(y, w, p, freqs):
    r"""1-sigma errors :math:`\sqrt{\mathrm{diag}(J^T W J)^{-1}}` of the physical parameters
    and the expected distance to the minimum :math:`g^T (J^T W J)^{-1} g`,
    :math:`g = J^T W (y - f)` (NaN errors where the matrix is singular)."""
    model, jac = _joint_model(p, freqs, jacobian=True)
    jw = jac * w[:, None, :]
    alpha = jw @ jw.transpose(0, 2, 1)
    grad = (jw @ ((y - model) * w)[:, :, None])[:, :, 0]
    d = np.sqrt(np.einsum("nii->ni", alpha))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.nan_to_num(alpha / (d[:, :, None] * d[:, None, :]))
        evals, evecs = np.linalg.eigh(corr)
        good = (evals.min(axis=1) > 1e-10) & (d > 0).all(axis=1)
        inv = (evecs / np.where(evals > 1e-10, evals, np.inf)[:, None, :]) @ evecs.transpose(0, 2, 1)
        cov = inv / (d[:, :, None] * d[:, None, :])
        errors = np.where(good[:, None], np.sqrt(np.einsum("nii->ni", cov)), np.nan)
        edm = np.where(good, np.einsum("ni,nij,nj->n", grad, cov, grad), np.inf)
    return errors, edm


def joint_starts(v, sigma, peak11, k, guesses=((10.0, 13.8), (15.0, 14.4), (25.0, 15.0))):
    """Starting values of :func:`fit_nh3_joint` from per-component line estimates.

    Parameters
    ----------
    v, sigma, peak11 : ndarray, shape (m, k) (or (m,) when k = 1)
        Centroid and dispersion (km/s), and (1,1) peak brightness (K) of each component,
        e.g. from moments or a Gaussian decomposition.
    k : int
        Number of components.
    guesses : sequence of (tkin, log N)
        One start per pair.

    Returns
    -------
    list of ndarray, shape (m, 5k)

    Notes
    -----
    tex is chosen so the start reproduces ``peak11`` at the main group:
    :math:`J(T_{ex}) = J(T_{bg}) + T_p / (1 - e^{-\\tau_c})`, with :math:`\\tau_c` the
    (1,1) optical depth at the line centre, solved by a few fixed-point passes (tau
    depends on tex); tex is kept within 3-97 % of the way from T_bg to tkin.
    """
    c = _joint_constants()
    line, tbg = c["lines"][0], c["tbg"]
    v, sigma, peak = (np.asarray(a, float).reshape(-1, k) for a in (v, sigma, peak11))
    sigma = np.clip(sigma, 0.05, 3.0)
    peak = np.maximum(peak, 1e-3)
    t0 = c["hk"] * line["f0"]
    starts = []
    for tkin, logn in guesses:
        cols = []
        for i in range(k):
            tk, ln = np.full(len(v), tkin), np.full(len(v), logn)
            centre = (line["f0"] * (1 - v[:, i] / c["ckms"]))[:, None]
            s0 = _hyperfine_sums(line, centre, sigma[:, i], v[:, i], False)[0][:, 0]
            tex = np.full(len(v), 0.5 * (tkin + tbg))
            for _ in range(4):
                tau_c = _nh3_line_tau(line, tk, tex, ln, sigma[:, i])[0] * s0
                jex = t0 / np.expm1(t0 / tbg) + peak[:, i] / -np.expm1(-tau_c)
                tex = np.clip(t0 / np.log1p(t0 / jex), tbg + 0.03 * (tkin - tbg), tbg + 0.97 * (tkin - tbg))
            cols.append(np.column_stack([tk, tex, ln, sigma[:, i], v[:, i]]))
        starts.append(np.concatenate(cols, axis=1))
    return starts


# ===========================================================================
# Science: cube features and spectral-axis length
# ===========================================================================
def make_features(cube):
    """Network inputs for every pixel of a cube (velocity increasing along axis 0).

    Parameters
    ----------
    cube : ndarray, shape (nchan, ny, nx)

    Returns
    -------
    x : ndarray, shape (nvalid, nchan, 2), float32
        Central spectrum / its maximum and 3x3-mean spectrum / its maximum.
    tmax : ndarray, shape (nvalid,)
        Maximum of each central spectrum (rescales the predicted peaks).
    valid : ndarray of bool, shape (ny, nx)
        Pixels whose spectrum is finite in every channel.

    Notes
    -----
    The neighbourhood mean uses the finite spectra of the 3x3 window, so border pixels
    and neighbours of blanked pixels get predictions too (the original left them NaN).
    """
    cube = np.asarray(cube, np.float32)
    valid = np.isfinite(cube).all(axis=0)
    filled = np.where(valid[None], cube, 0.0).astype(np.float32)
    pad = np.pad(filled, ((0, 0), (1, 1), (1, 1)))
    cnt = np.pad(valid.astype(np.float32), 1)
    ny, nx = valid.shape
    total = np.zeros_like(filled)
    count = np.zeros(valid.shape, np.float32)
    for dy in range(3):
        for dx in range(3):
            total += pad[:, dy:dy + ny, dx:dx + nx]
            count += cnt[dy:dy + ny, dx:dx + nx]
    local = filled[:, valid].T
    mean = (total[:, valid] / np.maximum(count[valid], 1)).T
    tmax = _safe_max(local)
    x = np.stack([local / tmax[:, None], mean / _safe_max(mean)[:, None]], axis=-1)
    return x.astype(np.float32), tmax, valid


def robust_noise(spectra, edge=50):
    """Per-spectrum noise from the edge channels: :func:`mad_sigma` of the first and last ``edge``.

    Parameters
    ----------
    spectra : ndarray, shape (nchan, ...)
    edge : int
        Channels taken at each end (the original: std of the first and last 50).
    """
    n = spectra.shape[0]
    edge = max(1, min(edge, n // 4 or 1))
    ends = np.concatenate([spectra[:edge], spectra[n - edge:]], axis=0)
    return mad_sigma(ends, axis=0)


def fill_blank_channels(cube, rng, max_blank=0.5):
    """Replace blanked (NaN) channels of mostly finite spectra by noise.

    Real cubes often have blanked channels: band edges flagged in every pixel,
    single bad channels, regridding gaps.  A spectrum with at most ``max_blank`` of its
    channels blank gets noise there (its own rms: :func:`mad_sigma` of the first
    differences / sqrt(2)), so it is still classified; one with more stays blank and
    gives NaN outputs (the original dropped every spectrum with any NaN).

    Parameters
    ----------
    cube : ndarray, shape (n, ny, nx)
    rng : numpy.random.Generator
    max_blank : float
        Largest blank fraction a spectrum may have to be filled.

    Returns
    -------
    filled : ndarray
        ``cube`` itself when nothing was filled, else a filled copy.
    blank : ndarray of bool or None
        Where values were filled (for writing the data back with its blanks).

    Examples
    --------
    >>> cube = np.random.default_rng(0).normal(0, 1, (50, 2, 2)).astype(np.float32)
    >>> cube[:3] = np.nan                  # band edge blanked everywhere
    >>> cube[:, 1, 1] = np.nan             # a fully blank pixel stays blank
    >>> out, blank = fill_blank_channels(cube, np.random.default_rng(1))
    >>> int(np.isfinite(out).all(axis=0).sum()), int(blank.sum())
    (3, 9)
    """
    nbad = cube.shape[0] - np.isfinite(cube).sum(axis=0)
    fix = (nbad > 0) & (nbad <= max_blank * cube.shape[0])
    if not fix.any():
        return cube, None
    spec = cube[:, fix]
    bad = ~np.isfinite(spec)
    sigma = mad_sigma(np.diff(spec, axis=0), axis=0) / np.sqrt(2)
    noise = (rng.standard_normal(spec.shape) * sigma).astype(cube.dtype)
    filled = cube.copy()
    filled[:, fix] = np.where(bad, noise, spec)
    blank = np.zeros(cube.shape, bool)
    blank[:, fix] = bad
    log.info("filled %d blank values in %d spectra with noise (spectra more than %.0f %% blank "
             "stay blank)", int(bad.sum()), int(fix.sum()), 100 * max_blank)
    return filled, blank


def _fitted_mask(mask, first, nchan):
    """A (n, ny, nx) mask moved like the data by :func:`fit_length` (padding: False)."""
    if first <= 0:
        return mask[-first:-first + nchan]
    out = np.zeros((nchan,) + mask.shape[1:], bool)
    out[first:first + len(mask)] = mask
    return out


def fit_length(cube, nchan, rng, centre=None):
    """Pad with noise or clip the spectral axis (axis 0) to ``nchan`` channels.

    Parameters
    ----------
    cube : ndarray, shape (n, ny, nx)
    nchan : int
        Required length (500 Gaussian, 1000 NH3).
    rng : numpy.random.Generator
        Source of the padding noise.
    centre : int, optional
        Input channel to bring as close as possible to the middle of the output (the
        emission, for ``tile`` mode of :func:`predict`); default: pad or clip equally
        at both ends, as the original.

    Returns
    -------
    cube : ndarray, shape (nchan, ny, nx)
    first : int
        Index in the new axis of the old channel 0 (positive = padded, negative = clipped):
        the FITS reference pixel moves by the same amount.

    Notes
    -----
    Shorter: floor(d/2) noise channels before and the rest after, with each pixel's
    noise from :func:`robust_noise`; NaN pixels stay NaN.  Longer: floor(d/2) channels
    clipped from the start and the rest from the end (the original's slice was empty
    for an excess of 1).
    """
    n = cube.shape[0]
    if n == nchan:
        return cube, 0
    if n > nchan:
        start = (n - nchan) // 2 if centre is None else int(np.clip(centre - nchan // 2, 0, n - nchan))
        return cube[start:start + nchan], -start
    before = (nchan - n) // 2 if centre is None else int(np.clip(nchan // 2 - centre, 0, nchan - n))
    after = nchan - n - before
    sigma = robust_noise(cube)
    blank = ~np.isfinite(cube).all(axis=0)
    pads = [(rng.standard_normal((k,) + cube.shape[1:]) * sigma).astype(cube.dtype)
            for k in (before, after)]
    out = np.concatenate([pads[0], cube, pads[1]], axis=0)
    out[:, blank] = np.nan
    return out, before


# ===========================================================================
# I/O: cubes in, maps out
# ===========================================================================
@dataclass
class Cube:
    """A spectral cube read by :func:`read_cube` (spectral axis first)."""

    data: np.ndarray          # (nchan, ny, nx), file order of the spectral axis
    velocity: np.ndarray      # (nchan,) radio velocity, km/s
    header: object            # the original astropy Header (3-D after dropping axes)
    spatial_header: object    # 2-D celestial WCS header for the maps
    bunit: str
    spec_fits_axis: int       # FITS axis number (1-based) of the spectral axis
    path: Path
    rest_hz: float = None     # rest frequency used for the velocities (Hz)


# velocity axes and the Doppler convention their values are in (FITS WCS Paper III)
_VELOCITY_CONVENTIONS = {"VRAD": "radio", "VOPT": "optical", "VELO": "relativistic"}
# CTYPE words people write for a spectral axis that are not FITS spectral types
_SPECTRAL_LOOKALIKES = ("VELO", "FREQ", "VRAD", "VOPT", "FELO", "WAVE", "AWAV", "VLSR", "VEL")


def _read_wcs(header, path):
    """astropy WCS of a FITS header; a header wcslib cannot read is an InputError naming the
    file and the keyword; a spectral type translated by wcslib (AIPS ``VELO-LSR`` with
    VELREF, ``FREQ-LSR``) is logged, and an AIPS velocity axis without VELREF - which
    wcslib reads as optical - gives a :class:`CloverWarning`."""
    from astropy.wcs import WCS, FITSFixedWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)   # OBSGEO, DATE-OBS, unit spelling fixes
        try:
            wcs = WCS(header)
        except Exception as exc:  # noqa: BLE001 - astropy/wcslib raise many types for bad keywords
            raise InputError(_wcs_problem(header, path, exc)) from None
    spec = wcs.wcs.spec
    if spec >= 0:
        key = "CTYPE%d" % (spec + 1)
        written, read = str(header.get(key, "")).strip(), wcs.wcs.ctype[spec]
        if written.upper() != read.upper():
            log.info("%s: %s = %r read as %r (wcslib, AIPS convention)", path, key, written, read)
            if written[:4].upper() in ("VELO", "FELO") and read.startswith("VOPT") and "VELREF" not in header:
                warnings.warn("%s: %s = %r without VELREF is read as an OPTICAL velocity (AIPS convention); "
                              "if it is a radio velocity, set VELREF = 257 or %s = 'VRAD'"
                              % (path, key, written, key), CloverWarning, stacklevel=3)
    return wcs


def _wcs_problem(header, path, exc):
    """The message for a header that wcslib refuses: which keyword, what it holds, the fix."""
    text = " ".join(str(exc).split())
    found = re.search(r"\b(CUNIT|CTYPE)(\d+)\b", text)
    if found:
        key, axis = found.group(0), found.group(2)
        value, ctype = header.get(key), header.get("CTYPE" + axis)
        detail = text.split(":")[-1].strip() if ":" in text else text
        if found.group(1) == "CUNIT":
            return ("%s: %s = %r is not a unit clover can use for %s = %r (%s); write a FITS unit that "
                    "fits the axis: Hz or GHz (FREQ), m/s or km/s (VRAD, VOPT, VELO), m or nm (WAVE)"
                    % (path, key, value, "CTYPE" + axis, ctype, detail))
        return ("%s: %s = %r cannot be read (%s); use a FITS spectral type such as FREQ, VRAD, VOPT "
                "or WAVE" % (path, key, value, detail))
    return "%s: the WCS cannot be read (%s); check the CTYPEn, CUNITn and CRVALn keywords" % (path, text)


def _no_spectral_axis(header, naxis, path):
    """InputError for a header without a FITS spectral axis; names a look-alike CTYPE."""
    ctypes = {"CTYPE%d" % i: str(header.get("CTYPE%d" % i, "")).strip() for i in range(1, max(naxis, 1) + 1)}
    for key, value in ctypes.items():
        if value[:4].upper().startswith(_SPECTRAL_LOOKALIKES):
            return InputError("%s has no spectral axis that FITS WCS knows: %s = %r is not a spectral type; "
                              "rename it to VRAD (radio velocity), VOPT (optical velocity) or FREQ "
                              "(frequency) with a matching CUNIT" % (path, key, value))
    listed = ", ".join("%s = %r" % kv for kv in ctypes.items() if kv[1]) or "no CTYPEn keywords"
    return InputError("%s has no spectral axis (%s; FITS spectral types are FREQ, VRAD, VOPT, VELO, "
                      "WAVE, AWAV, ...); clover needs a spectral cube or spectrum" % (path, listed))


def _spectral_coord(wcs, nchan):
    """SpectralCoord of the ``nchan`` channels of the WCS's spectral axis, in the cube's own
    frame: the observer (OBSGEO + date) is dropped - clover changes no frame, and building it
    costs a second of coordinate transforms, may want IERS tables and fails for SPECSYS =
    'SOURCE' - and air wavelengths are turned into vacuum ones by wcslib (SpectralCoord
    knows only vacuum wavelengths)."""
    spec = wcs.spectral.deepcopy()
    spec.wcs.obsgeo = np.full(6, np.nan)
    if spec.wcs.ctype[0].startswith("AWAV"):
        spec.wcs.sptr("WAVE-???")
    spec.wcs.set()
    return spec.pixel_to_world(np.arange(nchan))


def _radio_velocity(coord, ctype, rest_hz, where):
    """Radio-convention velocity (km/s) of a SpectralCoord.

    Parameters
    ----------
    coord : astropy.coordinates.SpectralCoord
        Frequencies, wavelengths, energies or velocities (those carry the Doppler
        convention and rest frequency of their header when it has one).
    ctype : str
        FITS spectral type of the axis (the convention of a velocity axis without a rest
        frequency).
    rest_hz : float or None
        Rest frequency (Hz) the velocities refer to; a velocity axis written for another
        rest frequency is re-referenced to this one (its frequencies are kept).
    where : str
        File and keyword, for the error message.

    Raises
    ------
    InputError
        When a rest frequency is needed (any axis but a radio velocity) and none is known.
    """
    from astropy import units as u
    from astropy.coordinates import SpectralCoord
    rest = rest_hz * u.Hz if rest_hz else None
    if coord.unit.physical_type == "speed" and coord.doppler_rest is None:
        convention = _VELOCITY_CONVENTIONS.get(ctype[:4].upper(), "radio")
        if rest is None and convention == "radio":
            return coord.to_value(u.km / u.s)           # already what clover needs
        if rest is not None:
            coord = SpectralCoord(coord.quantity, doppler_convention=convention, doppler_rest=rest)
    if rest is None and coord.doppler_rest is None:
        raise InputError("%s: a %s axis needs the rest frequency to give radio velocities; set RESTFRQ "
                         "(Hz) in the header, or give rest_frequency= / --rest-frequency" % (where, ctype))
    return coord.to(u.km / u.s, doppler_convention="radio",
                    doppler_rest=rest if rest is not None else coord.doppler_rest).value


def read_cube(path, rest_frequency=None, nh3=False, force_rest=False, line="oneone"):
    """Read a FITS cube, a 1-D FITS spectrum or a text spectrum (spectral axis first).

    Parameters
    ----------
    path : str or Path
        FITS image with a spectral axis and up to two spatial axes (degenerate axes such
        as Stokes are dropped), or a text spectrum (see :func:`read_text_spectrum`).
        A 1-D spectrum becomes a 1 x 1 cube.
    rest_frequency : float, optional
        Hz; overrides RESTFRQ/RESTFREQ/RESTWAV of the header (NH3 mode defaults to the
        line's).  A velocity axis written for another rest frequency is re-referenced to
        this one.
    nh3 : bool
        NH3 mode: the rest frequency must be that of ``line`` (see :func:`check_nh3_rest`).
    force_rest : bool
        Accept an NH3 cube whose rest frequency is not ``line``'s.
    line : {'oneone', 'twotwo'}
        Which NH3 inversion line the cube must hold in NH3 mode.

    Returns
    -------
    Cube
        ``velocity`` is the radio velocity (km/s) of every channel.

    Raises
    ------
    InputError
        Missing or unreadable file, no spectral axis, a non-degenerate extra axis, a
        spectral unit that does not fit the axis, a missing or (NH3) wrong rest frequency,
        or no finite value; the message names the file and the keyword.

    Warns
    -----
    CloverWarning
        An AIPS-convention ``VELO-xxx`` axis without VELREF (read as optical velocity).

    Notes
    -----
    The spectral axis is decoded by astropy/wcslib: ``WCS(header).spectral.pixel_to_world``
    gives a SpectralCoord (CDELT or CD/PC matrices, any unit, air wavelengths converted to
    vacuum), turned into radio velocities with ``.to(km/s, doppler_convention="radio",
    doppler_rest=rest)``.  A VRAD axis needs no rest frequency; VOPT, VELO (relativistic,
    FITS Paper III) and frequency/wavelength axes do.

    Examples
    --------
    >>> from astropy.io import fits
    >>> import tempfile, pathlib
    >>> hdr = fits.Header({"CTYPE1": "FREQ", "CUNIT1": "GHz", "CRVAL1": 23.6944955,
    ...                    "CDELT1": -1.0e-5, "CRPIX1": 1.0, "RESTFRQ": 23.6944955e9})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = pathlib.Path(tmp) / "spectrum.fits"
    ...     fits.PrimaryHDU(np.ones(20, np.float32), hdr).writeto(path)
    ...     velocity = read_cube(path).velocity
    >>> [round(float(v), 4) for v in velocity[:3]]          # steps of c x 10 kHz / 23.69 GHz
    [0.0, 0.1265, 0.253]
    """
    from astropy.io import fits
    path = Path(path)
    if not path.is_file():
        raise InputError("cube %s does not exist; give the path of a FITS cube or spectrum" % path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        return read_text_spectrum(path, rest_frequency, nh3, force_rest, line)
    try:
        with fits.open(path) as hdul:
            hdu = next((h for h in hdul if h.data is not None and h.data.ndim > 0), None)
            if hdu is None:
                raise InputError("%s has no image data in any HDU" % path)
            data, header = np.asarray(hdu.data, np.float32), hdu.header.copy()
    except OSError as exc:
        raise InputError("cannot read %s as FITS (%s); give a FITS file, or a text spectrum "
                         "ending in %s" % (path, exc, ", ".join(TEXT_SUFFIXES))) from None
    wcs = _read_wcs(header, path)
    spec = wcs.wcs.spec
    if not wcs.has_spectral or spec >= data.ndim:
        raise _no_spectral_axis(header, wcs.naxis, path)
    data, wcs2d = _squeeze_to_cube(data, wcs, spec, path)
    if not np.isfinite(data).any():
        raise InputError("%s contains no finite value (all NaN); nothing to predict" % path)
    ctype = wcs.wcs.ctype[spec]
    rest = _rest_frequency(header, rest_frequency, nh3, line)
    velocity = _radio_velocity(_spectral_coord(wcs, data.shape[0]), ctype, rest,
                               "%s (CTYPE%d = %r)" % (path, spec + 1, ctype))
    if nh3:
        check_nh3_rest(path, rest, velocity, ctype, force_rest, line)
    spatial = wcs2d.to_header()
    for k in HEADER_KEEP:
        if k in header:
            spatial[k] = header[k]
    if rest:
        spatial["RESTFRQ"] = rest
    return Cube(data, velocity, header, spatial, str(header.get("BUNIT", "")).strip(), spec + 1, path,
                rest)


TEXT_SUFFIXES = (".txt", ".dat", ".csv", ".ecsv", ".tsv")
# FITS spectral type of a text spectrum's first column, by the physical type of its unit
_TEXT_AXIS_TYPES = {"frequency": "FREQ", "speed": "VRAD", "length": "WAVE"}
# header keywords copied from the input to every output map (frames, beam, provenance)
HEADER_KEEP = ("BMAJ", "BMIN", "BPA", "OBJECT", "TELESCOP", "DATE-OBS", "MJD-OBS", "SPECSYS",
               "SSYSOBS", "VELOSYS", "VELREF", "OBSRA", "OBSDEC", "RADESYS", "EQUINOX")
NH3_REST_HZ = {"oneone": NH3_11_REST_HZ, "twotwo": NH3_22_REST_HZ}
NH3_REST_TOLERANCE_HZ = 1.0e6    # (1,1)-(2,2) are 28 MHz apart; CCS 2-1 at 22.34 GHz


def _rest_frequency(header, rest_frequency, nh3, line="oneone"):
    """Rest frequency (Hz): the argument, else RESTFRQ/RESTFREQ, else c / RESTWAV (vacuum, m),
    else the NH3 line's in NH3 mode."""
    if rest_frequency:
        return float(rest_frequency)
    rest = header.get("RESTFRQ", header.get("RESTFREQ"))
    if rest:
        return float(rest)
    wave = header.get("RESTWAV", header.get("RESTWAVE"))
    if wave:
        return C_KMS * 1e3 / float(wave)
    return NH3_REST_HZ[line] if nh3 else None


def check_nh3_rest(path, rest_hz, velocity, ctype, force=False, line="oneone"):
    """Refuse an NH3-mode cube that is not of NH3 ``line`` (unless ``force``).

    The rest frequency must be within :data:`NH3_REST_TOLERANCE_HZ` of the line's, and
    for an axis that is not a velocity (frequency, wavelength) the band centre must lie
    within 300 km/s of it (a (2,2) or CCS cube written without RESTFRQ).

    Raises
    ------
    InputError
    """
    want = NH3_REST_HZ[line]
    name = {"oneone": "(1,1)", "twotwo": "(2,2)"}[line]
    problem = None
    if rest_hz and abs(rest_hz - want) > NH3_REST_TOLERANCE_HZ:
        problem = "its rest frequency is %.6f GHz" % (rest_hz / 1e9)
    elif ctype[:4].upper() not in _VELOCITY_CONVENTIONS and abs(np.median(velocity)) > 300.0:
        problem = "its band centre is %.0f km/s from the line" % np.median(velocity)
    if problem and not force:
        raise InputError("%s is not an NH3 %s cube: %s, NH3 %s is at %.7f GHz; give the %s cube, "
                         "set rest_frequency / --rest-frequency, or force it (--force-rest)"
                         % (path, name, problem, name, want / 1e9, name))
    if problem:
        log.warning("%s: %s, not NH3 %s; used as NH3 %s because forced", path, problem, name, name)


def read_text_spectrum(path, rest_frequency=None, nh3=False, force_rest=False, line="oneone"):
    """Read a two-column text spectrum (spectral axis, intensity) as a 1 x 1 cube.

    Parameters
    ----------
    path : Path
        ECSV (column units are used) or plain text / CSV with two numeric columns;
        lines starting with ``#`` are comments.  Without units the first column is the
        radio velocity in km/s, or the frequency in Hz when its values exceed 1e6.
    rest_frequency, nh3, force_rest, line
        As :func:`read_cube`.

    Returns
    -------
    Cube

    Raises
    ------
    InputError
        Unreadable file, not two numeric columns, uneven channel spacing.
    """
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS
    try:
        table = Table.read(path, format="ascii.ecsv" if path.suffix.lower() == ".ecsv" else "ascii")
    except Exception as exc:  # astropy.io.ascii raises many types
        raise InputError("cannot read %s as a text spectrum (%s); give two columns: velocity "
                         "(km/s) or frequency (Hz), and intensity" % (path, exc)) from None
    if len(table.colnames) < 2 or len(table) < 8:
        raise InputError("%s: a text spectrum needs two columns (spectral axis, intensity) and at "
                         "least 8 rows; found %d column(s), %d row(s)" % (path, len(table.colnames), len(table)))
    axis, value = table.columns[0], table.columns[1]
    try:
        x = np.asarray(axis, float)
        y = np.asarray(value, np.float32)
    except (TypeError, ValueError):
        raise InputError("%s: the first two columns must be numbers" % path) from None
    from astropy import units as u
    from astropy.coordinates import SpectralCoord
    unit = axis.unit if axis.unit is not None else u.Hz if np.nanmedian(np.abs(x)) > 1e6 else u.km / u.s
    ctype = _TEXT_AXIS_TYPES.get(str(unit.physical_type).split("/")[0])
    if ctype is None:
        raise InputError("%s: the first column is in %s; give frequencies (Hz, GHz), velocities (km/s) "
                         "or wavelengths (m, nm)" % (path, unit))
    step = np.diff(x)
    if not len(step) or np.any(np.abs(step - step.mean()) > 1e-3 * abs(step.mean())):
        raise InputError("%s: the channels are not evenly spaced (steps %.6g to %.6g %s); resample "
                         "the spectrum to a uniform axis first" % (path, step.min(), step.max(), unit))
    header = fits.Header()
    header.update(NAXIS=1, NAXIS1=len(x), CTYPE1=ctype, CUNIT1=unit.to_string("fits"),
                  CRVAL1=float(x[0]), CDELT1=float(step.mean()), CRPIX1=1.0)
    if value.unit is not None:
        header["BUNIT"] = str(value.unit)
    rest = _rest_frequency(header, rest_frequency, nh3, line)
    velocity = _radio_velocity(SpectralCoord(x * unit), ctype, rest, "%s (first column, %s)" % (path, unit))
    if nh3:
        check_nh3_rest(path, rest, velocity, ctype, force_rest, line)
    spatial = WCS(naxis=2).to_header()
    if rest:
        spatial["RESTFRQ"] = header["RESTFRQ"] = rest
    return Cube(y[:, None, None], velocity, header, spatial, header.get("BUNIT", ""), 1, path, rest)


def _squeeze_to_cube(data, wcs, spec, path):
    """Move the spectral axis first, drop degenerate axes; return data (n, ny, nx) and the
    2-D WCS (a 1-D spectrum: (n, 1, 1) and the celestial axes if the header has them)."""
    from astropy.wcs import WCS
    np_spec = data.ndim - 1 - spec
    others = [i for i in range(wcs.naxis) if i != spec]
    celestial = [i for i in (wcs.wcs.lng, wcs.wcs.lat) if i >= 0]
    spatial = celestial if len(celestial) == 2 else others[:2]
    for i in others:
        size = data.shape[data.ndim - 1 - i] if i < data.ndim else 1
        if i not in spatial and size != 1:
            raise InputError("%s: axis %d (%s) has %d planes; clover needs one spectral and two "
                             "spatial axes (select one plane first)" % (path, i + 1, wcs.wcs.ctype[i], size))
    sizes = [data.shape[data.ndim - 1 - i] if i < data.ndim else 1 for i in spatial]
    if len(spatial) == 2 and min(sizes) == 1 < max(sizes):
        raise InputError("%s: a %d-pixel strip (one spatial axis) is not supported; give a cube "
                         "(two spatial axes) or a single spectrum" % (path, max(sizes)))
    cube = np.moveaxis(data, np_spec, 0)
    if len(spatial) < 2 or max(sizes) == 1:
        sub = wcs.sub([i + 1 for i in sorted(spatial)]) if len(spatial) == 2 else WCS(naxis=2)
        return cube.reshape(cube.shape[0], 1, 1), sub
    cube = cube.reshape((cube.shape[0],) + tuple(data.shape[data.ndim - 1 - i] for i in sorted(spatial, reverse=True)))
    return cube, wcs.sub([i + 1 for i in sorted(spatial)])


def write_map(path, image, header, bunit, overwrite=False, comment="", history=""):
    """Write a 2-D FITS map atomically (temporary file + rename)."""
    from astropy.io import fits
    hdr = header.copy()
    hdr["BUNIT"] = bunit
    hdr["ORIGIN"] = "clover %s" % __version__
    if comment:
        hdr["COMMENT"] = comment
    if history:
        hdr["HISTORY"] = history
    with atomic_output(path, overwrite=overwrite, mode="wb") as stream:
        fits.PrimaryHDU(np.asarray(image, np.float32), hdr).writeto(stream)


def _spectral_cdelt(header, key):
    """Channel increment of FITS axis ``key`` from CDi_i, or CDELTi x PCi_i."""
    if "CD%s_%s" % (key, key) in header:
        return header["CD%s_%s" % (key, key)]
    return header.get("CDELT" + key, 1.0) * header.get("PC%s_%s" % (key, key), 1.0)


# ===========================================================================
# Stage: predict
# ===========================================================================
def _output_paths(stem, outdir, refine=True, joint=False):
    """Fixed output names: a FITS map per :data:`OUTPUT_MAPS` entry, the table, the
    provenance record, the model and residual cubes (with ``refine``)."""
    names = [n for n, (_, _, needs) in OUTPUT_MAPS.items() if needs is None or (needs == "joint" and joint)]
    paths = {name: Path(outdir) / ("%s_%s.fits" % (stem, name)) for name in names}
    paths["table"] = Path(outdir) / ("%s_table.ecsv" % stem)
    paths["provenance"] = Path(outdir) / ("%s_provenance.json" % stem)
    if refine:
        paths["model"] = Path(outdir) / ("%s_model.fits" % stem)
        paths["residual"] = Path(outdir) / ("%s_residual.fits" % stem)
    return paths


def _check_outputs_free(paths, overwrite):
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError("%d output(s) exist already (%s%s); use --overwrite / overwrite=True "
                                "or another outdir" % (len(existing), existing[0],
                                                       ", ..." if len(existing) > 1 else ""))


def _assemble_maps(values, valid):
    """2-D maps (NaN where ``valid`` is False) from the flat values."""
    maps = {}
    for name, flat in values.items():
        image = np.full(valid.shape, np.nan, np.float32)
        image[valid] = flat
        maps[name] = image
    return maps


_UNITS = {"class": "", "count": "", "prob": "", "vel": "km/s", "width": "km/s", "flags": "", "K": "K",
          "logcm2": "log10(cm-2)"}


def _unit(kind, bunit):
    return bunit if kind == "peak" else _UNITS.get(kind, "")


def _result_table(values, valid, cube, domain, line):
    """One row per predicted spectrum: pixel, sky position, class and every map's value."""
    from astropy.table import Table
    from astropy import units as u
    yy, xx = np.nonzero(valid)
    table = Table()
    table["x"], table["y"] = xx.astype(np.int32), yy.astype(np.int32)
    try:
        wcs = _quiet_wcs(cube.spatial_header)
        if wcs.has_celestial:
            world = wcs.celestial.pixel_to_world(xx, yy)
            table["ra"], table["dec"] = world.icrs.ra.to(u.deg), world.icrs.dec.to(u.deg)
    except Exception:  # noqa: BLE001 - a position column is a convenience, never fatal
        log.debug("no sky positions for the table", exc_info=True)
    for name, (kind, text, _) in OUTPUT_MAPS.items():
        if name not in values:
            continue
        col = np.asarray(values[name], np.float64)
        if kind in ("class", "count", "flags"):
            table[name] = np.where(np.isfinite(col), col, -1).astype(np.int16)
        else:
            table[name] = col
            unit = _unit(kind, cube.bunit)
            if unit:
                try:
                    table[name].unit = u.Unit(unit, parse_strict="raise")
                except ValueError:
                    pass
        table[name].description = text
    table.meta.update({"tool": "clover %s" % __version__, "input": str(cube.path), "line": line,
                       "velocity": "radio convention, frame %s" % cube.header.get("SPECSYS", "as the input"),
                       "domain": domain.as_dict(), "domain_bits": {str(k): v for k, v in DOMAIN_BITS.items()}})
    return table


def _write_outputs(paths, maps, table, model, cube, extra, domain, stem, outdir, overwrite):
    """Write maps, table, model/residual cubes and (when changed) the network-domain cube."""
    outdir.mkdir(parents=True, exist_ok=True)
    history = "clover %s: %s" % (__version__, domain.note)
    for name, (kind, text, _) in OUTPUT_MAPS.items():
        if name in paths:
            write_map(paths[name], maps[name], cube.spatial_header, _unit(kind, cube.bunit), overwrite,
                      text, history)
    with atomic_path(paths["table"], overwrite=True, suffix=".part.ecsv") as tmp:
        table.write(tmp, format="ascii.ecsv", overwrite=True)
    if model is not None:
        write_native_cube(paths["model"], model, cube, overwrite, "model spectra of the fitted components")
        write_native_cube(paths["residual"], np.asarray(cube.data, np.float32) - model, cube, overwrite,
                          "data minus model")
    if extra["cube"] is not None:
        data, vel = extra["cube"]
        write_network_cube(outdir / (stem + "_clover.fits"), data, vel, cube, overwrite, history)


def _write_provenance_record(paths, config, arguments, cube, cube22, models, domain, n_pixels, seconds):
    """``<name>_provenance.json`` beside the products: how they were made (inputs with digests)."""
    inputs = {"cube": str(cube.path), "cube_sha256": file_digest(cube.path)}
    if cube22 is not None:
        inputs.update(nh3_22=str(cube22.path), nh3_22_sha256=file_digest(cube22.path))
    meta = Path(models.model_dir) / META_FILE
    write_provenance(paths["provenance"], config, predict=arguments, inputs=inputs,
                     rest_frequency_hz=cube.rest_hz, velocity_range_kms=[float(cube.velocity.min()),
                                                                         float(cube.velocity.max())],
                     models={"line": models.line, "model_dir": str(models.model_dir),
                             "members": models.n_members,
                             "meta_sha256": file_digest(meta) if meta.is_file() else None},
                     domain=domain.as_dict(), n_pixels=n_pixels, seconds=round(seconds, 2),
                     outputs=sorted(p.name for name, p in paths.items() if name != "provenance"))


def _remove_stale(stem, outdir, written, network_cube):
    """Delete outputs of an earlier run under the same names that this run did not write
    (e.g. model cubes after a run with refine=False, or the (2,2) maps): files in one
    directory then always come from one run."""
    every = list(_output_paths(stem, outdir, True, True).values())
    if not network_cube:
        every.append(Path(outdir) / (stem + "_clover.fits"))
    for path in every:
        if path not in written.values() and path.exists():
            log.info("removing %s, left by an earlier run with other settings", path)
            path.unlink()


def write_native_cube(path, data, cube, overwrite=False, comment=""):
    """Write a (nchan, ny, nx) cube on the input's own spectral axis, as (x, y, spectrum)."""
    from astropy.io import fits
    old, key = cube.header, str(cube.spec_fits_axis)
    hdr = _cube_header(cube)
    for k, v in (("CTYPE3", old.get("CTYPE" + key, "")), ("CUNIT3", old.get("CUNIT" + key, "")),
                 ("CRVAL3", old.get("CRVAL" + key, 0.0)), ("CDELT3", _spectral_cdelt(old, key)),
                 ("CRPIX3", old.get("CRPIX" + key, 1.0))):
        hdr[k] = v
    if comment:
        hdr["COMMENT"] = comment
    with atomic_output(path, overwrite=overwrite, mode="wb") as stream:
        fits.PrimaryHDU(np.asarray(data, np.float32), hdr).writeto(stream)


def write_network_cube(path, data, velocity, cube, overwrite=False, history=""):
    """Write the cube the networks saw (velocity increasing, radio km/s axis) as ``_clover.fits``."""
    from astropy.io import fits
    hdr = _cube_header(cube)
    hdr.update(CTYPE3="VRAD", CUNIT3="km/s", CRVAL3=float(velocity[0]), CDELT3=float(channel_width(velocity)),
               CRPIX3=1.0)
    if history:
        hdr["HISTORY"] = history
    hdr["HISTORY"] = "clover: blank band edges trimmed, blank channels filled and the axis padded or " \
                     "clipped with noise to %d channels" % data.shape[0]
    with atomic_output(path, overwrite=overwrite, mode="wb") as stream:
        fits.PrimaryHDU(np.asarray(data, np.float32), hdr).writeto(stream)


def _cube_header(cube):
    hdr = cube.spatial_header.copy()
    hdr["WCSAXES"] = 3
    for k in ("RESTFRQ", "SPECSYS", "SSYSOBS", "VELOSYS", "VELREF"):
        if k in cube.header:
            hdr[k] = cube.header[k]
    if cube.bunit:
        hdr["BUNIT"] = cube.bunit
    hdr["ORIGIN"] = "clover %s" % __version__
    return hdr

def _warn_centroid_range(outside, total, line, where):
    """CentroidRangeWarning when more than 1 % (and more than 2) of the emission spectra have
    a component outside the trained range."""
    limit, unit = LINE_TYPES[line]["centroid_range"]
    if total and outside > max(0.01 * total, 2):
        warnings.warn("%d of %d emission spectra have a component more than %.4g %s from %s, "
                      "outside the trained range (flag 4 of the domain map); use tile mode "
                      "(--tile N: a spectral window per N x N pixels) or split the cube into sub-cubes "
                      "with smaller velocity gradients" % (outside, total, limit, unit, where),
                      CentroidRangeWarning, stacklevel=4)


def _warn_bright_emission(data, velocity, line, centre, network_dv, max_pixels=20000, min_snr=6.0):
    """CentroidRangeWarning when bright emission lies outside the networks' window.

    Every spectrum of ``data`` (the whole cube, velocity ``velocity``, so emission in
    channels that the window clips away is caught too) with a peak above ``min_snr`` x
    its noise (after 4-channel smoothing) is checked: its peak must lie within the
    trained centroid range of ``centre``, in the range's own unit (channels of width
    ``network_dv``; Gaussian lines only - NH3 centroids are checked after the fits, as
    bright hyperfine satellites lie 19 km/s from the main line).
    """
    if line != "gauss":          # NH3: satellites are far from the main line; checked after the fits
        return
    flat = data.reshape(data.shape[0], -1)
    cols = np.flatnonzero(np.isfinite(flat).all(axis=0))
    if cols.size > max_pixels:
        cols = cols[np.linspace(0, cols.size - 1, max_pixels).astype(int)]
    if not cols.size:
        return
    raw = np.asarray(flat[:, cols], np.float64)
    spec = _boxcar(raw - np.median(raw, axis=0), 4)
    bright = spec.max(axis=0) > min_snr * _difference_noise(raw.T) / 2.0
    if not bright.any():
        return
    peak = np.argmax(spec[:, bright], axis=0)
    outside = _centroid_outside(velocity[peak], centre, line, network_dv)
    limit, unit = LINE_TYPES[line]["centroid_range"]
    if outside.mean() > 0.01:
        warnings.warn("%d of %d bright spectra peak outside the trained range (%.4g %s around the "
                      "centre %.2f km/s of the window the networks see); use tile mode (--tile N) or "
                      "split the cube into sub-cubes with smaller velocity gradients"
                      % (outside.sum(), outside.size, limit, unit, centre), CentroidRangeWarning, stacklevel=3)


def _half_max_sigma(spec, peak):
    """Dispersion in channels (FWHM / 2.355) of the run above half maximum around ``peak``."""
    n = spec.shape[0]
    chan = np.arange(n)[:, None]
    below = spec < 0.5 * spec[peak, np.arange(spec.shape[1])][None, :]
    left = np.where(below & (chan < peak[None, :]), chan, -1).max(axis=0)
    right = np.where(below & (chan > peak[None, :]), chan, n).min(axis=0)
    return (right - left - 1) / 2.3548


def _predict_blocks(cube, models, batch_size, block_pixels, progress):
    """Run the networks over row blocks of a (nchan, ny, nx) cube; return flat results."""
    nchan, ny, nx = cube.shape
    rows = max(1, block_pixels // max(nx, 1))
    starts = list(range(0, ny, rows))
    bar = None
    if progress and len(starts) > 1:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=ny * nx, unit="spec", desc="clover predict", leave=False)
        except ImportError:
            bar = None
    flat = {}
    for r0 in starts:
        r1 = min(ny, r0 + rows)
        h0, h1 = max(0, r0 - 1), min(ny, r1 + 1)        # one-row halo for the 3x3 mean
        block = np.asarray(cube[:, h0:h1], np.float32)
        x, tmax, valid = make_features(block)
        inner = np.zeros_like(valid)
        inner[r0 - h0:r1 - h0] = True
        keep = inner[valid]
        res = predict_spectra(x[keep], models, batch_size)
        for key, arr in res.items():
            flat.setdefault(key, []).append(arr)
        flat.setdefault("tmax", []).append(tmax[keep])
        flat.setdefault("valid", []).append(valid[r0 - h0:r1 - h0])
        if bar is not None:
            bar.update((r1 - r0) * nx)
    if bar is not None:
        bar.close()
    out = {k: np.concatenate(v) for k, v in flat.items() if k != "valid"}
    return out, np.concatenate(flat["valid"], axis=0)


def predict(f, nh3=False, nproc=1, outdir=None, overwrite=False, model_dir=None,
            batch_size=2048, seed=0, rest_frequency=None, block_pixels=20000,
            progress=True, write=True, models=None, refine=True, tile=0, force_rest=False,
            nh3_22=None, settings=None, config=None):
    """Classify every spectrum of a cube (or one spectrum) and measure its components.

    Parameters
    ----------
    f : str or Path
        FITS cube or 1-D FITS spectrum (spectral axis of frequency, velocity or
        wavelength, any unit), or a two-column text spectrum (:func:`read_text_spectrum`).
    nh3 : bool
        NH3 (1,1) mode (1000-channel models) instead of a Gaussian line (500 channels).
    nproc : int
        CPU threads for TensorFlow.
    outdir : str or Path, optional
        Output directory (default: the cube's directory).
    overwrite : bool
        Replace existing outputs (otherwise OutputExistsError before anything is written).
    model_dir : str or Path, optional
        Trained models (default models/clover).
    batch_size, block_pixels : int
        Spectra per network call; pixels per processing block.
    seed : int
        Seed of the noise that pads short axes and fills blank channels.
    rest_frequency : float, optional
        Hz; overrides the header's RESTFRQ/RESTFREQ.
    progress : bool
        tqdm progress bar when the cube spans several blocks.
    write : bool
        Write the outputs (False: only return them).
    models : CloverModels, optional
        Already loaded networks (saves the loading time in loops).
    refine : bool
        Check the networks' answer against the data (default): zero-, one- and
        two-component fits of every emission spectrum on the cube's own channels, seeded
        by the networks, decide the number of components with the networks' probabilities
        as a prior (:func:`check_against_data`, :func:`select_components`); values and
        errors are the fits'.  False: the networks alone (no model cube).
    tile : int
        0: one spectral window for the cube (its central channels, as the original).
        N > 0: each N x N-pixel tile gets a window centred on its emission (cubes with
        large velocity gradients or off-centre lines; no ``_clover.fits`` then).
    force_rest : bool
        NH3: accept a cube whose rest frequency is not NH3 (1,1).
    nh3_22 : str or Path, optional
        NH3 (2,2) cube of the same field and grid: joint (1,1)+(2,2) fits of the
        components found give T_kin, T_ex, N(NH3) and tau (:func:`fit_nh3_joint`).
    settings : dict, optional
        Keys of :data:`DATA_CHECK`.
    config : Config, optional
        The configuration the command line resolved, copied into the provenance record.

    Returns
    -------
    dict
        ``maps`` {name: (ny, nx)} for every :data:`OUTPUT_MAPS` entry; ``table``
        (astropy Table, a row per spectrum); ``paths`` {name: Path} written; ``domain``
        (:class:`SpectralDomain`); ``seconds``; ``n_pixels``; ``velocity`` (the cube's
        own axis, km/s); ``model`` (nchan, ny, nx) model cube (None without refine).

    Raises
    ------
    InputError, OutputExistsError

    Warns
    -----
    CentroidRangeWarning, LineWidthWarning, LineTypeWarning

    Notes
    -----
    Output names are fixed: ``<name>_<map>.fits`` for every map, ``<name>_table.ecsv``,
    ``<name>_provenance.json`` (:func:`write_provenance`: version, command line,
    configuration, the arguments and inputs of this call, with file digests),
    ``<name>_model.fits`` and ``<name>_residual.fits`` (with refine), and
    ``<name>_clover.fits`` - the cube as the networks saw it - when its axis was
    resampled, trimmed, padded or clipped.  Velocities are radio velocities on the cube's
    own axis and frame (SPECSYS, VELOSYS are copied to the outputs).
    """
    start = time.perf_counter()
    line = "nh3" if nh3 else "gauss"
    if int(tile) < 0:
        raise InputError("tile = %r: use 0 (one window for the cube) or a tile size in pixels" % tile)
    cube = read_cube(f, rest_frequency=rest_frequency, nh3=nh3, force_rest=force_rest)
    if not nh3 and cube.rest_hz and min(abs(cube.rest_hz - r) for r in NH3_REST_HZ.values()) < NH3_REST_TOLERANCE_HZ:
        warnings.warn("%s is an NH3 inversion-line cube (rest frequency %.6f GHz) but runs in Gaussian mode: "
                      "its hyperfine satellites would pass for extra components; use --nh3 / nh3=True"
                      % (cube.path, cube.rest_hz / 1e9), LineTypeWarning, stacklevel=2)
    if nh3_22 and not nh3:
        raise InputError("nh3_22 / --nh3-22 needs NH3 mode (--nh3 / nh3=True)")
    cube22 = _read_22(nh3_22, cube, force_rest) if nh3_22 else None
    outdir = Path(outdir) if outdir else cube.path.parent
    stem = cube.path.name[:-5] if cube.path.name.lower().endswith(".fits") else cube.path.stem
    paths = _output_paths(stem, outdir, refine, cube22 is not None)
    if write:
        _check_outputs_free(list(paths.values()) + [outdir / (stem + "_clover.fits")], overwrite)
    rng = np.random.default_rng(seed)
    work, wvel = (cube.data[::-1], cube.velocity[::-1]) if cube.velocity[-1] < cube.velocity[0] \
        else (cube.data, cube.velocity)
    domain = spectral_domain(work, wvel, line)
    log.info("spectral domain: %s", domain.note)
    if not domain.in_domain:
        warnings.warn("%s; classes and kinematics may be unreliable (flagged in the domain map)"
                      % domain.note, LineWidthWarning, stacklevel=2)
    models = _models_for(line, models, model_dir, nproc)
    log.info("Segmenting and predicting kinematics of %d pixels (%s, %d members)",
             work.shape[1] * work.shape[2], line, models.n_members)
    net, valid, extra = network_pass(work, wvel, domain, models, rng, int(tile), batch_size, block_pixels, progress)
    result = _decide(work, wvel, net, line, refine, settings, domain, valid, cube, block_pixels, progress)
    flags = _domain_flags(result, net, extra, domain, line, valid, settings)
    joint = _joint_22(cube22, valid, result, cube) if cube22 is not None else None
    values = _map_values(result, flags, joint)
    maps = _assemble_maps(values, valid)
    _warn_centroid_range(int((flags & 4 > 0).sum()), int((result["ncomp"] > 0).sum()), line,
                         "their window's centre")
    table = _result_table(values, valid, cube, domain, line)
    model = result["model"]
    if model is not None:
        model[:, ~valid] = np.nan
        if cube.velocity[-1] < cube.velocity[0]:
            model = model[::-1]
    seconds = time.perf_counter() - start
    if write:
        _write_outputs(paths, maps, table, model, cube, extra, domain, stem, outdir, overwrite)
        _remove_stale(stem, outdir, paths, extra["cube"] is not None)
        arguments = {"nh3": bool(nh3), "nproc": nproc, "batch_size": batch_size, "seed": seed,
                     "rest_frequency": rest_frequency, "block_pixels": block_pixels, "refine": bool(refine),
                     "tile": int(tile), "force_rest": bool(force_rest), "settings": {**DATA_CHECK, **(settings or {})}}
        _write_provenance_record(paths, config, arguments, cube, cube22, models, domain,
                                 int(valid.sum()), seconds)
    log.info("predicted %d pixels in %.1f s", int(valid.sum()), seconds)
    return {"maps": maps, "table": table, "paths": paths if write else {}, "seconds": seconds,
            "n_pixels": int(valid.sum()), "velocity": cube.velocity, "domain": domain, "model": model}


def network_pass(work, wvel, domain, models, rng, tile, batch_size, block_pixels, progress):
    """Run the networks on a cube brought into their domain.

    Parameters
    ----------
    work : ndarray, shape (nchan, ny, nx)
        The cube, velocity increasing.
    wvel : ndarray, shape (nchan,)
    domain : SpectralDomain
    models : CloverModels
    rng : numpy.random.Generator
    tile, batch_size, block_pixels, progress
        As :func:`predict`.

    Returns
    -------
    net : dict
        Flat (valid pixels, row-major) network output in physical units: ``probs``,
        ``class``, ``prob``, ``one``/``one_err`` (m, 3), ``two``/``two_err`` (m, 6),
        ``centre_kms`` (m,) the centre of the window each pixel was seen in.
    valid : ndarray of bool, shape (ny, nx)
    extra : dict
        ``blank`` (ny, nx) pixels with filled channels; ``cube`` (data, velocity) the
        network-domain cube when its axis differs from the input's (else None).
    """
    nchan = models.nchan
    edges = trim_blank_edges(work)
    filled, blank = fill_blank_channels(work[edges], rng)
    svel = wvel[edges]
    if domain.resampled:
        filled, svel = resample_spectra(filled, svel, domain.network_dv_kms)
    ny, nx = work.shape[1:]
    store = {}
    if tile:
        fallback = emission_channel(filled)
        fallback = filled.shape[0] // 2 if fallback is None else fallback
        corners = [(y, x) for y in range(0, ny, tile) for x in range(0, nx, tile)]
        log.info("%d tiles of %d x %d pixels, each with its own spectral window", len(corners), tile, tile)
        for y0, x0 in _progress(corners, progress, "clover tiles"):
            y1, x1 = min(ny, y0 + tile), min(nx, x0 + tile)
            hy0, hx0 = max(0, y0 - 1), max(0, x0 - 1)             # one-pixel halo for the 3x3 mean
            sub = filled[:, hy0:min(ny, y1 + 1), hx0:min(nx, x1 + 1)]
            centre = emission_channel(filled[:, y0:y1, x0:x1])
            data, first = fit_length(sub, nchan, rng, fallback if centre is None else centre)
            inner = (slice(y0 - hy0, y1 - hy0), slice(x0 - hx0, x1 - hx0))
            _store_network(store, data, _fitted_velocity(svel, first, nchan), models, batch_size,
                           data.shape[1] * data.shape[2], False, (slice(y0, y1), slice(x0, x1)), inner, (ny, nx))
        netcube = None
    else:
        data, first = fit_length(filled, nchan, rng)
        vel = _fitted_velocity(svel, first, nchan)
        _warn_bright_emission(work, wvel, models.line, 0.5 * (vel[0] + vel[-1]), domain.network_dv_kms)
        _store_network(store, data, vel, models, batch_size, block_pixels, progress,
                       (slice(None), slice(None)), (slice(None), slice(None)), (ny, nx))
        changed = domain.resampled or data.shape[0] != work.shape[0] or edges != slice(0, work.shape[0])
        netcube = (data, vel) if changed else None
    valid = np.isfinite(store["prob"])
    net = {k: v[valid] for k, v in store.items()}
    net["class"] = net["class"].astype(int)
    blank_px = blank.any(axis=0) if blank is not None else np.zeros((ny, nx), bool)
    return net, valid, {"blank": blank_px, "cube": netcube}


def _store_network(store, data, vel, models, batch_size, block_pixels, progress, target, inner, shape):
    """Networks on ``data`` (velocity ``vel``); physical values stored into 2-D maps."""
    flat, valid = _predict_blocks(data, models, batch_size, block_pixels, progress)
    phys = _network_physical(flat, flat["tmax"], vel, models.nchan)
    phys["centre_kms"] = np.full(len(flat["prob"]), 0.5 * (vel[0] + vel[-1]))
    for key, arr in phys.items():
        if key not in store:
            store[key] = np.full(shape + arr.shape[1:], np.nan)
        full = np.full(valid.shape + arr.shape[1:], np.nan)
        full[valid] = arr
        store[key][target] = full[inner]


def _network_physical(res, tmax, velocity, nchan):
    """Network output in training units -> km/s and brightness on the window ``velocity``."""
    half = _centre_channel(nchan)
    chan = np.arange(nchan)
    dv = channel_width(velocity)
    out = {"probs": res["probs"], "class": res["class"].astype(float), "prob": res["prob"]}
    for kind, key in (("reg1", "one"), ("reg2", "two")):
        mu, err = res[kind], res[kind + "_err"]
        k = mu.shape[1] // 3
        v = np.column_stack([np.interp(mu[:, j] * half + half, chan, velocity, left=np.nan, right=np.nan)
                             for j in range(k)])
        out[key] = np.column_stack([v, mu[:, k:2 * k] * dv, mu[:, 2 * k:] * tmax[:, None]])
        out[key + "_err"] = np.column_stack([err[:, :k] * half * dv, err[:, k:2 * k] * dv,
                                             err[:, 2 * k:] * tmax[:, None]])
    return out


def _decide(work, velocity, net, line, refine, settings, domain, valid, cube, block_pixels=20000, progress=False):
    """Number of components and their values: fits checked against the data, or the networks.

    The fits run on blocks of ``block_pixels`` spectra (memory); the neighbours' evidence
    and the choice then use the whole map; model spectra are drawn block by block into the
    model cube (``work``'s shape, velocity increasing).
    """
    ys, xs = np.nonzero(valid)
    spectra = lambda rows: np.asarray(work[:, ys[rows], xs[rows]].T, np.float64)  # noqa: E731
    blocks = [np.arange(i, min(i + block_pixels, len(ys))) for i in range(0, len(ys), block_pixels)]
    if not refine:
        ncomp = np.choose(net["class"], [1, 0, 2])
        comp, comp_err = network_components(net, ncomp)
        noise = np.concatenate([_difference_noise(spectra(rows)) for rows in blocks]) if blocks else np.zeros(0)
        return {"ncomp": ncomp, "prob": net["prob"], "comp": comp, "comp_err": comp_err, "model": None,
                "rchi2": np.full(len(ncomp), np.nan), "noise": noise, "failed": np.zeros(len(ncomp), bool)}
    parts = []
    for rows in _progress(blocks, progress, "clover fits"):
        parts.append(check_against_data(spectra(rows), velocity, {k: net[k][rows] for k in ("probs", "one", "two")},
                                        line, settings))
    check = _concatenate_checks(parts)
    aic = np.full(valid.shape + (3,), np.inf)
    aic[valid] = check["aic"]
    evidence = neighbour_evidence(aic, valid, beam_pixels(cube.spatial_header))[valid]
    ncomp, prob, lowered = select_components(check, net["probs"], settings, evidence, domain.resampled)
    comp, comp_err, rchi2 = assemble_components(check, ncomp)
    model = np.zeros(work.shape, np.float32)
    for rows in blocks:
        model[:, ys[rows], xs[rows]] = model_spectra({k: _take(check[k], rows) for k in ("q", "tmax", "fitted")},
                                                     ncomp[rows], comp[rows], velocity, line).T
    failed = check["fitted"] & ~(check["ok"][1] & check["ok"][2])
    if lowered.any():
        log.info("%d spectra lost a component the data do not support (matched-filter S/N < %.1f)",
                 int(lowered.sum()), dict(DATA_CHECK, **(settings or {}))["min_snr"])
    return {"ncomp": ncomp, "prob": prob, "comp": comp, "comp_err": comp_err, "model": model,
            "rchi2": rchi2, "noise": check["noise"], "failed": failed, "check": check}


def _take(value, rows):
    """``value[rows]`` for arrays and for dicts of arrays (one level)."""
    return {k: v[rows] for k, v in value.items()} if isinstance(value, dict) else value[rows]


def _concatenate_checks(parts):
    """One :func:`check_against_data` result from the results of consecutive blocks."""
    if not parts:
        return {"bic": np.zeros((0, 3)), "aic": np.zeros((0, 3)), "noise": np.zeros(0), "nchan": np.zeros(0, int),
                "fitted": np.zeros(0, bool), "tmax": np.zeros(0),
                **{key: {k: np.zeros((0,) + shape) for k, shape in shapes.items()}
                   for key, shapes in (("params", {1: (3,), 2: (6,)}), ("errors", {1: (3,), 2: (6,)}),
                                       ("snr", {1: (1,), 2: (2,)}), ("q", {1: (4,), 2: (8,)}),
                                       ("rchi2", {0: (), 1: (), 2: ()}), ("ok", {1: (), 2: ()}))}}
    out = {}
    for key, value in parts[0].items():
        if isinstance(value, dict):
            out[key] = {k: np.concatenate([p[key][k] for p in parts]) for k in value}
        elif isinstance(value, np.ndarray):
            out[key] = np.concatenate([p[key] for p in parts])
        else:
            out[key] = value
    return out


def _domain_flags(result, net, extra, domain, line, valid, settings=None):
    """Per-spectrum domain flag bits (:data:`DOMAIN_BITS`)."""
    m = len(result["ncomp"])
    flags = np.zeros(m, int)
    if domain.resampled:
        flags |= 1
    sig = result["comp"][:, :, 1]
    present = np.isfinite(sig)
    if line == "gauss":
        width = sig / domain.network_dv_kms
        lo, hi = GAUSS_SIGMA_CH
    else:
        width, (lo, hi) = sig, NH3_SIGMA_KMS
    floor = dict(DATA_CHECK, **(settings or {}))["min_sigma_channels"] * domain.native_dv_kms * 1.001  # at the floor
    flags |= 2 * (present & ((width < lo) | (width > hi) | (sig <= floor))).any(axis=1)
    flags |= 4 * (present & _centroid_outside(result["comp"][:, :, 0], net["centre_kms"][:, None], line,
                                               domain.network_dv_kms)).any(axis=1)
    flags |= 8 * extra["blank"][valid]
    flags |= 16 * result["failed"]
    return flags


def _centroid_outside(v, centre_kms, line, network_dv):
    """Centroids outside the trained range of the window the networks saw, in the range's
    own units: channels of the network axis (Gaussian lines), km/s (NH3)."""
    limit, unit = LINE_TYPES[line]["centroid_range"]
    offset = np.abs(v - centre_kms)
    if unit == "channels":
        offset = offset / network_dv
    return np.nan_to_num(offset) > limit


def _map_values(result, flags, joint=None):
    """Flat value per output map name."""
    comp, err, n = result["comp"], result["comp_err"], result["ncomp"]
    two, one = (n == 2)[:, None], (n == 1)[:, None]
    vals = {"class": np.choose(n, [CLASS_CODES["noise"], CLASS_CODES["one"], CLASS_CODES["two"]]).astype(float),
            "ncomp": n.astype(float), "prob": result["prob"], "rchi2": result["rchi2"], "rms": result["noise"],
            "domain": flags.astype(float)}
    dom, dom_err = dominant_component(comp, err)
    for q, name in enumerate(("vlsr", "sig", "tpeak")):
        for j in (0, 1):
            vals["%s%d" % (name, j + 1)] = np.where(two[:, 0], comp[:, j, q], np.nan)
            vals["%s%d_err" % (name, j + 1)] = np.where(two[:, 0], err[:, j, q], np.nan)
        vals[name] = np.where(one[:, 0], comp[:, 0, q], np.nan)
        vals[name + "_err"] = np.where(one[:, 0], err[:, 0, q], np.nan)
        vals[name + "_dom"] = np.where(n > 0, dom[:, q], np.nan)
        vals[name + "_dom_err"] = np.where(n > 0, dom_err[:, q], np.nan)
    if joint is not None:
        vals.update(joint)
    return vals


def _joint_22(cube22, valid, result, cube11):
    """Joint (1,1)+(2,2) fits of the components found in the (1,1) cube, seeded by them.

    Returns
    -------
    dict
        Flat (valid pixels) values of the NH3_JOINT_MAPS outputs: per quantity ``q``
        ``q1``, ``q2`` (two-component pixels), ``q`` (one-component), ``q_dom`` (the
        dominant component) and their ``_err``; NaN where the fit did not converge.
    """
    spec11 = np.asarray(cube11.data[:, valid].T, np.float64)
    spec22 = np.asarray(cube22.data[:, valid].T, np.float64)
    f11 = NH3_11_REST_HZ * (1 - np.asarray(cube11.velocity, float) / C_KMS)
    f22 = NH3_22_REST_HZ * (1 - np.asarray(cube22.velocity, float) / C_KMS)
    ncomp, comp = result["ncomp"], result["comp"]
    m = len(ncomp)
    vals = {q: np.full((m, 2), np.nan) for q in NH3_JOINT_MAPS}
    errs = {q: np.full((m, 2), np.nan) for q in NH3_JOINT_MAPS}
    floor = DATA_CHECK["min_sigma_channels"] * min(channel_width(cube11.velocity), channel_width(cube22.velocity))
    line11 = _joint_constants()["lines"][0]
    for k in (1, 2):
        rows = np.flatnonzero(ncomp == k)
        if not rows.size:
            continue
        starts = joint_starts(comp[rows, :k, 0], comp[rows, :k, 1], comp[rows, :k, 2], k)
        fit = fit_nh3_joint(spec11[rows], spec22[rows], f11, f22, starts, min_sigma=floor)
        p, e, ok = fit["params"], fit["errors"], fit["ok"]
        for i in range(k):
            tk, tx, ln, sg = (p[:, 5 * i + j] for j in range(4))
            etk, etx, eln, esg = (e[:, 5 * i + j] for j in range(4))
            tau, dl_tk, dl_tx = _nh3_line_tau(line11, tk, tx, ln, sg)
            # tau's error by linear propagation of the parameters' errors (covariances left out)
            etau = tau * np.sqrt((dl_tk * etk) ** 2 + (dl_tx * etx) ** 2 + (np.log(10) * eln) ** 2 + (esg / sg) ** 2)
            for q, v, ev in (("tkin", tk, etk), ("tex", tx, etx), ("logn", ln, eln), ("tau", tau, etau)):
                vals[q][rows, i] = np.where(ok, v, np.nan)
                errs[q][rows, i] = np.where(ok, ev, np.nan)
        log.info("joint (1,1)+(2,2) fits of %d %d-component pixels: %d converged", rows.size, k, int(ok.sum()))
    dom = np.argmax(np.where(np.isfinite(comp[:, :, 2]), comp[:, :, 2], -np.inf), axis=1)
    out, two, one, idx = {}, ncomp == 2, ncomp == 1, np.arange(m)
    for q in NH3_JOINT_MAPS:
        for suffix, col, sel in (("1", 0, two), ("2", 1, two), ("", 0, one)):
            out[q + suffix] = np.where(sel, vals[q][:, col], np.nan)
            out[q + suffix + "_err"] = np.where(sel, errs[q][:, col], np.nan)
        out[q + "_dom"] = np.where(ncomp > 0, vals[q][idx, dom], np.nan)
        out[q + "_dom_err"] = np.where(ncomp > 0, errs[q][idx, dom], np.nan)
    return out


def _read_22(path, cube11, force_rest):
    """The NH3 (2,2) cube of ``--nh3-22``, checked against the (1,1) cube's grid."""
    cube22 = read_cube(path, nh3=True, force_rest=force_rest, line="twotwo")
    if cube22.data.shape[1:] != cube11.data.shape[1:]:
        raise InputError("%s: the (2,2) cube has %d x %d pixels, the (1,1) cube %d x %d; regrid it to the "
                         "(1,1) grid" % (path, cube22.data.shape[2], cube22.data.shape[1],
                                          cube11.data.shape[2], cube11.data.shape[1]))
    return cube22


def _models_for(line, models, model_dir, nproc):
    """The given models (checked against the line type) or the ones loaded from ``model_dir``."""
    models = models or CloverModels(line, model_dir, nproc)
    if models.line != line:
        raise InputError("the given models are for %r spectra but nh3=%s; load CloverModels(%r)"
                         % (models.line, line == "nh3", line))
    return models


def emission_channel(data, smooth=5, min_snr=5.0):
    """Channel of the emission peak of a (sub-)cube, or None when there is none.

    The mean of the finite spectra is smoothed by a ``smooth``-channel boxcar; its
    maximum counts as emission when it exceeds ``min_snr`` x its noise (:func:`mad_sigma`
    of the smoothed mean spectrum).

    Examples
    --------
    >>> cube = np.zeros((200, 2, 2)) + np.random.default_rng(1).normal(0, 0.1, (200, 2, 2))
    >>> cube[120:125] += 1.0
    >>> emission_channel(cube)
    122
    """
    valid = np.ones(data.shape[1:], bool)
    for plane in data:                       # plane by plane: no copy of a large cube
        valid &= np.isfinite(plane)
    if not valid.any() or data.shape[0] < smooth:
        return None
    mean = np.array([plane[valid].mean(dtype=float) for plane in data])
    mean = np.convolve(mean, np.ones(smooth) / smooth, mode="same")
    base = np.median(mean)
    noise = mad_sigma(mean)
    peak = int(np.argmax(mean))
    return peak if mean[peak] - base > min_snr * max(noise, 1e-30) else None


def _progress(items, enabled, desc):
    """``items`` wrapped in a tqdm bar when enabled, there is more than one, and tqdm exists."""
    if not enabled or len(items) < 2:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


def _fitted_velocity(velocity, first, nchan):
    """Velocity axis after padding (first > 0) or clipping (first < 0), same channel width."""
    step = (velocity[-1] - velocity[0]) / (len(velocity) - 1) if len(velocity) > 1 else TEMPLATE_DV_KMS
    return velocity[0] + (np.arange(nchan) - first) * step


# ===========================================================================
# Stage: train and evaluate
# ===========================================================================
SNR_BINS = (0.0, 4.0, 8.0, 16.0, np.inf)


def evaluate(line, models, n=9000, seed=1, batch_size=2048, refine=True):
    """Accuracy table of a line type's models on a fresh simulated test set.

    Parameters
    ----------
    line : {'gauss', 'nh3'}
    models : CloverModels
    n : int
        Test spectra (thirds per class).
    seed : int
        Test-set seed (use one different from the training seed).
    refine : bool
        As :func:`predict`: the networks' answer checked against the spectra by fits
        (:func:`check_against_data`), or the networks alone.

    Returns
    -------
    dict
        ``class_accuracy`` {class: {'all', 'snr>=4'}} of the final classes,
        ``network_class_accuracy`` {class: S/N >= 4 accuracy of the ensemble alone},
        ``snr_bins`` {class: {bin: [acc, count]}} (two-component spectra binned by their
        weaker component's S/N), ``confusion`` (3x3, rows truth), ``two_by_separation``
        (two-component accuracy at S/N >= 4 per bin of centroid separation / larger
        dispersion), ``calibration`` {prob bin: [mean prob, fraction correct, count]}
        (the reliability curve of the ``prob`` map) and ``regression`` {'one', 'two':
        median absolute errors of centroid and dispersion (km/s), relative peak error and
        the pull spread (error / reported uncertainty) of correctly classified spectra at
        S/N >= 8}.
    """
    rng = np.random.default_rng(seed)
    sim = LINE_TYPES[line]["simulate"](n, rng)
    res = predict_spectra(sim["x"], models, batch_size)
    network = res["probs"].argmax(axis=1)
    nchan = models.nchan
    vel = gaussian_template_axis() if line == "gauss" else nh3_template_axis()[1]
    net = _network_physical(res, sim["tmax"], vel, nchan)
    spectra = sim["x"][:, :, 0].astype(np.float64) * sim["tmax"][:, None]
    if refine:
        check = check_against_data(spectra, vel, net, line)
        ncomp, prob, _ = select_components(check, res["probs"])
        comp, comp_err = assemble_components(check, ncomp)[:2]
    else:
        ncomp, prob = np.choose(network, [1, 0, 2]), res["prob"]
        comp, comp_err = network_components(net, ncomp)
    pred = np.choose(ncomp, [CLASS_CODES["noise"], CLASS_CODES["one"], CLASS_CODES["two"]])
    truth = sim["label"].astype(int)
    snr = np.where(truth == CLASS_CODES["two"], sim["snr_min"], sim["snr"])
    table = {"n": n, "seed": seed, "refine": bool(refine), "class_accuracy": {}, "network_class_accuracy": {},
             "snr_bins": {}, "confusion": np.bincount(truth * 3 + pred, minlength=9).reshape(3, 3).tolist()}
    for name, code in CLASS_CODES.items():
        rows = truth == code
        ok = pred[rows] == code
        high = (snr[rows] >= 4) | (code == CLASS_CODES["noise"])
        table["class_accuracy"][name] = {"all": float(ok.mean()), "snr>=4": float(ok[high].mean())}
        table["network_class_accuracy"][name] = float((network[rows] == code)[high].mean())
        bins = {}
        for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:]):
            sel = (snr[rows] >= lo) & (snr[rows] < hi)
            if sel.any() and code != CLASS_CODES["noise"]:
                bins["%g-%g" % (lo, hi)] = [float(ok[sel].mean()), int(sel.sum())]
        table["snr_bins"][name] = bins
    table["two_by_separation"] = _accuracy_by_separation(sim, pred, snr)
    table["calibration"] = calibration_curve(prob, pred == truth)
    table["regression"] = _regression_table(sim, comp, comp_err, pred, truth)
    return table


PROB_BINS = (0.0, 0.5, 0.7, 0.9, 0.97, 0.99, 1.0001)


def calibration_curve(prob, correct, bins=PROB_BINS):
    """Reliability of a probability: {bin: [mean prob, fraction correct, count]}.

    A ``prob`` map means what it says when, in every bin, the fraction of correct
    classes equals the mean probability.
    """
    prob, correct = np.asarray(prob, float), np.asarray(correct, bool)
    out = {}
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (prob >= lo) & (prob < hi)
        if sel.any():
            out["%g-%g" % (lo, min(hi, 1.0))] = [float(prob[sel].mean()), float(correct[sel].mean()), int(sel.sum())]
    return out


def _regression_table(sim, comp, comp_err, pred, truth, min_snr=8.0):
    """Median absolute errors and pull spreads of correctly classified spectra at S/N >= min_snr."""
    out = {}
    for name, k in (("one", 1), ("two", 2)):
        code = CLASS_CODES[name]
        good = (truth == code) & (pred == code) & (sim["snr_min"] >= min_snr)
        if not good.any():
            continue
        order = np.argsort(np.where(np.isfinite(sim["v"][good]), sim["v"][good], np.inf), axis=1)[:, :k]
        tv, ts = (np.take_along_axis(sim[q][good], order, 1) for q in ("v", "sigma"))
        tp = np.take_along_axis(sim["peak"][good], order, 1)
        c, e = comp[good, :k], comp_err[good, :k]
        dv, ds, dp = c[:, :, 0] - tv, c[:, :, 1] - ts, c[:, :, 2] - tp
        with np.errstate(all="ignore"):
            out[name] = {"n": int(good.sum()), "mae_vlsr_kms": float(np.nanmedian(np.abs(dv))),
                         "mae_sigma_kms": float(np.nanmedian(np.abs(ds))),
                         "mae_tpeak_rel": float(np.nanmedian(np.abs(dp / tp))),
                         "pull_std_vlsr": float(_robust_std(dv / e[:, :, 0])),
                         "pull_std_sigma": float(_robust_std(ds / e[:, :, 1])),
                         "pull_std_tpeak": float(_robust_std(dp / e[:, :, 2])),
                         "mean_linewidth_kms": float(np.nanmean(ts))}
    return out


def _robust_std(x):
    """:func:`mad_sigma` of the finite values (NaN if none; infinities left out too)."""
    x = np.asarray(x, float)
    return mad_sigma(x[np.isfinite(x)])


SEP_BINS = (0.0, 1.5, 2.0, 3.0, np.inf)


def _accuracy_by_separation(sim, pred, snr):
    """Two-component accuracy (weaker component S/N >= 4) per bin of centroid
    separation in units of the larger dispersion: {bin: [accuracy, count]}."""
    two = (sim["label"] == CLASS_CODES["two"]) & (snr >= 4)
    ratio = np.zeros(len(two))
    ratio[two] = np.abs(sim["v"][two, 1] - sim["v"][two, 0]) / sim["sigma"][two].max(axis=1)
    out = {}
    for lo, hi in zip(SEP_BINS[:-1], SEP_BINS[1:]):
        sel = two & (ratio >= lo) & (ratio < hi)
        if sel.any():
            out["%g-%g" % (lo, hi)] = [float((pred[sel] == CLASS_CODES["two"]).mean()), int(sel.sum())]
    return out


def _member_seed(seed, line, role, index=0):
    """Deterministic integer seed per (line, model role, member)."""
    words = [seed, list(LINE_TYPES).index(line), ["class", "reg2", "reg1", "val", "test"].index(role), index]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _fit(model, x, y, xv, yv, settings, label):
    """Train one network with Adam and early stopping; return its record."""
    keras = _import_keras()
    start = time.perf_counter()
    cb = [keras.callbacks.EarlyStopping("val_loss", patience=settings["patience"],
                                        restore_best_weights=True),
          keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.3, min_lr=1e-5,
                                            patience=max(1, settings["patience"] - 2))]
    hist = model.fit(x, y, batch_size=settings["batch_size"], epochs=settings["epochs"],
                     validation_data=(xv, yv), callbacks=cb, shuffle=True, verbose=0)
    record = {"epochs_run": len(hist.history["loss"]), "seconds": round(time.perf_counter() - start, 1),
              "val_loss": float(min(hist.history["val_loss"])), "n_train": int(len(x)),
              "params": int(model.count_params())}
    if "val_accuracy" in hist.history:
        record["val_accuracy"] = float(max(hist.history["val_accuracy"]))
    log.info("trained %s: %s", label, record)
    return record


def _save_weights(model, path):
    with atomic_path(path, overwrite=True, suffix=".part.weights.h5") as tmp:  # keras wants this ending
        model.save_weights(tmp)


def _train_line(line, model_dir, settings, previous=None):
    """Train the classifier members and both regressors of one line type.

    With ``settings['parts'] == ['reg']`` the classifier entry of ``previous`` (the
    metadata already in ``model_dir``) is kept and only the regressors are trained;
    training is deterministic, so this equals a full run with the same settings.
    """
    keras = _import_keras()
    spec = LINE_TYPES[line]
    simulate, nchan = spec["simulate"], spec["nchan"]
    frac = settings["nh3_fraction"] if line == "nh3" else 1.0
    size = lambda n: max(300, int(round(n * frac)) // 3 * 3)  # noqa: E731
    seed = settings["seed"]
    t0 = time.perf_counter()
    if "class" in settings["parts"]:
        val = simulate(size(settings["n_val"]), np.random.default_rng(_member_seed(seed, line, "val")))
        data = simulate(size(settings["n_class"]), np.random.default_rng(_member_seed(seed, line, "class")))
        log.info("%s: simulated %d + %d spectra in %.1f s", line, len(data["x"]), len(val["x"]),
                 time.perf_counter() - t0)
    else:
        data = None
    entry = {"nchan": nchan, "dv_kms": spec["dv_kms"], "classifier": {"members": []}}
    if "class" not in settings["parts"]:
        entry["classifier"] = previous["classifier"]
    for i in range(settings["ensemble_size"] if "class" in settings["parts"] else 0):
        keras.utils.set_random_seed(_member_seed(seed, line, "class", i))
        model = build_network(nchan, 3, "class")
        model.compile(keras.optimizers.Adam(settings["learning_rate"]), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        # bagging: each member sees its own bootstrap-free random 90 % of the set
        rows = np.random.default_rng(_member_seed(seed, line, "class", 100 + i)).permutation(len(data["x"]))
        rows = rows[: int(0.9 * len(rows))]
        rec = _fit(model, data["x"][rows], data["label"][rows], val["x"], val["label"], settings,
                   "%s classifier %d" % (line, i))
        name = "%s_class%d.weights.h5" % (line, i)
        _save_weights(model, model_dir / name)
        entry["classifier"]["members"].append(dict(rec, file=name, n_out=3, head="class", dense=32))
    del data
    kernel = recentre_kernel(line)
    entry["recentre"] = kernel
    for kind, code, factor in (("reg2", CLASS_CODES["two"], 1.0), ("reg1", CLASS_CODES["one"], 0.5)):
        sim = simulate(size(settings["n_reg"] * factor), np.random.default_rng(_member_seed(seed, line, kind)),
                       classes=code)
        vsim = simulate(size(settings["n_val"] / 3), np.random.default_rng(_member_seed(seed, line, "val", 1 + code)),
                        classes=code)
        sim["x"], shift = recentre(sim["x"], kernel)
        vsim["x"], vshift = recentre(vsim["x"], kernel)
        y, yv = _shift_targets(sim[kind], shift, kind, nchan), _shift_targets(vsim[kind], vshift, kind, nchan)
        mean, std = y.mean(axis=0), y.std(axis=0) + 1e-6
        k = y.shape[1]
        keras.utils.set_random_seed(_member_seed(seed, line, kind))
        model = build_network(nchan, 2 * k, "reg", 64)
        model.compile(keras.optimizers.Adam(settings["learning_rate"]), gaussian_nll)
        rec = _fit(model, sim["x"], (y - mean) / std, vsim["x"], (yv - mean) / std, settings,
                   "%s regressor %s" % (line, kind))
        name = "%s_%s.weights.h5" % (line, kind)
        _save_weights(model, model_dir / name)
        entry[kind] = dict(rec, file=name, n_out=2 * k, head="reg", dense=64, targets=REG_TARGETS[kind],
                           mean=mean.tolist(), std=std.tolist())
    entry["train_seconds"] = round(time.perf_counter() - t0, 1)
    return entry


def train(model_dir=None, seed=20191119, lines=("gauss", "nh3"), ensemble_size=6, n_class=54000,
          n_reg=54000, nh3_fraction=0.75, n_val=6000, n_test=9000, epochs=24, patience=5,
          batch_size=128, learning_rate=1.5e-3, threads=2, overwrite=False, parts=("class", "reg")):
    """Simulate the training sets and train every model of the given line types.

    Parameters
    ----------
    model_dir : str or Path, optional
        Output directory (default models/clover); ``clover_models.json`` records the
        seed, set sizes, versions, timings and the accuracy table of each line type.
    seed : int
        Seed of the simulated sets and of the weight initialisation.
    lines : sequence of {'gauss', 'nh3'}
    ensemble_size : int
        Classifier members (default 6, as the original).
    n_class, n_reg, n_val, n_test : int
        Spectra per classifier member set, regressor set, validation set, test set
        (NH3 sets are ``nh3_fraction`` of these).
    epochs, patience, batch_size, learning_rate : training settings (Adam, early
        stopping on the validation loss, best weights kept).
    threads : int
        CPU threads for TensorFlow.
    overwrite : bool
        Replace the models of these line types in ``model_dir``.
    parts : sequence of {'class', 'reg'}
        Train the classifier ensemble, the regressors, or both; with only 'reg' the
        classifiers already in ``model_dir`` are kept.

    Returns
    -------
    dict
        The metadata written to ``clover_models.json``.

    Notes
    -----
    Reproducible: numpy Generators and keras/TF seeds derive from ``seed`` and TF op
    determinism is enabled; results can still differ in the last bits across CPUs or
    thread counts (floating-point reduction order in oneDNN kernels).
    """
    model_dir = Path(model_dir) if model_dir else MODEL_DIR
    meta_path = model_dir / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"lines": {}}
    clash = [l for l in lines if l in meta["lines"]]
    if clash and not overwrite:
        raise OutputExistsError("%s already holds %s models; use --overwrite to retrain them"
                                % (model_dir, ", ".join(clash)))
    model_dir.mkdir(parents=True, exist_ok=True)
    keras = _import_keras(threads)
    import tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    settings = dict(seed=seed, ensemble_size=ensemble_size, n_class=n_class, n_reg=n_reg,
                    nh3_fraction=nh3_fraction, n_val=n_val, epochs=epochs, patience=patience,
                    batch_size=batch_size, learning_rate=learning_rate, parts=list(parts))
    for line in lines:
        previous = meta["lines"].get(line)
        if "class" not in parts and not previous:
            raise InputError("no %s classifiers in %s to keep; train with parts=('class', 'reg')"
                             % (line, model_dir))
        entry = _train_line(line, model_dir, settings, previous)
        meta["lines"][line] = entry
        _write_meta(meta_path, meta, settings, keras, tf)
        models = CloverModels(line, model_dir, threads)
        entry["accuracy"] = evaluate(line, models, int(n_test * (nh3_fraction if line == "nh3" else 1)),
                                     seed=seed + 1)
        log.info("%s accuracy: %s", line, json.dumps(entry["accuracy"]["class_accuracy"]))
        _write_meta(meta_path, meta, settings, keras, tf)
    return meta


def _write_meta(path, meta, settings, keras, tf):
    meta.update(clover_version=__version__, seed=settings["seed"], settings=settings,
                versions={"tensorflow": tf.__version__, "keras": keras.__version__,
                          "numpy": np.__version__, "python": sys.version.split()[0]},
                written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with atomic_output(path, overwrite=True) as out:
        json.dump(meta, out, indent=1)
    os.chmod(path, 0o644)


# ===========================================================================
# Simulated cubes (tests, benchmark, demo)
# ===========================================================================
def simulate_cube(line="gauss", ny=24, nx=24, rng=None, snr=10.0, nchan=None):
    """A small cube with noise / one-component / two-component regions (left to right).

    Parameters
    ----------
    line : {'gauss', 'nh3'}
    ny, nx : int
        Spatial size; columns [0, nx/3) are noise, [nx/3, 2nx/3) one component, the rest
        two components; centroids follow a gentle gradient along y.
    rng : numpy.random.Generator
    snr : float
        Peak S/N of the brighter component (Gaussian); NH3 noise is 0.1 K.
    nchan : int, optional
        Channels (default the model length); the template channel width is kept.

    Returns
    -------
    cube : ndarray, shape (nchan, ny, nx), float32 (velocity increasing with index)
    velocity : ndarray, shape (nchan,), km/s
    truth : dict of (ny, nx) maps: class, vlsr1, vlsr2, sig1, sig2, tpeak1, tpeak2
    """
    rng = rng or np.random.default_rng(0)
    full = LINE_TYPES[line]["nchan"]
    nchan = nchan or full
    yy, xx = np.mgrid[0:ny, 0:nx]
    code = np.where(xx < nx // 3, 1, np.where(xx < 2 * nx // 3, 0, 2))
    grad = (yy / max(ny - 1, 1) - 0.5)
    if line == "gauss":
        v1, sep, s1, s2, p1, p2, noise = -1.0 + 2.0 * grad, 2.0, 0.35, 0.45, 1.0, 0.7, 1.0 / snr
    else:
        v1, sep, s1, s2, noise = -0.5 + 1.0 * grad, 1.6, 0.2, 0.3, NH3_RANGES["noise_k"]
    v2 = v1 + sep
    present2 = code == 2
    first = (full - nchan) // 2
    if line == "gauss":
        vel = gaussian_template_axis()[first:first + nchan] if nchan <= full else \
            (np.arange(nchan) - _centre_channel(nchan)) * TEMPLATE_DV_KMS
        amp = np.column_stack([np.where(code != 1, p1, 0.0).ravel(), np.where(present2, p2, 0.0).ravel()])
        cen = np.column_stack([v1.ravel(), v2.ravel()])
        sig = np.column_stack([np.full(v1.size, s1), np.full(v1.size, s2)])
        spec = gaussian_profiles(vel, amp, cen, sig)
        t1, t2 = amp[:, 0].reshape(ny, nx), amp[:, 1].reshape(ny, nx)
    else:
        idx = np.arange(first, first + nchan)
        freq = NH3_11_REST_HZ * (1 - ((idx - 499) * TEMPLATE_DV_KMS) / C_KMS)
        vel = (idx - 499) * TEMPLATE_DV_KMS
        m = v1.size
        a = nh3_spectra(freq, np.full(m, 15.0), np.full(m, 14.2), np.full(m, s1), v1.ravel())
        b = nh3_spectra(freq, np.full(m, 12.0), np.full(m, 14.0), np.full(m, s2), v2.ravel())
        a[(code == 1).ravel()] = 0
        b[~present2.ravel()] = 0
        spec = a + b
        t1, t2 = a.max(1).reshape(ny, nx), b.max(1).reshape(ny, nx)
    cube = spec.T.reshape(nchan, ny, nx) + rng.standard_normal((nchan, ny, nx)).astype(np.float32) * noise
    nan = lambda a, keep: np.where(keep, a, np.nan)  # noqa: E731
    truth = {"class": code.astype(float), "vlsr1": nan(v1, present2), "vlsr2": nan(v2, present2),
             "sig1": nan(np.full_like(v1, s1), present2), "sig2": nan(np.full_like(v1, s2), present2),
             "tpeak1": nan(t1, present2), "tpeak2": nan(t2, present2),
             "vlsr": nan(v1, code == 0), "sig": nan(np.full_like(v1, s1), code == 0)}
    return cube.astype(np.float32), vel, truth


def interior_pixels(labels):
    """Pixels whose whole 3x3 neighbourhood has their own label (region interiors).

    The networks see the 3x3 mean spectrum, so a pixel next to a sharp region boundary
    (an unphysical step in a simulated cube) can take its neighbours' class.
    """
    pad = np.pad(labels, 1, mode="edge")
    ny, nx = labels.shape
    same = np.ones(labels.shape, bool)
    for dy in range(3):
        for dx in range(3):
            same &= pad[dy:dy + ny, dx:dx + nx] == labels
    return same


def cube_hdu(cube, velocity, axis="vrad", bunit="K", rest_hz=None, vel_unit="km/s"):
    """FITS HDU of a (nchan, ny, nx) cube with an RA/Dec grid and a linear spectral axis.

    ``axis='vrad'`` writes radio velocity in ``vel_unit``; ``axis='freq'`` writes Hz
    (needs ``rest_hz``; the frequency axis then decreases as velocity increases).
    """
    from astropy import units as u
    from astropy.io import fits
    hdu = fits.PrimaryHDU(np.asarray(cube, np.float32))
    h = hdu.header
    h.update(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CUNIT1="deg", CUNIT2="deg", CRPIX1=1.0,
             CRPIX2=1.0, CRVAL1=246.5, CRVAL2=-24.4, CDELT1=-2.0 / 3600, CDELT2=2.0 / 3600,
             CRPIX3=1.0, BUNIT=bunit, SPECSYS="LSRK")
    dv = (velocity[-1] - velocity[0]) / (len(velocity) - 1)
    if axis == "vrad":
        scale = (1 * u.km / u.s).to_value(u.Unit(vel_unit))
        h.update(CTYPE3="VRAD", CUNIT3=vel_unit, CRVAL3=velocity[0] * scale, CDELT3=dv * scale)
    else:
        h.update(CTYPE3="FREQ", CUNIT3="Hz", CRVAL3=rest_hz * (1 - velocity[0] / C_KMS),
                 CDELT3=-rest_hz * dv / C_KMS)
    if rest_hz:
        h["RESTFRQ"] = rest_hz
    return hdu


def run_demo(outdir, seed=2024, ny=24, nx=24):
    """Simulate a Gaussian and an NH3 cube, run predict, plot maps next to the truth.

    Parameters
    ----------
    outdir : str or Path
        Where the cubes, the output maps and ``clover_demo.png`` go.
    seed : int
    ny, nx : int
        Cube size.

    Returns
    -------
    dict
        Per line type: class accuracy (all pixels, and pixels away from the sharp
        region boundaries), median |vlsr1 error| (km/s), pixels/s; the figure's path.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    summary, panels = {}, []
    for line in LINE_TYPES:
        cube, vel, truth = simulate_cube(line, ny, nx, rng)
        path = outdir / ("demo_%s.fits" % line)
        cube_hdu(cube, vel, rest_hz=NH3_11_REST_HZ if line == "nh3" else 115.2712018e9).writeto(path, overwrite=True)
        res = predict(path, nh3=(line == "nh3"), outdir=outdir, overwrite=True, progress=False)
        maps = res["maps"]
        two = truth["class"] == 2
        inner = interior_pixels(truth["class"])
        summary[line] = {
            "class_accuracy": round(float((maps["class"] == truth["class"]).mean()), 3),
            "class_accuracy_interior": round(float((maps["class"] == truth["class"])[inner].mean()), 3),
            "median_abs_vlsr1_err_kms": round(float(np.nanmedian(np.abs(maps["vlsr1"] - truth["vlsr1"])[two])), 3),
            "pixels_per_s": round(res["n_pixels"] / res["seconds"], 1)}
        panels.append((line, truth, maps))
    fig, axes = plt.subplots(2 * len(panels), 3, figsize=(9, 6 * len(panels)))
    for row, (line, truth, maps) in enumerate(panels):
        for col, (key, cmap) in enumerate((("class", "viridis"), ("vlsr1", "RdBu_r"), ("vlsr2", "RdBu_r"))):
            lim = (0, 2) if key == "class" else (np.nanmin(truth[key]) - 0.3, np.nanmax(truth[key]) + 0.3)
            for k, (what, img) in enumerate((("truth", truth[key]), ("clover", maps[key]))):
                ax = axes[2 * row + k, col]
                im = ax.imshow(img, origin="lower", cmap=cmap, vmin=lim[0], vmax=lim[1])
                ax.set_title("%s %s: %s" % (line, key, what), fontsize=9)
                fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    png = outdir / "clover_demo.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    summary["figure"] = str(png)
    real = HERE / "tests" / "data" / "nh3"
    if (real / "ammonia_11_cutout.fits").is_file():   # a source checkout: the real G23.481 maps too
        summary["g23"] = _demo_real_nh3(real, outdir)
    return summary


def _demo_real_nh3(folder, outdir):
    """clover on the real VLA+GBT NH3 (1,1)+(2,2) cutout of G23.481: maps and one spectrum."""
    import matplotlib.pyplot as plt
    res = predict(folder / "ammonia_11_cutout.fits", nh3=True, nh3_22=folder / "ammonia_22_cutout.fits",
                  outdir=outdir / "g23", overwrite=True, progress=False)
    maps = res["maps"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    panels = (("ncomp", "components", "viridis", "", (0, 2)), ("vlsr_dom", "dominant centroid", "RdBu_r", "km/s", None),
              ("sig_dom", "dominant dispersion", "magma", "km/s", None), ("tkin_dom", "T_kin (joint (1,1)+(2,2))",
              "inferno", "K", None), ("rchi2", "reduced chi2", "cividis", "", (0.5, 2.0)))
    for ax, (key, title, cmap, unit, lim) in zip(axes.flat, panels):
        im = ax.imshow(maps[key], origin="lower", cmap=cmap, vmin=lim and lim[0], vmax=lim and lim[1])
        ax.set(title=title, xlabel="x (pixel)", ylabel="y (pixel)")
        fig.colorbar(im, ax=ax, fraction=0.046, label=unit)
    from astropy.io import fits
    data = fits.getdata(folder / "ammonia_11_cutout.fits")[:, 10, 10]
    ax = axes.flat[5]
    ax.plot(res["velocity"], data, color="k", lw=0.7, drawstyle="steps-mid", label="data (pixel 10, 10)")
    ax.plot(res["velocity"], res["model"][:, 10, 10], color="C3", lw=1.0, label="clover model")
    ax.set(xlabel="radio velocity (km/s, LSRK)", ylabel="T_B (K)", title="spectrum and model", xlim=(40, 88))
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = outdir / "clover_g23.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    ncomp = maps["ncomp"]
    return {"two_one_noise": [int((ncomp == k).sum()) for k in (2, 1, 0)],
            "median_tkin_k": round(float(np.nanmedian(maps["tkin_dom"])), 2), "seconds": round(res["seconds"], 1),
            "figure": str(png)}


# ===========================================================================
# Command line
# ===========================================================================
def evaluation_report(outdir, lines=("gauss", "nh3"), n=9000, seed=777, model_dir=None, nproc=2,
                      overwrite=False):
    """Accuracy of the models on fresh simulated sets: JSON tables and a figure.

    Parameters
    ----------
    outdir : str or Path
        Receives ``clover_accuracy.json`` and ``clover_accuracy.png`` (accuracy per
        class against the peak S/N and, for two components, against the centroid
        separation in units of the larger dispersion; the original's CNN_acc_snr.pdf
        and CNN_acc_vlsr.pdf).
    lines : sequence of {'gauss', 'nh3'}
    n : int
        Test spectra per line type (thirds per class; NH3 uses 3/4 of it).
    seed : int
        Test-set seed; keep it different from the training seed.
    model_dir, nproc
        As :class:`CloverModels`.
    overwrite : bool

    Returns
    -------
    dict
        {line: table of :func:`evaluate`}.
    """
    outdir = Path(outdir)
    paths = [outdir / "clover_accuracy.json", outdir / "clover_accuracy.png"]
    _check_outputs_free(paths, overwrite)
    outdir.mkdir(parents=True, exist_ok=True)
    tables = {}
    for line in lines:
        models = CloverModels(line, model_dir, nproc)
        tables[line] = evaluate(line, models, int(n * (0.75 if line == "nh3" else 1)) // 3 * 3, seed=seed)
        log.info("%s: %s", line, json.dumps(tables[line]["class_accuracy"]))
    with atomic_output(paths[0], overwrite=True) as out:
        json.dump(tables, out, indent=1)
    _plot_accuracy(tables, paths[1])
    return tables


def _plot_accuracy(tables, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _plot_calibration(tables, axes[2])
    axes = axes[:2]
    labels = [["%g-%g" % b for b in zip(edges[:-1], edges[1:])] for edges in (SNR_BINS, SEP_BINS)]
    for line, table in tables.items():
        curves = [(0, "%s %s" % (line, name), "os"[name == "two"], table["snr_bins"][name])
                  for name in ("one", "two")] + [(1, line, "s", table["two_by_separation"])]
        for ax, label, marker, bins in curves:
            if bins:
                axes[ax].plot([labels[ax].index(k) for k in bins], [v[0] for v in bins.values()],
                              marker=marker, label=label)
    for ax, names in zip(axes, labels):
        ax.set_xticks(range(len(names)), names)
    axes[0].set(xlabel="peak S/N (two components: the weaker)", ylabel="accuracy")
    axes[1].set(xlabel="separation / larger dispersion (two components, S/N >= 4)", ylabel="accuracy")
    for ax in axes:
        ax.axhline(0.97, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=8)
        ax.set_ylim(min(0.7, ax.get_ylim()[0]), 1.01)
    fig.tight_layout()
    with atomic_path(path, overwrite=True, suffix=".part.png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def _plot_calibration(tables, ax):
    """Reliability curve of the prob map: fraction correct against the mean probability."""
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    for line, table in tables.items():
        curve = table.get("calibration", {})
        if curve:
            p, f, n = (np.array(v) for v in zip(*curve.values()))
            ax.scatter(p, f, s=10 + 40 * np.sqrt(n / n.max()), label="%s (size ~ count)" % line)
            ax.plot(p, f, lw=0.8)
    ax.set(xlabel="prob (mean in bin)", ylabel="fraction of correct classes", xlim=(0.3, 1.01), ylim=(0.0, 1.01),
           title="calibration of the prob map")
    ax.legend(fontsize=8)


def _evaluate_arguments(parser):
    parser.add_argument("--lines", help="comma-separated line types (gauss,nh3)")
    parser.add_argument("--outdir", default=".", help="where the JSON table and figure go (default .)")
    parser.add_argument("--n", type=int, default=9000, help="test spectra per line type (default 9000)")
    parser.add_argument("--seed", type=int, default=777, help="test-set seed (default 777)")
    parser.add_argument("--model-dir", help="trained models (default models/clover)")
    parser.add_argument("--nproc", type=int, default=2, help="CPU threads for TensorFlow")


def _cli_evaluate(args, config):
    lines = [v.strip() for v in (args.lines or "gauss,nh3").split(",") if v.strip()]
    bad = [v for v in lines if v not in LINE_TYPES]
    if bad or args.n < 30:
        raise ConfigError("--lines %r / --n %r: use a subset of %s and n >= 30"
                          % (args.lines, args.n, ", ".join(LINE_TYPES)))
    tables = evaluation_report(args.outdir, lines, args.n, args.seed, args.model_dir, args.nproc,
                               args.overwrite)
    for line, table in tables.items():
        print(line, json.dumps({k: table[k] for k in ("class_accuracy", "two_by_separation")}))
    return EXIT_OK


def _train_arguments(parser):
    parser.add_argument("--lines", help="comma-separated line types to train (gauss,nh3)")
    parser.add_argument("--model-dir", help="where to write the models (default models/clover)")
    parser.add_argument("--parts", help="comma-separated: class, reg (default both; 'reg' keeps "
                        "the classifiers already in the model directory)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sets and 2 epochs: a smoke test of the training path")


def _predict_arguments(parser):
    parser.add_argument("cube", nargs="?", help="FITS cube or 1-D FITS spectrum (any spectral axis and unit), or a "
                        "two-column text spectrum (.txt/.dat/.csv/.tsv: km/s or Hz; .ecsv with units)")
    parser.add_argument("--nh3", action="store_true", default=None, help="NH3 (1,1) mode")
    parser.add_argument("--nproc", type=int, help="CPU threads for TensorFlow")
    parser.add_argument("--outdir", help="output directory (default: next to the cube)")
    parser.add_argument("--model-dir", help="trained models (default models/clover)")
    parser.add_argument("--tile", type=int, help="a spectral window per N x N-pixel tile, centred on "
                        "its emission (for cubes with large velocity gradients); 0 = one window")
    parser.add_argument("--no-refine", dest="refine", action="store_false", default=None,
                        help="networks only: no fits of the spectra (no model, residual or reduced-chi2 "
                             "check; classes and values are the networks')")
    parser.add_argument("--rest-frequency", type=_frequency_hz, metavar="FREQ",
                        help="rest frequency, overriding the header (Hz, or with a unit: '115.2712018 GHz')")
    parser.add_argument("--force-rest", action="store_true", default=None,
                        help="NH3: accept a cube whose rest frequency is not NH3 (1,1)")
    parser.add_argument("--nh3-22", metavar="CUBE22", help="NH3 (2,2) cube of the same field and grid: joint "
                        "(1,1)+(2,2) fits give Tkin, Tex, N(NH3) and tau per component")


def _frequency_hz(text):
    """A frequency from the command line: Hz, or a number with a unit ('23.69 GHz')."""
    try:
        return float(text)
    except ValueError:
        pass
    from astropy import units as u
    try:
        return u.Quantity(text).to_value(u.Hz)
    except (TypeError, ValueError, u.UnitsError):
        raise argparse.ArgumentTypeError("%r is not a frequency; give Hz (2.36944955e10) or a number "
                                         "with a unit (23.6944955 GHz)" % text) from None


def _cli_train(args, config):
    t = dict(config["Train"])
    if args.lines:
        t["lines"] = [v.strip() for v in args.lines.split(",") if v.strip()]
    if args.model_dir:
        t["model_dir"] = Path(args.model_dir)
    if args.parts:
        t["parts"] = [v.strip() for v in args.parts.split(",") if v.strip()]
        if not set(t["parts"]) <= {"class", "reg"}:
            raise ConfigError("--parts %r: use class, reg or class,reg" % args.parts)
    if args.quick:
        t.update(n_class=900, n_reg=600, n_val=300, n_test=300, epochs=2, ensemble_size=2)
    bad = [v for v in t["lines"] if v not in LINE_TYPES]
    if bad:
        raise ConfigError("unknown line type(s) %s; use a subset of %s" % (bad, ", ".join(LINE_TYPES)))
    start = time.perf_counter()
    train(model_dir=t.pop("model_dir"), overwrite=args.overwrite, **t)
    log.info("training finished in %.1f min", (time.perf_counter() - start) / 60)
    return EXIT_OK


def _cli_predict(args, config):
    if not args.cube:
        raise InputError("no cube given; usage: clover predict CUBE.fits|SPECTRUM.txt [--nh3] [--outdir DIR]")
    p = dict(config["Predict"])
    for key in ("nh3", "nproc", "outdir", "model_dir", "tile", "refine", "rest_frequency", "force_rest", "nh3_22"):
        value = getattr(args, key, None)
        if value is not None:
            p[key] = value
    p["settings"] = {k: p.pop(k) for k in list(p) if k in DATA_CHECK}
    res = predict(args.cube, overwrite=args.overwrite, config=config, **p)
    log.info("wrote %d files to %s", len(res["paths"]), Path(next(iter(res["paths"].values()))).parent)
    return EXIT_OK


SUBCOMMANDS = {
    "train": ("simulate training sets and train all models", _cli_train, _train_arguments),
    "predict": ("classify every spectrum of a cube and predict the component parameters",
                _cli_predict, _predict_arguments),
    "evaluate": ("accuracy of the models on fresh simulated spectra: JSON tables and a figure",
                 _cli_evaluate, _evaluate_arguments),
}


def main(argv=None):
    """Run the command line; return the exit code (0 ok, 1 failure, 2 usage/config error).

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.
    """
    return cli_main(argv, SUBCOMMANDS, CONFIG_SCHEMA, validators=(_validate_config,))


if invoked_as_script(globals()):
    sys.exit(main())
adopt_into_session(globals(), "clover")
