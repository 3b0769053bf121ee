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
3. *Refinement* (new; Gaussian lines, on by default): the two-component values are
   polished by a vectorised maximum-a-posteriori Levenberg-Marquardt fit of the central
   spectrum with the network's values and uncertainties as the prior
   (``refine_gaussians``): ~35 % smaller centroid errors and 10-25 % smaller dispersion
   and peak errors, at a fraction of the cost of fitting from scratch with model
   selection; the ``_err`` maps are then the fit's errors (~20 % small, as prior and
   data share the central spectrum).  One-component values stay the network's: seeing
   the 3x3 mean, it is about twice as precise as a fit of the central spectrum.
4. *Settling* (new; NH3, on by default with the refinement): pixels whose ensemble odds
   between one and two components are uncertain (``|ln(P_two / P_one)| < 3``, ~1/5 of
   the emission pixels) are fitted with one- and two-component NH3 (1,1) slab models -
   the central spectrum and its 8 neighbours, each on its own
   (:func:`nh3_two_component_evidence`) - and the summed chi^2 difference is added to
   the ensemble's log-odds (:func:`settle_nh3_classes`; constants calibrated on their
   own simulated set).  Two-component accuracy 0.94 -> 0.99 at S/N >= 4, one-component
   0.99 -> 1.00 (the ensemble alone misses mostly pairs closer than 1.5 linewidths; the
   NH3 set admits pairs from one linewidth apart).

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
                                       [--tile N] [--no-refine]
    python clover.py train [--quick] [--lines gauss,nh3] [--parts class,reg] [--overwrite]

``--tile N`` gives every N x N-pixel tile its own 500/1000-channel window centred on
the tile's emission - the sub-cube splitting the original's README asks users to do
by hand for cubes with large velocity gradients.

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
    "ChannelWidthWarning",
    "LineWidthWarning",
    "LINE_TYPES",
    "OUTPUT_MAPS",
    "simulate_gaussian",
    "simulate_nh3",
    "simulated_neighbours",
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
    "nh3_two_component_evidence",
    "settle_nh3_classes",
    "uncertain_emission",
    "NH3_SETTLE",
    "emission_channel",
    "read_cube",
    "predict",
    "train",
    "run_demo",
]
__version__ = "1.0.0"

log = logging.getLogger("clover")

# ===========================================================================
# Constants
# ===========================================================================
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
MODEL_DIR = HERE / "models" / "clover"
GAUSSIAN_NCHAN = 500   # spectral length the Gaussian-line models take (seed: Usage)
NH3_NCHAN = 1000       # spectral length the NH3 (1,1) models take (seed: Usage)
CLASS_CODES = {"one": 0, "noise": 1, "two": 2}  # output codes of the original
C_KMS = 299792.458
NH3_11_REST_HZ = 23.6944955e9   # NH3 (1,1) rest frequency (pyspeckit freq_dict['oneone'])
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
        log.addHandler(handler)
    log.propagate = False
    return log


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


class ChannelWidthWarning(CloverWarning):
    """An NH3 cube's channel width differs from the trained one (hyperfine spacing)."""


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
    ConfigKey("Predict", "rest_frequency", "float", None, (0.0, None), "rest frequency in Hz when the header has none (NH3 mode defaults to 23.6944955 GHz)", bounds=True),
    ConfigKey("Predict", "block_pixels", "int", 20000, (100, None), "pixels per processing block (memory and progress-bar granularity)", bounds=True),
    ConfigKey("Predict", "progress", "bool", True, help="show a tqdm progress bar for cubes of more than one block"),
    ConfigKey("Predict", "tile", "int", 0, (0, None), "0: one spectral window for the cube (central channels); N: a window per N x N-pixel tile centred on its emission", bounds=True),
    ConfigKey("Predict", "refine", "bool", True, help="polish the networks' output by model fits: Gaussian lines, the two-component values (MAP fit of the central spectrum with the network's values as the prior); NH3, the one/two-component decision of pixels with uncertain ensemble odds (NH3 fits of their 3x3 neighbourhood)"),
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


def simulated_neighbours(sim):
    """``neighbours`` callable of :func:`predict_spectra` for a simulated set made with
    ``windows=True``: the 8 non-central spectra of each window on the central spectrum's
    scale (as :func:`predict` hands them over from a cube)."""
    others = [j for j in range(9) if j != 4]
    return lambda rows: sim["windows"][rows][:, others] / sim["tmax"][rows, None, None]


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
    "gauss": {"nchan": GAUSSIAN_NCHAN, "dv_kms": TEMPLATE_DV_KMS, "simulate": simulate_gaussian,
              "centroid_halfwidth_kms": 10.0 + 5 * 0.8, "rest_hz": None,
              "what": "Gaussian line (e.g. CO)"},
    "nh3": {"nchan": NH3_NCHAN, "dv_kms": TEMPLATE_DV_KMS, "simulate": simulate_nh3,
            "centroid_halfwidth_kms": 5.0 + 1.0, "rest_hz": NH3_11_REST_HZ,
            "what": "NH3 (1,1) with hyperfine structure"},
}

# output suffix -> (source array, column, kind of unit, description).  kind: 'class'
# (dimensionless code), 'prob', 'vel' (km/s), 'width' (km/s), 'peak' (cube BUNIT).
OUTPUT_MAPS = {
    "class": ("class", None, "class", "class: 0 one component, 1 noise, 2 two components"),
    "vlsr1": ("reg2", 0, "vel", "centroid velocity of the lower-velocity component"),
    "vlsr2": ("reg2", 1, "vel", "centroid velocity of the higher-velocity component"),
    "sig1": ("reg2", 2, "width", "velocity dispersion of component 1"),
    "sig2": ("reg2", 3, "width", "velocity dispersion of component 2"),
    "tpeak1": ("reg2", 4, "peak", "peak intensity of component 1"),
    "tpeak2": ("reg2", 5, "peak", "peak intensity of component 2"),
    "prob": ("prob", None, "prob", "probability of the chosen class (ensemble mean; NH3 settled pixels: combined with the fits)"),
    "vlsr": ("reg1", 0, "vel", "centroid velocity of one-component pixels"),
    "sig": ("reg1", 1, "width", "velocity dispersion of one-component pixels"),
    "tpeak": ("reg1", 2, "peak", "peak intensity of one-component pixels"),
}
for _name, (_src, _col, _kind, _text) in list(OUTPUT_MAPS.items()):
    if _src in ("reg1", "reg2"):
        OUTPUT_MAPS[_name + "_err"] = (_src + "_err", _col, _kind, "1-sigma uncertainty of " + _name)
REG_TARGETS = {"reg2": ("vlsr1", "vlsr2", "sig1", "sig2", "tpeak1", "tpeak2"),
               "reg1": ("vlsr", "sig", "tpeak")}
META_FILE = "clover_models.json"


# ===========================================================================
# Science: networks
# ===========================================================================
def _import_keras(threads=None):
    """Import keras (TensorFlow backend) lazily; set the CPU thread pools once."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf
    import keras
    tf.get_logger().setLevel("ERROR")
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(threads))
        except RuntimeError:  # already initialised in this process: keep its pools
            log.debug("TensorFlow thread pools already set; nproc=%s ignored", threads)
    return keras


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


def refine_gaussians(spectra, params, prior_sigma=None, n_iter=12, chunk=1024):
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

    Notes
    -----
    The noise ``s`` of each spectrum is 1.4826 x the median absolute first difference
    / sqrt(2) (robust to lines wider than a few channels).  Each spectrum is fitted in a
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
    noise = _difference_noise(spectra)
    out, err = params.copy(), np.full(params.shape, np.nan)
    refined = np.zeros(len(params), bool)
    lo, hi = _component_extent(params, params.shape[1] // 3, spectra.shape[1])
    order = np.argsort(np.nan_to_num(hi - lo), kind="stable")     # chunks of similar window width
    for start in range(0, len(params), chunk):
        rows = order[start:start + chunk]
        out[rows], err[rows], refined[rows] = _refine_chunk(spectra[rows] / noise[rows, None],
                                                            params[rows], weight[rows], noise[rows], n_iter)
    return out, err, refined


def _refine_chunk(y, p, weight, noise, n_iter):
    """MAP fit of ``y`` (in units of its noise); the peaks in ``p`` are in data units."""
    nchan = y.shape[1]
    k = p.shape[1] // 3
    idx = _fit_windows(p, k, nchan)          # fit only where the components are
    y = np.take_along_axis(y, idx, axis=1)
    chan = idx.astype(np.float64)
    scale = np.concatenate([np.ones((len(p), 2 * k)), np.repeat(noise[:, None], k, axis=1)], axis=1)
    prior = p / scale                        # work with peaks in noise units
    weight = weight * scale ** 2
    q = prior.copy()
    lam = np.full(len(q), 1e-3)

    def evaluate(q):
        model, jac = _gaussians_and_jacobian(chan, q, k)
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
        ok = _allowed(trial, k, nchan)
        t_model, t_jac, t_obj = evaluate(np.where(ok[:, None], trial, q))
        better = ok & (t_obj < obj)
        q = np.where(better[:, None], trial, q)
        model = np.where(better[:, None], t_model, model)
        jac = np.where(better[:, None, None], t_jac, jac)
        obj = np.where(better, t_obj, obj)
        lam = np.where(better, lam * 0.3, lam * 10.0)
    refined = _allowed(q, k, nchan) & np.isfinite(obj)
    with np.errstate(all="ignore"):
        cov = np.linalg.pinv(jac @ jac.transpose(0, 2, 1) + weight[:, :, None] * eye)
        err = np.sqrt(np.abs(np.einsum("nii->ni", cov))) * scale
    q = np.where(refined[:, None], q * scale, p)
    err = np.where(refined[:, None], err, np.nan)
    order = np.argsort(q[:, :k], axis=1)
    idx = np.concatenate([order + j * k for j in range(3)], axis=1)
    return np.take_along_axis(q, idx, 1), np.take_along_axis(err, idx, 1), refined


def _allowed(p, k, nchan):
    """Rows whose Gaussians stay physical: positive peaks, 0.3 <= sigma <= nchan/4, centre on the axis."""
    c, s, a = p[:, :k], p[:, k:2 * k], p[:, 2 * k:]
    return ((a > 0) & (s >= 0.3) & (s <= nchan / 4) & (c >= 0) & (c <= nchan - 1)).all(axis=1) \
        & np.isfinite(p).all(axis=1)


def _refine_rows(x, mu, err, nchan):
    """Refine regressor output (training units) on the central spectra ``x[:, :, 0]``,
    with the regressor's values and uncertainties as the prior."""
    k = mu.shape[1] // 3
    half = _centre_channel(nchan)
    start = mu.astype(np.float64).copy()
    start[:, :k] = start[:, :k] * half + half            # normalised centroid -> channel
    prior = err.astype(np.float64).copy()
    prior[:, :k] *= half
    fit, fit_err, ok = refine_gaussians(x[:, :, 0], start, prior)
    fit[:, :k] = (fit[:, :k] - half) / half
    fit_err[:, :k] = fit_err[:, :k] / half
    return (np.where(ok[:, None], fit, mu).astype(np.float32),
            np.where(ok[:, None], fit_err, err).astype(np.float32), ok)


# ---------------------------------------------------------------------------
# NH3: the one/two-component decision of uncertain pixels by model fits
# ---------------------------------------------------------------------------
# Combination of the ensemble's odds with the fit evidence (see settle_nh3_classes):
# log-odds(two : one) = ln(P_two / P_one) + weight * (dchi2 - offset * npix) for pixels
# with |ln(P_two / P_one)| < window, dchi2 summed over the npix fitted spectra of the
# 3x3 neighbourhood.  Chosen with benchmarks/calibrate_clover_nh3_settle.py on its own
# simulated set (seed 555, 6,000 spectra; not the training or the test seeds): one /
# two-component accuracy 0.999 / 0.993 (ensemble alone 0.987 / 0.944), fitting 18 % of
# the spectra; the best of the scanned grid (window 6: 0.998 / 0.997) fits 33 %.
NH3_SETTLE = {"window": 3.0, "weight": 0.1, "offset": 7.0}
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
    """Per-spectrum noise: 1.4826 x median |first difference| / sqrt(2) (robust to lines
    wider than a few channels); never zero."""
    noise = 1.4826 * np.median(np.abs(np.diff(spectra, axis=1)), axis=1) / np.sqrt(2)
    return np.maximum(noise, 1e-6 * np.abs(spectra).max(axis=1) + 1e-30)


def fit_nh3_slabs(spectra, starts, freq_hz=None, n_iter=25, chunk=256, weight=None):
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
                                                 freq[rows] if freq.ndim == 2 else freq, n_iter)
        if best_q is None:
            best_q = q
        better = chi < best_chi
        best_q[better], best_chi[better] = q[better], chi[better]
    return best_q, best_chi


def _fit_slab_chunk(y, w, q, freq, n_iter):
    """Levenberg-Marquardt of slab models; ``w`` (m, nchan) weights, ``freq`` (nchan,) or (m, nchan)."""
    k = q.shape[1] // 4
    lo, hi = _slab_bounds(freq, len(q), k)
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


def _slab_starts(mu, k, freq, taus=(0.1, 1.0, 5.0)):
    """Slab starting values from regressor output (training units: channels of the axis
    ``freq``), one per optical depth."""
    vel = _nh3_velocity(freq)
    nchan = len(freq)
    half = _centre_channel(nchan)
    v = np.interp(mu[:, :k] * half + half, np.arange(nchan), vel)
    sig = np.clip(mu[:, k:2 * k] * abs(vel[-1] - vel[0]) / (nchan - 1), 0.04, 2.5)
    peak = np.clip(mu[:, 2 * k:], 0.02, 2.0)
    starts = []
    for tau in taus:
        cols = []
        for i in range(k):
            pmax = nh3_profile(freq, sig[:, i], v[:, i]).max(axis=1)
            amp = peak[:, i] / -np.expm1(-tau * np.maximum(pmax, 1e-3))
            cols.append(np.column_stack([np.log(amp), np.full(len(mu), np.log(tau)), np.log(sig[:, i]), v[:, i]]))
        starts.append(np.concatenate(cols, axis=1))
    return starts


def _nh3_velocity(freq_hz):
    """Radio velocity (km/s) relative to the NH3 (1,1) rest frequency."""
    return C_KMS * (1 - np.asarray(freq_hz, float) / NH3_11_REST_HZ)


def nh3_two_component_evidence(spectra, reg1, reg2, neighbours=None, freq_hz=None, n_iter=25,
                               neighbour_iter=12, chunk=256):
    """chi^2 improvement of the best two-component NH3 slab fits over the best one-component fits.

    Parameters
    ----------
    spectra : ndarray, shape (n, nchan)
        Central spectra, velocity increasing with index (the networks' first input
        channel).
    reg1, reg2 : ndarray, shape (n, 3) and (n, 6)
        One- and two-component regressor output (training units): the starting values.
    neighbours : ndarray, shape (n, m, nchan), optional
        The other spectra of each pixel's 3x3 neighbourhood on the same scale as
        ``spectra`` (rows with a non-finite value are left out: borders, blanks).
    freq_hz : ndarray, shape (nchan,), optional
        Frequency axis of the spectra (the cube's; default the training axis): the
        hyperfine pattern is fitted in frequency, so the fits stay right when the
        cube's channels are not the training set's 5.72 kHz.
    n_iter, neighbour_iter : int
        Iterations for the central spectra and for the neighbours (which start from the
        central spectrum's best fits).
    chunk : int
        Pixels fitted together (grouped by the number of channels their lines cover).

    Returns
    -------
    dchi2 : ndarray, shape (n,)
        Sum over the fitted pixels of ``chi2(one) - chi2(two)``, each in units of its
        spectrum's noise variance estimated from the residuals of the two-component
        fit (first differences overestimate the noise of bright, wide lines).
    npix : ndarray of int, shape (n,)
        Pixels summed (1 + finite neighbours).

    Notes
    -----
    Central spectrum, one component: three starts (total optical depth 0.1, 1, 5).  Two
    components: the same three from the two-component regressor, plus the best
    one-component fit with a faint second component one dispersion to either side (so
    the two-component fit is never worse than the one-component fit).  Neighbours: the
    central spectrum's best fits and the nested starts.  Each neighbour is a fit of its
    own (the 3x3 velocity gradients of the training set move lines by up to a few tenths
    of km/s); for one-component pixels each term behaves as a chi^2 with 4 degrees of
    freedom, so the sum over 9 independent pixels has mean ~36 and spread ~8.5, while a
    second component adds its evidence nine times.  Neighbouring pixels of real maps are
    often correlated (beams of ~3 pixels): their terms are then not independent and
    the sum's spread is larger.

    Only the channels within 5 dispersions + 1 km/s of the starting components'
    hyperfine lines enter the fits (both models vanish elsewhere).
    """
    spectra = np.asarray(spectra, np.float64)
    axis = _nh3_freq(freq_hz)
    starts1, starts2 = _slab_starts(reg1, 1, axis), _slab_starts(reg2, 2, axis)
    near = _line_channels(np.concatenate([starts1[0], starts2[0]], axis=1), _nh3_velocity(axis))
    order = np.argsort(near.sum(axis=1), kind="stable")       # chunks of similar channel counts
    dchi2, npix = np.zeros(len(spectra)), np.ones(len(spectra), int)
    for lo in range(0, len(spectra), chunk):
        rows = order[lo:lo + chunk]
        dchi2[rows], npix[rows] = _evidence_rows(
            spectra[rows], near[rows], axis, [s[rows] for s in starts1], [s[rows] for s in starts2],
            None if neighbours is None else neighbours[rows], n_iter, neighbour_iter)
    return dchi2, npix


def _evidence_rows(spectra, near, axis, starts1, starts2, neighbours, n_iter, neighbour_iter):
    """:func:`nh3_two_component_evidence` of one chunk, fitted on the channels ``near`` lines."""
    width = max(int(near.sum(axis=1).max(initial=0)), 16)
    idx = np.sort(np.argsort(~near, axis=1, kind="stable")[:, :width], axis=1)     # used channels first
    use = np.take_along_axis(near, idx, axis=1)
    freq = axis[idx]
    one, two, dchi2 = _one_two_fits(spectra, idx, use, freq, starts1, starts2, n_iter)
    npix = np.ones(len(dchi2), int)
    for j in range(0 if neighbours is None else neighbours.shape[1]):
        y = np.asarray(neighbours[:, j], np.float64)
        ok = np.flatnonzero(np.isfinite(y).all(axis=1))
        if ok.size:
            dchi2[ok] += _one_two_fits(y[ok], idx[ok], use[ok], freq[ok], [one[ok]], [two[ok]], neighbour_iter)[2]
            npix[ok] += 1
    return dchi2, npix


def _line_channels(q, vel, span=5.0, margin_kms=1.0):
    """Mask (m, nchan) of the channels (velocities ``vel``, km/s) within ``span``
    dispersions + ``margin_kms`` of any hyperfine line of the slab components in ``q``."""
    c = _nh3_constants()
    centre = (q[:, 3::4, None] + c["voff"][None, None, :]).reshape(len(q), -1)       # km/s
    reach = np.repeat(span * np.exp(q[:, 2::4]) + margin_kms, c["voff"].size, axis=1)
    near = np.zeros((len(q), len(vel)), bool)
    for j in range(centre.shape[1]):
        near |= np.abs(vel[None, :] - centre[:, j:j + 1]) <= reach[:, j:j + 1]
    return near


def _one_two_fits(spectra, idx, use, freq, starts1, starts2, n_iter):
    """Best one- and two-component slab fits on the channels ``idx`` where ``use``, and
    their chi^2 difference (noise from the two-component residuals)."""
    weight = use / _difference_noise(spectra)[:, None]
    y = np.take_along_axis(spectra, idx, axis=1)
    one, chi1 = fit_nh3_slabs(y, starts1, freq, n_iter=n_iter, weight=weight)
    nested = []
    for side in (1.0, -1.0):
        second = one.copy()
        second[:, 0] -= np.log(10.0)
        second[:, 3] += side * np.exp(one[:, 2])
        nested.append(np.concatenate([one, second], axis=1))
    two, chi2 = fit_nh3_slabs(y, list(starts2) + nested, freq, n_iter=n_iter, weight=weight)
    chi2 = np.minimum(chi2, chi1)
    dof = np.maximum(use.sum(axis=1) - 8, 1)
    return one, two, (chi1 - chi2) * dof / np.maximum(chi2, 1e-12)


def settle_nh3_classes(probs, dchi2, npix=1, settle=None):
    """Combine the ensemble's one/two-component odds with the fits' chi^2 evidence.

    Parameters
    ----------
    probs : ndarray, shape (n, 3)
        Ensemble probabilities (one, noise, two).
    dchi2 : ndarray, shape (n,)
        :func:`nh3_two_component_evidence` (NaN: not fitted, the network decides).
    npix : int or ndarray, shape (n,)
        Pixels summed in ``dchi2``.
    settle : dict, optional
        ``window``, ``weight``, ``offset`` (default :data:`NH3_SETTLE`).

    Returns
    -------
    code : ndarray, shape (n,)
        Class codes: argmax of ``probs``, except that rows with an emission class and
        ``|ln(P_two / P_one)| < window`` get two components when
        ``ln(P_two / P_one) + weight (dchi2 - offset npix) > 0``.
    prob : ndarray, shape (n,)
        Probability of the chosen class: the network's, or for settled rows
        ``(P_one + P_two)`` times the logistic function of the combined log-odds.
    settled : ndarray of bool, shape (n,)
    """
    cfg = dict(NH3_SETTLE, **(settle or {}))
    probs = np.asarray(probs, float)
    code, prob = probs.argmax(axis=1), probs.max(axis=1)
    odds = _two_one_odds(probs)
    settled = uncertain_emission(probs, cfg) & np.isfinite(dchi2)
    combined = odds + cfg["weight"] * (np.nan_to_num(dchi2) - cfg["offset"] * np.asarray(npix))
    two = combined > 0
    code = np.where(settled, np.where(two, CLASS_CODES["two"], CLASS_CODES["one"]), code)
    p_two = 1.0 / (1.0 + np.exp(-np.clip(combined, -50, 50)))
    prob = np.where(settled, (probs[:, 0] + probs[:, 2]) * np.where(two, p_two, 1 - p_two), prob)
    return code, prob, settled


def uncertain_emission(probs, settle=None):
    """Rows whose one/two-component decision the fits settle (see :func:`settle_nh3_classes`)."""
    cfg = dict(NH3_SETTLE, **(settle or {}))
    probs = np.asarray(probs, float)
    return (probs.argmax(axis=1) != CLASS_CODES["noise"]) & (np.abs(_two_one_odds(probs)) < cfg["window"])


def _two_one_odds(probs):
    """ln(P_two / P_one) of ensemble probabilities (one, noise, two)."""
    return np.log(probs[:, 2] + 1e-6) - np.log(probs[:, 0] + 1e-6)


def predict_spectra(x, models, batch_size=2048, refine=True, neighbours=None, freq_hz=None):
    """Classify spectra and regress their components (training units).

    Parameters
    ----------
    x : ndarray, shape (n, nchan, 2)
        Network inputs (see :func:`make_features`).
    models : CloverModels
    batch_size : int
    refine : bool
        Polish the networks' output by model fits.  Gaussian lines: the two-component
        regressor's values, by a few vectorised Levenberg-Marquardt steps on the central
        spectrum with the network's values as the prior (:func:`refine_gaussians`).
        NH3: the one/two-component decision of the pixels the ensemble is unsure about,
        by one- and two-component NH3 model fits (of the 3x3 neighbourhood with
        ``neighbours``) whose chi^2 difference is combined with the ensemble's odds
        (:func:`settle_nh3_classes`; NH3 values stay the network's).
        One-component values are never refined: the network, which also sees the 3x3
        mean, is already about twice as precise as a least-squares fit of the central
        spectrum (and a refinement would lose that).
    neighbours : callable, optional
        NH3 settling: ``neighbours(rows)`` gives the other 8 spectra of those rows' 3x3
        neighbourhoods, shape (len(rows), 8, nchan), on the scale of ``x[:, :, 0]``
        (NaN rows where missing); their fits add to the central spectrum's evidence.
        Without it only the central spectra are fitted (weaker; see
        :func:`nh3_two_component_evidence`).
    freq_hz : ndarray, shape (nchan,), optional
        NH3 settling: the spectra's frequency axis (default: the training axis).

    Returns
    -------
    dict
        ``probs`` (n, 3) ensemble probabilities; ``class`` (n,) codes (argmax of the
        summed member softmax vectors, as the original, or the settled decision);
        ``prob`` (n,) probability of that class; ``reg2``, ``reg2_err`` (n, 6) for
        class-2 rows and ``reg1``, ``reg1_err`` (n, 3) for class-0 rows (NaN elsewhere):
        normalised centroid, dispersion (channels), peak / maximum; ``refined`` (n,)
        rows whose values come from the refinement (their ``_err`` are then the fit's
        formal errors, otherwise the network's); ``settled`` (n,) rows whose class the
        NH3 fits decided.
    """
    probs = models.classify(x, batch_size)
    code, prob = probs.argmax(axis=1), probs.max(axis=1)
    settled = np.zeros(len(x), bool)
    if refine and models.line == "nh3":
        code, prob, settled = _settle_rows(x, probs, models, batch_size, neighbours, freq_hz)
    result = {"probs": probs, "class": code, "prob": prob, "settled": settled,
              "refined": np.zeros(len(x), bool)}
    for kind, cls in (("reg2", CLASS_CODES["two"]), ("reg1", CLASS_CODES["one"])):
        k = len(REG_TARGETS[kind])
        mu = np.full((len(x), k), np.nan, np.float32)
        err = np.full((len(x), k), np.nan, np.float32)
        rows = np.flatnonzero(code == cls)
        if rows.size:
            mu[rows], err[rows] = models.regress(kind, x[rows], batch_size)
            if refine and kind == "reg2" and models.line == "gauss":
                mu[rows], err[rows], result["refined"][rows] = _refine_rows(
                    x[rows], mu[rows], err[rows], models.nchan)
        result[kind], result[kind + "_err"] = mu, err
    return result


def _settle_rows(x, probs, models, batch_size, neighbours=None, freq_hz=None):
    """NH3 fits of the rows the ensemble is unsure about: settle_nh3_classes output."""
    dchi2, npix = np.full(len(x), np.nan), np.ones(len(x), int)
    rows = np.flatnonzero(uncertain_emission(probs))
    if rows.size:
        log.info("NH3 model fits of %d pixels with uncertain one/two-component odds (roughly %.0f s "
                 "on one core; --no-refine skips them)", rows.size,
                 0.013 * rows.size * (1 if neighbours is None else 3))
        reg1, _ = models.regress("reg1", x[rows], batch_size)
        reg2, _ = models.regress("reg2", x[rows], batch_size)
        dchi2[rows], npix[rows] = nh3_two_component_evidence(
            x[rows, :, 0], reg1, reg2, None if neighbours is None else neighbours(rows), freq_hz)
    return settle_nh3_classes(probs, dchi2, npix)


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
    """Per-spectrum noise from the edge channels: 1.4826 x MAD of the first and last ``edge``.

    Parameters
    ----------
    spectra : ndarray, shape (nchan, ...)
    edge : int
        Channels taken at each end (the original: std of the first and last 50).
    """
    n = spectra.shape[0]
    edge = max(1, min(edge, n // 4 or 1))
    ends = np.concatenate([spectra[:edge], spectra[n - edge:]], axis=0)
    med = np.median(ends, axis=0)
    return 1.4826 * np.median(np.abs(ends - med), axis=0)


def fill_blank_channels(cube, rng, max_blank=0.5):
    """Replace blanked (NaN) channels of mostly finite spectra by noise.

    Real cubes often have blanked channels: band edges flagged in every pixel,
    single bad channels, regridding gaps.  A spectrum with at most ``max_blank`` of its
    channels blank gets noise there (its own rms: 1.4826 x median absolute first
    difference / sqrt(2)), so it is still classified; one with more stays blank and
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
    sigma = 1.4826 * np.nanmedian(np.abs(np.diff(spec, axis=0)), axis=0) / np.sqrt(2)
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


_SPECTRAL_KINDS = {"FREQ": "freq", "VRAD": "radio", "VELO": "radio", "VOPT": "optical",
                   "FELO": "optical", "WAVE": "wave", "AWAV": "wave"}


def _velocity_axis(values, ctype, unit, rest_hz):
    """Radio-convention velocity (km/s) from spectral-axis values in their unit."""
    from astropy import units as u
    kind = _SPECTRAL_KINDS.get(ctype[:4].upper())
    if kind is None:
        raise InputError("spectral axis type %r is not supported; use FREQ, VRAD, VELO, VOPT, "
                         "FELO, WAVE or AWAV" % ctype)
    try:
        unit = u.Unit(unit or ("Hz" if kind == "freq" else "m/s" if kind != "wave" else "m"),
                      parse_strict="raise")
    except ValueError:
        raise InputError("spectral unit %r is not a unit astropy knows; write CUNIT as e.g. "
                         "Hz, GHz, m/s or km/s" % unit) from None
    q = values * unit
    needs_rest = kind in ("freq", "optical", "wave")
    if needs_rest and not rest_hz:
        raise InputError("a %s axis needs the rest frequency to give velocities; set RESTFRQ "
                         "in the header or rest_frequency= (in Hz)" % ctype)
    try:
        if kind == "radio":
            return q.to_value(u.km / u.s)
        if kind == "freq":
            f = q.to_value(u.Hz)
        elif kind == "wave":
            f = (q.to(u.Hz, equivalencies=u.spectral())).value
        else:
            f = rest_hz / (1 + q.to_value(u.km / u.s) / C_KMS)
    except u.UnitConversionError:
        raise InputError("spectral unit %r does not fit a %s axis; use a frequency unit for "
                         "FREQ, a velocity unit for VRAD/VELO/VOPT" % (str(unit), ctype)) from None
    return C_KMS * (1 - f / rest_hz)


def read_cube(path, rest_frequency=None, nh3=False):
    """Read a FITS cube; return the data (spectral axis first) and radio velocities.

    Parameters
    ----------
    path : str or Path
    rest_frequency : float, optional
        Hz, when the header has no RESTFRQ/RESTFREQ (NH3 mode defaults to (1,1)).
    nh3 : bool
        NH3 mode (default rest frequency).

    Returns
    -------
    Cube

    Raises
    ------
    InputError
        Missing or unreadable file, fewer than 3 axes, no spectral axis, a non-degenerate
        extra axis, an unknown spectral unit, a missing rest frequency, or no finite value.
    """
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning
    path = Path(path)
    if not path.is_file():
        raise InputError("cube %s does not exist; give the path of a FITS cube" % path)
    try:
        with fits.open(path) as hdul:
            hdu = next((h for h in hdul if h.data is not None and h.data.ndim > 0), None)
            if hdu is None:
                raise InputError("%s has no image data in any HDU" % path)
            data, header = np.asarray(hdu.data, np.float32), hdu.header.copy()
    except OSError as exc:
        raise InputError("cannot read %s as FITS: %s" % (path, exc)) from None
    if data.ndim < 3:
        raise InputError("%s is a %d-D image; clover needs a cube with a spectral axis "
                         "(axes x, y, spectrum)" % (path, data.ndim))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
        except Exception as exc:  # astropy raises several types for bad WCS keywords
            raise InputError("%s: the WCS cannot be read (%s); check CTYPE/CUNIT" % (path, exc)) from None
    spec = _spectral_axis_index(header, data.ndim)
    if spec is None:
        raise InputError("%s has no spectral axis (no CTYPEn of FREQ/VRAD/VELO/VOPT/FELO/WAVE); "
                         "clover needs a spectral cube" % path)
    data, wcs2d = _squeeze_to_cube(data, wcs, spec, path)
    if not np.isfinite(data).any():
        raise InputError("%s contains no finite value (all NaN); nothing to predict" % path)
    n = data.shape[0]
    key = str(spec + 1)
    crval, crpix = header.get("CRVAL" + key, 0.0), header.get("CRPIX" + key, 1.0)
    values = crval + (np.arange(n) + 1 - crpix) * _spectral_cdelt(header, key)
    rest = header.get("RESTFRQ", header.get("RESTFREQ")) or rest_frequency or (NH3_11_REST_HZ if nh3 else None)
    velocity = _velocity_axis(values, header.get("CTYPE" + key, ""), header.get("CUNIT" + key, ""), rest)
    spatial = wcs2d.to_header()
    for k in ("BMAJ", "BMIN", "BPA", "OBJECT", "TELESCOP", "DATE-OBS"):
        if k in header:
            spatial[k] = header[k]
    return Cube(data, velocity, header, spatial, str(header.get("BUNIT", "")).strip(), spec + 1, path)


def _spectral_axis_index(header, naxis):
    for i in range(naxis):
        if str(header.get("CTYPE%d" % (i + 1), ""))[:4].upper() in _SPECTRAL_KINDS:
            return i
    return None


def _squeeze_to_cube(data, wcs, spec, path):
    """Move the spectral axis first, drop degenerate axes; return data and the 2-D WCS."""
    np_spec = data.ndim - 1 - spec
    extra = [i for i in range(wcs.naxis) if i != spec and i not in (wcs.wcs.lng, wcs.wcs.lat)]
    if wcs.wcs.lng < 0 or wcs.wcs.lat < 0:   # linear spatial axes: keep the first two others
        extra = [i for i in range(wcs.naxis) if i != spec][2:]
    for i in extra:
        if data.shape[data.ndim - 1 - i] != 1:
            raise InputError("%s: axis %d (%s) has %d planes; clover needs one spectral and two "
                             "spatial axes (select one plane first)"
                             % (path, i + 1, wcs.wcs.ctype[i], data.shape[data.ndim - 1 - i]))
    keep = [i for i in range(wcs.naxis) if i != spec and i not in extra]
    cube = np.moveaxis(data, np_spec, 0)
    cube = cube.reshape((cube.shape[0],) + tuple(data.shape[data.ndim - 1 - i] for i in sorted(keep, reverse=True)))
    return cube, wcs.sub([i + 1 for i in sorted(keep)])


def write_map(path, image, header, bunit, overwrite=False, comment=""):
    """Write a 2-D FITS map atomically (temporary file + rename)."""
    from astropy.io import fits
    hdr = header.copy()
    hdr["BUNIT"] = bunit
    hdr["ORIGIN"] = "clover %s" % __version__
    if comment:
        hdr["COMMENT"] = comment
    with atomic_output(path, overwrite=overwrite, mode="wb") as stream:
        fits.PrimaryHDU(np.asarray(image, np.float32), hdr).writeto(stream)


def write_fitted_cube(path, cube, first, overwrite=False):
    """Write the padded/clipped cube as ``<name>_clover.fits`` with a corrected axis.

    The cube is written as (x, y, spectrum) whatever the axis order of the input: the
    header is the 2-D celestial WCS plus the input's spectral axis as axis 3, with its
    reference pixel moved by ``first`` (the original kept the old one, and assumed the
    spectral axis was FITS axis 3).
    """
    from astropy.io import fits
    old, key = cube.header, str(cube.spec_fits_axis)
    hdr = cube.spatial_header.copy()
    hdr["WCSAXES"] = 3
    hdr["CTYPE3"] = old.get("CTYPE" + key, "")
    hdr["CUNIT3"] = old.get("CUNIT" + key, "")
    hdr["CRVAL3"] = old.get("CRVAL" + key, 0.0)
    hdr["CDELT3"] = _spectral_cdelt(old, key)
    hdr["CRPIX3"] = old.get("CRPIX" + key, 1.0) + first
    for k in ("RESTFRQ", "RESTFREQ", "SPECSYS", "SSYSOBS", "VELREF", "BUNIT"):
        if k in old:
            hdr[k] = old[k]
    hdr["HISTORY"] = "clover %s: spectral axis %s from %d to %d channels" % (
        __version__, "padded with noise" if first > 0 else "clipped",
        old.get("NAXIS" + key, 0), cube.data.shape[0])
    with atomic_output(path, overwrite=overwrite, mode="wb") as stream:
        fits.PrimaryHDU(np.asarray(cube.data, np.float32), hdr).writeto(stream)


def _spectral_cdelt(header, key):
    """Channel increment of FITS axis ``key`` from CDi_i, or CDELTi x PCi_i."""
    if "CD%s_%s" % (key, key) in header:
        return header["CD%s_%s" % (key, key)]
    return header.get("CDELT" + key, 1.0) * header.get("PC%s_%s" % (key, key), 1.0)


# ===========================================================================
# Stage: predict
# ===========================================================================
def _output_paths(stem, outdir):
    return {name: Path(outdir) / ("%s_%s.fits" % (stem, name)) for name in OUTPUT_MAPS}


def _check_outputs_free(paths, overwrite):
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError("%d output(s) exist already (%s%s); use --overwrite / overwrite=True "
                                "or another outdir" % (len(existing), existing[0],
                                                       ", ..." if len(existing) > 1 else ""))


def _to_physical(result, tmax, velocity, nchan):
    """Training units -> km/s and brightness: centroid channel -> velocity by interpolation."""
    half = _centre_channel(nchan)
    chan = np.arange(nchan)
    dv = abs(velocity[-1] - velocity[0]) / (nchan - 1)     # mean width, not channels 23/24
    out = {}
    for kind, names in REG_TARGETS.items():
        mu, err = result[kind], result[kind + "_err"]
        ncomp = len(names) // 3
        for j, name in enumerate(names):
            col = mu[:, j]
            if j < ncomp:                      # centroid
                out[name] = np.interp(col * half + half, chan, velocity, left=np.nan, right=np.nan)
                out[name + "_err"] = err[:, j] * half * dv
            elif j < 2 * ncomp:                # dispersion
                out[name], out[name + "_err"] = col * dv, err[:, j] * dv
            else:                              # peak
                out[name], out[name + "_err"] = col * tmax, err[:, j] * tmax
    out["class"] = result["class"].astype(np.float32)
    out["prob"] = result["prob"]
    return out


def _centroids_outside(maps, velocity, line):
    """(number outside the trained range, number of finite centroids) of the maps."""
    centre = 0.5 * (velocity[0] + velocity[-1])
    cents = np.concatenate([maps[k][np.isfinite(maps[k])] for k in ("vlsr", "vlsr1", "vlsr2")])
    return int((np.abs(cents - centre) > LINE_TYPES[line]["centroid_halfwidth_kms"]).sum()), cents.size


def _warn_centroid_range(outside, total, line, where):
    """CentroidRangeWarning when more than 1 % of the predicted centroids leave the trained range."""
    if total and outside / total > 0.01:
        warnings.warn("%d of %d predicted centroids lie more than %.1f km/s from %s, outside the "
                      "trained range; use tile mode (--tile N: a spectral window per N x N pixels) "
                      "or split the cube into sub-cubes with smaller velocity gradients"
                      % (outside, total, LINE_TYPES[line]["centroid_halfwidth_kms"], where),
                      CentroidRangeWarning, stacklevel=4)


def _warn_bright_emission(data, velocity, line, centre, max_pixels=20000, min_snr=6.0):
    """Check the bright spectra of a Gaussian-line cube against the trained ranges.

    Every spectrum with peak S/N > ``min_snr`` (noise = 1.4826 MAD of the spectrum; at
    most ``max_pixels`` of them) is checked for (1) its peak velocity against the trained
    centroid range around ``centre`` (km/s, the centre of the window the networks see;
    ``data`` is the whole input cube, so emission in channels clipped away is caught
    too) -> CentroidRangeWarning; (2) its width in channels (FWHM / 2.355 around the
    peak) against the trained dispersions, with some margin -> LineWidthWarning.  NH3
    is left to the checks on the predicted centroids and the channel width.
    """
    if line != "gauss":
        return
    flat = data.reshape(data.shape[0], -1)
    cols = np.flatnonzero(np.isfinite(flat).all(axis=0))
    if cols.size > max_pixels:
        cols = cols[np.linspace(0, cols.size - 1, max_pixels).astype(int)]
    spec = flat[:, cols]
    if not spec.size:
        return
    noise = 1.4826 * np.median(np.abs(spec - np.median(spec, axis=0)), axis=0)
    spec = spec[:, spec.max(axis=0) > min_snr * np.maximum(noise, 1e-30)]
    if not spec.shape[1]:
        return
    peak = np.argmax(spec, axis=0)
    outside = np.abs(velocity[peak] - centre) > LINE_TYPES[line]["centroid_halfwidth_kms"]
    if outside.mean() > 0.01:
        warnings.warn("%d of %d bright spectra peak outside the trained range (%.1f km/s around "
                      "the centre %.2f km/s of the window the networks see); use tile mode "
                      "(--tile N) or split the cube into sub-cubes with smaller velocity gradients"
                      % (outside.sum(), outside.size, LINE_TYPES[line]["centroid_halfwidth_kms"], centre),
                      CentroidRangeWarning, stacklevel=3)
    width = np.median(_half_max_sigma(spec, peak))
    lo, hi = (v / TEMPLATE_DV_KMS for v in GAUSS_RANGES["sigma_kms"])
    if not 0.7 * lo <= width <= 1.5 * hi:
        warnings.warn("the bright lines are %.1f channels wide (dispersion, median of %d spectra); "
                      "the Gaussian models were trained on %.1f-%.1f channels, so classes and "
                      "kinematics are unreliable: resample the spectral axis so that lines span "
                      "that range" % (width, spec.shape[1], lo, hi), LineWidthWarning, stacklevel=3)


def _half_max_sigma(spec, peak):
    """Dispersion in channels (FWHM / 2.355) of the run above half maximum around ``peak``."""
    n = spec.shape[0]
    chan = np.arange(n)[:, None]
    below = spec < 0.5 * spec[peak, np.arange(spec.shape[1])][None, :]
    left = np.where(below & (chan < peak[None, :]), chan, -1).max(axis=0)
    right = np.where(below & (chan > peak[None, :]), chan, n).min(axis=0)
    return (right - left - 1) / 2.3548


def _predict_blocks(cube, models, batch_size, block_pixels, progress, refine=True, velocity=None):
    """Run the networks over row blocks of a (nchan, ny, nx) cube; return flat maps.
    ``velocity`` (km/s): the cube's axis, for the NH3 fits (default the training axis)."""
    freq = None
    if velocity is not None and models.line == "nh3":
        freq = NH3_11_REST_HZ * (1 - np.asarray(velocity, float) / C_KMS)
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
        near = _cube_neighbours(block, valid, np.argwhere(valid)[keep], tmax[keep])
        res = predict_spectra(x[keep], models, batch_size, refine, near, freq)
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


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _cube_neighbours(block, valid, positions, tmax):
    """``neighbours`` callable of :func:`predict_spectra` for pixels of a cube block.

    Parameters
    ----------
    block : ndarray, shape (nchan, ny, nx)
    valid : ndarray of bool, shape (ny, nx)
        Pixels with a finite spectrum.
    positions : ndarray of int, shape (n, 2)
        (y, x) of the predicted pixels, in the order of the network inputs.
    tmax : ndarray, shape (n,)
        Their central maxima (the neighbours are put on the same scale).
    """
    nchan, ny, nx = block.shape

    def neighbours(rows):
        py, px = positions[rows, 0], positions[rows, 1]
        out = np.full((len(rows), len(_NEIGHBOURS), nchan), np.nan, np.float32)
        for j, (dy, dx) in enumerate(_NEIGHBOURS):
            yy, xx = py + dy, px + dx
            ok = np.flatnonzero((yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx))
            ok = ok[valid[yy[ok], xx[ok]]]
            out[ok, j] = block[:, yy[ok], xx[ok]].T / tmax[rows][ok, None]
        return out
    return neighbours


def predict(f, nh3=False, nproc=1, outdir=None, overwrite=False, model_dir=None,
            batch_size=2048, seed=0, rest_frequency=None, block_pixels=20000,
            progress=True, write=True, models=None, refine=True, tile=0):
    """Classify every pixel of a cube and predict its components' kinematics.

    Parameters
    ----------
    f : str or Path
        FITS cube (spectral axis of frequency, velocity or wavelength, any unit).
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
        Seed of the padding noise.
    rest_frequency : float, optional
        Hz, when the header has none.
    progress : bool
        tqdm progress bar when the cube spans several blocks.
    write : bool
        Write the FITS outputs (False: only return the maps).
    models : CloverModels, optional
        Already loaded networks (saves the loading time in loops).
    refine : bool
        Polish the networks' output by model fits (see :func:`predict_spectra`):
        Gaussian lines, the two-component values (:func:`refine_gaussians`; their
        ``_err`` maps are then the fit's formal errors); NH3, the one/two-component
        decision of pixels with uncertain ensemble odds, by NH3 fits of their 3x3
        neighbourhood (:func:`settle_nh3_classes`).
    tile : int
        0 (default): one spectral window for the whole cube, the central 500/1000
        channels (the original).  N > 0: the automatic sub-cube tiling the original's
        README asks users to do by hand - each N x N-pixel tile gets its own window,
        centred on the tile's emission (peak of its smoothed mean spectrum; the whole
        cube's when the tile has none above 5 sigma), so cubes with large velocity
        gradients or off-centre lines stay inside the trained centroid range.  No
        ``<name>_clover.fits`` is written in this mode (there is no single cube).

    Returns
    -------
    dict
        ``maps`` {name: (ny, nx) array} for every OUTPUT_MAPS entry; ``paths``
        {name: Path} of the written files (with ``cube`` when the spectral axis was
        changed); ``seconds``; ``n_pixels``; ``velocity`` (km/s axis used).

    Raises
    ------
    InputError, OutputExistsError

    Warns
    -----
    CentroidRangeWarning, ChannelWidthWarning

    Notes
    -----
    The output names are ``<name>_<map>.fits`` with ``<name>`` the cube's name, or
    ``<name>_clover`` when the spectral axis had to be padded or clipped (then the
    changed cube is written as ``<name>_clover.fits``, as in the original, with the
    input's blanks kept).  Blank (NaN) channels of spectra that are at most half blank
    are filled with noise for the networks (:func:`fill_blank_channels`); spectra that
    are more than half blank give NaN in every map.
    """
    start = time.perf_counter()
    line = "nh3" if nh3 else "gauss"
    nchan = LINE_TYPES[line]["nchan"]
    if int(tile) < 0:
        raise InputError("tile = %r: use 0 (one window for the cube) or a tile size in pixels" % tile)
    cube = read_cube(f, rest_frequency=rest_frequency, nh3=nh3)
    outdir = Path(outdir) if outdir else cube.path.parent
    stem = cube.path.name[:-5] if cube.path.name.lower().endswith(".fits") else cube.path.stem
    rng = np.random.default_rng(seed)
    filled, blank = fill_blank_channels(cube.data, rng)
    if tile:
        return _predict_tiled(cube, filled, stem, outdir, line, int(tile), dict(
            nproc=nproc, overwrite=overwrite, model_dir=model_dir, batch_size=batch_size, rng=rng,
            progress=progress, write=write, models=models, refine=refine), start)
    data, first = fit_length(filled, nchan, rng)
    changed = cube.data.shape[0] != nchan
    velocity = _fitted_velocity(cube.velocity, first, nchan)
    paths = {}
    if changed:
        stem += "_clover"
        paths["cube"] = outdir / (stem + ".fits")
    paths.update(_output_paths(stem, outdir))
    if write:
        _check_outputs_free(paths.values(), overwrite)
    _check_channel_width(velocity, line)
    fitted = data                             # file channel order, for <name>_clover.fits
    if changed and blank is not None:         # the written cube keeps the input's blanks
        fitted = np.where(_fitted_mask(blank, first, nchan), np.float32(np.nan), data)
    if velocity[-1] < velocity[0]:            # the networks saw velocity increasing with index
        data, velocity = data[::-1], velocity[::-1]
    centre = 0.5 * (velocity[0] + velocity[-1])
    _warn_bright_emission(filled, cube.velocity, line, centre)
    models = _models_for(line, models, model_dir, nproc)
    log.info("Segmenting and predicting kinematics of %d pixels (%s, %d members)",
             data.shape[1] * data.shape[2], line, models.n_members)
    flat, valid = _predict_blocks(data, models, batch_size, block_pixels, progress,
                                  bool(refine), velocity)
    maps = _assemble_maps(_to_physical(flat, flat["tmax"], velocity, nchan), valid)
    _warn_centroid_range(*_centroids_outside(maps, velocity, line), line,
                         "the band centre (%.2f km/s)" % centre)
    if write:
        if changed:
            cube.data = fitted
            write_fitted_cube(paths["cube"], cube, first, overwrite)
        _write_maps(paths, maps, cube, overwrite)
    seconds = time.perf_counter() - start
    log.info("predicted %d pixels in %.1f s", int(valid.sum()), seconds)
    return {"maps": maps, "paths": paths if write else {}, "seconds": seconds,
            "n_pixels": int(valid.sum()), "velocity": velocity}


def _models_for(line, models, model_dir, nproc):
    """The given models (checked against the line type) or the ones loaded from ``model_dir``."""
    models = models or CloverModels(line, model_dir, nproc)
    if models.line != line:
        raise InputError("the given models are for %r spectra but nh3=%s; load CloverModels(%r)"
                         % (models.line, line == "nh3", line))
    return models


def _assemble_maps(phys, valid):
    """2-D maps (NaN where ``valid`` is False) from the flat physical values."""
    maps = {}
    for name in OUTPUT_MAPS:
        image = np.full(valid.shape, np.nan, np.float32)
        image[valid] = phys[name]
        maps[name] = image
    return maps


def _write_maps(paths, maps, cube, overwrite):
    units = {"class": "", "prob": "", "vel": "km/s", "width": "km/s", "peak": cube.bunit}
    for name, (_, _, kind, text) in OUTPUT_MAPS.items():
        write_map(paths[name], maps[name], cube.spatial_header, units[kind], overwrite, text)


def emission_channel(data, smooth=5, min_snr=5.0):
    """Channel of the emission peak of a (sub-)cube, or None when there is none.

    The mean of the finite spectra is smoothed by a ``smooth``-channel boxcar; its
    maximum counts as emission when it exceeds ``min_snr`` x its noise (1.4826 MAD of
    the smoothed mean spectrum about its median).

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
    noise = 1.4826 * np.median(np.abs(mean - base))
    peak = int(np.argmax(mean))
    return peak if mean[peak] - base > min_snr * max(noise, 1e-30) else None


def _predict_tiled(cube, filled, stem, outdir, line, tile, opts, start):
    """:func:`predict` in tile mode: a spectral window per tile x tile pixels of ``filled``
    (the cube's data after :func:`fill_blank_channels`)."""
    nchan = LINE_TYPES[line]["nchan"]
    paths = _output_paths(stem, outdir)
    if opts["write"]:
        _check_outputs_free(paths.values(), opts["overwrite"])
    models = _models_for(line, opts["models"], opts["model_dir"], opts["nproc"])
    n, ny, nx = filled.shape
    fallback = emission_channel(filled)
    fallback = n // 2 if fallback is None else fallback
    maps = {name: np.full((ny, nx), np.nan, np.float32) for name in OUTPUT_MAPS}
    corners = [(y, x) for y in range(0, ny, tile) for x in range(0, nx, tile)]
    log.info("Segmenting and predicting kinematics of %d pixels (%s, %d members) in %d tiles of "
             "%d x %d pixels", ny * nx, line, models.n_members, len(corners), tile, tile)
    rng = opts["rng"]
    outside = total = 0
    for y0, x0 in _progress(corners, opts["progress"], "clover tiles"):
        y1, x1 = min(ny, y0 + tile), min(nx, x0 + tile)
        hy0, hx0 = max(0, y0 - 1), max(0, x0 - 1)             # one-pixel halo for the 3x3 mean
        sub = filled[:, hy0:min(ny, y1 + 1), hx0:min(nx, x1 + 1)]
        centre = emission_channel(filled[:, y0:y1, x0:x1])
        data, first = fit_length(sub, nchan, rng, fallback if centre is None else centre)
        velocity = _fitted_velocity(cube.velocity, first, nchan)
        if velocity[-1] < velocity[0]:
            data, velocity = data[::-1], velocity[::-1]
        flat, valid = _predict_blocks(data, models, opts["batch_size"], data.shape[1] * data.shape[2],
                                      False, bool(opts["refine"]), velocity)
        full = _assemble_maps(_to_physical(flat, flat["tmax"], velocity, nchan), valid)
        inner = (slice(y0 - hy0, y1 - hy0), slice(x0 - hx0, x1 - hx0))
        part = {name: image[inner] for name, image in full.items()}
        for name, image in part.items():
            maps[name][y0:y1, x0:x1] = image
        o, t = _centroids_outside(part, velocity, line)
        outside, total = outside + o, total + t
    _check_channel_width(cube.velocity, line)
    _warn_centroid_range(outside, total, line, "their tile's window centre")
    if opts["write"]:
        _write_maps(paths, maps, cube, opts["overwrite"])
    seconds = time.perf_counter() - start
    valid = np.isfinite(maps["class"])
    log.info("predicted %d pixels in %.1f s", int(valid.sum()), seconds)
    return {"maps": maps, "paths": paths if opts["write"] else {}, "seconds": seconds,
            "n_pixels": int(valid.sum()), "velocity": None}


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


def _check_channel_width(velocity, line):
    if line != "nh3":
        return
    dv = abs(velocity[-1] - velocity[0]) / (len(velocity) - 1)
    if abs(dv / TEMPLATE_DV_KMS - 1) > 0.1:
        warnings.warn("the NH3 cube's channel width %.4f km/s differs from the trained %.4f km/s; "
                      "the hyperfine pattern spans a different number of channels, so results "
                      "are unreliable: regrid the cube to 5.72 kHz channels" % (dv, TEMPLATE_DV_KMS),
                      ChannelWidthWarning, stacklevel=3)


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
        Test spectra for the classifier (thirds); a third of it for the regressor.
    seed : int
        Test-set seed (use one different from the training seed).
    refine : bool
        As :func:`predict_spectra` (NH3: fits settle uncertain one/two decisions).

    Returns
    -------
    dict
        ``class_accuracy`` {class: {'all', 'snr>=4'}} of the final classes,
        ``network_class_accuracy`` {class: S/N >= 4 accuracy of the ensemble alone},
        ``settled_fraction`` (spectra decided by NH3 fits), ``snr_bins`` {class: {bin: [acc,
        count]}} (two-component spectra binned by their weaker component's S/N),
        ``confusion`` (3x3, rows truth), ``two_by_separation`` (two-component accuracy
        at S/N >= 4 per bin of centroid separation / larger dispersion) and
        ``regression`` (median absolute errors of vlsr and sigma in km/s at S/N >= 8,
        with the mean linewidth; for Gaussian lines also after the refinement).
    """
    rng = np.random.default_rng(seed)
    simulate = LINE_TYPES[line]["simulate"]
    sim = simulate(n, rng, windows=True) if line == "nh3" else simulate(n, rng)
    near = simulated_neighbours(sim) if "windows" in sim else None
    res = predict_spectra(sim["x"], models, batch_size, refine=refine, neighbours=near)
    pred, network = res["class"], res["probs"].argmax(axis=1)
    truth = sim["label"].astype(int)
    snr = np.where(truth == CLASS_CODES["two"], sim["snr_min"], sim["snr"])
    table = {"n": n, "seed": seed, "class_accuracy": {}, "network_class_accuracy": {}, "snr_bins": {},
             "settled_fraction": float(res["settled"].mean()),
             "confusion": np.bincount(truth * 3 + pred, minlength=9).reshape(3, 3).tolist()}
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
    table["regression"] = _evaluate_regression(line, models, max(300, n // 3), rng, batch_size)
    return table


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


def _evaluate_regression(line, models, n, rng, batch_size):
    """Median absolute errors (km/s) of the two-component regressor at S/N >= 8, of the
    network alone and (Gaussian lines) after :func:`refine_gaussians`."""
    sim = LINE_TYPES[line]["simulate"](n, rng, classes=CLASS_CODES["two"])
    nchan = LINE_TYPES[line]["nchan"]
    mu, err = models.regress("reg2", sim["x"], batch_size)
    good = sim["snr_min"] >= 8
    table = {"n": int(good.sum()), "mean_linewidth_kms": float(np.nanmean(sim["sigma"][good]))}
    table.update(_regression_errors(mu, err, sim["reg2"], good, nchan))
    if line == "gauss":
        fit, fit_err, _ = _refine_rows(sim["x"], mu, err, nchan)
        table["refined"] = _regression_errors(fit, fit_err, sim["reg2"], good, nchan)
    return table


def _regression_errors(mu, err, truth, good, nchan):
    half, dv = _centre_channel(nchan), TEMPLATE_DV_KMS
    dvel = np.abs(mu[:, :2] - truth[:, :2])[good] * half * dv
    dsig = np.abs(mu[:, 2:4] - truth[:, 2:4])[good] * dv
    dpeak = np.abs(mu[:, 4:] - truth[:, 4:])[good]
    pull = ((mu - truth) / err)[good]
    return {"mae_vlsr_kms": float(np.median(dvel)), "mae_sigma_kms": float(np.median(dsig)),
            "mae_tpeak_rel": float(np.median(dpeak)),
            "pull_std": [float(v) for v in np.nanstd(pull, axis=0)]}


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
    return summary


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
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
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
    parser.add_argument("cube", nargs="?", help="FITS cube (any spectral unit)")
    parser.add_argument("--nh3", action="store_true", default=None, help="NH3 (1,1) mode")
    parser.add_argument("--nproc", type=int, help="CPU threads for TensorFlow")
    parser.add_argument("--outdir", help="output directory (default: next to the cube)")
    parser.add_argument("--model-dir", help="trained models (default models/clover)")
    parser.add_argument("--tile", type=int, help="a spectral window per N x N-pixel tile, centred on "
                        "its emission (for cubes with large velocity gradients); 0 = one window")
    parser.add_argument("--no-refine", dest="refine", action="store_false", default=None,
                        help="networks only: no least-squares polish of two-component Gaussian values, "
                             "no NH3 model fits of pixels with uncertain one/two-component odds")


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
        raise InputError("no cube given; usage: clover predict CUBE.fits [--nh3] [--outdir DIR]")
    p = dict(config["Predict"])
    for key in ("nh3", "nproc", "outdir", "model_dir", "tile", "refine"):
        value = getattr(args, key, None)
        if value is not None:
            p[key] = value
    res = predict(args.cube, overwrite=args.overwrite, **p)
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
    parser = build_cli(__doc__.strip().splitlines()[0], SUBCOMMANDS, __version__, CONFIG_SCHEMA)
    return run_cli(parser, argv, validators=(_validate_config,))


if invoked_as_script(globals()):
    sys.exit(main())
