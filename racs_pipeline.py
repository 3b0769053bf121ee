"""RACS historical transients: ASKAP vs SUMSS/NVSS crossmatch and transient search.

Re-creation of the RACS historical-transients pipeline (``processASKAPimage.py`` of
ajstewart/racs-historical-transients): source finding on an ASKAP image (AegeanTools,
PyBDSF, or existing Aegean/Selavy catalogues), crossmatch with SUMSS and NVSS (local
catalogue files, or Vizier queries cached on disk), flux-ratio and positional
diagnostics, transient candidates with forced (priorized) Aegean photometry, kvis/DS9
annotations, postage stamps and an SQL database (SQLite by default, PostgreSQL + Q3C).

Images come as ASKAP writes them: 2-D, 3-D or 4-D FITS (degenerate axes squeezed; a
cube's channel, or an MFS plane, chosen with ``channel``), the beam from a beam table,
BMAJ/BMIN or ``beam``, the frequency from the FREQ axis, RESTFRQ/RESTFREQ or
``frequency``.  Without an image, an existing ASKAP catalogue gives a catalogue-only run;
without a survey catalogue, a source-finding-only run.  Everything that scales with the
number of sources is vectorised (a KD-tree on unit vectors does the crossmatch).

Use
---
As a module::

    import racs_pipeline
    racs_pipeline.main(["process", "-c", "parset.in", "image.fits"])
    summary = racs_pipeline.process_image("image.fits", racs_pipeline.load_parset("parset.in"))

From the shell::

    python racs_pipeline.py process -c parset.in image.fits [image2.fits ...]
    python racs_pipeline.py process --sumss-csv sumss.csv --transients --channel mfs cube.fits
    python racs_pipeline.py process --help      # every key, the image and catalogue formats

Every parset key also exists as a ``--flag`` (``transient_max_separation`` ->
``--transient-max-separation 20``); booleans take true/false/yes/no/on/off/1/0 and a bare
``--transients`` means true.  The command line overrides the parset; paths in a parset are
relative to its folder.

Inside a CASA 6 session: ``execfile("racs_pipeline.py")`` defines the functions and
runs nothing.

Configuration
-------------
A parset (INI) with the sections ``[GENERAL]``, ``[ANALYSIS]``, ``[CATALOGUES]``,
``[CROSSMATCHING]``, ``[TRANSIENTS]``, ``[POSTAGESTAMPS]`` and ``[DATABASE]``
(``--write-config FILE`` writes a template; ``configs/racs_pipeline.in``).
Aegean settings come from an optional ``[aegean]`` file (``aegean_settings_config``).

Outputs go to ``<image>_results[_<output_tag>]/``; each stage records its settings and
the checksums of its inputs in ``racs_stages.json`` and is redone only when they change
(or with ``clobber``/``--overwrite``).
"""
import argparse
import configparser
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "main",
    "CONFIG_SCHEMA",
    "SURVEYS",
    "ToolError",
    "ConfigError",
    "InputError",
    "OutputExistsError",
    "RacsDataWarning",
    "CatalogueUnavailableError",
    "CATALOGUE_FORMATS_HELP",
    "load_parset",
    "resolve_parset_paths",
    "image_layout",
    "read_beam_table",
    "plane_header",
    "check_convolvable",
    "import_casa",
    "aegean_numpy_compat",
    "read_table_file",
    "read_table",
    "column_unit",
    "catalogue_footprint",
    "resolve_scaled_defaults",
    "file_digest",
    "StageLedger",
    "ConfigKey",
    "Config",
    "load_config",
    "setup_logging",
    "ImageInfo",
    "load_image",
    "rms_map",
    "robust_rms",
    "sample_map",
    "weight_crop",
    "convolve_to_beam",
    "survey_beam",
    "determine_catalogues",
    "read_survey_catalogue",
    "fetch_survey_catalogue",
    "trim_to_footprint",
    "flag_extended",
    "read_askap_csv",
    "find_sources_aegean",
    "find_sources_pybdsf",
    "read_aegean_settings",
    "forced_photometry",
    "crossmatch_nearest",
    "pairs_within",
    "scale_flux",
    "flux_ratio",
    "sky_offsets",
    "variability_metrics",
    "transient_search",
    "write_ann",
    "write_ds9_region",
    "write_table",
    "display_plane",
    "make_diagnostic_plots",
    "make_postage_stamps",
    "RacsDatabase",
    "process_image",
    "process_images",
    "mad_sigma",
    "jsonable",
    "write_provenance",
    "cli_main",
]
__version__ = "0.3.0"

log = logging.getLogger("racs_pipeline")

# ===========================================================================
# Constants
# ===========================================================================
SPECTRAL_INDEX = -0.8   # flux extrapolation S ~ nu^alpha between surveys (seed)
SUMSS_FREQUENCY_HZ = 843e6
NVSS_FREQUENCY_HZ = 1.4e9
CITATION = ("Stewart et al., racs-historical-transients (github.com/ajstewart/"
            "racs-historical-transients); Hancock et al. 2012, 2018 (Aegean)")

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


class RacsDataWarning(UserWarning):
    """A recoverable problem in the input data (filter with ``warnings.filterwarnings``)."""


class CatalogueUnavailableError(InputError):
    """A survey catalogue could not be obtained (Vizier unreachable and no local file)."""


def _data_warning(message):
    """Report a recoverable data problem: a :class:`RacsDataWarning` and, when this tool's
    log is set up (command line, per-run log file), the same text in the log.

    AegeanTools turns Python warnings into log records of its own at import
    (``logging.captureWarnings``), so warnings alone would vanish from the console.
    """
    if any(getattr(h, "_toolkit_handler", False) or getattr(h, "_racs_run_handler", False)
           for h in log.handlers):
        log.warning("%s", message)
    import warnings
    warnings.warn(message, RacsDataWarning, stacklevel=3)


# ===========================================================================
# Configuration schema (the only keys accepted; see --write-config)
# ===========================================================================
_POS = (0.0, None)
CONFIG_SCHEMA = (
    ConfigKey("GENERAL", "output_tag", "str", "", help="suffix of the output directory <image>_results_<tag>"),
    ConfigKey("GENERAL", "output_dir", "path", None, help="parent directory of the results (default: beside each image)"),
    ConfigKey("GENERAL", "log_level", "str", "INFO", ("DEBUG", "INFO", "WARNING"), "logging level (-v/-q win)"),
    ConfigKey("GENERAL", "nice", "int", 10, (0, 19), "process niceness (never lowered)", bounds=True),
    ConfigKey("GENERAL", "clobber", "bool", False, help="recompute every stage even when its recorded inputs and settings are unchanged (same as --overwrite)"),
    ConfigKey("GENERAL", "sumss_only", "bool", False, help="crossmatch with SUMSS only"),
    ConfigKey("GENERAL", "nvss_only", "bool", False, help="crossmatch with NVSS only"),
    ConfigKey("ANALYSIS", "frequency", "float", None, _POS, "image frequency (Hz), used when the header has none (FREQ axis, then RESTFRQ/RESTFREQ); required for a catalogue without an image", bounds=True),
    ConfigKey("ANALYSIS", "force_frequency", "bool", False, help="use frequency even when the header has one (--force)"),
    ConfigKey("ANALYSIS", "channel", "str", None, help="plane of a cube: a channel number (0-based) or 'mfs' (inverse-variance weighted mean of the good channels at their common beam)"),
    ConfigKey("ANALYSIS", "stokes", "str", "I", ("I", "Q", "U", "V"), "Stokes plane of an image with several"),
    ConfigKey("ANALYSIS", "beam", "floatlist", [], help="restoring beam 'bmaj, bmin, bpa' (arcsec, arcsec, deg) when the image header / catalogue has none"),
    ConfigKey("ANALYSIS", "weight_crop", "bool", False, help="blank pixels whose weight is low"),
    ConfigKey("ANALYSIS", "weight_crop_value", "float", 0.04, (0.0, 1.0), "relative weight (x max) at or below which pixels are blanked", bounds=True),
    ConfigKey("ANALYSIS", "weight_crop_image", "path", None, help="weight image for cropping ({stem} = image name without .fits)"),
    ConfigKey("ANALYSIS", "convolve", "bool", False, help="convolve the image to the SUMSS/NVSS beam before crossmatching"),
    ConfigKey("ANALYSIS", "convolve_method", "str", "auto", ("auto", "casa", "astropy"), "convolution: CASA imsmooth, astropy+radio-beam, or auto (CASA if installed)"),
    ConfigKey("ANALYSIS", "convolved_image", "path", None, help="an already convolved image ({stem} allowed)"),
    ConfigKey("ANALYSIS", "convolved_non_conv_askap_csv", "path", None, help="component catalogue of the image before convolution"),
    ConfigKey("ANALYSIS", "convolved_non_conv_askap_islands_csv", "path", None, help="island catalogue of the image before convolution"),
    ConfigKey("ANALYSIS", "sourcefinder", "str", "aegean", ("aegean", "pybdsf", "selavy"), "source finder"),
    ConfigKey("ANALYSIS", "find_negative", "bool", False, help="also report negative components (by default only positive ones, as the aegean command)"),
    ConfigKey("ANALYSIS", "aegean_settings_config", "path", None, help="[aegean] settings file (copied to <sf>_settings_used.cfg)"),
    ConfigKey("ANALYSIS", "pybdsf_settings_config", "path", None, help="[pybdsf] settings file (process_image keywords)"),
    ConfigKey("ANALYSIS", "selavy_settings_config", "path", None, help="[selavy] settings file"),
    ConfigKey("ANALYSIS", "boundary_value", "str", "nan", ("nan", "zero"), "value of blanked pixels outside the image"),
    ConfigKey("ANALYSIS", "askap_flux_error", "float", 0.0, _POS, "fractional flux error added in quadrature (0.1 = 10 %)", bounds=True),
    ConfigKey("ANALYSIS", "rms_image", "path", None, help="an existing rms map (e.g. from BANE; {stem} allowed) on the image's pixel grid; default: computed"),
    ConfigKey("ANALYSIS", "bkg_image", "path", None, help="an existing background map (e.g. from BANE; {stem} allowed); default: computed"),
    ConfigKey("ANALYSIS", "rms_box", "int", None, (8, None), "box (pixels) of the sigma-clipped rms/background map (default: 30 beams, at most a third of the image)", bounds=True),
    ConfigKey("ANALYSIS", "edge_margin", "int", None, (0, None), "pixels: a blank or off-image pixel this close marks an edge source (default: 1 arcmin or 4 beams, whichever is larger)", bounds=True),
    ConfigKey("CATALOGUES", "askap_csv", "path", None, help="existing ASKAP component catalogue ({stem} allowed, for batches; without an image: catalogue-only run)"),
    ConfigKey("CATALOGUES", "askap_islands_csv", "path", None, help="existing ASKAP island catalogue ({stem} allowed)"),
    ConfigKey("CATALOGUES", "sumss_csv", "path", None, help="local SUMSS catalogue (Vizier columns, see --help; file, or directory holding sumss.csv)"),
    ConfigKey("CATALOGUES", "nvss_csv", "path", None, help="local NVSS catalogue (Vizier columns, see --help; file, or directory holding nvss.csv)"),
    ConfigKey("CATALOGUES", "catalogue_cache_dir", "path", None, help="directory caching Vizier downloads (reused offline)"),
    ConfigKey("CATALOGUES", "vizier_timeout", "int", 60, (1, None), "seconds before a Vizier query gives up", bounds=True),
    ConfigKey("CATALOGUES", "askap_csv_format", "str", "aegean", ("aegean", "selavy"), "format of askap_csv"),
    ConfigKey("CATALOGUES", "write_ann", "bool", False, help="write kvis .ann and DS9 .reg files"),
    ConfigKey("CATALOGUES", "produce_overlays", "bool", True, help="write overlay plots of the sources on the image"),
    ConfigKey("CROSSMATCHING", "diagnostic_max_separation", "float", None, _POS, "match radius of the diagnostics (arcsec; default: 5\" or a third of the beam, whichever is larger)", bounds=True),
    ConfigKey("CROSSMATCHING", "transient_max_separation", "float", None, _POS, "match radius of the transient search (arcsec; default: the 45\" survey beam or the image beam, whichever is larger)", bounds=True),
    ConfigKey("CROSSMATCHING", "remove_extended", "bool", False, help="leave extended sources out of the diagnostics"),
    ConfigKey("CROSSMATCHING", "askap_ext_thresh", "float", 1.2, _POS, "ASKAP extended threshold (x beam, either axis)", bounds=True),
    ConfigKey("CROSSMATCHING", "sumss_ext_thresh", "float", 1.2, _POS, "SUMSS extended threshold (x beam, either axis)", bounds=True),
    ConfigKey("CROSSMATCHING", "nvss_ext_thresh", "float", 1.2, _POS, "NVSS extended threshold (x beam, either axis)", bounds=True),
    ConfigKey("CROSSMATCHING", "use_all_fits", "bool", False, help="keep Aegean fits with non-zero flags"),
    ConfigKey("CROSSMATCHING", "spectral_index", "float", SPECTRAL_INDEX, help="spectral index alpha (S ~ nu^alpha) of the flux extrapolation"),
    ConfigKey("TRANSIENTS", "transients", "bool", False, help="run the transient search"),
    ConfigKey("TRANSIENTS", "transients_askap_snr_thresh", "float", 5.0, _POS, "S/N (x local rms) a catalogue source must reach in ASKAP to count as missing", bounds=True),
    ConfigKey("TRANSIENTS", "catalogue_only_sigma", "float", 5.0, _POS, "a catalogue source without an ASKAP component is a candidate only if its forced ASKAP flux lies this many sigma (both errors) below the scaled catalogue flux", bounds=True),
    ConfigKey("TRANSIENTS", "transients_catalogue_snr_thresh", "float", 5.0, _POS, "S/N an ASKAP source must reach in the survey to count as new", bounds=True),
    ConfigKey("TRANSIENTS", "transients_large_flux_ratio_thresh", "float", 3.0, (1.0, None), "flux ratio (>= 1) flagging a variable match", bounds=True),
    ConfigKey("TRANSIENTS", "forced_photometry", "bool", True, help="priorized Aegean fits at catalogue positions without an ASKAP source"),
    ConfigKey("TRANSIENTS", "extended_tag_thresh", "float", 1.75, _POS, "axis > this x beam tags a candidate 'Extended source'", bounds=True),
    ConfigKey("TRANSIENTS", "bright_sources_csv", "path", None, help="bright-source table (ra, dec in deg; ',' or ';' separated): missing sources within bright_source_radius are 'Likely artefact (bright source)'"),
    ConfigKey("TRANSIENTS", "bright_source_radius", "float", 10.0, _POS, "radius (arcmin) around a bright source", bounds=True),
    ConfigKey("POSTAGESTAMPS", "postage_stamps", "bool", False, help="make postage stamps"),
    ConfigKey("POSTAGESTAMPS", "postage_stamp_selection", "str", "all", ("all", "transients"), "which crossmatch rows get stamps"),
    ConfigKey("POSTAGESTAMPS", "postage_stamp_ncores", "int", None, (1, None), "parallel processes for stamps (default: half the CPUs)", bounds=True),
    ConfigKey("POSTAGESTAMPS", "postage_stamp_radius", "float", None, _POS, "stamp size (arcmin, full width as in the original; default: 13' or 52 beams, whichever is larger)", bounds=True),
    ConfigKey("POSTAGESTAMPS", "postage_stamp_zscale_contrast", "float", 0.2, (0.0, 1.0), "zscale contrast of the stamps", bounds=True),
    ConfigKey("POSTAGESTAMPS", "sumss_mosaic_dir", "path", None, help="directory of SUMSS mosaic FITS files"),
    ConfigKey("POSTAGESTAMPS", "nvss_mosaic_dir", "path", None, help="directory of NVSS mosaic FITS files"),
    ConfigKey("DATABASE", "db_inject", "bool", True, help="write the results to the database"),
    ConfigKey("DATABASE", "db_engine", "str", "sqlite", ("sqlite", "postgresql"), "database engine (sqlite: file in the output directory)"),
    ConfigKey("DATABASE", "db_url", "str", "", help="full SQLAlchemy URL; wins over the other db_* keys"),
    ConfigKey("DATABASE", "db_username", "str", "", help="database user (postgresql)"),
    ConfigKey("DATABASE", "db_password", "str", "", help="database password (better: PGPASSWORD or ~/.pgpass)"),
    ConfigKey("DATABASE", "db_host", "str", "127.0.0.1", help="database host"),
    ConfigKey("DATABASE", "db_port", "int", 5432, (1, 65535), "database port", bounds=True),
    ConfigKey("DATABASE", "db_database", "str", "racs", help="database name (sqlite: <db_database>.sqlite in the output directory)"),
    ConfigKey("DATABASE", "db_tag", "str", "RACS Analysis", help="tag of this run; re-running with the same tag replaces its rows"),
    ConfigKey("DATABASE", "website_media_dir", "path", None, help="media directory of the review website (PNG and stamps copied there)"),
    ConfigKey("WEB", "host", "str", "127.0.0.1", help="address the review website listens on (web serve)"),
    ConfigKey("WEB", "port", "int", 8005, (1, 65535), "port of the review website", bounds=True),
    ConfigKey("WEB", "allowed_hosts", "list", ["127.0.0.1", "localhost"], help="host names the website answers to (Django ALLOWED_HOSTS)"),
    ConfigKey("WEB", "debug", "bool", False, help="Django debug pages (never on a shared machine)"),
    ConfigKey("WEB", "public_read", "bool", False, help="let visitors browse without logging in (every change still needs a login)"),
    ConfigKey("WEB", "secret_key_file", "path", None, help="file holding the site's SECRET_KEY, made once with mode 0600 (default ~/.config/racs_web/secret_key; $RACS_WEB_SECRET_KEY wins)"),
    ConfigKey("WEB", "slack_webhook_url", "str", "", help="Slack incoming-webhook URL of 'send to Slack' (off when empty)"),
    ConfigKey("WEB", "base_url", "str", "", help="public URL of the site, for the links in Slack messages"),
    ConfigKey("WEB", "candidate_vs_threshold", "float", 4.3, _POS, "candidates: pipeline tag Good and Vs at least this", bounds=True),
    ConfigKey("WEB", "candidate_m_threshold", "float", 1.2, _POS, "candidates: |m| at least this", bounds=True),
    ConfigKey("WEB", "page_size", "int", 50, (1, 1000), "rows per page of the tables", bounds=True),
    ConfigKey("WEB", "threads", "int", 8, (1, 64), "worker threads of the web server", bounds=True),
)


def _cross_key_checks(config):
    """Second validation pass: rules that involve several keys or the file system."""
    errors = []
    general, analysis = config["GENERAL"], config["ANALYSIS"]
    if general["sumss_only"] and general["nvss_only"]:
        errors.append("[GENERAL] sumss_only and nvss_only are both true; set at most one")
    if analysis["weight_crop"] and analysis["weight_crop_image"] is None:
        errors.append("[ANALYSIS] weight_crop = true needs weight_crop_image = FILE")
    if analysis["sourcefinder"] == "selavy" and config["CATALOGUES"]["askap_csv"] is None:
        import shutil
        if shutil.which("selavy") is None:
            errors.append("[ANALYSIS] sourcefinder = 'selavy' but the selavy program is not on PATH; "
                          "run Selavy yourself and give its catalogue with askap_csv = FILE and "
                          "askap_csv_format = selavy, or use sourcefinder = aegean or pybdsf")
    for section, key in (("ANALYSIS", "aegean_settings_config"), ("ANALYSIS", "pybdsf_settings_config"),
                         ("ANALYSIS", "selavy_settings_config"), ("TRANSIENTS", "bright_sources_csv")):
        path = config[section][key]
        if path is not None and not Path(path).is_file():
            errors.append("[%s] %s = %s does not exist" % (section, key, path))
    channel = analysis["channel"]
    if channel is not None and channel.lower() != "mfs" and not channel.isdigit():
        errors.append("[ANALYSIS] channel = %r is invalid: expected a channel number (0, 1, ...) or "
                      "'mfs'" % channel)
    if analysis["beam"] and (len(analysis["beam"]) not in (2, 3) or min(analysis["beam"][:2]) <= 0):
        errors.append("[ANALYSIS] beam = %s is invalid: expected 'bmaj, bmin[, bpa]' with positive "
                      "axes in arcsec and the position angle in deg, e.g. beam = 15, 12, 30"
                      % ", ".join("%g" % v for v in analysis["beam"]))
    if analysis["force_frequency"] and analysis["frequency"] is None:
        errors.append("[ANALYSIS] force_frequency = true needs frequency = HZ")
    return errors


def flat_options(config):
    """All configuration values in one ``{key: value}`` dict (keys are unique)."""
    return {key: value for section in config.as_dict() for key, value in config[section].items()}


# ===========================================================================
# Survey registry: everything that differs between SUMSS and NVSS
# ===========================================================================
SURVEYS = {
    "sumss": {
        "frequency": SUMSS_FREQUENCY_HZ,
        "vizier": ("VIII/81B/sumss212", "VIII/82/mgpscat"),
        "columns": {"ra": "_RAJ2000", "dec": "_DEJ2000", "flux": "St", "flux_err": "e_St"},
        "optional": {"peak_flux": "Sp", "maj": "MajAxis", "min": "MinAxis", "pa": "PA",
                     "mosaic": "Mosaic"},
        "beam_arcsec": 45.0, "beam_cosec_dec": True, "dec_range": (-90.0, -30.0),
    },
    "nvss": {
        "frequency": NVSS_FREQUENCY_HZ,
        "vizier": ("VIII/65/nvss",),
        "columns": {"ra": "_RAJ2000", "dec": "_DEJ2000", "flux": "S1.4", "flux_err": "e_S1.4"},
        "optional": {"maj": "MajAxis", "min": "MinAxis", "pa": "PA"},
        "beam_arcsec": 45.0, "beam_cosec_dec": False, "dec_range": (-40.0, 90.0),
    },
}
_ALT_COLUMNS = {"_RAJ2000": ("RAJ2000", "ra", "RA", "RA_deg"), "_DEJ2000": ("DEJ2000", "dec", "DEC", "Dec", "DEC_deg")}


def survey_rms(survey, dec):
    """Typical 1-sigma noise (Jy) of a survey at declination ``dec`` (deg).

    SUMSS: 2 mJy for dec > -50, 1.2 mJy south of it (original pipeline, PIPELINE.md);
    NVSS: 0.45 mJy (Condon et al. 1998).
    """
    dec = np.asarray(dec, dtype=float)
    if survey == "sumss":
        return np.where(dec > -50.0, 2.0e-3, 1.2e-3)
    return np.full(dec.shape, 0.45e-3)


def survey_beam(survey, dec):
    """Survey restoring beam (bmaj, bmin, bpa) in arcsec/deg at declination ``dec``.

    SUMSS: 45" x 45" cosec|dec| (major axis along declination); NVSS: 45" x 45".

    Examples
    --------
    >>> survey_beam("sumss", -90.0)
    (45.0, 45.0, 0.0)
    """
    info = SURVEYS[survey]
    size = info["beam_arcsec"]
    if info["beam_cosec_dec"]:
        return (float(size / abs(math.sin(math.radians(dec)))), size, 0.0)
    return (size, size, 0.0)


def determine_catalogues(dec, sumss_only=False, nvss_only=False):
    """Which surveys cover an image centred at ``dec``; the first is the base survey.

    dec <= -30: SUMSS (plus NVSS when dec > -43); -30 < dec < -27: NVSS then SUMSS;
    dec >= -27: NVSS only.  ``sumss_only``/``nvss_only`` restrict the list.

    Returns
    -------
    list of str
        e.g. ``['sumss', 'nvss']``; empty when the requested survey does not cover it.
    """
    if dec <= -30.0:
        surveys = ["sumss", "nvss"] if dec > -43.0 else ["sumss"]
    elif dec < -27.0:
        surveys = ["nvss", "sumss"]
    else:
        surveys = ["nvss"]
    if sumss_only:
        surveys = [s for s in surveys if s == "sumss"]
    if nvss_only:
        surveys = [s for s in surveys if s == "nvss"]
    return surveys


def matched_to_label(surveys):
    """Database label of the surveys used: 'SUMSS & NVSS', 'NVSS & SUMSS', 'SUMSS', 'NVSS'."""
    return " & ".join(s.upper() for s in surveys)


# ===========================================================================
# Pure science functions
# ===========================================================================
def scale_flux(flux, from_hz, to_hz, alpha=SPECTRAL_INDEX):
    """Extrapolate a flux density with a power-law spectrum S ~ nu^alpha.

    Parameters
    ----------
    flux : float or array
        Flux density at ``from_hz`` (any unit; returned in the same unit).
    from_hz, to_hz : float
        Frequencies (Hz).
    alpha : float
        Spectral index (default -0.8, the original pipeline's).

    Returns
    -------
    float or array
        ``flux * (to_hz / from_hz) ** alpha``.

    Examples
    --------
    >>> round(float(scale_flux(1.0, 843e6, 1.4e9)), 4)   # (1400/843)^-0.8
    0.6664
    """
    return np.asarray(flux, dtype=float) * (to_hz / from_hz) ** alpha


def flux_ratio(flux_a, err_a, flux_b, err_b):
    """Flux ratio >= 1 (larger over smaller) and its error.

    ``ratio = max(a, b) / min(a, b)``, ``err = ratio * hypot(err_a / a, err_b / b)``
    (original ``sort_master_transient_table``).  Non-positive fluxes give NaN.
    """
    a = np.asarray(flux_a, dtype=float)
    b = np.asarray(flux_b, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (a > 0) & (b > 0)
        ratio = np.where(ok, np.maximum(a, b) / np.minimum(a, b), np.nan)
        err = ratio * np.hypot(np.asarray(err_a, float) / a, np.asarray(err_b, float) / b)
    return ratio, np.where(ok, err, np.nan)


def variability_metrics(flux_a, err_a, flux_b, err_b):
    """Two-epoch variability metrics (Mooley et al. 2016).

    ``vs = |Sa - Sb| / hypot(ea, eb)``; ``m = (Sa - Sb) / ((Sa + Sb) / 2)``.

    Returns
    -------
    vs, m, m_abs : arrays
    """
    a, b = np.asarray(flux_a, float), np.asarray(flux_b, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        vs = np.abs(a - b) / np.hypot(err_a, err_b)
        m = (a - b) / ((a + b) / 2.0)
    return vs, m, np.abs(m)


def _unit_vectors(ra, dec):
    ra = np.radians(np.asarray(ra, dtype=float))
    dec = np.radians(np.asarray(dec, dtype=float))
    cos_dec = np.cos(dec)
    return np.column_stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)])


def _chord(arcsec):
    return 2.0 * np.sin(np.radians(np.asarray(arcsec, float) / 3600.0) / 2.0)


def _arcsec_from_chord(chord):
    return np.degrees(2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))) * 3600.0


def crossmatch_nearest(ra1, dec1, ra2, dec2, max_sep=None, workers=-1):
    """Nearest neighbour in catalogue 2 of every source of catalogue 1.

    A KD-tree on unit vectors gives exact great-circle nearest neighbours, so RA
    wrap-around at 0/360 deg and the poles need no special cases.

    Parameters
    ----------
    ra1, dec1, ra2, dec2 : array (deg)
    max_sep : float, optional
        Only neighbours within this many arcsec count.
    workers : int
        Threads of the KD-tree query (-1 = all cores).

    Returns
    -------
    idx : int array, len(ra1)
        Index into catalogue 2, -1 where none lies within ``max_sep``.
    sep : float array (arcsec)
        Separation, NaN where ``idx == -1``.
    """
    from scipy.spatial import cKDTree
    n1, n2 = len(np.atleast_1d(ra1)), len(np.atleast_1d(ra2))
    if n1 == 0 or n2 == 0:
        return np.full(n1, -1, dtype=np.int64), np.full(n1, np.nan)
    tree = cKDTree(_unit_vectors(ra2, dec2))
    bound = np.inf if max_sep is None else float(_chord(max_sep)) * (1 + 1e-12)
    queries = _unit_vectors(ra1, dec1)
    # query in spatially sorted order (a 1024^3 grid key): neighbouring queries then walk
    # the same tree nodes, which is 3-4x faster for large catalogues (cache locality)
    cell = np.floor((queries + 1.0) * 512.0).astype(np.int64).clip(0, 1023)
    order = np.argsort((cell[:, 0] << 20) | (cell[:, 1] << 10) | cell[:, 2], kind="stable")
    dist, idx = np.empty(n1), np.empty(n1, dtype=np.int64)
    dist[order], idx[order] = tree.query(queries[order], k=1, distance_upper_bound=bound,
                                         workers=workers)
    found = idx < n2
    return (np.where(found, idx, -1).astype(np.int64),
            np.where(found, _arcsec_from_chord(np.where(found, dist, 0.0)), np.nan))


def pairs_within(ra1, dec1, ra2, dec2, radius):
    """All pairs (i, j, sep) with source i of 1 and j of 2 within ``radius`` arcsec."""
    from scipy.spatial import cKDTree
    if len(np.atleast_1d(ra1)) == 0 or len(np.atleast_1d(ra2)) == 0:
        return np.array([], int), np.array([], int), np.array([])
    tree1, tree2 = cKDTree(_unit_vectors(ra1, dec1)), cKDTree(_unit_vectors(ra2, dec2))
    coo = tree1.sparse_distance_matrix(tree2, float(_chord(radius)), output_type="coo_matrix")
    return coo.row.astype(int), coo.col.astype(int), _arcsec_from_chord(coo.data)


def nearest_other(ra, dec, k=2):
    """Distance (arcsec) to the nearest other source of the same catalogue (k=2)."""
    from scipy.spatial import cKDTree
    n = len(ra)
    if n < k:
        return np.full(n, np.nan)
    dist, _ = cKDTree(_unit_vectors(ra, dec)).query(_unit_vectors(ra, dec), k=k)
    return _arcsec_from_chord(dist[:, k - 1])


def sky_offsets(ra1, dec1, ra2, dec2):
    """Offsets (arcsec) from positions 1 to 2: (dRA cos dec, dDec) on the sphere."""
    from astropy.coordinates import SkyCoord
    if len(ra1) == 0:
        return np.array([]), np.array([])
    c1 = SkyCoord(ra1, dec1, unit="deg")
    dra, ddec = c1.spherical_offsets_to(SkyCoord(ra2, dec2, unit="deg"))
    return dra.to_value("arcsec"), ddec.to_value("arcsec")


def source_names(ra, dec, prefix="J"):
    """IAU-style names ``J hhmmss.ss-ddmmss.s`` -> 'J123456.78-123456.7' (vectorised)."""
    # round the total seconds first, so 59.995 s carries into the minutes
    ra_s = np.mod(np.round(np.mod(np.asarray(ra, float), 360.0) / 15.0 * 3600.0, 2), 86400.0)
    dec = np.asarray(dec, float)
    dec_s = np.round(np.abs(dec) * 3600.0, 1)
    hh, rest = np.divmod(ra_s, 3600.0)
    mm, ss = np.divmod(rest, 60.0)
    sign = np.where(dec < 0, "-", "+")
    dd, rest = np.divmod(dec_s, 3600.0)
    dm, ds = np.divmod(rest, 60.0)
    parts = [np.char.mod("%02d", hh), np.char.mod("%02d", mm), np.char.mod("%05.2f", ss), sign,
             np.char.mod("%02d", dd), np.char.mod("%02d", dm), np.char.mod("%04.1f", ds)]
    out = np.full(ra_s.shape, prefix, dtype=object)
    for part in parts:
        out = out + part.astype(object)
    return out.astype(str)


def robust_rms(data, sigma=4.0, maxiters=10):
    """Sigma-clipped standard deviation of the finite values (MAD-based clipping)."""
    values = np.asarray(data, dtype=float).ravel()
    if values.size > 2_000_000:        # a regular subsample is plenty for a noise estimate
        values = values[:: values.size // 1_000_000]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    for _ in range(maxiters):
        med = np.median(values)
        mad = mad_sigma(values)
        keep = np.abs(values - med) <= sigma * mad
        if keep.all() or mad == 0:
            break
        values = values[keep]
    return float(np.std(values))


def rms_map(data, box=200, sigma=4.0, maxiters=10):
    """Background and rms maps from sigma-clipped statistics in boxes, bilinearly interpolated.

    Parameters
    ----------
    data : 2-D array (NaN = blank)
    box : int
        Box size (pixels) of the statistics grid.
    sigma, maxiters : float, int
        Clipping of the iterative (median, 1.4826 MAD) estimate; the rms is the std of
        the values that remain (the original: 4 sigma, 10 iterations, +-300 px).

    Returns
    -------
    bkg, rms : 2-D float32 arrays, same shape as ``data``; NaN where ``data`` is NaN.

    Notes
    -----
    Kept instead of AegeanTools' BANE (whose maps ``rms_image``/``bkg_image`` accept) after
    ``benchmarks/bench_racs_bane.py`` (``results/racs_bane.json``; 4000 x 4000 px with the
    real 4-D RACS header, injected sigma 0.25 mJy/beam, 2 shared cores, 2026-12-02): this
    takes 0.5-1.6 s where BANE takes 17-27 s on one core (14-24 s on two), i.e. as long
    as Aegean's whole source finding; on noise alone its median is 0.998 x the injected
    sigma (BANE, 3-sigma clipping: 0.983).  BANE is better in two cases: among the
    simulator's dense faint sources (300 per 1000^2 px) this reads 1.057 x sigma (BANE
    1.014), and its sliding 24-beam box follows a step in the noise within ~100 px where
    these fixed boxes take ~200 px (columns > 10 % off).
    """
    data = np.asarray(data, dtype=np.float32)
    ny, nx = data.shape
    box = int(min(box, ny, nx))
    gy, gx = -(-ny // box), -(-nx // box)
    padded = np.full((gy * box, gx * box), np.nan, dtype=np.float32)
    padded[:ny, :nx] = data
    # statistics from every step-th pixel of each box (>= 64 x 64 samples): the noise is
    # correlated over a beam anyway, and this makes 4k x 4k images several times faster
    step = max(1, box // 64)
    blocks = padded.reshape(gy, box, gx, box)[:, ::step, :, ::step]
    blocks = blocks.transpose(0, 2, 1, 3).reshape(gy, gx, -1).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN boxes are handled below
        for _ in range(maxiters):
            med = np.nanmedian(blocks, axis=-1, keepdims=True)
            mad = mad_sigma(blocks, axis=-1)[..., None]
            clip = np.abs(blocks - med) > sigma * mad
            if not clip.any():
                break
            blocks[clip] = np.nan
        grid_rms = np.nanstd(blocks, axis=-1)
        grid_bkg = np.nanmedian(blocks, axis=-1)
    fill = np.nanmedian(grid_rms) if np.isfinite(grid_rms).any() else 1.0
    grid_rms = np.where(np.isfinite(grid_rms) & (grid_rms > 0), grid_rms, fill)
    grid_bkg = np.where(np.isfinite(grid_bkg), grid_bkg, 0.0)
    # bilinear interpolation of the box grid as two small matrix products (separable)
    wy, wx = _linear_weights(ny, gy, box), _linear_weights(nx, gx, box)
    rms = (wy @ grid_rms @ wx.T).astype(np.float32)
    bkg = (wy @ grid_bkg @ wx.T).astype(np.float32)
    blank = ~np.isfinite(data)
    rms[blank] = np.nan
    bkg[blank] = np.nan
    return bkg, rms


def _linear_weights(n, grid, box):
    """(n, grid) matrix of linear-interpolation weights from box centres to pixels."""
    coord = np.clip((np.arange(n) - (box - 1) / 2.0) / box, 0, grid - 1)
    low = np.floor(coord).astype(int)
    high = np.minimum(low + 1, grid - 1)
    frac = coord - low
    weights = np.zeros((n, grid))
    np.add.at(weights, (np.arange(n), low), 1.0 - frac)
    np.add.at(weights, (np.arange(n), high), frac)
    return weights


def sample_map(image, x, y, fill=np.nan):
    """Values of a 2-D map at (rounded) pixel positions; ``fill`` off the image."""
    x = np.rint(np.asarray(x, float))
    y = np.rint(np.asarray(y, float))
    ny, nx = image.shape
    inside = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (x < nx) & (y >= 0) & (y < ny)
    out = np.full(x.shape, fill, dtype=float)
    out[inside] = image[y[inside].astype(int), x[inside].astype(int)]
    return out


def flag_extended(major, minor, beam_major, beam_minor, thresh):
    """True where either axis exceeds ``thresh`` x the beam axis (original remove_extended)."""
    major, minor = np.asarray(major, float), np.asarray(minor, float)
    return (major > thresh * np.asarray(beam_major)) | (minor > thresh * np.asarray(beam_minor))


# ===========================================================================
# Images: any FITS layout -> one 2-D plane with its beam and frequency
# ===========================================================================
_STOKES_CODES = {"I": 1, "Q": 2, "U": 3, "V": 4}
_BLANK_BEAM_ARCSEC = 1e-3   # beam-table axes below this are blank (0, or WSClean's 1.18e-38 "NaN")
MFS_BEAM_TOLERANCE = 0.25   # MFS: channels whose beam x frequency deviates more than this are left out
MFS_RMS_LIMIT = 3.0         # MFS: channels noisier than this x the median channel are left out


@dataclass
class ImageInfo:
    """One 2-D image plane reduced to what the pipeline needs.

    Build it with :func:`load_image`.  ``beam`` is (bmaj, bmin, bpa) in degrees,
    ``frequency`` in Hz, ``ra``/``dec`` the centre pixel (deg), ``radius`` the
    half-diagonal (deg), ``pixel_scale`` deg/pixel.  ``path`` is the file the source
    finder reads; ``source_path`` the file given by the user (the same for a plain 2-D
    image); ``plane`` says which plane of a cube this is; ``needs_plane_file`` is true
    when the source finder cannot read ``source_path`` as it is (3-D/4-D, beam or
    frequency not in the header, zero boundary), so the pipeline writes the plane.
    """

    path: Path
    data: np.ndarray
    header: object
    wcs: object
    beam: tuple
    frequency: float
    ra: float
    dec: float
    radius: float
    pixel_scale: float
    boundary_value: str = "nan"
    rms: float = float("nan")
    extra: dict = field(default_factory=dict)
    source_path: Path = None
    plane: str = "2-D"
    date_obs: str = ""
    needs_plane_file: bool = False

    def blank_mask(self):
        """True where a pixel is outside the observed area (NaN, or 0 with boundary zero)."""
        blank = ~np.isfinite(self.data)
        if self.boundary_value == "zero":
            blank |= self.data == 0
        return blank

    def world_to_pixel(self, ra, dec):
        """Pixel (x, y) of sky positions (deg), vectorised."""
        if len(np.atleast_1d(ra)) == 0:
            return np.array([]), np.array([])
        x, y = self.wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        return x, y

    def with_origin(self, source_path, plane, date_obs):
        """This plane, labelled as ``plane`` of the user's file ``source_path``."""
        self.source_path, self.plane, self.date_obs = Path(source_path), plane, date_obs or self.date_obs
        return self

    @property
    def beam_pixels(self):
        """Major axis of the beam in pixels."""
        return self.beam[0] / self.pixel_scale

    def __repr__(self):
        return ("ImageInfo(%s, %s, shape=%s, beam=%.1f\"x%.1f\" pa %.0f, freq=%.4g Hz, centre=(%.4f, %.4f))"
                % (self.path.name if self.path else None, self.plane, self.data.shape, self.beam[0] * 3600,
                   self.beam[1] * 3600, self.beam[2], self.frequency, self.ra, self.dec))


def _open_fits(path):
    from astropy.io import fits
    path = Path(path)
    if not path.is_file():
        raise InputError("image %s does not exist" % path)
    try:
        return fits.open(path, memmap=True)
    except (OSError, ValueError) as exc:
        raise InputError("%s is not a readable FITS file: %s" % (path, exc)) from None


def _image_hdu(hdul, path):
    """Index of the first HDU holding an image of two or more axes."""
    for k, hdu in enumerate(hdul):
        if hdu.is_image and hdu.header.get("NAXIS", 0) >= 2:
            return k
    raise InputError("%s holds no image of 2 or more axes (NAXIS >= 2) in any HDU" % path)


def _quiet_wcs(header):
    import warnings
    from astropy.wcs import WCS, FITSFixedWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def _axis_values(header, axis):
    """World values (CRVAL + (i + 1 - CRPIX) CDELT) of every pixel of FITS axis ``axis``."""
    n = int(header.get("NAXIS%d" % axis, 1))     # 1: a 2-D file that kept a third axis' keywords
    crval, crpix = float(header.get("CRVAL%d" % axis, 0.0)), float(header.get("CRPIX%d" % axis, 1.0))
    cdelt = float(header.get("CDELT%d" % axis, 1.0))
    return crval + (np.arange(n) + 1.0 - crpix) * cdelt


def image_layout(header, path="image", channel=None, stokes="I"):
    """Which plane of a FITS image to analyse.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header of the image HDU (NAXIS >= 2; RA/Dec must be FITS axes 1 and 2).
    path : str
        File name for messages.
    channel : str or None
        ``None`` for an image whose frequency axis has one plane, a channel number
        ('3', 0-based) or 'mfs' for a cube.
    stokes : {'I', 'Q', 'U', 'V'}
        Plane of a Stokes axis with several planes.

    Returns
    -------
    dict
        ``index`` (numpy index of the plane, with ``None`` at the frequency axis for
        'mfs'), ``freq_axis`` (FITS axis number or None), ``nchan``, ``channel`` (int,
        'mfs' or None), ``stokes_index`` and a ``label`` such as 'channel 3 of 36'.

    Raises
    ------
    InputError
        Celestial axes not first, a non-degenerate axis other than FREQ/STOKES, a cube
        without a ``channel`` choice (the message lists the channels), a channel out of
        range, or a Stokes plane that the image does not have.
    """
    naxis = int(header["NAXIS"])
    wcs = _quiet_wcs(header)
    lng, lat = wcs.wcs.lng, wcs.wcs.lat
    if lng < 0 or lat < 0:
        raise InputError("%s has no celestial WCS (CTYPE1/CTYPE2 such as RA---SIN/DEC--SIN); give a "
                         "sky image" % path)
    if sorted((lng, lat)) != [0, 1]:
        raise InputError("%s has its celestial axes at FITS axes %d and %d; racs_pipeline needs RA and "
                         "Dec as axes 1 and 2 (as ASKAP, WSClean and CASA write images); reorder the "
                         "axes first (e.g. CASA imtrans)" % (path, lng + 1, lat + 1))
    index = [0] * naxis                     # FITS axis order; reversed for numpy at the end
    index[0] = index[1] = slice(None)
    out = {"freq_axis": None, "nchan": 1, "channel": None, "stokes_index": 0, "label": "2-D"}
    labels = []
    for axis in range(3, naxis + 1):
        n = int(header["NAXIS%d" % axis])
        ctype = str(header.get("CTYPE%d" % axis, "")).strip().upper()
        if ctype.startswith("FREQ"):
            out["freq_axis"], out["nchan"] = axis, n
        if n == 1:
            continue
        if ctype == "STOKES":
            codes = np.rint(_axis_values(header, axis)).astype(int)
            want = _STOKES_CODES[stokes.upper()]
            if want not in codes:
                raise InputError("%s has no Stokes %s plane (its STOKES axis holds %s); choose one with "
                                 "--stokes" % (path, stokes, ", ".join(
                                     {v: k for k, v in _STOKES_CODES.items()}.get(c, str(c)) for c in codes)))
            out["stokes_index"] = index[axis - 1] = int(np.flatnonzero(codes == want)[0])
            labels.append("Stokes %s" % stokes.upper())
        elif ctype.startswith("FREQ"):
            index[axis - 1] = _channel_index(header, axis, n, channel, path)
            out["channel"] = "mfs" if index[axis - 1] is None else index[axis - 1]
            labels.insert(0, "MFS of %d channels" % n if index[axis - 1] is None
                          else "channel %d of %d" % (index[axis - 1], n))
        else:
            raise InputError("%s: axis %d (%s) has %d planes; only a FREQ axis (choose with --channel) "
                             "and a STOKES axis (--stokes) may have more than one" % (path, axis, ctype or "?", n))
    if channel is not None and out["channel"] is None:
        log.info("%s has a single frequency plane; channel = %s ignored", path, channel)
    out["index"] = tuple(reversed(index))
    out["label"] = ", ".join(labels) if labels else ("2-D" if naxis == 2 else "%d-D, degenerate axes squeezed" % naxis)
    return out


def _channel_index(header, axis, n, channel, path):
    """0-based channel of a cube (None = MFS); a clear error when none or a wrong one is chosen."""
    freqs = _axis_values(header, axis)
    span = "%.1f-%.1f MHz" % (freqs.min() / 1e6, freqs.max() / 1e6)
    if channel is None:
        raise InputError("%s is a cube of %d channels (%s); choose the plane to search with --channel N "
                         "(0-%d) or --channel mfs (weighted mean of the good channels at their common "
                         "beam), or [ANALYSIS] channel = ..." % (path, n, span, n - 1))
    if str(channel).lower() == "mfs":
        return None
    k = int(channel)
    if not 0 <= k < n:
        raise InputError("%s: channel %d does not exist; the cube has channels 0-%d (%s)" % (path, k, n - 1, span))
    return k


def read_beam_table(hdul):
    """Per-channel restoring beams of a cube (CASA/WSClean ``BEAMS`` binary table).

    Returns
    -------
    dict or None
        ``bmaj``, ``bmin`` (deg), ``bpa`` (deg), ``chan``, ``pol`` arrays (one row per
        table row) and ``valid`` (false where an axis is blank: NaN, 0, or WSClean's
        1.18e-38 marker); None when the file has no beam table.
    """
    import astropy.units as u
    from astropy.io import fits
    for hdu in hdul[1:]:
        if not isinstance(hdu, fits.BinTableHDU):
            continue
        names = {name.upper(): name for name in hdu.columns.names}
        if not {"BMAJ", "BMIN"} <= set(names):
            continue
        table = {}
        for key, default in (("BMAJ", "arcsec"), ("BMIN", "arcsec"), ("BPA", "deg")):
            if key not in names:
                table[key.lower()] = np.zeros(len(hdu.data))
                continue
            unit = u.Unit(hdu.columns[names[key]].unit or default)
            table[key.lower()] = (np.asarray(hdu.data[names[key]], float) * unit).to_value(u.deg)
        n = len(hdu.data)
        table["chan"] = np.asarray(hdu.data[names["CHAN"]], int) if "CHAN" in names else np.arange(n)
        table["pol"] = np.asarray(hdu.data[names["POL"]], int) if "POL" in names else np.zeros(n, int)
        blank = _BLANK_BEAM_ARCSEC / 3600.0
        table["valid"] = (np.isfinite(table["bmaj"]) & np.isfinite(table["bmin"]) & (table["bmaj"] > blank)
                          & (table["bmin"] > blank))
        return table
    return None


def _header_beam(header):
    """(bmaj, bmin, bpa) in deg from BMAJ/BMIN/BPA or AIPS history (radio-beam); None if absent."""
    if "BMAJ" in header and "BMIN" in header:
        beam = (float(header["BMAJ"]), float(header["BMIN"]), float(header.get("BPA", 0.0)))
        return beam if beam[0] > 0 and beam[1] > 0 else None
    try:
        from radio_beam import Beam
        found = Beam.from_fits_header(header)
    except Exception:  # noqa: BLE001 - radio-beam raises several kinds when there is no beam
        return None
    return (found.major.to_value("deg"), found.minor.to_value("deg"), found.pa.to_value("deg"))


def _plane_beam(header, table, layout, option, path):
    """Beam of the chosen plane: beam table row, else header, else the ``beam`` option."""
    given = None
    if option:
        given = (option[0] / 3600.0, option[1] / 3600.0, float(option[2]) if len(option) > 2 else 0.0)
    found, where = None, None
    if table is not None and isinstance(layout["channel"], int):
        rows = np.flatnonzero((table["chan"] == layout["channel"]) & (table["pol"] == layout["stokes_index"]))
        if not len(rows):
            rows = np.flatnonzero(table["chan"] == layout["channel"])
        if len(rows):
            if not table["valid"][rows[0]]:
                raise InputError("%s: channel %d has no valid beam in its beam table (a flagged channel); "
                                 "choose another channel or --channel mfs" % (path, layout["channel"]))
            found = tuple(float(table[k][rows[0]]) for k in ("bmaj", "bmin", "bpa"))
            where = "beam table"
    if found is None:
        found, where = _header_beam(header), "header"
    if found is None:
        if given is None:
            raise InputError("%s has no beam: the header lacks BMAJ/BMIN (deg) and there is no beam table. "
                             "Give it with [ANALYSIS] beam = BMAJ, BMIN, BPA (arcsec, arcsec, deg) or "
                             "--beam 15,12,0" % path)
        return given, "beam option"
    if given is not None and not np.allclose(given[:2], found[:2], rtol=1e-3):
        _data_warning("%s: beam = %.2f\", %.2f\" given, but the %s has %.2f\" x %.2f\"; using the %s"
                      % (path, given[0] * 3600, given[1] * 3600, where, found[0] * 3600, found[1] * 3600, where))
    return found, where


def _header_frequency(header, layout):
    """Frequency (Hz) of the plane from the header: FREQ axis, then RESTFRQ/RESTFREQ."""
    axis = layout["freq_axis"]
    if axis is None and str(header.get("CTYPE3", "")).upper().startswith("FREQ") and "CRVAL3" in header:
        axis = 3                      # a 2-D file that kept its FREQ keywords (e.g. BANE output)
    if axis is not None:
        import astropy.units as u
        values = _axis_values(header, axis) * u.Unit(str(header.get("CUNIT%d" % axis, "Hz")).strip() or "Hz")
        channel = layout["channel"] if isinstance(layout["channel"], int) else 0
        return float(values[min(channel, len(values) - 1)].to_value(u.Hz)), "FREQ axis"
    for key in ("RESTFRQ", "RESTFREQ"):
        if header.get(key):
            return float(header[key]), key
    return None, None


def _plane_frequency(header, layout, option, force, path):
    found, where = _header_frequency(header, layout)
    if found is None:
        if option:
            return float(option), "frequency option"
        raise InputError("%s: the header has no frequency (no FREQ axis, RESTFRQ or RESTFREQ); give the "
                         "image frequency in Hz with [ANALYSIS] frequency = 887.5e6 or --frequency" % path)
    if option and not math.isclose(float(option), found, rel_tol=1e-9):
        if force:
            log.info("%s: using frequency = %.6g Hz (--force) instead of the header's %.6g Hz (%s)",
                     path, option, found, where)
            return float(option), "frequency option (forced)"
        _data_warning("%s: frequency = %.6g Hz was given but the header says %.6g Hz (%s); using the "
                      "header (add --force to use the given value)" % (path, option, found, where))
    return found, where


def load_image(path, frequency=None, boundary_value="nan", channel=None, stokes="I", beam=None,
               force_frequency=False, need_frequency=True):
    """Read one 2-D plane of a FITS image (2-D, 3-D or 4-D) with its beam and frequency.

    Degenerate axes are squeezed; a cube needs ``channel`` (a number, or 'mfs'); a
    Stokes axis with several planes gives the ``stokes`` plane.

    Parameters
    ----------
    path : path
        FITS image; RA/Dec must be FITS axes 1 and 2 (any projection; negative CRVAL1
        is fine).
    frequency : float, optional
        Hz; used when the header has none (FREQ axis value, then RESTFRQ/RESTFREQ), or
        instead of the header's with ``force_frequency``.
    boundary_value : {'nan', 'zero'}
        'zero': pixels equal to 0 are blank (converted to NaN).
    channel : str or int, optional
    stokes : {'I', 'Q', 'U', 'V'}
    beam : sequence, optional
        (bmaj, bmin[, bpa]) in arcsec, arcsec, deg, used when there is no beam table
        and no BMAJ/BMIN in the header.
    need_frequency : bool
        False: a plane without a frequency gets NaN instead of an error (for internal
        reads of derived maps, where the frequency is not used).

    Returns
    -------
    ImageInfo

    Raises
    ------
    InputError
        Missing/unreadable file, an axis layout it cannot use, a cube without a channel
        choice, no beam, no frequency.
    """
    path = Path(path)
    with _open_fits(path) as hdul:
        k = _image_hdu(hdul, path)
        header = hdul[k].header.copy()
        layout = image_layout(header, path, None if channel is None else str(channel), stokes)
        table = read_beam_table(hdul)
        if layout["channel"] == "mfs":
            data, plane_beam, freq, layout["label"] = _mfs_plane(hdul[k], header, layout, table, beam, path)
            where_beam, where_freq = "MFS common beam", "MFS weighted mean"
        else:
            data = np.asarray(hdul[k].section[layout["index"]], dtype=np.float32)
            plane_beam, where_beam = _plane_beam(header, table, layout, beam, path)
            if need_frequency:
                freq, where_freq = _plane_frequency(header, layout, frequency, force_frequency, path)
            else:
                freq, where_freq = _header_frequency(header, layout)
                freq = float("nan") if freq is None else freq
    info = _image_info(path, data, header, plane_beam, freq, boundary_value)
    info.plane = layout["label"]
    info.needs_plane_file = (int(header["NAXIS"]) != 2 or where_beam not in ("header",)
                             or where_freq not in ("RESTFRQ", "RESTFREQ", "FREQ axis") or boundary_value == "zero"
                             or k != 0)
    log.debug("%s: %s; beam from %s, frequency from %s", path.name, info.plane, where_beam, where_freq)
    return info


def _image_info(path, data, header, beam, frequency, boundary_value):
    wcs = _quiet_wcs(header).celestial
    ny, nx = data.shape
    centre = wcs.all_pix2world([[(nx - 1) / 2.0, (ny - 1) / 2.0]], 0)[0]
    scale = _pixel_scale_deg(wcs)
    if boundary_value == "zero":
        data = np.where(data == 0, np.nan, data).astype(np.float32)
    info = ImageInfo(path, data, plane_header(header, beam, frequency), wcs, tuple(beam), float(frequency),
                     float(centre[0]) % 360.0, float(centre[1]), 0.5 * math.hypot(nx, ny) * scale, scale,
                     boundary_value, source_path=path, date_obs=_date_obs(header))
    info.rms = robust_rms(info.data)
    return info


def _date_obs(header):
    if header.get("DATE-OBS"):
        return str(header["DATE-OBS"]).strip()
    if header.get("MJD-OBS"):
        from astropy.time import Time
        return Time(float(header["MJD-OBS"]), format="mjd").isot
    return ""


def plane_header(header, beam, frequency):
    """2-D header of an analysis plane: celestial WCS, beam (deg) and frequency (RESTFRQ, Hz).

    The observing frequency goes into RESTFRQ, as the original pipeline's convolved
    images carried it, so that Aegean, PyBDSF and this tool read the plane alone.
    """
    new = _quiet_wcs(header).celestial.to_header()
    for key in ("BUNIT", "TELESCOP", "OBJECT", "DATE-OBS", "BTYPE"):
        if key in header:
            new[key] = header[key]
    new["BMAJ"], new["BMIN"], new["BPA"] = float(beam[0]), float(beam[1]), float(beam[2])
    if np.isfinite(frequency):
        new["RESTFRQ"] = (float(frequency), "observing frequency of this plane (Hz)")
    return new


def _mfs_plane(hdu, header, layout, table, beam_option, path):
    """Inverse-variance weighted mean of the good channels of a cube at their common beam.

    Channels are left out when their beam is blank (flagged), when beam x frequency
    deviates by more than ``MFS_BEAM_TOLERANCE`` from the median (a bad PSF fit; beams
    scale as 1/frequency), when they are blank or constant, or when their rms exceeds
    ``MFS_RMS_LIMIT`` x the median.  Each kept channel is convolved to the common beam
    (radio-beam ``Beams.common_beam``), rescaled to Jy/common beam and weighted by
    1/rms^2 of the convolved plane; the frequency is the same weighted mean.
    """
    import astropy.units as u
    from radio_beam import Beam, Beams
    nchan, axis = layout["nchan"], layout["freq_axis"]
    numpy_axis = int(header["NAXIS"]) - axis
    freqs = _axis_values(header, axis) * u.Unit(str(header.get("CUNIT%d" % axis, "Hz")).strip() or "Hz")
    freqs = freqs.to_value(u.Hz)

    def read(c):
        index = list(layout["index"])
        index[numpy_axis] = c
        return np.asarray(hdu.section[tuple(index)], dtype=np.float64)

    beams = np.zeros((nchan, 3))
    valid = np.ones(nchan, bool)
    if table is None:                     # one beam for every channel (header or option)
        beams[:] = _plane_beam(header, None, layout, beam_option, path)[0]
    for c in range(nchan if table is not None else 0):
        try:
            beams[c] = _plane_beam(header, table, dict(layout, channel=c), None, path)[0]
        except InputError:
            valid[c] = False
    reasons = {c: "blank beam" for c in np.flatnonzero(~valid)}
    scale = beams[:, :2] * freqs[:, None]
    if valid.any():
        deviation = np.abs(scale / np.median(scale[valid], axis=0) - 1.0).max(axis=1)
        for c in np.flatnonzero(valid & (deviation > MFS_BEAM_TOLERANCE)):
            reasons[c] = "beam outlier"
    rms = np.full(nchan, np.nan)
    for c in range(nchan):
        if c not in reasons:
            rms[c] = robust_rms(read(c))
            if not (np.isfinite(rms[c]) and rms[c] > 0):
                reasons[c] = "blank or constant"
    keep = np.array([c not in reasons for c in range(nchan)])
    if keep.any():
        for c in np.flatnonzero(keep & (rms > MFS_RMS_LIMIT * np.nanmedian(rms[keep]))):
            reasons[c] = "noisy"
    keep = np.array([c not in reasons for c in range(nchan)])
    if not keep.any():
        raise InputError("%s: no channel of the cube can enter an MFS plane (%s)" % (path, _channel_reasons(reasons)))
    kept = Beams(major=beams[keep, 0] * u.deg, minor=beams[keep, 1] * u.deg, pa=beams[keep, 2] * u.deg)
    try:
        common = kept.common_beam()
    except Exception:  # noqa: BLE001 - radio-beam's solver can fail for very different beams
        common = Beam(major=kept.major.max(), minor=kept.major.max(), pa=0 * u.deg)
    data, weight = _weighted_mean_at_beam(read, np.flatnonzero(keep), beams, common,
                                          _pixel_scale_deg(_quiet_wcs(header).celestial) * u.deg)
    freq = float(np.sum(weight * freqs[np.flatnonzero(keep)]) / np.sum(weight))
    label = "MFS of %d of %d channels" % (keep.sum(), nchan)
    if reasons:
        label += " (left out: %s)" % _channel_reasons(reasons)
    log.info("%s: %s; common beam %.2f\" x %.2f\" pa %.1f, %.4g Hz", path.name, label,
             common.major.to_value(u.arcsec), common.minor.to_value(u.arcsec), common.pa.to_value(u.deg), freq)
    return data, (common.major.to_value(u.deg), common.minor.to_value(u.deg), common.pa.to_value(u.deg)), freq, label


def _channel_reasons(reasons):
    by_reason = {}
    for c, why in sorted(reasons.items()):
        by_reason.setdefault(why, []).append(str(c))
    return "; ".join("%s %s" % (why, ",".join(chans)) for why, chans in by_reason.items())


def _pixel_scale_deg(wcs):
    """Mean pixel size (deg) of a celestial WCS (CUNIT deg)."""
    from astropy.wcs.utils import proj_plane_pixel_scales
    return float(np.mean(np.abs(proj_plane_pixel_scales(wcs))))


def _weighted_mean_at_beam(read, channels, beams, common, pixel_scale):
    """Sum of the channels convolved to ``common``, weighted by 1/rms^2; returns (plane, weights)."""
    import astropy.units as u
    from astropy.convolution import convolve_fft
    from radio_beam import Beam
    total = weights = None
    used = []
    for c in channels:
        plane = read(c)
        beam = Beam(major=beams[c, 0] * u.deg, minor=beams[c, 1] * u.deg, pa=beams[c, 2] * u.deg)
        try:
            kernel = common.deconvolve(beam).as_kernel(pixel_scale)
        except Exception:  # noqa: BLE001 - radio-beam BeamError: this channel has the common beam
            kernel = None
        if kernel is not None:
            plane = convolve_fft(plane, kernel, normalize_kernel=True, nan_treatment="fill",
                                 preserve_nan=True, allow_huge=True)
            plane *= float(common.sr / beam.sr)
        w = 1.0 / robust_rms(plane) ** 2
        finite = np.isfinite(plane)
        if total is None:
            total, weights = np.zeros(plane.shape), np.zeros(plane.shape)
        total[finite] += w * plane[finite]
        weights[finite] += w
        used.append(w)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(weights > 0, total / weights, np.nan)
    return mean.astype(np.float32), np.asarray(used)


def write_fits_2d(path, data, header):
    """Write a 2-D image with the celestial part of ``header`` (plus beam and frequency)."""
    from astropy.io import fits
    new = _quiet_wcs(header).celestial.to_header()
    for key in ("BMAJ", "BMIN", "BPA", "BUNIT", "RESTFRQ", "TELESCOP", "OBJECT", "DATE-OBS"):
        if key in header:
            new[key] = header[key]
    path = Path(path)
    with atomic_path(path, overwrite=True, suffix=".part.fits") as tmp:
        fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header=new).writeto(tmp, overwrite=True)
    return path


def _read_2d(path, like_shape, what, channel=None, like_wcs=None):
    """A 2-D auxiliary map (weights, rms, background): degenerate axes squeezed; a cube of
    maps gives ``channel`` (or the mean over its planes for MFS).  With ``like_wcs`` the
    map's celestial WCS must put its pixels where the image's are (within 0.1 pixel)."""
    with _open_fits(path) as hdul:
        hdu = hdul[_image_hdu(hdul, path)]
        header, data = hdu.header, np.squeeze(np.asarray(hdu.data, dtype=np.float32))
    if data.ndim == 3:
        data = data[int(channel)] if isinstance(channel, int) and channel < len(data) else np.nanmean(data, axis=0)
    if data.shape != tuple(like_shape):
        raise InputError("%s %s has shape %s but the image plane has %s; give the %s of this image (same "
                         "pixel grid)" % (what, path, data.shape, tuple(like_shape), what))
    wcs = _quiet_wcs(header)
    if like_wcs is not None and wcs.has_celestial:
        ny, nx = data.shape
        probe = np.array([[0.0, 0.0], [nx - 1.0, ny - 1.0], [(nx - 1) / 2.0, 0.0]])
        mine, theirs = wcs.celestial.all_pix2world(probe, 0), like_wcs.all_pix2world(probe, 0)
        offset = _arcsec_from_chord(np.linalg.norm(_unit_vectors(*mine.T) - _unit_vectors(*theirs.T), axis=1))
        pixel = _pixel_scale_deg(wcs.celestial) * 3600.0
        if np.nanmax(offset) > 0.1 * pixel:
            raise InputError("%s %s has the image's shape but not its sky grid (pixels %.1f\" off); give "
                             "the %s made from this image" % (what, path, np.nanmax(offset), what))
    return data


def weight_crop(image_path, weight_path, value, out_path, channel=None):
    """Blank (NaN) the pixels whose weight is <= ``value`` x max(weight).

    Output ``<image>.weightcrop_<value>.fits`` (original ``weight_crop``); the weight image
    must have the image's pixel grid (degenerate axes are squeezed).
    """
    from astropy.io import fits
    weight_path = Path(weight_path)
    if not weight_path.is_file():
        raise InputError("weight image %s does not exist (set [ANALYSIS] weight_crop_image)" % weight_path)
    with fits.open(image_path) as hdul:
        header = hdul[0].header.copy()
        image2d = np.squeeze(np.asarray(hdul[0].data, dtype=np.float32))
    if image2d.ndim != 2:
        raise InputError("weight_crop needs a 2-D image plane; %s has shape %s" % (image_path, image2d.shape))
    weights = _read_2d(weight_path, image2d.shape, "weight image", channel)
    cropped = np.where(weights <= value * np.nanmax(weights), np.nan, image2d)
    return write_fits_2d(out_path, cropped, header)


def check_convolvable(current, target, what):
    """Raise InputError when ``current`` beam cannot be convolved to ``target``.

    Both are (bmaj, bmin, bpa) in arcsec, arcsec, deg.  Returns False when the beams
    are already equal (nothing to do), True otherwise.
    """
    import astropy.units as u
    from radio_beam import Beam
    cur = Beam(current[0] * u.arcsec, current[1] * u.arcsec, current[2] * u.deg)
    tgt = Beam(target[0] * u.arcsec, target[1] * u.arcsec, target[2] * u.deg)
    if np.allclose(current[:2], target[:2], rtol=1e-4) and (abs(current[0] - current[1]) < 1e-6 * current[0]
                                                           or abs((current[2] - target[2] + 90) % 180 - 90) < 0.01):
        return False
    try:
        tgt.deconvolve(cur)
    except Exception:  # noqa: BLE001 - radio-beam BeamError: the target is not larger everywhere
        raise InputError("cannot convolve %s to the %.1f\" x %.1f\" (pa %.0f deg) beam: its own beam "
                         "%.1f\" x %.1f\" (pa %.0f deg) is larger in at least one direction. Crossmatch "
                         "at the image's resolution (convolve = false), or give an image convolved "
                         "elsewhere with convolved_image = FILE" % (what, target[0], target[1], target[2],
                                                                    current[0], current[1], current[2])) from None
    return True


def convolve_to_beam(image_path, target_beam, out_path, method="auto"):
    """Convolve an image to ``target_beam`` = (bmaj, bmin, bpa) in arcsec, arcsec, deg.

    ``method='casa'`` runs CASA ``imsmooth(targetres=True)``; ``'astropy'`` convolves
    with the radio-beam deconvolved kernel and rescales Jy/beam by the beam-area ratio;
    ``'auto'`` uses CASA when casatasks is installed.  RESTFRQ is kept.

    Raises
    ------
    InputError
        When the image beam is already larger than the target in some direction.
    """
    from astropy.io import fits
    header = fits.getheader(image_path)
    current = _header_beam(header)
    if current is None:
        raise InputError("cannot convolve %s: its header has no beam (BMAJ/BMIN)" % image_path)
    current_arcsec = (current[0] * 3600.0, current[1] * 3600.0, current[2])
    if not check_convolvable(current_arcsec, target_beam, Path(image_path).name):
        log.info("%s has the target beam already; copied unchanged", Path(image_path).name)
        info = load_image(image_path, need_frequency=False)
        return write_fits_2d(out_path, info.data, info.header)
    if method in ("auto", "casa"):
        try:
            _, casatasks = import_casa()
        except ImportError:
            if method == "casa":
                raise InputError("convolve_method = casa but casatasks is not installed; use "
                                 "convolve_method = astropy") from None
        else:
            return _convolve_casa(casatasks, image_path, target_beam, out_path)
    return _convolve_astropy(image_path, target_beam, out_path)


def _convolve_casa(casatasks, image_path, target_beam, out_path):
    import shutil
    work = Path(out_path).with_suffix(".casaimage")
    shutil.rmtree(work, ignore_errors=True)
    casatasks.imsmooth(imagename=str(image_path), kernel="gauss", targetres=True,
                       major="%.3farcsec" % target_beam[0], minor="%.3farcsec" % target_beam[1],
                       pa="%.3fdeg" % target_beam[2], outfile=str(work), overwrite=True)
    if not work.exists():
        raise ToolError("CASA imsmooth did not write %s (see the CASA log)" % work)
    with atomic_path(out_path, overwrite=True, suffix=".part.fits") as tmp:
        casatasks.exportfits(imagename=str(work), fitsimage=str(tmp), overwrite=True, dropdeg=True)
        from astropy.io import fits
        restfrq = fits.getheader(image_path).get("RESTFRQ")
        if restfrq:
            fits.setval(tmp, "RESTFRQ", value=restfrq)
    shutil.rmtree(work, ignore_errors=True)
    return Path(out_path)


def _convolve_astropy(image_path, target_beam, out_path):
    import astropy.units as u
    from astropy.convolution import convolve_fft
    from radio_beam import Beam
    info = load_image(image_path, need_frequency=False)
    current = Beam(info.beam[0] * u.deg, info.beam[1] * u.deg, info.beam[2] * u.deg)
    target = Beam(target_beam[0] * u.arcsec, target_beam[1] * u.arcsec, target_beam[2] * u.deg)
    kernel = target.deconvolve(current).as_kernel(info.pixel_scale * u.deg)
    smoothed = convolve_fft(info.data, kernel, normalize_kernel=True, nan_treatment="fill",
                            preserve_nan=True, allow_huge=True)
    smoothed *= float(target.sr / current.sr)   # Jy/beam: flux per (larger) beam
    header = info.header.copy()
    header["BMAJ"], header["BMIN"], header["BPA"] = (target_beam[0] / 3600.0,
                                                     target_beam[1] / 3600.0, target_beam[2])
    header["RESTFRQ"] = info.frequency
    return write_fits_2d(out_path, smoothed, header)


# ===========================================================================
# Reference catalogues (SUMSS / NVSS)
# ===========================================================================
CATALOGUE_FORMATS_HELP = """\
Catalogue files
  --sumss-csv / --nvss-csv: the survey catalogue as Vizier writes it (CSV, TSV, ECSV,
  VOTable or FITS table; '#' comment lines, a units row and a dashes row are skipped).
    SUMSS (VIII/81B/sumss212 + VIII/82/mgpscat): _RAJ2000, _DEJ2000 (deg; or RAJ2000
          'hh mm ss.ss' and DEJ2000 '+dd mm ss.s', ':' also accepted), St, e_St (mJy);
          optional Sp (mJy), MajAxis, MinAxis (arcsec), PA (deg), Mosaic.
    NVSS  (VIII/65/nvss): _RAJ2000, _DEJ2000 (or RAJ2000, DEJ2000 as above), S1.4, e_S1.4
          (mJy); optional MajAxis, MinAxis (arcsec), PA (deg; blank = 0).
    Columns with units (ECSV, VOTable, FITS) are converted from their units; plain CSV
    columns are taken to be in the units above.  Rows without a position or flux are
    dropped with a warning that says how many.
  --askap-csv: Aegean components (ra, dec deg; peak_flux, err_peak_flux, int_flux,
    err_int_flux, local_rms Jy; a, b arcsec; pa deg; optional island, source, flags,
    psf_a, psf_b, psf_pa) or, with --askap-csv-format selavy, a Selavy component
    catalogue (CSV or its fixed-width text; fluxes mJy).  Without an image this is a
    catalogue-only run (crossmatch, ratios, candidates; no forced photometry); give
    --frequency and, when the catalogue has no psf_a/psf_b, --beam.
  Tables written by this tool are ECSV (CSV with a '# %ECSV' header carrying units;
  pandas: read_csv(path, comment='#')), FITS and VOTable.
"""


def _resolve_local_catalogue(survey, local):
    path = Path(local)
    if path.is_dir():
        path = path / ("%s.csv" % survey)
    if not path.is_file():
        raise InputError("%s catalogue %s does not exist; set [CATALOGUES] %s_csv to a CSV file "
                         "(or a directory holding %s.csv)" % (survey.upper(), path, survey, survey))
    return path


def read_table_file(path, what="catalogue"):
    """Read a table file into a DataFrame and a ``{column: unit}`` dict.

    ECSV (also a ``.csv`` starting with ``# %ECSV``), VOTable and FITS tables keep their
    units; CSV/TSV (separator sniffed) have none.  A units row and a row of dashes
    right after the header (Vizier's ASCII output) are skipped.
    """
    import pandas as pd
    path = Path(path)
    try:
        with path.open("rb") as stream:
            start = stream.read(64)
        suffix = path.suffix.lower()
        if suffix in (".fits", ".fit", ".vot", ".xml", ".ecsv") or start.startswith(b"# %ECSV") \
                or start.startswith(b"SIMPLE") or b"<?xml" in start:
            from astropy.table import Table
            table = Table.read(path, format="ascii.ecsv" if start.startswith(b"# %ECSV") else None)
            units = {name: str(table[name].unit) for name in table.colnames if table[name].unit is not None}
            for name in table.colnames:
                if table[name].dtype.kind == "S":
                    table[name] = table[name].astype(str)
            return table.to_pandas(), units
        raw = pd.read_csv(path, comment="#", sep=_delimiter(path), engine="python", skipinitialspace=True)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError("cannot read %s %s: %s" % (what, path, exc)) from None
    raw.columns = [str(c).strip() for c in raw.columns]
    skip = 0
    for k in range(min(2, len(raw))):          # Vizier ASCII: units row, then dashes row
        row = raw.iloc[k].astype(str).str.strip()
        if row.str.fullmatch(r"-+|[A-Za-z\[\]/.:0-9\"']*[A-Za-z\[\]\"'][A-Za-z\[\]/.:0-9\"']*|").all() and \
                pd.to_numeric(raw.iloc[k], errors="coerce").isna().all():
            skip = k + 1
    return raw.iloc[skip:].reset_index(drop=True), {}


def _delimiter(path):
    """Separator of a text table from its header line: tab, ';', ',' or white space."""
    with Path(path).open(errors="replace") as stream:
        for line in stream:
            if line.strip() and not line.lstrip().startswith("#"):
                break
        else:
            return ","
    for sep in ("\t", ";", ","):
        if sep in line:
            return sep
    return r"\s+"


def read_survey_catalogue(survey, path):
    """Read a local SUMSS/NVSS catalogue (Vizier column names) into pipeline form.

    Required columns: SUMSS ``_RAJ2000, _DEJ2000, St, e_St``; NVSS ``_RAJ2000, _DEJ2000,
    S1.4, e_S1.4`` (``RAJ2000``/``DEJ2000`` in degrees or sexagesimal, and ``ra``/``dec``
    are accepted for the positions).  Optional: ``MajAxis, MinAxis`` (arcsec), ``PA``
    (deg), SUMSS ``Sp``, ``Mosaic``.  Fluxes are mJy unless the file says otherwise
    (ECSV/VOTable/FITS units).  See ``CATALOGUE_FORMATS_HELP``.

    Returns
    -------
    pandas.DataFrame
        Columns name, ra, dec, flux, flux_err (Jy), peak_flux (Jy), maj, min (arcsec),
        pa (deg), mosaic, survey.
    """
    raw, units = read_table_file(path, "%s catalogue" % survey.upper())
    return normalise_survey_table(survey, raw, str(path), units)


def _to_unit(series, unit, target, where, column):
    """Numeric values of ``series`` converted from ``unit`` (None = already ``target``)."""
    import astropy.units as u
    import pandas as pd
    values = pd.to_numeric(series, errors="coerce").astype(float)
    if not unit:
        return values
    try:
        factor = u.Unit(unit).to(target)
    except (ValueError, u.UnitsError):
        raise InputError("%s: column %s has unit %r, which cannot be converted to %s"
                         % (where, column, unit, target)) from None
    return values * factor


def _sexagesimal(series, hours):
    """Degrees from 'hh mm ss.s' / '+dd:mm:ss' strings (vectorised); NaN where unparsable."""
    import pandas as pd
    text = series.astype(str).str.strip().str.replace(r"[hmsd:°'\"]", " ", regex=True)
    parts = text.str.split(expand=True).reindex(columns=range(3))
    a, b, c = (pd.to_numeric(parts[k], errors="coerce") for k in range(3))
    value = a.abs() + b.fillna(0) / 60.0 + c.fillna(0) / 3600.0
    value = np.where(text.str.startswith("-"), -value, value)
    return value * (15.0 if hours else 1.0)


def _position_column(raw, column, hours, units, where):
    """A position column in degrees: numeric (unit-converted) or sexagesimal text."""
    import pandas as pd
    values = _to_unit(raw[column], units.get(column), "deg", where, column)
    text = raw[column].dropna().astype(str).str.strip()
    if len(text) and values.isna().mean() > 0.5 and text.str.contains(r"[\s:]").mean() > 0.5:
        log.info("%s: column %s is sexagesimal (%s); converted to degrees", where, column,
                 "hh mm ss" if hours else "dd mm ss")
        return pd.Series(_sexagesimal(raw[column], hours), index=raw.index)
    return values


def normalise_survey_table(survey, raw, where, units=None):
    """Rename a Vizier-style table (DataFrame) to the pipeline's columns and units (Jy, deg)."""
    import pandas as pd
    units = units or {}
    spec = SURVEYS[survey]
    columns, missing = {}, []
    for name, column in spec["columns"].items():
        options = (column,) + _ALT_COLUMNS.get(column, ())
        found = next((c for c in options if c in raw.columns), None)
        if found is None:
            missing.append(column)
        columns[name] = found
    if missing:
        raise InputError("%s catalogue %s lacks the column(s) %s; it has %s. A %s catalogue needs "
                         "%s (positions in deg or sexagesimal RAJ2000/DEJ2000, fluxes in mJy, as "
                         "downloaded from Vizier %s; see python racs_pipeline.py process --help)"
                         % (survey.upper(), where, ", ".join(missing), ", ".join(map(str, raw.columns)),
                            survey.upper(), ", ".join(spec["columns"].values()), spec["vizier"][0]))
    out = pd.DataFrame({"ra": _position_column(raw, columns["ra"], True, units, where),
                        "dec": _position_column(raw, columns["dec"], False, units, where)})
    out["flux"] = _to_unit(raw[columns["flux"]], units.get(columns["flux"], "mJy"), "Jy", where, columns["flux"])
    out["flux_err"] = _to_unit(raw[columns["flux_err"]], units.get(columns["flux_err"], "mJy"), "Jy", where,
                               columns["flux_err"])
    optional = spec["optional"]
    peak = optional.get("peak_flux")
    out["peak_flux"] = (_to_unit(raw[peak], units.get(peak, "mJy"), "Jy", where, peak)
                        if peak in raw.columns else out["flux"])
    for name, target in (("maj", "arcsec"), ("min", "arcsec"), ("pa", "deg")):
        column = optional.get(name)
        out[name] = _to_unit(raw[column], units.get(column), target, where, column) \
            if column in raw.columns else np.nan
    out["pa"] = out["pa"].fillna(0.0)      # NVSS leaves PA blank for unresolved sources
    mosaic = optional.get("mosaic")
    out["mosaic"] = (raw[mosaic].astype(str).str.strip() if mosaic in raw.columns else "")
    bad = ~(np.isfinite(out["ra"]) & np.isfinite(out["dec"]) & np.isfinite(out["flux"]))
    if bad.all() and len(out):
        raise InputError("%s catalogue %s: none of its %d rows has a usable position and flux in the "
                         "columns %s, %s, %s; see python racs_pipeline.py process --help for the formats"
                         % (survey.upper(), where, len(out), columns["ra"], columns["dec"], columns["flux"]))
    if bad.any():
        _data_warning("%s catalogue %s: %d of %d rows without position or flux dropped"
                      % (survey.upper(), where, int(bad.sum()), len(out)))
        out = out[~bad].reset_index(drop=True)
    out["flux_err"] = out["flux_err"].fillna(0.0)
    out["ra"] = np.mod(out["ra"], 360.0)
    out.insert(0, "name", np.char.add(survey.upper() + "_", source_names(out["ra"], out["dec"], "J")))
    out["survey"] = survey
    return out


def fetch_survey_catalogue(survey, ra, dec, radius, local=None, cache_dir=None, timeout=60):
    """A survey catalogue around (ra, dec): the local file if given, else Vizier (cached).

    Parameters
    ----------
    survey : {'sumss', 'nvss'}
    ra, dec, radius : float (deg)
    local : path, optional
        Local catalogue file (or directory holding ``<survey>.csv``); no network then.
    cache_dir : path, optional
        Vizier results are written here as ``<survey>_<ra>_<dec>_<radius>.csv`` (atomic,
        so parallel jobs can share the directory) and reused.

    Raises
    ------
    InputError
        A local file that is missing or unreadable.
    CatalogueUnavailableError
        When Vizier cannot be reached (or astroquery is missing) and no local file is
        given; the message says how to supply one.
    """
    import pandas as pd
    if local is not None:
        return read_survey_catalogue(survey, _resolve_local_catalogue(survey, local))
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / ("%s_%.4f_%.4f_%.4f.csv" % (survey, ra, dec, radius))
        if cached.is_file():
            log.info("%s: using cached Vizier download %s", survey.upper(), cached)
            return read_survey_catalogue(survey, cached)
    how = ("give a local catalogue with [CATALOGUES] %s_csv = FILE (or --%s-csv FILE): a CSV "
           "with the Vizier columns %s (deg, mJy) from %s" % (survey, survey,
           ", ".join(SURVEYS[survey]["columns"].values()), SURVEYS[survey]["vizier"][0]))
    try:
        import astropy.units as u
        from astropy.coordinates import SkyCoord
        from astroquery.vizier import VizierClass
    except ImportError as exc:
        raise CatalogueUnavailableError("astroquery is needed to download %s (%s); %s"
                                        % (survey.upper(), exc, how)) from None
    vizier = VizierClass(columns=["_r", "_RAJ2000", "_DEJ2000", "**"], row_limit=-1, timeout=timeout)
    try:
        tables = vizier.query_region(SkyCoord(ra, dec, unit="deg"), radius=radius * u.deg,
                                     catalog=list(SURVEYS[survey]["vizier"]))
    except Exception as exc:  # noqa: BLE001 - any network/HTTP/parse failure means "unreachable"
        raise CatalogueUnavailableError("Vizier could not be reached for %s (%s: %s); %s"
                                        % (survey.upper(), type(exc).__name__, exc, how)) from None
    frames = [t.to_pandas() for t in tables]
    raw = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=list(SURVEYS[survey]["columns"].values()))
    if cached is not None:
        with atomic_output(cached, overwrite=True) as stream:
            raw.to_csv(stream, index=False)
    return normalise_survey_table(survey, raw, "Vizier " + ",".join(SURVEYS[survey]["vizier"]))


def trim_to_footprint(table, image, margin=0):
    """Rows of ``table`` (ra, dec deg) whose pixel lies on the image and is not blank."""
    x, y = image.world_to_pixel(table["ra"].to_numpy(), table["dec"].to_numpy())
    value = sample_map(np.where(image.blank_mask(), np.nan, 1.0), x, y)
    keep = np.isfinite(value)
    out = table[keep].reset_index(drop=True)
    return out


# ===========================================================================
# ASKAP source finding and catalogues
# ===========================================================================
AEGEAN_COLUMNS = ("island", "source", "local_rms", "ra", "dec", "err_ra", "err_dec", "peak_flux",
                  "err_peak_flux", "int_flux", "err_int_flux", "a", "err_a", "b", "err_b", "pa",
                  "err_pa", "flags", "psf_a", "psf_b", "psf_pa")
_REQUIRED_AEGEAN = ("ra", "dec", "peak_flux", "err_peak_flux", "int_flux", "err_int_flux",
                    "local_rms", "a", "b", "pa")
# Selavy component catalogue (mJy, arcsec) -> Aegean-style columns (Jy, arcsec).
_SELAVY_RENAME = {"ra_deg_cont": "ra", "dec_deg_cont": "dec", "flux_peak": "peak_flux",
                  "flux_peak_err": "err_peak_flux", "flux_int": "int_flux",
                  "flux_int_err": "err_int_flux", "maj_axis": "a", "min_axis": "b",
                  "pos_ang": "pa", "rms_image": "local_rms", "island_id": "island",
                  "component_id": "source", "flag_c4": "flags"}
_SELAVY_MJY = ("peak_flux", "err_peak_flux", "int_flux", "err_int_flux", "local_rms")

# Aegean defaults of the original pipeline and how [aegean] keys map onto AegeanTools.
AEGEAN_DEFAULTS = {"cores": 1, "maxsummits": 5, "seedclip": 5.0, "floodclip": 4.0, "nocov": True}
_AEGEAN_KEYS = {"cores": ("cores", int), "maxsummits": ("max_summits", int),
                "seedclip": ("innerclip", float), "floodclip": ("outerclip", float),
                "nocov": ("docov", lambda v: not parse_bool(v)),
                "island": ("doislandflux", parse_bool), "nopositive": ("nopositive", parse_bool),
                "negative": ("nonegative", lambda v: not parse_bool(v)),
                "autoload": (None, None)}


def read_aegean_settings(path=None):
    """Aegean settings: the seed's defaults updated from an ``[aegean]`` INI file.

    Keys: cores, maxsummits, seedclip, floodclip, nocov, island, nopositive, negative,
    autoload (ignored: the pipeline always supplies its own rms/background maps).
    ``true`` means the bare flag, ``false`` drops it; a key left out keeps the default
    (the original dropped it instead).

    Returns
    -------
    settings : dict
        The resolved settings (original key names).
    kwargs : dict
        Keyword arguments of ``SourceFinder.find_sources_in_image``.
    """
    settings = dict(AEGEAN_DEFAULTS)
    if path is not None:
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
        parser.read(path)
        if not parser.has_section("aegean"):
            raise ConfigError("Aegean settings file %s has no [aegean] section" % path)
        for key, value in parser["aegean"].items():
            if key not in _AEGEAN_KEYS:
                raise ConfigError("Aegean settings file %s: unknown key %r; known keys are %s"
                                  % (path, key, ", ".join(sorted(_AEGEAN_KEYS))))
            settings[key] = value
    kwargs = {}
    for key, value in settings.items():
        target, convert = _AEGEAN_KEYS[key]
        if target is None:
            continue
        try:
            kwargs[target] = convert(value)
        except ValueError:
            raise ConfigError("Aegean setting %s = %r is invalid" % (key, value)) from None
    return settings, kwargs


def _components_frame(components):
    import pandas as pd
    from AegeanTools.models import ComponentSource
    rows = [{name: getattr(c, name, np.nan) for name in AEGEAN_COLUMNS}
            for c in components if isinstance(c, ComponentSource)]
    frame = pd.DataFrame(rows, columns=list(AEGEAN_COLUMNS))
    return frame.astype({c: (int if c in ("island", "source", "flags") else float) for c in AEGEAN_COLUMNS})


def aegean_numpy_compat():
    """Make AegeanTools 2.3.5 work with NumPy >= 2 (call before it fits anything).

    ``AegeanTools.fitting.covar_errors`` catches ``np.linalg.linalg.LinAlgError``, a
    private module path NumPy 2 removed: any failed covariance estimate (a singular or
    non-finite Jacobian, e.g. an island on a zero-filled region or zero rms) then raises
    ``AttributeError`` instead of being handled, and the run crashes.  This puts back a
    ``numpy.linalg.linalg`` namespace holding the public ``LinAlgError`` (nothing else
    changes; a no-op on NumPy versions that still have it).

    Returns
    -------
    bool
        True when the shim was installed by this call.
    """
    import types
    import numpy.linalg
    if hasattr(numpy.linalg, "linalg"):
        return False
    shim = types.ModuleType("numpy.linalg.linalg", "AegeanTools 2.3.5 compatibility (racs_pipeline)")
    shim.LinAlgError = numpy.linalg.LinAlgError
    numpy.linalg.linalg = shim
    return True


def _import_source_finder():
    """AegeanTools' SourceFinder, made safe and quiet.

    The NumPy shim goes in first; AegeanTools logs every step at INFO through its own
    handler (kept to warnings here) and, at import, routes all Python warnings into the
    logging system (``logging.captureWarnings(True)``), which is undone so that warnings
    stay visible.
    """
    aegean_numpy_compat()
    first = "AegeanTools.source_finder" not in sys.modules
    from AegeanTools.source_finder import SourceFinder
    if first:
        logging.captureWarnings(False)
    logging.getLogger("AegeanTools").setLevel(logging.WARNING)
    return SourceFinder


def _positive_only(table, find_negative, what):
    """Drop negative components unless asked for them (Aegean's API reports them by default)."""
    if find_negative or not len(table):
        return table
    negative = table["peak_flux"].to_numpy(dtype=float) < 0
    if negative.any():
        log.info("%s: %d negative component(s) left out (set find_negative = true to keep them)",
                 what, int(negative.sum()))
    return table[~negative].reset_index(drop=True)


def find_sources_aegean(image_path, rms_path, bkg_path, settings_path=None, find_negative=False):
    """Run AegeanTools on a 2-D image with the given rms/background maps.

    Only positive components are returned unless ``find_negative`` (or ``negative =
    true`` in the ``[aegean]`` settings) asks for negative ones too, as the ``aegean``
    command does.

    Returns
    -------
    pandas.DataFrame
        Aegean component columns (``AEGEAN_COLUMNS``; fluxes Jy, a/b arcsec, pa deg);
        empty (with the columns) when nothing is detected.
    """
    SourceFinder = _import_source_finder()
    settings, kwargs = read_aegean_settings(settings_path)
    kwargs.setdefault("cores", 1)
    want_negative = find_negative or parse_bool(settings.get("negative", False))
    kwargs["nonegative"] = not want_negative
    log.info("Aegean on %s with %s", Path(image_path).name, kwargs)
    finder = SourceFinder()
    components = finder.find_sources_in_image(str(image_path), rmsin=str(rms_path),
                                              bkgin=str(bkg_path), progress=False, **kwargs)
    return _positive_only(_components_frame(components), want_negative, Path(image_path).name)


def find_sources_pybdsf(image_path, frequency, settings_path=None, find_negative=False):
    """Run PyBDSF and convert its Gaussian list to Aegean-style columns.

    Sizes are FWHM in arcsec and PA in degrees (the original multiplied PA by 3600).
    ``[pybdsf]`` keys of the settings file are passed to ``bdsf.process_image``.
    Negative Gaussians are dropped unless ``find_negative``.
    """
    import bdsf
    import pandas as pd
    kwargs = {"thresh_isl": 3.0, "thresh_pix": 5.0}
    if settings_path is not None:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(settings_path)
        for key, value in (parser["pybdsf"].items() if parser.has_section("pybdsf") else ()):
            kwargs[key] = _guess_type(value)
    img = bdsf.process_image(str(image_path), frequency=frequency, quiet=True, **kwargs)
    gaussians = list(getattr(img, "gaussians", []))
    frame = pd.DataFrame({
        "island": [g.island_id for g in gaussians],
        "source": [g.gaus_num for g in gaussians],
        "local_rms": [g.rms for g in gaussians],
        "ra": [g.centre_sky[0] for g in gaussians], "dec": [g.centre_sky[1] for g in gaussians],
        "err_ra": [g.centre_skyE[0] for g in gaussians], "err_dec": [g.centre_skyE[1] for g in gaussians],
        "peak_flux": [g.peak_flux for g in gaussians], "err_peak_flux": [g.peak_fluxE for g in gaussians],
        "int_flux": [g.total_flux for g in gaussians], "err_int_flux": [g.total_fluxE for g in gaussians],
        "a": [g.size_sky[0] * 3600 for g in gaussians], "err_a": [g.size_skyE[0] * 3600 for g in gaussians],
        "b": [g.size_sky[1] * 3600 for g in gaussians], "err_b": [g.size_skyE[1] * 3600 for g in gaussians],
        "pa": [g.size_sky[2] for g in gaussians], "err_pa": [g.size_skyE[2] for g in gaussians],
    }, columns=[c for c in AEGEAN_COLUMNS if c not in ("flags", "psf_a", "psf_b", "psf_pa")])
    frame["flags"] = 0
    beam = getattr(img, "beam", None)
    if beam is not None and len(beam) >= 3:
        frame["psf_a"], frame["psf_b"], frame["psf_pa"] = beam[0] * 3600.0, beam[1] * 3600.0, beam[2]
    return _positive_only(frame, find_negative, Path(image_path).name)


def _guess_type(text):
    for convert in (int, float, parse_bool):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def read_askap_csv(path, fmt="aegean"):
    """Read an existing ASKAP component catalogue (Aegean CSV, or Selavy CSV/fixed-width text).

    Raises
    ------
    InputError
        When the file is missing or lacks required columns (the message lists them).
    """
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        raise InputError("ASKAP catalogue %s does not exist (set [CATALOGUES] askap_csv)" % path)
    with path.open() as stream:
        first = stream.readline()
    if fmt == "selavy" and "," not in first:
        raw = pd.read_csv(path, sep=r"\s+", skiprows=[1], comment=None)  # fixed width, units line
        raw.columns = [c.lstrip("#") for c in raw.columns]
    else:
        raw = pd.read_csv(path, comment="#")
    if fmt == "selavy":
        raw = raw.rename(columns=_SELAVY_RENAME)
        missing = [k for k, v in _SELAVY_RENAME.items() if v in _REQUIRED_AEGEAN and v not in raw.columns]
        if missing:
            raise InputError("Selavy catalogue %s lacks the column(s) %s" % (path, ", ".join(missing)))
        for column in _SELAVY_MJY:
            raw[column] = pd.to_numeric(raw[column], errors="coerce") / 1e3
    missing = [c for c in _REQUIRED_AEGEAN if c not in raw.columns]
    if missing:
        raise InputError("ASKAP catalogue %s lacks the column(s) %s; an Aegean-format catalogue "
                         "needs %s (Jy, arcsec, deg)" % (path, ", ".join(missing), ", ".join(_REQUIRED_AEGEAN)))
    for column in AEGEAN_COLUMNS:
        if column not in raw.columns:
            raw[column] = 0 if column in ("flags", "island", "source") else np.nan
    raw["flags"] = pd.to_numeric(raw["flags"], errors="coerce").fillna(0).astype(int)
    return raw


def prepare_askap_catalogue(table, image, opts):
    """Derived columns of the ASKAP catalogue (vectorised).

    Adds name, askap_snr, err_*_orig (with ``askap_flux_error`` added in quadrature),
    distance_from_centre (deg), nn_d2d (arcsec), island_size, extended, edge, x, y.
    Keeps only Aegean flag 0 unless ``use_all_fits``.
    """
    import pandas as pd
    cat = table.copy()
    for column in AEGEAN_COLUMNS:        # an empty or text-typed table still has numeric columns
        if column in cat.columns and column not in ("island", "source", "flags"):
            cat[column] = pd.to_numeric(cat[column], errors="coerce").astype(float)
    if not opts["use_all_fits"]:
        cat = cat[cat["flags"] == 0]
    cat = cat[np.isfinite(cat["ra"]) & np.isfinite(cat["dec"])].reset_index(drop=True)
    cat["ra"] = np.mod(cat["ra"], 360.0)
    cat.insert(0, "name", np.char.add("ASKAP_", source_names(cat["ra"], cat["dec"])))
    cat["askap_snr"] = cat["int_flux"] / cat["local_rms"]
    fraction = opts["askap_flux_error"]
    for column in ("err_int_flux", "err_peak_flux"):
        flux = cat[column.replace("err_", "")]
        cat[column + "_orig"] = cat[column]
        cat[column] = np.hypot(cat[column].fillna(0.0).clip(lower=0), fraction * flux)
    cat["distance_from_centre"] = _separation_deg(cat["ra"], cat["dec"], image.ra, image.dec)
    cat["nn_d2d"] = nearest_other(cat["ra"].to_numpy(), cat["dec"].to_numpy())
    cat["island_size"] = cat.groupby("island")["island"].transform("size") if len(cat) else []
    cat["extended"] = flag_extended(cat["a"], cat["b"], image.beam[0] * 3600, image.beam[1] * 3600,
                                    opts["askap_ext_thresh"])
    x, y = image.world_to_pixel(cat["ra"].to_numpy(), cat["dec"].to_numpy())
    cat["x"], cat["y"] = x, y
    cat["edge"] = edge_flags(image, x, y, _with_defaults(opts, image, "edge_margin")["edge_margin"])
    return cat


def island_sizes(askap, islands_csv):
    """Components per island from an Aegean/Selavy island catalogue (for "Large island")."""
    import pandas as pd
    islands = pd.read_csv(islands_csv, comment="#")
    islands = islands.rename(columns={"island_id": "island", "n_components": "components"})
    missing = [c for c in ("island", "components") if c not in islands.columns]
    if missing:
        raise InputError("island catalogue %s lacks the column(s) %s (Aegean: island, components; "
                         "Selavy: island_id, n_components)" % (islands_csv, ", ".join(missing)))
    sizes = islands.drop_duplicates("island").set_index("island")["components"]
    return askap["island"].map(sizes).fillna(askap["island_size"]).to_numpy()


def prepare_survey_catalogue(cat, survey, image, opts, rms_image):
    """Derived columns of a trimmed survey catalogue (scaled flux, local ASKAP rms, edge...)."""
    cat = cat.copy()
    nu = SURVEYS[survey]["frequency"]
    bmaj, bmin, _ = survey_beam(survey, float(np.median(cat["dec"])) if len(cat) else image.dec)
    cat["beam_maj"], cat["beam_min"] = bmaj, bmin
    cat["extended"] = flag_extended(cat["maj"].fillna(0), cat["min"].fillna(0), bmaj, bmin,
                                    opts["%s_ext_thresh" % survey])
    cat["survey_rms"] = survey_rms(survey, cat["dec"])
    cat["scaled_to_askap"] = scale_flux(cat["flux"], nu, image.frequency, opts["spectral_index"])
    cat["scaled_to_askap_err"] = scale_flux(cat["flux_err"], nu, image.frequency, opts["spectral_index"])
    x, y = image.world_to_pixel(cat["ra"].to_numpy(), cat["dec"].to_numpy())
    cat["x"], cat["y"] = x, y
    cat["askap_local_rms"] = sample_map(rms_image, x, y)
    cat["edge"] = edge_flags(image, x, y, _with_defaults(opts, image, "edge_margin")["edge_margin"])
    cat["distance_from_centre"] = _separation_deg(cat["ra"], cat["dec"], image.ra, image.dec)
    return cat


def _separation_deg(ra, dec, ra0, dec0):
    v = _unit_vectors(np.asarray(ra, float), np.asarray(dec, float))
    v0 = _unit_vectors([ra0], [dec0])[0]
    return _arcsec_from_chord(np.linalg.norm(v - v0, axis=1)) / 3600.0


def edge_flags(image, x, y, margin):
    """True where a blank or off-image pixel lies within +-``margin`` px (original: 24 px)."""
    from scipy.ndimage import maximum_filter
    if "beyond_hull" in image.extra:       # catalogue-only run: the true edge is unknown
        return sample_map(image.extra["beyond_hull"], x, y, fill=1.0) > 0
    key = ("edge_mask", margin)
    if key not in image.extra:
        blank = image.blank_mask().astype(np.uint8)
        image.extra[key] = maximum_filter(blank, size=2 * margin + 1, mode="constant", cval=1) \
            if margin > 0 else blank
    return sample_map(image.extra[key], x, y, fill=1.0) > 0


_FORCED_COLUMNS = ["peak_flux", "err_peak_flux", "int_flux", "err_int_flux", "local_rms"]


def forced_photometry(image_path, ra, dec, beam, rms_path, bkg_path, image=None):
    """Forced (priorized) Aegean fits of point sources at fixed positions.

    Each position gets a component with the image's beam shape; AegeanTools'
    ``priorized_fit_islands`` (stage 1: flux only, no flood clipping, no regrouping)
    fits its flux.  Positions with no data under the beam (blank or zero-filled) are
    not fitted; when the joint fit raises, the positions are fitted one by one so a
    single bad fit cannot stop the others.

    Parameters
    ----------
    image_path, rms_path, bkg_path : path
        2-D image plane and its rms and background maps (same grid).
    ra, dec : array (deg)
    beam : tuple
        (bmaj, bmin, bpa) in deg.
    image : ImageInfo, optional
        The plane already in memory (saves reading it for the blank-data check).

    Returns
    -------
    pandas.DataFrame
        One row per input position, in input order: peak_flux, err_peak_flux, int_flux,
        err_int_flux, local_rms (Jy) and ``forced_status``: 'ok', 'blank' (no data under
        the beam), 'no fit' (Aegean returned nothing) or 'failed: <error>'.
    """
    import pandas as pd
    n = len(ra)
    out = pd.DataFrame(np.nan, index=np.arange(n), columns=_FORCED_COLUMNS)
    out["forced_status"] = "ok"
    if n == 0:
        return out
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    if image is None:
        image = load_image(image_path, need_frequency=False)
    blank = _no_data_under_beam(image, ra, dec)
    out.loc[blank, "forced_status"] = "blank"
    todo = np.flatnonzero(~blank)
    SourceFinder = _import_source_finder()
    finder = SourceFinder()
    try:
        _fit_positions(finder, image_path, rms_path, bkg_path, ra, dec, beam, todo, out)
    except Exception as exc:  # noqa: BLE001 - any failure inside AegeanTools/lmfit: retry one by one
        log.warning("forced photometry of %d positions failed as one fit (%s: %s); fitting them one by one",
                    len(todo), type(exc).__name__, exc)
        for i in todo:
            try:
                _fit_positions(finder, image_path, rms_path, bkg_path, ra, dec, beam, [i], out)
            except Exception as exc_one:  # noqa: BLE001 - record the failure, keep the others
                out.loc[i, "forced_status"] = "failed: %s" % type(exc_one).__name__
                log.debug("forced fit at (%.5f, %.5f) failed: %r", ra[i], dec[i], exc_one)
    lost = (out["forced_status"] == "ok") & out["int_flux"].isna()
    out.loc[lost, "forced_status"] = "no fit"
    return out


def _no_data_under_beam(image, ra, dec):
    """True where every pixel within half a beam of the position is NaN or exactly 0."""
    from scipy.ndimage import maximum_filter
    key = "data_under_beam"
    if key not in image.extra:
        usable = (np.isfinite(image.data) & (image.data != 0)).astype(np.uint8)
        size = 2 * max(1, int(round(0.5 * image.beam_pixels))) + 1
        image.extra[key] = maximum_filter(usable, size=size, mode="constant", cval=0)
    x, y = image.world_to_pixel(ra, dec)
    return ~(sample_map(image.extra[key], x, y, fill=0.0) > 0)


def _fit_positions(finder, image_path, rms_path, bkg_path, ra, dec, beam, rows, out):
    """Priorized stage-1 fits at ``rows`` of (ra, dec); results written into ``out``."""
    from AegeanTools.models import ComponentSource
    rows = np.asarray(rows, dtype=int)
    if not len(rows):
        return
    priors = []
    for i in rows:
        comp = ComponentSource()
        comp.ra, comp.dec = float(ra[i]), float(dec[i])
        comp.a, comp.b, comp.pa = beam[0] * 3600.0, beam[1] * 3600.0, float(beam[2])
        comp.psf_a, comp.psf_b, comp.psf_pa = comp.a, comp.b, comp.pa
        comp.peak_flux, comp.int_flux = 1e-3, 1e-3
        comp.island, comp.source = int(i), 0
        priors.append(comp)
    fitted = finder.priorized_fit_islands(str(image_path), catalogue=priors, rmsin=str(rms_path),
                                          bkgin=str(bkg_path), stage=1, outerclip=-1,
                                          doregroup=False, docov=False, cores=1, progress=False)
    fitted = [c for c in fitted if isinstance(c, ComponentSource)]
    if fitted:
        found = _components_frame(fitted)      # positions are fixed at stage 1: match back
        idx, _ = crossmatch_nearest(found["ra"], found["dec"], ra[rows], dec[rows], max_sep=1.0)
        ok = idx >= 0
        for column in _FORCED_COLUMNS:
            out.loc[rows[idx[ok]], column] = found[column].to_numpy()[ok]


# ===========================================================================
# Crossmatch and transient search (vectorised)
# ===========================================================================
def diagnostic_crossmatch(askap, cat, survey, image, opts):
    """Each catalogue source with its nearest ASKAP component (any distance).

    Columns are prefixed ``<survey>_`` and ``askap_``; adds d2d (arcsec), RA/Dec offsets
    (arcsec, ASKAP minus catalogue), scaled fluxes at both frequencies, the flux ratio
    (scaled ASKAP / catalogue) and its error, and ``good`` (d2d <= diagnostic radius).
    """
    import pandas as pd
    opts = _with_defaults(opts, image, "diagnostic_max_separation")
    idx, d2d = crossmatch_nearest(cat["ra"], cat["dec"], askap["ra"], askap["dec"])
    ok = idx >= 0
    left = cat[ok].add_prefix(survey + "_").reset_index(drop=True)
    right = askap.iloc[idx[ok]].add_prefix("askap_").reset_index(drop=True)
    xm = pd.concat([left, right], axis=1)
    xm["d2d"] = d2d[ok]
    nu = SURVEYS[survey]["frequency"]
    alpha = opts["spectral_index"]
    xm["askap_scaled_to_%s" % survey] = scale_flux(xm["askap_int_flux"], image.frequency, nu, alpha)
    xm["askap_scaled_to_%s_err" % survey] = scale_flux(xm["askap_err_int_flux"], image.frequency, nu, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        xm["flux_ratio"] = xm["askap_scaled_to_%s" % survey] / xm[survey + "_flux"]
        xm["flux_ratio_err"] = np.abs(xm["flux_ratio"]) * np.hypot(
            xm["askap_scaled_to_%s_err" % survey] / xm["askap_scaled_to_%s" % survey],
            xm[survey + "_flux_err"] / xm[survey + "_flux"])
        xm["inverse_flux_ratio"] = 1.0 / xm["flux_ratio"]
    xm["dra"], xm["ddec"] = sky_offsets(xm[survey + "_ra"].to_numpy(), xm[survey + "_dec"].to_numpy(),
                                        xm["askap_ra"].to_numpy(), xm["askap_dec"].to_numpy())
    xm["good"] = xm["d2d"] <= opts["diagnostic_max_separation"]
    if opts["remove_extended"]:
        xm["good"] &= ~(xm[survey + "_extended"].astype(bool) | xm["askap_extended"].astype(bool))
    xm["survey"] = survey
    return xm


_MASTER_COLUMNS = (
    "master_name", "ra", "dec", "survey", "transient_type", "d2d", "askap_index", "askap_name",
    "askap_ra", "askap_dec", "askap_iflux", "askap_iflux_err", "askap_local_rms", "askap_scaled_flux",
    "askap_scaled_flux_err", "catalog_name", "catalog_ra", "catalog_dec", "catalog_iflux",
    "catalog_iflux_err", "catalog_rms", "catalog_scaled_flux", "catalog_scaled_flux_err",
    "catalog_mosaic", "predicted_snr", "aegean_rms_used", "askap_extended", "catalog_extended",
    "island_size", "edge", "d2d_nn_askap_cat", "distance_from_centre")


def _rows(n, **columns):
    import pandas as pd
    frame = pd.DataFrame({c: np.full(n, np.nan) for c in _MASTER_COLUMNS})
    for key, value in columns.items():
        frame[key] = value
    return frame


def _unique_matches(idx, sep):
    """Keep only the closest catalogue source for each ASKAP source (others -> no match)."""
    idx = idx.copy()
    matched = np.flatnonzero(idx >= 0)
    order = matched[np.argsort(sep[matched], kind="stable")]
    _, first = np.unique(idx[order], return_index=True)
    losers = np.setdiff1d(order, order[first])
    idx[losers] = -1
    return idx, len(losers)


def _survey_rows(askap, cat, survey, image, opts, forced):
    """Match and no-ASKAP-match rows of one survey (see :func:`transient_search`)."""
    nu, alpha = SURVEYS[survey]["frequency"], opts["spectral_index"]
    radius = opts["transient_max_separation"]
    idx, sep = crossmatch_nearest(cat["ra"], cat["dec"], askap["ra"], askap["dec"], max_sep=radius)
    idx, n_dup = _unique_matches(idx, sep)
    if n_dup:
        log.info("%s: %d catalogue sources shared an ASKAP match; the closer one kept", survey.upper(), n_dup)
    hit = idx >= 0
    a = askap.reset_index(drop=True).reindex(np.where(hit, idx, -1)).reset_index(drop=True)
    n = len(cat)
    rows = _rows(
        n, master_name=cat["name"].to_numpy(), ra=cat["ra"].to_numpy(), dec=cat["dec"].to_numpy(),
        survey=survey, transient_type=np.where(hit, "match", "noaskapmatch"), d2d=sep,
        askap_index=idx, catalog_name=cat["name"].to_numpy(), catalog_ra=cat["ra"].to_numpy(),
        catalog_dec=cat["dec"].to_numpy(), catalog_iflux=cat["flux"].to_numpy(),
        catalog_iflux_err=cat["flux_err"].to_numpy(), catalog_rms=cat["survey_rms"].to_numpy(),
        catalog_scaled_flux=cat["scaled_to_askap"].to_numpy(),
        catalog_scaled_flux_err=cat["scaled_to_askap_err"].to_numpy(),
        catalog_mosaic=cat["mosaic"].to_numpy(), catalog_extended=cat["catalog_ext_tag"].to_numpy(),
        edge=cat["edge"].to_numpy(), distance_from_centre=cat["distance_from_centre"].to_numpy(),
        aegean_rms_used=False)
    rows["askap_local_rms"] = np.where(hit, a["local_rms"], cat["askap_local_rms"])
    for column, source in (("askap_name", "name"), ("askap_ra", "ra"), ("askap_dec", "dec"),
                           ("askap_iflux", "int_flux"), ("askap_iflux_err", "err_int_flux"),
                           ("island_size", "island_size")):
        rows[column] = np.where(hit, a[source].to_numpy(), rows[column].to_numpy() if
                                column not in ("askap_name",) else "")
    rows["askap_extended"] = np.where(hit, a["ext_tag"].to_numpy(), False)
    rows["edge"] = rows["edge"].astype(bool) | np.where(hit, a["edge"].to_numpy(), False)
    miss = np.flatnonzero(~hit)
    rows["forced_status"] = np.where(hit, "", "not measured")
    if len(miss) and forced is not None:
        _forced_rows(rows, miss, forced(cat["ra"].to_numpy()[miss], cat["dec"].to_numpy()[miss]))
    elif len(miss):
        rms = _valid_rms(rows["askap_local_rms"].to_numpy()[miss])
        rows.loc[miss, "askap_local_rms"] = rms
        rows.loc[miss, "askap_iflux"] = 3 * rms
        rows.loc[miss, "askap_iflux_err"] = rms
        rows.loc[miss, "aegean_rms_used"] = True
    rows["askap_scaled_flux"] = scale_flux(rows["askap_iflux"], image.frequency, nu, alpha)
    rows["askap_scaled_flux_err"] = scale_flux(rows["askap_iflux_err"], image.frequency, nu, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows["predicted_snr"] = np.where(hit, np.nan, rows["catalog_scaled_flux"] / rows["askap_local_rms"])
    return rows


def _valid_rms(values):
    """An rms that can divide: NaN where it is not finite or not positive (zero-filled maps)."""
    values = np.asarray(values, dtype=float)
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)


def _forced_rows(rows, miss, phot):
    """Fill the no-ASKAP-match rows ``miss`` from forced photometry ``phot``.

    The forced flux, its error and ``forced_sigma`` = (scaled catalogue flux - forced
    flux) / hypot(both errors) are recorded; fluxes below 3 x the local rms (or not
    measured) are replaced by that 3-sigma limit for the ratio (``aegean_rms_used``).
    """
    flux = phot["int_flux"].to_numpy(dtype=float)
    rms = _valid_rms(phot["local_rms"])
    rms = np.where(np.isfinite(rms), rms, _valid_rms(rows["askap_local_rms"].to_numpy()[miss]))
    # Aegean's formal error treats pixels as independent and so underestimates the error
    # of a fixed-shape point-source amplitude in beam-correlated noise: that is the local
    # rms (Jy/beam); use whichever is larger (Aegean writes -1/-2 when it has none).
    aegean_err = phot["err_int_flux"].to_numpy(dtype=float)
    err = np.fmax(np.where(aegean_err > 0, aegean_err, np.nan), rms)
    rows.loc[miss, "forced_flux"] = flux
    rows.loc[miss, "forced_flux_err"] = err
    rows.loc[miss, "forced_status"] = phot["forced_status"].to_numpy()
    expected = rows["catalog_scaled_flux"].to_numpy()[miss]
    expected_err = rows["catalog_scaled_flux_err"].to_numpy()[miss]
    with np.errstate(invalid="ignore", divide="ignore"):
        rows.loc[miss, "forced_sigma"] = (expected - flux) / np.hypot(expected_err, err)
    limit = ~np.isfinite(flux) | (flux <= 0) | ~(flux >= 3 * rms)
    rows.loc[miss, "askap_iflux"] = np.where(limit, 3 * rms, flux)
    rows.loc[miss, "askap_iflux_err"] = np.where(limit, rms, err)
    rows.loc[miss, "askap_local_rms"] = rms
    rows.loc[miss, "aegean_rms_used"] = limit


def _nocatalog_rows(askap, catalogues, base, image, opts):
    """ASKAP sources with no catalogue source within the radius that the survey should see."""
    radius = opts["transient_max_separation"]
    has_cat = np.zeros(len(askap), dtype=bool)
    covered = np.zeros(len(askap), dtype=bool)
    for survey, cat in catalogues.items():
        idx, _ = crossmatch_nearest(askap["ra"], askap["dec"], cat["ra"], cat["dec"], max_sep=radius)
        has_cat |= idx >= 0
        low, high = SURVEYS[survey]["dec_range"]
        covered |= (askap["dec"].to_numpy() >= low) & (askap["dec"].to_numpy() <= high)
    # beyond every used survey's declination limit a source cannot be "new" (original:
    # removal of ASKAP sources past the SUMSS/NVSS boundary)
    matched_any = has_cat.copy()
    has_cat |= ~covered
    nu, alpha = SURVEYS[base]["frequency"], opts["spectral_index"]
    a = askap[~has_cat]
    scaled = scale_flux(a["int_flux"], image.frequency, nu, alpha)
    srms = survey_rms(base, a["dec"])
    seen = scaled / srms >= opts["transients_catalogue_snr_thresh"]
    a, scaled, srms = a[seen], scaled[seen], srms[seen]
    rows = _rows(
        len(a), master_name=a["name"].to_numpy(), ra=a["ra"].to_numpy(), dec=a["dec"].to_numpy(),
        survey=base, transient_type="nocatalogmatch", askap_index=a.index.to_numpy(),
        askap_name=a["name"].to_numpy(), askap_ra=a["ra"].to_numpy(), askap_dec=a["dec"].to_numpy(),
        askap_iflux=a["int_flux"].to_numpy(), askap_iflux_err=a["err_int_flux"].to_numpy(),
        askap_local_rms=a["local_rms"].to_numpy(), catalog_name="", catalog_iflux=3 * srms,
        catalog_iflux_err=srms, catalog_rms=srms, catalog_mosaic="", aegean_rms_used=True,
        askap_extended=a["ext_tag"].to_numpy(), catalog_extended=False,
        island_size=a["island_size"].to_numpy(), edge=a["edge"].to_numpy(),
        distance_from_centre=a["distance_from_centre"].to_numpy(),
        predicted_snr=(scaled / srms))
    rows["catalog_scaled_flux"] = scale_flux(rows["catalog_iflux"], nu, image.frequency, alpha)
    rows["catalog_scaled_flux_err"] = scale_flux(rows["catalog_iflux_err"], nu, image.frequency, alpha)
    rows["askap_scaled_flux"] = np.asarray(scaled, float)
    rows["askap_scaled_flux_err"] = scale_flux(rows["askap_iflux_err"], image.frequency, nu, alpha)
    # "Likely double": another ASKAP source within 2.5 x 45" that has a catalogue
    # counterpart (the original counted any ASKAP source, which tags most sources of a
    # deep field; an unmatched neighbour explains nothing)
    i, j, _ = pairs_within(rows["ra"], rows["dec"], askap["ra"], askap["dec"], 2.5 * 45.0)
    other = (j != rows["askap_index"].to_numpy()[i]) & matched_any[j]
    rows["likely_double"] = np.bincount(i[other], minlength=len(rows)) > 0
    return rows


def _merge_surveys(per_survey, base):
    """Dual mode: keep the base survey's rows, add the others' rows only for new sources."""
    import pandas as pd
    if len(per_survey) == 1:
        return per_survey[base]
    base_rows = per_survey[base]
    base_askap = set(base_rows.loc[base_rows["transient_type"] == "match", "askap_index"].astype(int))
    frames = [base_rows]
    for survey, rows in per_survey.items():
        if survey == base:
            continue
        is_match = rows["transient_type"] == "match"
        dup_match = is_match & rows["askap_index"].astype(int).isin(base_askap)
        near, _ = crossmatch_nearest(rows["ra"], rows["dec"], base_rows["catalog_ra"],
                                     base_rows["catalog_dec"], max_sep=45.0)
        dup_noaskap = ~is_match & (near >= 0)
        frames.append(rows[~(dup_match | dup_noaskap)])
    return pd.concat(frames, ignore_index=True)


def transient_search(askap, catalogues, image, opts, forced=None, non_conv=None):
    """Classify every source into match / noaskapmatch / nocatalogmatch and tag candidates.

    Parameters
    ----------
    askap : DataFrame
        ASKAP components from :func:`prepare_askap_catalogue`.
    catalogues : dict
        ``{survey: DataFrame}`` from :func:`prepare_survey_catalogue`; the first key is
        the base survey.
    image : ImageInfo
    opts : dict
        Flat options (:func:`flat_options`).
    forced : callable, optional
        ``forced(ra, dec) -> DataFrame`` (int_flux, err_int_flux, local_rms) measuring the
        ASKAP flux at catalogue positions without an ASKAP source; without it the 3-sigma
        upper limit of the local rms is used.
    non_conv : DataFrame, optional
        Convolved mode: the catalogue of the image before convolution.  A catalogue
        source without a convolved match but with a non-convolved one within the radius
        becomes a match on the non-convolved fluxes (``using_preconv``); new ASKAP
        sources are tagged "Created convolved source" when their non-convolved
        counterpart is more than 2 beams away and "Inflated convolved flux error" when
        the non-convolved flux would not be seen by the survey.

    Returns
    -------
    DataFrame
        The master table, sorted by ratio (descending), with ``pipelinetag`` (Good or the
        reason it is not), ``transient_class`` (askap_only, catalogue_only, large_ratio or
        '') and ``candidate`` (bool).

    Notes
    -----
    * match: catalogue source with its nearest ASKAP source within
      ``transient_max_separation`` (closest wins when two share one ASKAP source);
    * noaskapmatch: catalogue source without one; it must be expected at
      ``transients_askap_snr_thresh`` x the local ASKAP rms (S_cat (nu_askap/nu_cat)^alpha)
      and, when forced photometry ran, its forced flux must lie ``catalogue_only_sigma``
      below that expectation: ``forced_sigma = (S_cat,scaled - S_forced) /
      hypot(err_cat,scaled, err_forced)`` (else tagged "Forced flux consistent");
    * nocatalogmatch: ASKAP source with no catalogue source within the radius in any
      survey, whose flux scaled to the base survey is >= ``transients_catalogue_snr_thresh``
      x the survey rms;
    * ratio = larger / smaller of (scaled ASKAP flux, catalogue flux) at the survey
      frequency; a match is a large-ratio candidate when ratio >=
      ``transients_large_flux_ratio_thresh``.
    """
    import pandas as pd
    opts = _with_defaults(opts, image, "transient_max_separation")
    askap = askap.copy()
    ext = opts["extended_tag_thresh"]
    askap["ext_tag"] = flag_extended(askap["a"], askap["b"], image.beam[0] * 3600,
                                     image.beam[1] * 3600, ext)
    per_survey = {}
    for survey, cat in catalogues.items():
        cat = cat.copy()
        cat["catalog_ext_tag"] = flag_extended(cat["maj"].fillna(0), cat["min"].fillna(0),
                                               cat["beam_maj"], cat["beam_min"], ext)
        rows = _survey_rows(askap, cat, survey, image, opts, forced)
        if non_conv is not None:
            rows = _use_preconvolved(rows, non_conv, survey, image, opts)
        per_survey[survey] = rows
    base = next(iter(catalogues))
    master = _merge_surveys(per_survey, base)
    nocat = _nocatalog_rows(askap, catalogues, base, image, opts)
    if non_conv is not None and len(nocat):
        _tag_convolved_artefacts(nocat, askap, base, image, opts)
    master = pd.concat([master, nocat], ignore_index=True)
    for column in ("likely_double", "aegean_rms_used", "askap_extended", "catalog_extended", "edge",
                   "using_preconv", "created_convolved", "inflated_convolved_error"):
        if column not in master.columns:
            master[column] = False
        master[column] = master[column].fillna(False).astype(bool)
    for column in ("forced_flux", "forced_flux_err", "forced_sigma"):
        if column not in master.columns:
            master[column] = np.nan
    master["forced_status"] = master["forced_status"].fillna("").astype(str) \
        if "forced_status" in master.columns else ""
    master["ratio"], master["ratio_e"] = flux_ratio(master["askap_scaled_flux"], master["askap_scaled_flux_err"],
                                                    master["catalog_iflux"], master["catalog_iflux_err"])
    with np.errstate(divide="ignore", invalid="ignore"):
        master["ratio_askap_flux"] = master["askap_scaled_flux"] / master["catalog_iflux"]
    master["vs"], master["m"], master["m_abs"] = variability_metrics(
        master["askap_scaled_flux"], master["askap_scaled_flux_err"], master["catalog_iflux"],
        master["catalog_iflux_err"])
    if "inflated_convolved_flux" in askap.columns:
        own = master["askap_index"].fillna(-1).to_numpy().astype(int)
        flag = askap["inflated_convolved_flux"].to_numpy().astype(bool)
        master["inflated_convolved_flux"] = np.where(own >= 0, flag[np.maximum(own, 0)], False) \
            if len(askap) else False
        master["using_preconv"] = False
    bright = opts.get("bright_sources_csv")
    if bright is not None:
        master["near_bright_source"] = near_bright_sources(master, bright, opts["bright_source_radius"])
    _tag(master, image, opts)
    _add_sky_columns(master, askap)
    return master.sort_values("ratio", ascending=False, na_position="last").reset_index(drop=True)


def _use_preconvolved(rows, non_conv, survey, image, opts):
    """Convolved mode: no-ASKAP-match rows with a non-convolved source in range -> match."""
    rows = rows.copy()
    rows["using_preconv"] = False
    miss = np.flatnonzero(rows["transient_type"].to_numpy() == "noaskapmatch")
    if not len(miss) or not len(non_conv):
        return rows
    idx, sep = crossmatch_nearest(rows["ra"].to_numpy()[miss], rows["dec"].to_numpy()[miss], non_conv["ra"],
                                  non_conv["dec"], max_sep=opts["transient_max_separation"])
    hit, idx = miss[idx >= 0], idx[idx >= 0]
    if not len(hit):
        return rows
    src = non_conv.iloc[idx]
    nu, alpha = SURVEYS[survey]["frequency"], opts["spectral_index"]
    rows.loc[hit, "transient_type"] = "match"
    rows.loc[hit, "using_preconv"] = True
    rows.loc[hit, "aegean_rms_used"] = False
    rows.loc[hit, "predicted_snr"] = np.nan
    rows.loc[hit, "d2d"] = sep[np.isfinite(sep)]
    for column, source in (("askap_name", "name"), ("askap_ra", "ra"), ("askap_dec", "dec"),
                           ("askap_iflux", "int_flux"), ("askap_iflux_err", "err_int_flux"),
                           ("askap_local_rms", "local_rms")):
        rows.loc[hit, column] = src[source].to_numpy()
    rows.loc[hit, "askap_scaled_flux"] = scale_flux(src["int_flux"].to_numpy(), image.frequency, nu, alpha)
    rows.loc[hit, "askap_scaled_flux_err"] = scale_flux(src["err_int_flux"].to_numpy(), image.frequency, nu, alpha)
    log.info("%s: %d catalogue sources matched only in the non-convolved image", survey.upper(), len(hit))
    return rows


def _tag_convolved_artefacts(nocat, askap, base, image, opts):
    """New-source rows whose convolved detection is not backed by the non-convolved image."""
    own = nocat["askap_index"].to_numpy().astype(int)
    if "non_conv_d2d" not in askap.columns:
        return
    d2d = askap["non_conv_d2d"].to_numpy()[own]
    nonconv_flux = askap["non_conv_int_flux"].to_numpy()[own]
    beam = askap["non_conv_beam"].to_numpy()[own] if "non_conv_beam" in askap.columns else image.beam[0] * 3600
    nu, alpha = SURVEYS[base]["frequency"], opts["spectral_index"]
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = scale_flux(nonconv_flux, image.frequency, nu, alpha) / nocat["catalog_rms"].to_numpy()
    nocat["created_convolved"] = ~(d2d < 2 * beam)
    nocat["inflated_convolved_error"] = ~(scaled >= opts["transients_catalogue_snr_thresh"])


def near_bright_sources(master, path, radius_arcmin):
    """True for rows within ``radius_arcmin`` of a source of a bright-source table.

    The table (the original's packaged sumss/nvss_bright_sources.csv, or any list) needs
    ra and dec columns in degrees (also _RAJ2000/_DEJ2000); ',' or ';' separated.
    """
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        raise InputError("bright_sources_csv %s does not exist" % path)
    table = pd.read_csv(path, sep=None, engine="python")
    table.columns = [c.strip() for c in table.columns]
    table = table.rename(columns={"_RAJ2000": "ra", "_DEJ2000": "dec", "RA": "ra", "DEC": "dec", "Dec": "dec"})
    if not {"ra", "dec"} <= set(table.columns):
        raise InputError("bright_sources_csv %s needs ra and dec columns (deg); it has %s"
                         % (path, ", ".join(table.columns)))
    idx, _ = crossmatch_nearest(master["ra"], master["dec"], table["ra"], table["dec"], max_sep=radius_arcmin * 60)
    return idx >= 0


def _tag(master, image, opts):
    """pipelinetag, transient_class and candidate columns (vectorised, original priorities)."""
    t = master["transient_type"].to_numpy()
    match, noaskap, nocat = t == "match", t == "noaskapmatch", t == "nocatalogmatch"
    extended = master["askap_extended"].to_numpy() | master["catalog_extended"].to_numpy()
    large_island = master["island_size"].fillna(0).to_numpy() >= 3
    edge = master["edge"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        bright_structure = noaskap & (master["askap_iflux"].to_numpy() / image.rms > 50) & \
            ~master["aegean_rms_used"].to_numpy()
        low_snr = noaskap & ~(master["predicted_snr"].to_numpy() >= opts["transients_askap_snr_thresh"])
    near_bright = master["near_bright_source"].to_numpy().astype(bool) if "near_bright_source" in master \
        else np.zeros(len(master), dtype=bool)
    status = master["forced_status"].fillna("").astype(str).to_numpy()
    fit_failed = np.char.startswith(status.astype(str), "failed") | (status == "no fit")
    with np.errstate(invalid="ignore"):
        # a catalogue source is only missing if the forced flux is significantly fainter
        # than expected (a detection below the finder's threshold is not a transient)
        consistent = (status == "ok") & ~(master["forced_sigma"].to_numpy(dtype=float) >= opts["catalogue_only_sigma"])
    rules = [
        (~np.isfinite(master["ratio"].to_numpy()), "Failed"),
        (noaskap & near_bright, "Likely artefact (bright source)"),
        (noaskap & (status == "blank"), "No ASKAP data at position"),
        (noaskap & fit_failed, "Forced fit failed"),
        (noaskap & consistent, "Forced flux consistent"),
        (noaskap & bright_structure, "Likely bright extended structure"),
        (noaskap & low_snr, "Local RMS too high"),
        (nocat & master["likely_double"].to_numpy(), "Likely double"),
        (nocat & master["created_convolved"].to_numpy(), "Created convolved source"),
        (nocat & master["inflated_convolved_error"].to_numpy(), "Inflated convolved flux error"),
        (extended, "Extended source"),
        ((match | nocat) & large_island, "Large island source"),
        (edge, "Edge of ASKAP image"),
    ]
    conditions, labels = [c for c, _ in rules], [label for _, label in rules]
    master["pipelinetag"] = np.select(conditions, labels, default="Good")
    good = master["pipelinetag"].to_numpy() == "Good"
    large = match & (master["ratio"].to_numpy() >= opts["transients_large_flux_ratio_thresh"])
    master["transient_class"] = np.select([nocat, noaskap, large],
                                          ["askap_only", "catalogue_only", "large_ratio"], default="")
    master["candidate"] = good & (master["transient_class"].to_numpy() != "")
    master["flagged"] = ~good


def _add_sky_columns(master, askap):
    from astropy.coordinates import SkyCoord
    if len(master):
        galactic = SkyCoord(master["ra"].to_numpy(), master["dec"].to_numpy(), unit="deg").galactic
        master["gal_l"], master["gal_b"] = galactic.l.deg, galactic.b.deg
    else:
        master["gal_l"], master["gal_b"] = [], []
    # distance to the nearest ASKAP source other than the matched one
    from scipy.spatial import cKDTree
    if len(askap) >= 2 and len(master):
        dist, idx = cKDTree(_unit_vectors(askap["ra"], askap["dec"])).query(
            _unit_vectors(master["ra"], master["dec"]), k=2)
        own = master["askap_index"].fillna(-1).to_numpy().astype(int)
        pick = np.where(idx[:, 0] == own, dist[:, 1], dist[:, 0])
        master["d2d_nn_askap_cat"] = _arcsec_from_chord(pick)
    # names of the 6 nearest good matches (original "nearest_sources")
    good = master[(master["transient_type"] == "match") & (master["pipelinetag"] == "Good")]
    if len(good) and len(master):
        k = min(7, len(good))
        _, idx = cKDTree(_unit_vectors(good["ra"], good["dec"])).query(
            _unit_vectors(master["ra"], master["dec"]), k=k)
        names = good["master_name"].to_numpy()[np.asarray(idx).reshape(len(master), k)]
        own_name = master["master_name"].to_numpy()[:, None]
        master["nearest_sources"] = [",".join(row[row != me][:6]) for row, me in zip(names, own_name[:, 0])]
    else:
        master["nearest_sources"] = ""


# ===========================================================================
# Output products: tables, annotations, plots, postage stamps
# ===========================================================================
# Units of the columns this tool writes (after stripping an askap_/sumss_/nvss_/catalog_/
# non_conv_ prefix); any other numeric column whose name holds "flux" is Jy ("peak" ->
# Jy/beam) and "_rms" is Jy/beam.  Ratios, S/N and metrics are dimensionless.
_COLUMN_UNITS = {
    "ra": "deg", "dec": "deg", "err_ra": "deg", "err_dec": "deg", "gal_l": "deg", "gal_b": "deg",
    "distance_from_centre": "deg", "pa": "deg", "err_pa": "deg", "psf_pa": "deg",
    "a": "arcsec", "b": "arcsec", "err_a": "arcsec", "err_b": "arcsec", "psf_a": "arcsec", "psf_b": "arcsec",
    "maj": "arcsec", "min": "arcsec", "beam_maj": "arcsec", "beam_min": "arcsec", "beam": "arcsec",
    "d2d": "arcsec", "dra": "arcsec", "ddec": "arcsec", "nn_d2d": "arcsec", "d2d_nn_askap_cat": "arcsec",
    "separation": "arcsec", "x": "pix", "y": "pix",
}
_UNIT_PREFIXES = ("askap_", "sumss_", "nvss_", "catalog_", "non_conv_", "master_")


def column_unit(name):
    """Unit string of a column written by this tool ('' when dimensionless)."""
    base = str(name)
    if base.endswith("_orig"):
        base = base[:-5]
    while base not in _COLUMN_UNITS and base.startswith(_UNIT_PREFIXES):
        base = base.split("_", 1)[1] if not base.startswith("non_conv_") else base[len("non_conv_"):]
    if base in _COLUMN_UNITS:
        return _COLUMN_UNITS[base]
    if "ratio" in base or "snr" in base or "sigma" in base:
        return ""
    if "rms" in base:
        return "Jy/beam"
    if "flux" in base or "scaled_to" in base:
        return "Jy/beam" if "peak" in base else "Jy"
    return ""


def _ecsv_datatype(series):
    kind = series.dtype.kind
    return {"b": "bool", "i": "int64", "u": "int64", "f": "float64"}.get(kind, "string")


def _ecsv_header(frame):
    """The ``# %ECSV 1.0`` header (YAML) of a comma-separated ECSV file with units."""
    lines = ["# %ECSV 1.0", "# ---", "# delimiter: ','", "# datatype:"]
    for name in frame.columns:
        dtype = _ecsv_datatype(frame[name])
        unit = column_unit(name) if dtype in ("float64", "int64") else ""
        lines.append("# - {name: %s, %sdatatype: %s}" % (json.dumps(str(name)),
                                                        "unit: %s, " % json.dumps(unit) if unit else "", dtype))
    lines.append("# schema: astropy-2.0")
    return "\n".join(lines) + "\n"


def write_table(frame, csv_path, formats=("csv", "fits", "vot")):
    """Write a DataFrame as ECSV-in-CSV and (optionally) FITS and VOTable next to it.

    The ``.csv`` file is ECSV 1.0 with a comma delimiter: a commented YAML header gives
    each column's type and unit (astropy, TOPCAT read it; pandas:
    ``read_csv(path, comment='#')``).  FITS and VOTable carry the same units.  Every
    file is written atomically.
    """
    from astropy.table import Table
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    clean = frame.copy()
    for column in clean.columns:
        if _ecsv_datatype(clean[column]) == "string":
            clean[column] = clean[column].where(clean[column].notna(), "").astype(str)
    if "csv" in formats:
        with atomic_output(csv_path, overwrite=True) as stream:
            stream.write(_ecsv_header(clean))
            clean.to_csv(stream, index=False)
        written.append(csv_path)
    if set(formats) & {"fits", "vot"}:
        table = Table.from_pandas(clean)
        for name in table.colnames:
            unit = column_unit(name) if _ecsv_datatype(clean[name]) in ("float64", "int64") else ""
            if unit:
                table[name].unit = unit
        for fmt, suffix, writer in (("fits", ".fits", "fits"), ("vot", ".vot", "votable")):
            if fmt in formats:
                path = csv_path.with_suffix(suffix)
                with atomic_path(path, overwrite=True) as tmp:
                    table.write(tmp, format=writer, overwrite=True)
                written.append(path)
    return written


def read_table(path):
    """Read a table written by :func:`write_table` (or a plain CSV) into a DataFrame."""
    import pandas as pd
    return pd.read_csv(path, comment="#", keep_default_na=False, na_values=["", "nan", "NaN"])


def write_ann(path, ra, dec, major, minor, pa, colour="BLUE", names=None):
    """kvis annotation file of ellipses (axes are FWHM in arcsec; written as semi-axes deg)."""
    lines = ["COORD W", "PA SKY", "COLOR %s" % colour]
    a = np.asarray(major, float) / 3600.0 / 2.0
    b = np.asarray(minor, float) / 3600.0 / 2.0
    lines += ["ELLIPSE W %.6f %.6f %.6f %.6f %.2f" % row
              for row in zip(ra, dec, a, b, np.nan_to_num(np.asarray(pa, float)))]
    if names is not None:
        lines += ["TEXT W %.6f %.6f %s" % row for row in zip(ra, dec, names)]
    with atomic_output(path, overwrite=True) as stream:
        stream.write("\n".join(lines) + "\n")
    return Path(path)


def write_ds9_region(path, ra, dec, major, minor, pa, colour="blue", names=None):
    """DS9 region file (fk5) of ellipses; axes are FWHM in arcsec, written as semi-axes."""
    a = np.asarray(major, float) / 2.0
    b = np.asarray(minor, float) / 2.0
    angle = np.nan_to_num(np.asarray(pa, float)) + 90.0     # DS9 angles from the x axis
    text = names if names is not None else [""] * len(a)
    rows = ['ellipse(%.6f,%.6f,%.2f",%.2f",%.2f) # text={%s}' % r
            for r in zip(ra, dec, a, b, angle, text)]
    with atomic_output(path, overwrite=True) as stream:
        stream.write("# Region file format: DS9 version 4.1\nglobal color=%s\nfk5\n" % colour)
        stream.write("\n".join(rows) + ("\n" if rows else ""))
    return Path(path)


def _figure():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def make_diagnostic_plots(xm_by_survey, askap, catalogues, image, prefix):
    """Diagnostic PNGs: flux ratio vs flux and vs distance, offsets, separations, sky, counts.

    Only good matches (``good``: d2d <= diagnostic radius, extended removed if asked)
    enter the ratio/offset plots; the source-count plot uses everything.
    Returns the list of written files.
    """
    plt = _figure()
    prefix = Path(prefix)
    written = []

    def save(fig, suffix):
        path = prefix.with_name(prefix.name + suffix)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    for survey, xm in xm_by_survey.items():
        good = xm[xm["good"]]
        for xcol, label, suffix in (("askap_int_flux", "ASKAP integrated flux (Jy)", "flux_ratio_vs_askap_flux"),
                                    ("askap_distance_from_centre", "distance from image centre (deg)",
                                     "flux_ratio_vs_distance_from_centre")):
            fig, ax = plt.subplots(figsize=(7, 5))
            ax.errorbar(good[xcol], good["flux_ratio"], yerr=good["flux_ratio_err"], fmt="o", ms=3, alpha=0.7)
            if len(good):
                ax.axhline(np.nanmedian(good["flux_ratio"]), color="C1", ls="--", label="median")
            ax.axhline(1.0, color="k", lw=0.8, label="unity")
            if xcol == "askap_int_flux" and (good[xcol] > 0).any():
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labels overlap otherwise
            ax.set_xlabel(label)
            ax.set_ylabel("scaled ASKAP / %s flux" % survey.upper())
            ax.legend()
            save(fig, "_%s_%s.png" % (survey, suffix))
        fig, ax = plt.subplots(figsize=(6, 6))
        sc = ax.scatter(good["dra"], good["ddec"], c=np.log10(good["askap_int_flux"].clip(lower=1e-6)), s=10)
        fig.colorbar(sc, label="log10 ASKAP flux (Jy)")
        if len(good):
            ax.axvline(np.median(good["dra"]), ls="--", color="C1")
            ax.axhline(np.median(good["ddec"]), ls="--", color="C1")
        from matplotlib.patches import Ellipse
        ax.add_patch(Ellipse((0, 0), image.beam[1] * 3600, image.beam[0] * 3600, angle=-image.beam[2],
                             fill=False, color="k", label="ASKAP beam"))
        half = 0.6 * image.beam[0] * 3600
        ax.set_xlim(min(-half, *good["dra"]) if len(good) else -half, max(half, *good["dra"]) if len(good) else half)
        ax.set_ylim(min(-half, *good["ddec"]) if len(good) else -half, max(half, *good["ddec"]) if len(good) else half)
        ax.set_xlabel("RA offset (arcsec)")
        ax.set_ylabel("Dec offset (arcsec)")
        ax.set_aspect("equal")
        save(fig, "_position_offset_from_%s.png" % survey)
        fig = plt.figure(figsize=(8, 7))
        data, wcs, _ = display_plane(image)
        ax = fig.add_subplot(projection=wcs)
        ax.imshow(np.where(np.isfinite(data) & ~((data == 0) & (image.boundary_value == "zero")), 0.0, np.nan),
                  origin="lower", cmap="Greys", vmin=-1, vmax=1)
        x, y = wcs.all_world2pix(good["askap_ra"].to_numpy(float), good["askap_dec"].to_numpy(float), 0) \
            if len(good) else (np.array([]), np.array([]))
        sc = ax.scatter(x, y, c=good["flux_ratio"], cmap="Reds", s=25, edgecolors="k", linewidths=0.3)
        fig.colorbar(sc, label="scaled ASKAP / %s flux" % survey.upper())
        ax.set_xlabel("RA (J2000)")
        ax.set_ylabel("Dec (J2000)")
        save(fig, "_%s_flux_ratio_image_view.png" % survey)
        fig, ax = plt.subplots(figsize=(7, 5))
        ax.hist(xm["d2d"].clip(upper=120), bins=60)
        ax.set_xlabel("separation to nearest ASKAP source (arcsec, clipped at 120)")
        ax.set_ylabel("number")
        save(fig, "_%s_separation_distribution.png" % survey)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(askap["ra"], askap["dec"], s=8, label="ASKAP", alpha=0.6)
    for survey, cat in catalogues.items():
        ax.scatter(cat["ra"], cat["dec"], s=20, facecolors="none", edgecolors="C%d" % (2 + len(ax.collections)),
                   label=survey.upper())
    ax.invert_xaxis()
    ax.set_xlabel("RA (deg)")
    ax.set_ylabel("Dec (deg)")
    ax.legend()
    save(fig, "_sky_distribution.png")
    fig, ax = plt.subplots(figsize=(7, 5))
    labels, counts = ["ASKAP"], [len(askap)]
    for survey, cat in catalogues.items():
        labels += ["%s total" % survey.upper(), "%s matched" % survey.upper()]
        counts += [len(cat), int(xm_by_survey[survey]["good"].sum()) if survey in xm_by_survey else 0]
    ax.bar(labels, counts)
    ax.set_ylabel("number of sources")
    save(fig, "_source_counts.png")
    return written


def display_plane(image, max_pixels=1800):
    """A block-averaged copy of ``image.data`` for plotting, its WCS and the factor.

    A 4k x 4k plane drawn into a ~1400-pixel figure is resampled anyway; averaging
    k x k blocks first (k = ceil(size / max_pixels)) makes the plot several times faster.
    The WCS is the sliced one with its reference pixel moved to the block centres, so
    world coordinates (and pixel positions divided by k) stay exact.
    """
    ny, nx = image.data.shape
    k = max(1, int(math.ceil(max(nx, ny) / float(max_pixels))))
    if k == 1:
        return image.data, image.wcs, 1
    import warnings
    cut = image.data[: ny // k * k, : nx // k * k].reshape(ny // k, k, nx // k, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # all-blank blocks stay NaN
        small = np.nanmean(cut, axis=(1, 3)).astype(np.float32)
    wcs = image.wcs.slice((slice(None, None, k), slice(None, None, k)))
    wcs.wcs.crpix = wcs.wcs.crpix - (k - 1) / (2.0 * k)
    return small, wcs, k


def make_overlay(image, tables, path, zscale_contrast=0.2):
    """PNG of the image with source ellipses (``tables``: list of (frame, colour, label)).

    ``frame`` holds ra, dec (deg), major, minor (FWHM, arcsec), pa (deg) and extended
    (dashed).  The ellipses are one ``EllipseCollection`` per line style (not one patch
    each) and the image is block-averaged to the figure's resolution (:func:`display_plane`).
    """
    plt = _figure()
    from astropy.visualization import ImageNormalize, ZScaleInterval
    from matplotlib.collections import EllipseCollection
    data, wcs, k = display_plane(image)
    fig = plt.figure(figsize=(9, 9))
    ax = fig.add_subplot(projection=wcs)
    norm = ImageNormalize(data, interval=ZScaleInterval(contrast=zscale_contrast))
    ax.imshow(data, origin="lower", cmap="gray_r", norm=norm)
    scale = image.pixel_scale * 3600.0 * k
    for frame, colour, label in tables:
        if not len(frame):
            continue
        x, y = wcs.all_world2pix(frame["ra"].to_numpy(float), frame["dec"].to_numpy(float), 0)
        extended = frame["extended"].to_numpy().astype(bool)
        for dashed in (False, True):
            sel = extended == dashed
            if not sel.any():
                continue
            ax.add_collection(EllipseCollection(
                frame["minor"].to_numpy(float)[sel] / scale, frame["major"].to_numpy(float)[sel] / scale,
                np.nan_to_num(frame["pa"].to_numpy(float)[sel]), units="xy",
                offsets=np.column_stack([x[sel], y[sel]]), offset_transform=ax.transData,
                facecolors="none", edgecolors=colour, linewidths=0.8, linestyles="--" if dashed else "-"))
        ax.plot([], [], color=colour, label=label)
    ax.set_xlim(-0.5, data.shape[1] - 0.5)
    ax.set_ylim(-0.5, data.shape[0] - 0.5)
    ax.set_xlabel("RA (J2000)")
    ax.set_ylabel("Dec (J2000)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _mosaic_index(directory):
    """(paths, centre ra, centre dec, radius deg) of the FITS mosaics in a directory."""
    from astropy.io import fits
    from astropy.wcs import WCS
    paths, ra, dec, radius = [], [], [], []
    for path in sorted(Path(directory).glob("*.fits")) + sorted(Path(directory).glob("*.FITS")):
        header = fits.getheader(path)
        wcs = WCS(header).celestial
        nx, ny = header["NAXIS1"], header["NAXIS2"]
        centre = wcs.all_pix2world([[(nx - 1) / 2, (ny - 1) / 2]], 0)[0]
        scale = abs(float(header.get("CDELT2", wcs.pixel_scale_matrix[1, 1])))
        paths.append(path)
        ra.append(centre[0])
        dec.append(centre[1])
        radius.append(0.5 * min(nx, ny) * scale)
    return paths, np.array(ra), np.array(dec), np.array(radius)


def _stamp_job(job):
    """Draw one postage stamp (runs in a worker process)."""
    plt = _figure()
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astropy.io import fits
    from astropy.nddata import Cutout2D
    from astropy.visualization import ImageNormalize, ZScaleInterval
    from astropy.wcs import WCS
    from matplotlib.patches import Circle, Ellipse
    position = SkyCoord(job["ra"], job["dec"], unit="deg")
    size = job["size_arcmin"] * u.arcmin
    panels = [("ASKAP", job["askap_image"])] + ([(job["survey"].upper(), job["mosaic"])] if job["mosaic"] else [])
    fig = plt.figure(figsize=(6 * len(panels) + 2, 8))
    for k, (title, path) in enumerate(panels):
        with fits.open(path) as hdul:
            data = np.squeeze(hdul[0].data)
            wcs = WCS(hdul[0].header).celestial
        try:
            cut = Cutout2D(data, position, size, wcs=wcs, mode="partial")
        except Exception:  # noqa: BLE001 - position off this mosaic: leave the panel empty
            continue
        ax = fig.add_subplot(1, len(panels), k + 1, projection=cut.wcs)
        finite = cut.data[np.isfinite(cut.data)]
        norm = ImageNormalize(finite if finite.size else [0, 1],
                              interval=ZScaleInterval(contrast=job["contrast"]))
        ax.imshow(cut.data, origin="lower", cmap="gray_r", norm=norm)
        x, y = cut.wcs.world_to_pixel(position)
        scale = abs(cut.wcs.proj_plane_pixel_scales()[0].to_value("deg"))
        ax.add_patch(Circle((x, y), (1.0 / 60.0) / scale, fill=False, color="orange", ls=":",
                            label="1' around target"))
        for key, colour, label in (("askap", "blue", "ASKAP"), ("catalog", "red", job["survey"].upper())):
            ra, dec, bmaj, bmin, bpa = job[key]
            if not (np.isfinite(ra) and np.isfinite(dec)):
                continue
            ex, ey = cut.wcs.world_to_pixel(SkyCoord(ra, dec, unit="deg"))
            ax.add_patch(Ellipse((ex, ey), bmin / 3600 / scale, bmaj / 3600 / scale, angle=bpa,
                                 fill=False, color=colour, label=label))
        ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel("RA (J2000)")
        ax.set_ylabel("Dec (J2000)")
        ax.set_title("%s %s" % (title, job["name"]))
    fig.text(0.01, 0.01, job["text"], fontsize=10, family="monospace")
    fig.savefig(job["out"], dpi=80, format="jpg" if str(job["out"]).endswith(".jpg") else None)
    plt.close(fig)
    return job["out"]


def make_postage_stamps(master, askap_image, mosaic_dirs, outdir, size_arcmin=13.0, contrast=0.2,
                        ncores=1, askap_beam=(0.0, 0.0, 0.0)):
    """One JPEG per master row: ASKAP cutout next to the survey mosaic cutout.

    Parameters
    ----------
    master : DataFrame
        Rows with master_name, ra, dec, survey, ratio, askap_iflux, catalog_iflux.
    mosaic_dirs : dict
        ``{survey: directory of mosaic FITS}``; the mosaic whose centre is nearest and
        covers the position is used (no mosaic -> ASKAP panel only).
    ncores : int
        Worker processes (``concurrent.futures.ProcessPoolExecutor``).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    indices = {s: _mosaic_index(d) for s, d in mosaic_dirs.items() if d is not None}
    mosaic = np.full(len(master), "", dtype=object)
    for survey, (paths, mra, mdec, mrad) in indices.items():
        rows = np.flatnonzero(master["survey"].to_numpy() == survey)
        if not len(paths) or not len(rows):
            continue
        idx, sep = crossmatch_nearest(master["ra"].to_numpy()[rows], master["dec"].to_numpy()[rows], mra, mdec)
        ok = sep / 3600.0 <= mrad[idx]
        mosaic[rows[ok]] = np.array([str(paths[i]) for i in idx[ok]], dtype=object)
    text = ["%s  d2d %.1f\"  ratio %.2f +- %.2f\nASKAP %.2f mJy (local rms %.2f)  %s %.2f mJy"
            % (t, d, r, re, a * 1e3, lr * 1e3, s.upper(), c * 1e3) for t, d, r, re, a, lr, s, c in zip(
                master["transient_type"], master["d2d"].fillna(-1), master["ratio"], master["ratio_e"],
                master["askap_iflux"], master["askap_local_rms"], master["survey"], master["catalog_iflux"])]
    beam = [askap_beam[0] * 3600, askap_beam[1] * 3600, askap_beam[2]]
    jobs = [{"ra": r, "dec": d, "name": n, "survey": s, "mosaic": m, "askap_image": str(askap_image),
             "size_arcmin": size_arcmin, "contrast": contrast, "text": t,
             "askap": (float(ar), float(ad), *beam),
             "catalog": (float(cr), float(cd), *survey_beam(s, d)),
             "out": str(outdir / ("source_%s_postagestamps.jpg" % n.replace(" ", "_")))}
            for r, d, n, s, m, t, ar, ad, cr, cd in zip(
                master["ra"], master["dec"], master["master_name"], master["survey"], mosaic, text,
                master["askap_ra"].astype(float), master["askap_dec"].astype(float),
                master["catalog_ra"].astype(float), master["catalog_dec"].astype(float))]
    if ncores > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(ncores, mp_context=multiprocessing.get_context("spawn")) as pool:
            return [Path(p) for p in pool.map(_stamp_job, jobs)]
    return [Path(_stamp_job(job)) for job in jobs]


# ===========================================================================
# Database (SQLAlchemy Core; SQLite file or PostgreSQL with Q3C)
# ===========================================================================
_IMAGE_COLUMNS = {"unique_tag": "str", "name": "str", "description": "str", "ra": "float",
                  "dec": "float", "runtime": "str", "url": "str", "url_2": "str", "runby": "str",
                  "number_askap_sources": "int", "number_sumss_sources": "int",
                  "number_nvss_sources": "int", "rms": "float", "frequency": "float",
                  "transients_master_total": "int", "number_candidates": "int",
                  "matched_to": "str", "claimed_by": "str", "number_candidates_checked": "int",
                  "output_dir": "str", "settings": "str", "checksum": "str", "plane": "str",
                  "date_obs": "str", "analysis_image": "str", "mode": "str"}
_SOURCE_COLUMNS = {"name": "str", "ra": "float", "dec": "float", "int_flux": "float",
                   "err_int_flux": "float", "peak_flux": "float", "err_peak_flux": "float",
                   "local_rms": "float", "a": "float", "b": "float", "pa": "float",
                   "island": "int", "flags": "int", "extended": "bool"}
_CROSSMATCH_COLUMNS = {"master_name": "str", "askap_name": "str", "catalog_name": "str",
                       "ra": "float", "dec": "float", "gal_l": "float", "gal_b": "float",
                       "survey": "str", "transient_type": "str", "d2d": "float",
                       "askap_iflux": "float", "askap_iflux_err": "float",
                       "askap_scaled_flux": "float", "askap_scaled_flux_err": "float",
                       "askap_local_rms": "float", "catalog_iflux": "float",
                       "catalog_iflux_err": "float", "catalog_rms": "float", "catalog_mosaic": "str",
                       "ratio": "float", "ratio_e": "float", "ratio_askap_flux": "float",
                       "vs": "float", "m": "float", "m_abs": "float", "predicted_snr": "float",
                       "aegean_rms_used": "bool", "d2d_nn_askap_cat": "float",
                       "distance_from_centre": "float", "pipelinetag": "str",
                       "transient_class": "str", "candidate": "bool", "flagged": "bool",
                       "usertag": "str", "userreason": "str", "checkedby": "str", "ploturl": "str",
                       "inflated_convolved_flux": "bool", "nearest_sources": "str",
                       "forced_flux": "float", "forced_flux_err": "float", "forced_sigma": "float",
                       "forced_status": "str"}
_SCHEMA_LOCK_KEY = 7_225_001      # PostgreSQL advisory lock serialising schema creation/upgrades
_INJECT_RETRIES = 5


class RacsDatabase:
    """Results database: images, sources, crossmatches and transient candidates.

    Parameters
    ----------
    url : str or sqlalchemy.engine.URL
        e.g. ``sqlite:////path/racs.sqlite`` or ``postgresql+psycopg://user@host:5432/racs``.

    Notes
    -----
    Every query is built with SQLAlchemy expressions or bound parameters (never string
    formatting).  On PostgreSQL with the ``q3c`` extension, :meth:`cone_search` uses
    ``q3c_radial_query`` and the crossmatch table gets a ``q3c_ang2ipix`` index; elsewhere
    a declination band in SQL is refined with exact great-circle distances.

    An image run is identified by the checksum of the image file, the plane analysed
    (channel, Stokes), the file's path (``url``) and the run's ``db_tag`` (unique index
    ``racs_images_identity``): injecting the same image and tag again replaces that
    run's rows; two epochs with the same file name are two runs.  Several processes may inject into one PostgreSQL
    database at once: schema changes take an advisory lock, each injection is one
    transaction, and a clash on the identity index (the same run injected twice at the
    same moment) is retried, so rows are neither lost nor duplicated.
    """

    def __init__(self, url):
        import sqlalchemy as sa
        self.sa = sa
        sqlite = str(url).startswith("sqlite")
        self.engine = sa.create_engine(url, future=True, connect_args={"timeout": 60} if sqlite else {})
        self.meta = sa.MetaData()
        t = {"str": sa.Text, "float": sa.Float, "int": sa.Integer, "bool": sa.Boolean}

        def cols(spec):
            return [sa.Column(name, t[kind]) for name, kind in spec.items()]
        self.images = sa.Table("racs_images", self.meta, sa.Column("id", sa.Integer, primary_key=True),
                               *cols(_IMAGE_COLUMNS))
        sa.Index("racs_images_identity", self.images.c.checksum, self.images.c.plane, self.images.c.url,
                 self.images.c.description, unique=True)
        fk = lambda: sa.Column("image_id", sa.Integer, sa.ForeignKey("racs_images.id", ondelete="CASCADE"),  # noqa: E731
                               index=True, nullable=False)
        self.sources = sa.Table("racs_sources", self.meta, sa.Column("id", sa.Integer, primary_key=True),
                                fk(), *cols(_SOURCE_COLUMNS))
        self.crossmatches = sa.Table("racs_crossmatches", self.meta,
                                     sa.Column("id", sa.Integer, primary_key=True), fk(),
                                     *cols(_CROSSMATCH_COLUMNS))
        self.transients = sa.Table("racs_transients", self.meta, sa.Column("id", sa.Integer, primary_key=True),
                                   fk(), sa.Column("crossmatch_id", sa.Integer,
                                                   sa.ForeignKey("racs_crossmatches.id", ondelete="CASCADE")),
                                   sa.Column("master_name", sa.Text), sa.Column("transient_class", sa.Text),
                                   sa.Column("ra", sa.Float), sa.Column("dec", sa.Float),
                                   sa.Column("ratio", sa.Float))
        self.has_q3c = False
        self._create_schema()

    def _create_schema(self):
        """Create or upgrade the tables (serialised across processes; see the class Notes)."""
        sa = self.sa
        for attempt in range(_INJECT_RETRIES):
            try:
                with self.engine.begin() as conn:
                    if self.engine.dialect.name == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                    self.meta.create_all(conn)
                    self._upgrade_schema(conn)
                    if self.engine.dialect.name == "postgresql":
                        self.has_q3c = conn.execute(sa.text(
                            "SELECT count(*) FROM pg_extension WHERE extname = :name"), {"name": "q3c"}).scalar() > 0
                        if self.has_q3c:
                            conn.execute(sa.text("CREATE INDEX IF NOT EXISTS racs_crossmatches_q3c "
                                                 "ON racs_crossmatches (q3c_ang2ipix(ra, dec))"))
                return
            except sa.exc.OperationalError as exc:      # SQLite: another process created it first
                if attempt == _INJECT_RETRIES - 1 or "already exists" not in str(exc):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _upgrade_schema(self, conn):
        """Columns added in a later version are appended (never dropped); version 0.2's
        unique (name, description) constraint is replaced by the identity index."""
        sa = self.sa
        inspector = sa.inspect(conn)
        preparer = self.engine.dialect.identifier_preparer
        for table in self.meta.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(dialect=self.engine.dialect)
                    conn.execute(sa.text("ALTER TABLE %s ADD COLUMN %s %s" % (
                        preparer.quote(table.name), preparer.quote(column.name), kind)))
                    log.info("database: added column %s.%s", table.name, column.name)
        legacy = [u for u in inspector.get_unique_constraints("racs_images")
                  if sorted(u["column_names"]) == ["description", "name"]]
        if legacy:
            self._drop_legacy_unique(conn, legacy[0])
        conn.execute(sa.text("CREATE UNIQUE INDEX IF NOT EXISTS racs_images_identity "
                             "ON racs_images (checksum, plane, url, description)"))

    def _drop_legacy_unique(self, conn, constraint):
        sa = self.sa
        if self.engine.dialect.name == "postgresql":
            conn.execute(sa.text('ALTER TABLE racs_images DROP CONSTRAINT "%s"'
                                 % constraint["name"].replace('"', '')))
        else:       # SQLite cannot drop a constraint: copy into a new table, drop, rename
            names = ", ".join('"%s"' % c.name for c in self.images.columns)
            fresh = self.images.to_metadata(sa.MetaData(), name="racs_images_new")
            fresh.indexes.clear()
            fresh.create(conn)
            conn.execute(sa.text("INSERT INTO racs_images_new (%s) SELECT %s FROM racs_images" % (names, names)))
            conn.execute(sa.text("DROP TABLE racs_images"))
            conn.execute(sa.text("ALTER TABLE racs_images_new RENAME TO racs_images"))
        log.info("database: unique (name, description) of racs_images replaced by the identity index "
                 "(checksum, plane, url, description)")

    def __repr__(self):
        return "RacsDatabase(%s, q3c=%s)" % (self.engine.url.render_as_string(hide_password=True), self.has_q3c)

    @staticmethod
    def _records(frame, spec):
        import pandas as pd
        out = pd.DataFrame(index=frame.index)
        for name, kind in spec.items():
            if name in frame.columns:
                col = frame[name]
            else:
                col = pd.Series([None] * len(frame), index=frame.index)
            if kind == "float":
                col = pd.to_numeric(col, errors="coerce").astype(float)
            out[name] = col
        records = out.astype(object).where(pd.notna(out), None).to_dict("records")
        for rec in records:
            for name, kind in spec.items():
                value = rec[name]
                if value is None:
                    continue
                if kind == "float":
                    rec[name] = float(value) if np.isfinite(value) else None
                elif kind == "int":
                    rec[name] = int(value)
                elif kind == "bool":
                    rec[name] = bool(value)
                else:
                    rec[name] = str(value)
        return records

    def _same_run(self, image_row):
        """Condition selecting earlier rows of this run (identity; name for checksum-less rows)."""
        c = self.images.c
        if image_row.get("checksum"):
            return (c.checksum == image_row["checksum"]) & (c.plane == image_row.get("plane")) & \
                (c.url == image_row.get("url")) & (c.description == image_row["description"])
        return c.checksum.is_(None) & (c.name == image_row["name"]) & (c.description == image_row["description"])

    def inject(self, image_row, sources, master):
        """Store one processed image in one transaction; returns the image id.

        An earlier injection of the same run (same image checksum, plane, path and tag)
        is replaced: its sources and crossmatches are rewritten and its image row is
        updated in place, so the run keeps its id.  A clash with a concurrent injection
        of the same run is retried.
        """
        sa = self.sa
        for attempt in range(_INJECT_RETRIES):
            try:
                return self._inject_once(image_row, sources, master)
            except sa.exc.IntegrityError:
                if attempt == _INJECT_RETRIES - 1:
                    raise
                log.info("database: %s is being injected by another process too; retrying",
                         image_row.get("name"))
                time.sleep(0.1 * (attempt + 1))

    def _inject_once(self, image_row, sources, master):
        sa = self.sa
        with self.engine.begin() as conn:
            old = sorted(conn.execute(sa.select(self.images.c.id).where(self._same_run(image_row))).scalars().all())
            for image_id in old:    # explicit deletes: SQLite does not cascade by default
                for table in (self.transients, self.crossmatches, self.sources):
                    conn.execute(sa.delete(table).where(table.c.image_id == image_id))
            for image_id in old[1:]:
                conn.execute(sa.delete(self.images).where(self.images.c.id == image_id))
            record = self._records(_one_row(image_row), _IMAGE_COLUMNS)[0]
            if old:                 # the run keeps its id (the review website's claims and tags use it)
                image_id = old[0]
                conn.execute(sa.update(self.images).where(self.images.c.id == image_id).values(**record))
            else:
                image_id = conn.execute(sa.insert(self.images).returning(self.images.c.id), record).scalar_one()
            for table, frame, spec in ((self.sources, sources, _SOURCE_COLUMNS),
                                       (self.crossmatches, master, _CROSSMATCH_COLUMNS)):
                if frame is None:
                    continue
                records = self._records(frame, spec)
                for rec in records:
                    rec["image_id"] = image_id
                if records:
                    conn.execute(sa.insert(table), records)
            if master is not None and len(master):
                cand = conn.execute(sa.select(self.crossmatches.c.id, self.crossmatches.c.master_name,
                                              self.crossmatches.c.transient_class, self.crossmatches.c.ra,
                                              self.crossmatches.c.dec, self.crossmatches.c.ratio).where(
                    (self.crossmatches.c.image_id == image_id) & self.crossmatches.c.candidate)).all()
                if cand:
                    conn.execute(sa.insert(self.transients), [
                        {"image_id": image_id, "crossmatch_id": r[0], "master_name": r[1],
                         "transient_class": r[2], "ra": r[3], "dec": r[4], "ratio": r[5]} for r in cand])
        return image_id

    def count(self, table):
        """Number of rows of ``table`` ('images', 'sources', 'crossmatches', 'transients')."""
        sa = self.sa
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(getattr(self, table))).scalar()

    def table(self, table, image_name=None):
        """A table as a DataFrame (ordered by id), optionally one image's rows."""
        import pandas as pd
        sa = self.sa
        t = getattr(self, table)
        query = sa.select(t).order_by(t.c.id)
        if image_name is not None and table != "images":
            query = query.join(self.images, self.images.c.id == t.c.image_id).where(
                self.images.c.name == image_name)
        with self.engine.connect() as conn:
            return pd.DataFrame(conn.execute(query).mappings().all())

    def cone_search(self, ra, dec, radius_arcsec, table="crossmatches"):
        """Rows within ``radius_arcsec`` of (ra, dec) deg, nearest first (Q3C when available)."""
        import pandas as pd
        sa = self.sa
        t = getattr(self, table)
        radius = radius_arcsec / 3600.0
        if self.has_q3c:
            query = sa.select(t).where(sa.func.q3c_radial_query(t.c.ra, t.c.dec, ra, dec, radius))
        else:
            query = sa.select(t).where(t.c.dec.between(dec - radius, dec + radius))
        with self.engine.connect() as conn:
            rows = pd.DataFrame(conn.execute(query).mappings().all())
        if rows.empty:
            return rows
        sep = _separation_deg(rows["ra"], rows["dec"], ra, dec) * 3600.0
        rows["separation"] = sep
        return rows[sep <= radius_arcsec * (1 + 1e-9)].sort_values(["separation", "id"]).reset_index(drop=True)


def _one_row(mapping):
    import pandas as pd
    return pd.DataFrame([mapping])


def database_url(opts, outdir):
    """SQLAlchemy URL from the [DATABASE] options (password never logged)."""
    import sqlalchemy as sa
    if opts["db_url"]:
        return opts["db_url"]
    if opts["db_engine"] == "sqlite":
        return "sqlite:///%s" % (Path(outdir) / ("%s.sqlite" % opts["db_database"])).resolve()
    return sa.engine.URL.create("postgresql+psycopg", username=opts["db_username"] or None,
                                password=opts["db_password"] or os.environ.get("PGPASSWORD") or None,
                                host=opts["db_host"], port=opts["db_port"], database=opts["db_database"])


# ===========================================================================
# Stages
# ===========================================================================
STAGE_LEDGER_FILE = "racs_stages.json"   # in the output directory: how each stage was made


class Products:
    """Named output files of one image: ``<outdir>/<stem><suffix>`` and the stage ledger."""

    def __init__(self, outdir, stem, overwrite=False, ledger=None, stage_prefix=""):
        self.outdir, self.stem, self.overwrite = Path(outdir), stem, overwrite
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.ledger = ledger if ledger is not None else StageLedger(self.outdir / STAGE_LEDGER_FILE, overwrite)
        self.stage_prefix = stage_prefix

    def path(self, suffix):
        return self.outdir / (self.stem + suffix)

    def current(self, stage, outputs, settings, inputs):
        return self.ledger.current(self.stage_prefix + stage, outputs, settings, inputs)

    def record(self, stage, outputs, settings, inputs, **meta):
        self.ledger.record(self.stage_prefix + stage, outputs, settings, inputs, **meta)


def _expand(path, stem):
    return None if path is None else Path(str(path).replace("{stem}", stem))


def _image_stem(path):
    name = Path(path).name
    for ending in (".fits", ".fit", ".csv", ".ecsv", ".txt", ".vot", ".xml"):
        if name.lower().endswith(ending):
            return name[:-len(ending)]
    return Path(path).stem


def output_directory(image_path, opts):
    """``<image>_results[_<tag>]`` beside the image, or under ``output_dir``."""
    stem = _image_stem(image_path)
    name = stem + "_results" + ("_" + opts["output_tag"] if opts["output_tag"] else "")
    parent = Path(opts["output_dir"]) if opts["output_dir"] else Path(image_path).resolve().parent
    return parent / name


def _pick(opts, *sections, exclude=()):
    """The options of ``sections`` (schema order) without ``exclude``: what a stage depends on."""
    return {k.key: opts[k.key] for k in CONFIG_SCHEMA if k.section in sections and k.key not in exclude}


_PLANE_KEYS = ("channel", "stokes", "beam", "frequency", "force_frequency", "boundary_value")


def stage_image(image_path, opts, products):
    """The analysis plane: plane of a 3-/4-D image, weight crop and convolution.

    Returns
    -------
    image : ImageInfo
        The plane the source finder reads (``image.path``), with ``source_path``, ``plane``
        and ``date_obs`` of the file given.
    non_conv_path : Path or None
        Convolved mode: the plane before convolution.
    """
    image_path = Path(image_path)
    settings = {k: opts[k] for k in _PLANE_KEYS}
    plane_path = products.path("_plane.fits")
    meta = products.ledger.meta("plane")
    if products.current("plane", [plane_path] if meta.get("outputs") else [], settings, {"image": image_path}):
        source = load_image(plane_path) if meta.get("outputs") else _load_plane(image_path, opts)
        source = source.with_origin(image_path, meta.get("plane", source.plane), meta.get("date_obs", source.date_obs))
    else:
        source = _load_plane(image_path, opts)
        outputs = []
        if source.needs_plane_file:
            write_fits_2d(plane_path, source.data, source.header)
            outputs = [plane_path]
            log.info("analysis plane (%s) written to %s", source.plane, plane_path.name)
        products.record("plane", outputs, settings, {"image": image_path}, plane=source.plane,
                        date_obs=source.date_obs)
        if outputs:          # from the file, so this and later runs see the very same plane and WCS
            source = load_image(plane_path).with_origin(image_path, source.plane, source.date_obs)
    working = source.path
    working = _weight_crop_stage(working, opts, products)
    working, non_conv = _convolve_stage(working, source, opts, products)
    if working == source.path:
        return source, non_conv
    image = load_image(working, boundary_value=opts["boundary_value"])
    return image.with_origin(image_path, source.plane, source.date_obs), non_conv


def _load_plane(image_path, opts):
    return load_image(image_path, opts["frequency"], opts["boundary_value"], opts["channel"], opts["stokes"],
                      opts["beam"] or None, opts["force_frequency"])


def _weight_crop_stage(working, opts, products):
    if not opts["weight_crop"]:
        return working
    out = products.path(".weightcrop_%s.fits" % opts["weight_crop_value"])
    weights = _expand(opts["weight_crop_image"], products.stem)
    settings = {"weight_crop_value": opts["weight_crop_value"], "channel": opts["channel"]}
    inputs = {"image": working, "weights": weights}
    if not products.current("weight_crop", [out], settings, inputs):
        channel = int(opts["channel"]) if opts["channel"] and str(opts["channel"]).isdigit() else None
        weight_crop(working, weights, opts["weight_crop_value"], out, channel)
        products.record("weight_crop", [out], settings, inputs)
        log.info("weight-cropped image: %s", out.name)
    return out


def _convolve_stage(working, source, opts, products):
    """Convolution to the base survey's beam (or a given convolved image)."""
    if not opts["convolve"]:
        return working, None
    given = _expand(opts["convolved_image"], products.stem)
    if given is not None:
        if not given.is_file():
            raise InputError("convolved_image %s does not exist" % given)
        return given, working
    surveys = determine_catalogues(source.dec, opts["sumss_only"], opts["nvss_only"])
    if not surveys:
        raise InputError("convolve = true, but no survey covers dec %.2f (SUMSS: dec < -30, NVSS: dec > -40)"
                         % source.dec)
    target = survey_beam(surveys[0], source.dec)
    out = products.path(".convolve2%s.fits" % surveys[0])
    settings = {"target_beam": target, "convolve_method": opts["convolve_method"]}
    if not products.current("convolve", [out], settings, {"image": working}):
        convolve_to_beam(working, target, out, opts["convolve_method"])
        products.record("convolve", [out], settings, {"image": working})
        log.info("convolved to the %s beam %.1f\" x %.1f\": %s", surveys[0].upper(), target[0], target[1], out.name)
    return out, working


_SCALED_KEYS = ("diagnostic_max_separation", "transient_max_separation", "edge_margin", "rms_box",
                "postage_stamp_radius")


def scaled_default(key, image):
    """Automatic value of one of ``_SCALED_KEYS`` for ``image`` (see :func:`resolve_scaled_defaults`)."""
    bmaj = image.beam[0] * 3600.0
    if key == "diagnostic_max_separation":
        return round(max(5.0, bmaj / 3.0), 3)
    if key == "transient_max_separation":
        return round(max(45.0, bmaj), 3)
    if key == "postage_stamp_radius":
        return round(max(13.0, 52.0 * bmaj / 60.0), 3)
    pix = image.pixel_scale * 3600.0
    if key == "edge_margin":
        return int(math.ceil(round(max(60.0, 4.0 * bmaj) / pix, 6)))
    ny, nx = image.data.shape
    return int(max(8, min(round(30.0 * bmaj / pix), max(8, min(nx, ny) // 3))))


def _with_defaults(opts, image, *keys):
    """``opts`` with the automatic value of each of ``keys`` that is unset (library calls)."""
    missing = [k for k in keys if opts.get(k) is None]
    return dict(opts, **{k: scaled_default(k, image) for k in missing}) if missing else opts


def resolve_scaled_defaults(opts, image):
    """Fill in the options whose default scales with the beam or the image (None = auto).

    * ``diagnostic_max_separation``: 5" or a third of the beam major axis (the original's
      5" at ASKAP's 15"), whichever is larger;
    * ``transient_max_separation``: the 45" survey beam or the image beam major axis;
    * ``edge_margin`` (px): 1 arcmin (the original's 24 px of 2.5") or 4 beams;
    * ``rms_box`` (px): 30 beams, at most a third of the image's shorter side (so a small
      image still gets a local, not a global, rms), at least 8 px;
    * ``postage_stamp_radius`` (arcmin): 13' or 52 beams.

    Values set by the user are kept; a match radius below a quarter of the beam is
    warned about.  Returns ``(opts, resolved)`` with ``resolved`` the filled-in values.
    """
    opts = dict(opts)
    bmaj = image.beam[0] * 3600.0
    resolved = {key: scaled_default(key, image) for key in _SCALED_KEYS if opts[key] is None}
    opts.update(resolved)
    if resolved:
        log.info("defaults scaled to the %.1f\" beam, %.2f\" pixels and %d x %d image: %s", bmaj,
                 image.pixel_scale * 3600.0, image.data.shape[1], image.data.shape[0],
                 ", ".join("%s = %s" % kv for kv in resolved.items()))
    for key in ("diagnostic_max_separation", "transient_max_separation"):
        if key not in resolved and opts[key] < 0.25 * bmaj:
            _data_warning("%s = %g\" is far below the image beam (%.1f\"): most true counterparts will be "
                          "missed; leave it unset to scale it with the beam" % (key, opts[key], bmaj))
    return opts, resolved


def stage_rms_maps(image, opts, products):
    """Background and rms maps ``<stem>_bkg.fits`` / ``<stem>_rms.fits``.

    Computed (:func:`rms_map`, box ``rms_box``) unless ``rms_image``/``bkg_image`` give
    existing maps (e.g. BANE's), which are checked against the image grid, squeezed to
    2-D and written alongside (non-positive rms values become blank).
    """
    bkg_path, rms_path = products.path("_bkg.fits"), products.path("_rms.fits")
    given = {"rms": _expand(opts["rms_image"], products.stem), "bkg": _expand(opts["bkg_image"], products.stem)}
    for name, path in given.items():
        if path is not None and not path.is_file():
            raise InputError("%s_image %s does not exist" % (name, path))
    settings = {"rms_box": opts["rms_box"], "rms_image": given["rms"], "bkg_image": given["bkg"]}
    inputs = {"image": image.path, "rms_image": given["rms"], "bkg_image": given["bkg"]}
    if products.current("rms", [bkg_path, rms_path], settings, inputs):
        return bkg_path, rms_path, _read_2d(rms_path, image.data.shape, "rms map")
    maps = {}
    if None in given.values():
        maps["bkg"], maps["rms"] = rms_map(image.data, box=opts["rms_box"])
    for name, path in given.items():
        if path is not None:
            maps[name] = _read_2d(path, image.data.shape, "%s map" % name, like_wcs=image.wcs)
            log.info("%s map from %s", name, path)
    bad = ~(maps["rms"] > 0) & np.isfinite(image.data)
    if bad.any():
        _data_warning("rms map has %d pixels <= 0 or blank where the image has data (zero-filled "
                      "regions?); they are blank for source finding and forced photometry" % int(bad.sum()))
        maps["rms"] = np.where(maps["rms"] > 0, maps["rms"], np.nan)
    write_fits_2d(bkg_path, maps["bkg"], image.header)
    write_fits_2d(rms_path, maps["rms"], image.header)
    products.record("rms", [bkg_path, rms_path], settings, inputs)
    return bkg_path, rms_path, np.asarray(maps["rms"], dtype=np.float32)


def stage_source_finding(image, opts, products, bkg_path, rms_path, askap_csv=None, fmt="aegean"):
    """ASKAP components: a supplied catalogue, or Aegean/PyBDSF -> ``<stem>_comp.csv``."""
    if askap_csv is not None:
        log.info("ASKAP catalogue supplied: %s (%s format)", askap_csv, fmt)
        table = _positive_only(read_askap_csv(askap_csv, fmt), opts["find_negative"], Path(askap_csv).name)
        return table, 99.0, 99.0
    out = products.path("_comp.csv")
    finder = opts["sourcefinder"]
    settings_file = opts["%s_settings_config" % finder]
    if settings_file is not None:
        import shutil
        shutil.copyfile(settings_file, products.outdir / ("%s_settings_used.cfg" % finder))
    if finder == "aegean":
        settings, _ = read_aegean_settings(settings_file)
        det, fill = float(settings["seedclip"]), float(settings["floodclip"])
    else:
        det, fill = 5.0, 3.0
    key = {"sourcefinder": finder, "find_negative": opts["find_negative"]}
    inputs = {"image": image.path, "rms": rms_path, "bkg": bkg_path, "settings_file": settings_file}
    if products.current("sources", [out], key, inputs):
        return read_askap_csv(out, "aegean"), det, fill
    start = time.perf_counter()
    if finder == "aegean":
        table = find_sources_aegean(image.path, rms_path, bkg_path, settings_file, opts["find_negative"])
    elif finder == "pybdsf":
        table = find_sources_pybdsf(image.path, image.frequency, settings_file, opts["find_negative"])
    else:
        raise InputError("sourcefinder = selavy needs an existing Selavy catalogue: set "
                         "askap_csv = FILE and askap_csv_format = selavy")
    log.info("%s found %d components in %.1f s", finder, len(table), time.perf_counter() - start)
    if not len(table):
        _data_warning("%s found no source in %s (%s); the run goes on with zero ASKAP sources "
                      "(catalogue sources are still searched)" % (finder, image.path.name, image.plane))
    write_table(table, out, formats=("csv",))
    products.record("sources", [out], key, inputs)
    return table, det, fill


def stage_catalogues(image, opts, products):
    """Trimmed SUMSS/NVSS catalogues ``<stem>_<survey>_comp.csv`` (first = base survey).

    A survey that cannot be obtained (Vizier unreachable and no local file) is left out
    with a warning; with none left the run is source finding only.
    """
    surveys = determine_catalogues(image.dec, opts["sumss_only"], opts["nvss_only"])
    if not surveys:
        raise InputError("no survey covers dec %.2f with sumss_only=%s nvss_only=%s (SUMSS covers "
                         "dec < -30, NVSS dec > -40)" % (image.dec, opts["sumss_only"], opts["nvss_only"]))
    catalogues = {}
    for survey in surveys:
        out = products.path("_%s_comp.csv" % survey)
        local = _expand(opts["%s_csv" % survey], products.stem)
        settings = {"survey": survey, "local": local, "cache_dir": opts["catalogue_cache_dir"],
                    "query": None if local else [round(image.ra, 4), round(image.dec, 4), round(image.radius * 1.05, 4)]}
        inputs = {"image": image.path, "catalogue": local if local is not None and Path(local).is_file() else None}
        if products.current("catalogue_%s" % survey, [out], settings, inputs):
            catalogues[survey] = read_table(out)
            mosaic = catalogues[survey]["mosaic"]
            catalogues[survey]["mosaic"] = np.where(mosaic.notna(), mosaic.astype(str), "")
            continue
        try:
            full = fetch_survey_catalogue(survey, image.ra, image.dec, image.radius * 1.05, local=local,
                                          cache_dir=opts["catalogue_cache_dir"], timeout=opts["vizier_timeout"])
        except CatalogueUnavailableError as exc:
            _data_warning("%s is not available, so it is left out of this run: %s" % (survey.upper(), exc))
            continue
        trimmed = trim_to_footprint(full, image)
        if trimmed.empty:
            message = ("no %s source lies on %s (checked %d catalogue rows)"
                       % (survey.upper(), image.path.name, len(full)))
            if local is not None:
                raise InputError(message + "; is the right catalogue given?")
            _data_warning(message + "; %s is left out" % survey.upper())
            continue
        write_table(trimmed, out, formats=("csv",))
        products.record("catalogue_%s" % survey, [out], settings, inputs)
        catalogues[survey] = trimmed
        log.info("%s: %d of %d sources on the image", survey.upper(), len(trimmed), len(full))
    if not catalogues:
        _data_warning("no survey catalogue could be had for %s: source finding only (its own catalogue is "
                      "written; give --sumss-csv/--nvss-csv FILE, or a catalogue_cache_dir filled while "
                      "online, for the crossmatch)" % image.path.name)
    return catalogues


def stage_outputs(askap, catalogues, xms, image, opts, products):
    """Diagnostic plots, overlays, kvis/DS9 annotations."""
    written = make_diagnostic_plots(xms, askap, catalogues, image, products.path(""))
    if opts["produce_overlays"] and image.extra.get("catalogue_only"):
        log.info("no overlay plots in a catalogue-only run (there are no image pixels)")
    elif opts["produce_overlays"]:
        frames = [(askap.assign(major=askap["a"], minor=askap["b"]), "blue", "ASKAP")]
        for survey, cat in catalogues.items():
            frames.append((cat.assign(major=cat["maj"].fillna(cat["beam_maj"]),
                                      minor=cat["min"].fillna(cat["beam_min"])),
                           "red" if survey == "sumss" else "green", survey.upper()))
        for frame in frames:
            out = products.path("_%s_source_overlay.png" % frame[2].lower())
            written.append(make_overlay(image, [frame], out))
    if opts["write_ann"]:
        written.append(write_ann(products.path("_askap.ann"), askap["ra"], askap["dec"], askap["a"],
                                 askap["b"], askap["pa"], "BLUE"))
        written.append(write_ds9_region(products.path("_askap.reg"), askap["ra"], askap["dec"], askap["a"],
                                        askap["b"], askap["pa"], "blue", askap["name"]))
        for survey, cat in catalogues.items():
            major, minor = cat["maj"].fillna(cat["beam_maj"]), cat["min"].fillna(cat["beam_min"])
            written.append(write_ann(products.path("_%s.ann" % survey), cat["ra"], cat["dec"], major,
                                     minor, cat["pa"], "RED"))
            written.append(write_ds9_region(products.path("_%s.reg" % survey), cat["ra"], cat["dec"],
                                            major, minor, cat["pa"], "red", cat["name"]))
    return written


_TRANSIENT_FILES = {"transients_master.csv": None,
                    "transients_sources_no_askap_match.csv": "noaskapmatch",
                    "transients_askap_sources_no_match_should_be_seen.csv": "nocatalogmatch",
                    "transients_good_matches.csv": "match"}
_NOT_TRANSIENT_KEYS = ("weight_crop_image", "convolved_image", "aegean_settings_config", "pybdsf_settings_config",
                       "selavy_settings_config", "rms_image", "bkg_image", "write_ann", "produce_overlays",
                       "vizier_timeout", "catalogue_cache_dir", "sumss_csv", "nvss_csv", "askap_csv")


def stage_transients(askap, catalogues, image, opts, products, bkg_path, rms_path, non_conv=None,
                     inputs=None):
    """Transient search -> ``transients/`` (master, per type, candidates; CSV+FITS+VOTable)."""
    tdir = products.outdir / "transients"
    master_csv = tdir / "transients_master.csv"
    outputs = [master_csv, tdir / "transients_candidates.csv"] + [tdir / n for n in _TRANSIENT_FILES]
    settings = dict(_pick(opts, "ANALYSIS", "CATALOGUES", "CROSSMATCHING", "TRANSIENTS", exclude=_NOT_TRANSIENT_KEYS),
                    sumss_only=opts["sumss_only"], nvss_only=opts["nvss_only"], surveys=list(catalogues))
    inputs = dict(inputs or {}, image=image.path, rms=rms_path, bkg=bkg_path,
                  bright_sources=opts["bright_sources_csv"])
    if products.current("transients", outputs, settings, inputs):
        return read_table(master_csv)

    def forced(ra, dec):
        return forced_photometry(image.path, ra, dec, image.beam, rms_path, bkg_path, image=image)
    use_forced = opts["forced_photometry"] and not image.extra.get("catalogue_only")
    master = transient_search(askap, catalogues, image, opts, forced=forced if use_forced else None,
                              non_conv=non_conv)
    for name, kind in _TRANSIENT_FILES.items():
        if kind is not None:
            write_table(master[master["transient_type"] == kind], tdir / name)
    write_table(master[master["candidate"]], tdir / "transients_candidates.csv")
    write_table(master, master_csv)
    products.record("transients", outputs, settings, inputs)
    return master


def _database_stage(opts, outdir, image_row, askap, master):
    db = RacsDatabase(database_url(opts, outdir))
    image_id = db.inject(image_row, askap, master)
    log.info("database %r: image id %d (tag %r)", db, image_id, opts["db_tag"])
    return image_id


class _Timer:
    """Wall time per named step, for the run summary (``timings_s``)."""

    def __init__(self):
        self.times = {}

    @contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 3)


def process_image(image_path, config, overwrite=False, askap_csv=None):
    """Run every stage on one image; returns the run summary (also ``<stem>_summary.json``).

    Parameters
    ----------
    image_path : path or None
        ASKAP FITS image (2-D, 3-D or 4-D).  ``None`` with ``askap_csv`` (or
        ``[CATALOGUES] askap_csv``): a catalogue-only run.
    config : Config
        From :func:`load_config` (or :func:`load_parset`) with ``CONFIG_SCHEMA``.
    overwrite : bool
        Redo every stage (also set by ``clobber``); otherwise a stage is redone only when
        its recorded inputs or settings differ (:class:`StageLedger`).
    askap_csv : path, optional
        This image's existing component catalogue (wins over ``[CATALOGUES] askap_csv``).
    """
    start = time.perf_counter()
    opts = flat_options(config)
    if image_path is None:
        askap_csv = Path(askap_csv if askap_csv is not None else opts["askap_csv"] or "")
        if not askap_csv.is_file():
            raise InputError("no image, and the ASKAP catalogue %s does not exist; give an image, or "
                             "--askap-csv FILE for a catalogue-only run" % askap_csv)
    source = Path(image_path) if image_path is not None else Path(askap_csv)
    stem = _image_stem(source)
    overwrite = overwrite or opts["clobber"]
    outdir = output_directory(source, opts)
    products = Products(outdir, stem, overwrite)
    handler = logging.FileHandler(outdir / ("racs_pipeline_%s.log" % time.strftime("%Y%m%d-%H%M%S")))
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
    handler.setLevel(logging.DEBUG)
    handler._racs_run_handler = True
    log.addHandler(handler)
    try:
        return _process_image(None if image_path is None else Path(image_path), config, opts, stem, outdir,
                              products, askap_csv, start)
    except Exception as exc:
        if not isinstance(exc, ToolError):
            log.debug("traceback:", exc_info=True)       # into this run's log file
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _process_image(image_path, config, opts, stem, outdir, products, askap_csv, start):
    timer = _Timer()
    log.info("processing %s -> %s (racs_pipeline %s)", (image_path or askap_csv).name, outdir, __version__)
    if image_path is None:
        image, askap, rms, bkg_path, rms_path, det_sigma, fill_sigma, non_conv_path = \
            _catalogue_only_inputs(Path(askap_csv), opts, timer)
        non_conv = None
        opts, resolved = resolve_scaled_defaults(opts, image)
        askap = prepare_askap_catalogue(askap, image, opts)
    else:
        with timer("image"):
            image, non_conv_path = stage_image(image_path, opts, products)
        log.info("%r, rms %.3g mJy/beam", image, image.rms * 1e3)
        opts, resolved = resolve_scaled_defaults(opts, image)
        with timer("rms_maps"):
            bkg_path, rms_path, rms = stage_rms_maps(image, opts, products)
        askap_csv = askap_csv if askap_csv is not None else _expand(opts["askap_csv"], stem)
        with timer("source_finding"):
            table, det_sigma, fill_sigma = stage_source_finding(image, opts, products, bkg_path, rms_path,
                                                                askap_csv, opts["askap_csv_format"])
        askap = prepare_askap_catalogue(table, image, opts)
    islands_csv = _expand(opts["askap_islands_csv"], stem)
    if islands_csv is not None:
        askap["island_size"] = island_sizes(askap, islands_csv)
    non_conv = None
    if non_conv_path is not None:
        with timer("source_finding"):
            askap, non_conv = _link_non_convolved(askap, non_conv_path, opts, products)
    askap_catalogue = products.path("_askap_catalogue.csv")
    write_table(askap, askap_catalogue)
    with timer("catalogues"):
        raw = stage_catalogues(image, opts, products)
        catalogues = {s: prepare_survey_catalogue(c, s, image, opts, rms) for s, c in raw.items()}
    with timer("crossmatch"):
        xms = {}
        for survey, cat in catalogues.items():
            xms[survey] = diagnostic_crossmatch(askap, cat, survey, image, opts)
            write_table(xms[survey], products.path("_%s_askap_crossmatch_diagnostic.csv" % survey))
    with timer("plots"):
        plots = stage_outputs(askap, catalogues, xms, image, opts, products)
    master = None
    if opts["transients"] and catalogues:
        inputs = {"askap_catalogue": askap_catalogue, "islands": islands_csv,
                  **{"catalogue_%s" % s: products.path("_%s_comp.csv" % s) for s in catalogues}}
        with timer("transients"):
            master = stage_transients(askap, catalogues, image, opts, products, bkg_path, rms_path, non_conv,
                                      inputs)
        master = _postage_stamps(master, image, opts, outdir, timer)
    elif opts["transients"]:
        log.warning("no survey catalogue: the transient search is skipped")
    elif opts["postage_stamps"]:
        log.warning("postage_stamps needs transients = true (the stamps show the transient table)")
    summary = _run_summary(image_path, image, askap, catalogues, xms, master, plots, opts, outdir,
                           det_sigma, fill_sigma, resolved, askap_csv)
    if opts["db_inject"]:
        with timer("database"):
            summary["db_image_id"] = _database_stage(opts, outdir, _image_row(summary, image, config, opts,
                                                                              non_conv_path, master),
                                                     askap, None if master is None else
                                                     master.assign(usertag="N/A", userreason="N/A", checkedby="N/A"))
    _copy_to_website(opts, outdir, summary.get("db_image_id", stem))
    summary["stages"] = dict(products.ledger.status)
    summary["timings_s"] = timer.times
    summary["runtime_s"] = round(time.perf_counter() - start, 2)
    with atomic_output(products.path("_summary.json"), overwrite=True) as stream:
        json.dump(jsonable(summary), stream, indent=2, default=str)
    with atomic_output(outdir / "config_used.in", overwrite=True) as stream:
        stream.write("# racs_pipeline %s: %s\n" % (__version__, " ".join(sys.argv)))
        stream.write("# automatic values: %s\n" % (", ".join("%s = %s" % kv for kv in resolved.items()) or "none"))
        stream.write(_config_as_ini(config))
    log.info("%s done in %.1f s: %s", (image_path or askap_csv).name, summary["runtime_s"],
             {k: summary[k] for k in ("n_askap", "n_candidates") if k in summary})
    return summary


def _postage_stamps(master, image, opts, outdir, timer):
    if not opts["postage_stamps"]:
        return master
    if image.extra.get("catalogue_only"):
        log.warning("no postage stamps in a catalogue-only run (there is no ASKAP image)")
        return master
    selection = master if opts["postage_stamp_selection"] == "all" else master[master["candidate"]]
    with timer("stamps"):
        make_postage_stamps(selection, image.path, {"sumss": opts["sumss_mosaic_dir"], "nvss": opts["nvss_mosaic_dir"]},
                            outdir / "postage-stamps", opts["postage_stamp_radius"],
                            opts["postage_stamp_zscale_contrast"],
                            opts["postage_stamp_ncores"] or max(1, (os.cpu_count() or 2) // 2), image.beam)
    master = master.copy()
    stamped = master["master_name"].isin(selection["master_name"])
    master["ploturl"] = np.where(stamped, "postage-stamps/source_" + master["master_name"].astype(str)
                                 + "_postagestamps.jpg", "N/A")
    return master


def _run_summary(image_path, image, askap, catalogues, xms, master, plots, opts, outdir, det_sigma, fill_sigma,
                 resolved, askap_csv):
    mode = ("catalogue only" if image_path is None else "source finding only" if not catalogues else "full")
    summary = {
        "image": str(image_path) if image_path is not None else None,
        "askap_csv": str(askap_csv) if askap_csv is not None else None, "mode": mode,
        "analysis_image": str(image.path), "plane": image.plane, "date_obs": image.date_obs,
        "checksum": file_digest(image.source_path), "output_dir": str(outdir),
        "version": __version__, "frequency_hz": image.frequency, "ra": image.ra, "dec": image.dec,
        "beam_arcsec": [image.beam[0] * 3600, image.beam[1] * 3600, image.beam[2]],
        "rms_jy": image.rms, "surveys": list(catalogues), "matched_to": matched_to_label(list(catalogues)),
        "aegean_det_sigma": det_sigma, "aegean_fill_sigma": fill_sigma, "resolved_defaults": resolved,
        "diagnostic_max_separation": opts["diagnostic_max_separation"],
        "transient_max_separation": opts["transient_max_separation"],
        "n_askap": len(askap), **{"n_%s" % s: len(c) for s, c in catalogues.items()},
        "n_good_matches": {s: int(x["good"].sum()) for s, x in xms.items()},
        "median_flux_ratio": {s: float(np.nanmedian(x.loc[x["good"], "flux_ratio"])) if x["good"].any()
                              else None for s, x in xms.items()},
        "plots": [str(p.name) for p in plots],
    }
    if master is not None:
        summary["n_master"] = len(master)
        summary["transient_types"] = master["transient_type"].value_counts().to_dict()
        summary["n_candidates"] = int(master["candidate"].sum())
        summary["candidates"] = master.loc[master["candidate"], "transient_class"].value_counts().to_dict()
    return summary


def _image_row(summary, image, config, opts, non_conv_path, master):
    import getpass
    import uuid
    settings = dict(config.as_dict(), resolved_defaults=summary["resolved_defaults"])
    return {"unique_tag": str(uuid.uuid4()), "name": image.source_path.name, "description": opts["db_tag"],
            "ra": image.ra, "dec": image.dec, "runtime": time.strftime("%Y-%m-%d %H:%M:%S"),
            "url": str(Path(image.source_path).resolve()), "url_2": str(non_conv_path) if non_conv_path else "N/A",
            "runby": getpass.getuser(), "number_askap_sources": summary["n_askap"],
            "number_sumss_sources": summary.get("n_sumss", 0), "number_nvss_sources": summary.get("n_nvss", 0),
            "rms": image.rms, "frequency": image.frequency,
            "transients_master_total": 0 if master is None else len(master),
            "number_candidates": summary.get("n_candidates", 0), "matched_to": summary["matched_to"],
            "claimed_by": "Unclaimed", "number_candidates_checked": 0, "output_dir": summary["output_dir"],
            "settings": json.dumps(jsonable(settings), default=str), "checksum": summary["checksum"],
            "plane": image.plane, "date_obs": image.date_obs, "analysis_image": str(image.path),
            "mode": summary["mode"]}


def _copy_to_website(opts, outdir, image_id):
    import shutil
    if not opts["website_media_dir"]:
        return
    media = Path(opts["website_media_dir"]) / str(image_id)
    media.mkdir(parents=True, exist_ok=True)
    for png in outdir.glob("*.png"):
        shutil.copy2(png, media)
    if (outdir / "postage-stamps").is_dir():
        shutil.copytree(outdir / "postage-stamps", media / "stamps", dirs_exist_ok=True)


def _catalogue_only_inputs(askap_csv, opts, timer):
    """Catalogue-only run: the field outlined by the catalogue, its own local rms, no pixels."""
    with timer("image"):
        table = _positive_only(read_askap_csv(askap_csv, opts["askap_csv_format"]), opts["find_negative"],
                               askap_csv.name)
        image = catalogue_footprint(table, askap_csv, opts)
        rms = image.extra["rms_map"]
    log.info("catalogue-only run on %s (%d components): %r; no forced photometry", askap_csv.name, len(table), image)
    return image, table, rms, None, None, 99.0, 99.0, None


def catalogue_footprint(table, path, opts):
    """A stand-in image for a catalogue without its image.

    The field is the convex hull of the components (tangent-plane projection about their
    mean position, pixels of a third of the beam, at most ~1000 across), blank outside;
    the local rms at any point is that of the nearest component (``local_rms``).  The
    beam comes from the catalogue's psf_a/psf_b/psf_pa (Aegean) or ``beam``; the
    frequency from ``frequency``.

    Raises
    ------
    InputError
        Fewer than 3 components, no frequency, or no beam.
    """
    from astropy.wcs import WCS
    from scipy.ndimage import distance_transform_edt
    from scipy.spatial import Delaunay, QhullError, cKDTree
    if len(table) < 3:
        raise InputError("%s has %d component(s); a catalogue-only run needs at least 3 to outline the field"
                         % (path, len(table)))
    if opts["frequency"] is None:
        raise InputError("a catalogue-only run needs the image frequency: give [ANALYSIS] frequency = HZ or "
                         "--frequency 887.5e6 (there is no image header to read it from)")
    beam = _catalogue_beam(table, opts["beam"], path)
    v = _unit_vectors(table["ra"], table["dec"]).mean(axis=0)
    ra0, dec0 = math.degrees(math.atan2(v[1], v[0])) % 360.0, math.degrees(math.atan2(v[2], math.hypot(v[0], v[1])))
    wcs = WCS(naxis=2)
    wcs.wcs.ctype, wcs.wcs.crval = ["RA---TAN", "DEC--TAN"], [ra0, dec0]
    wcs.wcs.crpix, wcs.wcs.cdelt = [1.0, 1.0], [1.0, 1.0]          # pixels = tangent-plane degrees
    x, y = wcs.wcs_world2pix(table["ra"].to_numpy(float), table["dec"].to_numpy(float), 0)
    extent = max(np.abs(x).max(), np.abs(y).max()) + 2 * beam[0]
    scale = max(beam[0] / 3.0, extent / 500.0)
    half = int(math.ceil(extent / scale))
    wcs.wcs.cdelt, wcs.wcs.crpix = [-scale, scale], [half + 1.0, half + 1.0]
    px, py = wcs.wcs_world2pix(table["ra"].to_numpy(float), table["dec"].to_numpy(float), 0)
    gy, gx = np.mgrid[0:2 * half + 1, 0:2 * half + 1]
    grid = np.column_stack([gx.ravel(), gy.ravel()]).astype(float)
    try:
        hull = (Delaunay(np.column_stack([px, py])).find_simplex(grid) >= 0).reshape(gx.shape)
    except QhullError:
        raise InputError("%s: the components lie on a line; a catalogue-only run needs a 2-D field" % path) from None
    tree = cKDTree(np.column_stack([px, py]))
    # the field reaches about one source spacing beyond the outermost components
    spacing = float(np.median(tree.query(np.column_stack([px, py]), k=2)[0][:, 1]))
    inside = distance_transform_edt(~hull) <= spacing
    _, nearest = tree.query(grid)
    local = table["local_rms"].to_numpy(float)[nearest]
    shape = gx.shape
    data = np.where(inside, 0.0, np.nan).astype(np.float32)
    header = wcs.to_header()
    header["BMAJ"], header["BMIN"], header["BPA"] = beam
    header["RESTFRQ"] = float(opts["frequency"])
    image = ImageInfo(Path(path), data, header, wcs, beam, float(opts["frequency"]), ra0, dec0,
                      0.5 * math.hypot(*shape) * scale, scale, "nan", source_path=Path(path), plane="catalogue")
    image.rms = float(np.nanmedian(_valid_rms(table["local_rms"])))
    image.extra["rms_map"] = np.where(inside, local.reshape(shape), np.nan).astype(np.float32)
    image.extra["catalogue_only"] = True
    image.extra["beyond_hull"] = (~hull).astype(np.uint8)      # "edge": beyond the outermost components
    log.info("catalogue footprint: convex hull of %d components grown by their median spacing %.1f\"",
             len(table), spacing * scale * 3600.0)
    return image


def _catalogue_beam(table, option, path):
    if {"psf_a", "psf_b"} <= set(table.columns) and np.isfinite(table["psf_a"]).any():
        pa = table["psf_pa"] if "psf_pa" in table.columns else 0.0
        beam = (float(np.nanmedian(table["psf_a"])) / 3600.0, float(np.nanmedian(table["psf_b"])) / 3600.0,
                float(np.nanmedian(pa)) if np.size(pa) > 1 else 0.0)
        if beam[0] > 0 and beam[1] > 0:
            return beam
    if option:
        return (option[0] / 3600.0, option[1] / 3600.0, float(option[2]) if len(option) > 2 else 0.0)
    raise InputError("%s has no psf_a/psf_b columns; give the restoring beam of its image with "
                     "[ANALYSIS] beam = BMAJ, BMIN, BPA (arcsec, arcsec, deg) or --beam 15,12,0" % path)


def _link_non_convolved(askap, non_conv_path, opts, products):
    """Convolved mode: nearest non-convolved component of every convolved one (non_conv_*)."""
    info = load_image(non_conv_path, boundary_value=opts["boundary_value"])
    sub = Products(products.outdir, products.stem + ".nonconv", products.overwrite, products.ledger, "nonconv:")
    sub_opts = dict(opts, rms_box=None, edge_margin=None, diagnostic_max_separation=None,
                    transient_max_separation=None, postage_stamp_radius=None)
    sub_opts, _ = resolve_scaled_defaults(sub_opts, info)
    sub_opts["rms_box"] = opts["rms_box"] if opts["rms_box"] else sub_opts["rms_box"]
    bkg, rms, _ = stage_rms_maps(info, sub_opts, sub)
    given = _expand(opts["convolved_non_conv_askap_csv"], products.stem)
    table, _, _ = stage_source_finding(info, sub_opts, sub, bkg, rms, given, opts["askap_csv_format"])
    non = prepare_askap_catalogue(table, info, sub_opts)
    islands = _expand(opts["convolved_non_conv_askap_islands_csv"], products.stem)
    if islands is not None:
        non["island_size"] = island_sizes(non, islands)
    idx, sep = crossmatch_nearest(askap["ra"], askap["dec"], non["ra"], non["dec"])
    askap = askap.copy()
    for column in ("name", "int_flux", "err_int_flux", "peak_flux", "local_rms"):
        askap["non_conv_" + column] = np.where(idx >= 0, non[column].to_numpy()[np.maximum(idx, 0)], np.nan) \
            if len(non) else np.nan
    askap["non_conv_d2d"] = sep
    # original "inflated_convolved_flux": fluxes differ by > 25 % although the non-convolved
    # counterpart lies within 2 beams (convolution merged or boosted a source)
    beam = info.beam[0] * 3600.0
    with np.errstate(invalid="ignore", divide="ignore"):
        differ = np.abs(askap["int_flux"] / askap["non_conv_int_flux"] - 1.0) > 0.25
    askap["inflated_convolved_flux"] = differ & (sep <= 2 * beam)
    askap["non_conv_beam"] = beam
    return askap, non


def _config_as_ini(config):
    lines = []
    for section, values in config.as_dict().items():
        lines.append("[%s]" % section)
        for key, value in values.items():
            text = "" if value is None else (str(value).lower() if isinstance(value, bool) else
                                             ", ".join(map(str, value)) if isinstance(value, list) else str(value))
            lines.append(("%s = %s" % (key, text)).rstrip())
        lines.append("")
    return "\n".join(lines)


def process_images(images, config, overwrite=False, askap_csvs=None):
    """Process several images; a failing image is logged and the others continue.

    Any error of one image (bad input, or an unexpected exception, whose traceback goes
    to the debug log) is recorded and the batch goes on.

    Returns
    -------
    summaries : list of dict
    failures : list of (image, message)
    """
    summaries, failures = [], []
    for k, image in enumerate(images):
        label = image if image is not None else askap_csvs[k]
        try:
            summaries.append(process_image(image, config, overwrite,
                                           None if askap_csvs is None else askap_csvs[k]))
        except ToolError as exc:
            if len(images) == 1:
                raise
            log.error("%s failed: %s", label, exc)
            failures.append((str(label), str(exc)))
        except Exception as exc:  # noqa: BLE001 - one broken image must not stop a survey batch
            message = "%s: %s (traceback in the run's log file)" % (type(exc).__name__, exc)
            if len(images) == 1:
                raise ToolError("%s failed: %s" % (label, message)) from exc
            log.error("%s failed: %s", label, message)
            failures.append((str(label), message))
    if len(images) > 1:
        log.info("batch: %d of %d images processed%s", len(summaries), len(images),
                 "; failed: " + "; ".join("%s (%s)" % f for f in failures) if failures else "")
    return summaries, failures


# ===========================================================================
# Command line
# ===========================================================================
class _SetOption(argparse.Action):
    """``--some-key VALUE`` -> ``--set SECTION.some_key=VALUE`` (same precedence)."""

    def __init__(self, option_strings, dest, entry=None, **kwargs):
        self.entry = entry
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "set", None) or [])
        items.append("%s.%s=%s" % (self.entry.section, self.entry.key, values))
        namespace.set = items


_PROCESS_EPILOG = """\
Modes
  IMAGE...                 full run per image: source finding, crossmatch, transients
  --askap-csv FILE, no IMAGE  catalogue-only run (crossmatch, ratios, candidates; no
                           forced photometry): needs --frequency, and --beam unless the
                           catalogue has psf_a/psf_b
  no survey catalogue      (Vizier unreachable, no --sumss-csv/--nvss-csv): source finding
                           only, with a warning; exit 0
Images
  2-D, 3-D or 4-D FITS (RA, Dec first; degenerate FREQ/STOKES axes are squeezed).  A cube
  needs --channel N or --channel mfs; several Stokes planes: --stokes (default I).  Beam:
  the beam table (cubes), BMAJ/BMIN/BPA, AIPS history, or --beam BMAJ,BMIN,BPA (arcsec,
  arcsec, deg).  Frequency: the FREQ axis, then RESTFRQ/RESTFREQ, then --frequency HZ
  (--frequency against a header that has one: the header wins, with a warning, unless
  --force).
Automatic defaults (unset keys scale with the data)
  diagnostic radius max(5", beam/3); transient radius max(45", beam); edge margin
  max(1', 4 beams); rms box 30 beams (<= 1/3 of the image); stamps max(13', 52 beams).
Re-runs
  Each stage records its settings and the SHA-256 of its inputs in
  <output>/racs_stages.json and is redone whenever they change; --overwrite redoes all.
Paths in a parset are relative to the parset's folder; on the command line, to the
current directory.

""" + CATALOGUE_FORMATS_HELP


def _key_flags(parser, sections, title):
    """One ``--key-name VALUE`` flag per schema key of ``sections`` (each overrides the parset)."""
    group = parser.add_argument_group(title)
    for entry in CONFIG_SCHEMA:
        if entry.section not in sections:
            continue
        flag = "--" + entry.key.replace("_", "-")
        extra = {"metavar": "BOOL" if entry.type == "bool" else entry.key.upper()}
        group.add_argument(flag, action=_SetOption, entry=entry, dest="_flag_" + entry.key,
                           default=argparse.SUPPRESS,
                           help=("[%s] %s (%s)" % (entry.section, entry.help, entry.describe_allowed())
                                 ).replace("%", "%%"), **extra)


_PIPELINE_SECTIONS = ("GENERAL", "ANALYSIS", "CATALOGUES", "CROSSMATCHING", "TRANSIENTS", "POSTAGESTAMPS",
                      "DATABASE")


def _process_arguments(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _PROCESS_EPILOG
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="ASKAP FITS images (2-D, 3-D or 4-D); none with --askap-csv: catalogue-only run")
    parser.add_argument("--cite", action="store_true", help="print what to cite and exit")
    parser.add_argument("--force", action="store_true",
                        help="use --frequency even when the image header has a frequency (= --force-frequency)")
    _key_flags(parser, _PIPELINE_SECTIONS, "parset keys (each overrides the parset)")


_WEB_EPILOG = """\
Actions
  migrate      create or upgrade the pipeline's tables and the site's own (users, tags, claims, comments)
  createuser   add a user (--username NAME [--staff]; password from --password-stdin, $RACS_WEB_PASSWORD
               or a prompt); there is no sign-up page
  serve        run the site with waitress on --host/--port (static files by whitenoise) until Ctrl-C
The database is the one `process` writes: --db URL, or [DATABASE] db_url / db_engine = postgresql.
SECRET_KEY: $RACS_WEB_SECRET_KEY, or a 0600 file made once outside the repository (secret_key_file).
"""


def _web_arguments(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _WEB_EPILOG
    parser.add_argument("action", choices=("migrate", "createuser", "serve"), help="what to do")
    parser.add_argument("--db", metavar="URL", help="database URL (sqlite:////path/racs.sqlite or "
                                                     "postgresql+psycopg://user@host:5432/racs)")
    parser.add_argument("--username", help="createuser: the new user's name")
    parser.add_argument("--email", default="", help="createuser: e-mail (optional)")
    parser.add_argument("--staff", action="store_true", help="createuser: may use the staff-only tags and the admin")
    parser.add_argument("--password-stdin", action="store_true", help="createuser: read the password from stdin")
    _key_flags(parser, ("WEB",), "[WEB] keys (each overrides the parset)")


def _web_database(args, opts):
    if args.db:
        return args.db
    if opts["db_url"]:
        return opts["db_url"]
    if opts["db_engine"] == "postgresql":
        return database_url(opts, ".").render_as_string(hide_password=False)
    raise InputError("web: give the database with --db URL (e.g. sqlite:////data/field_results/racs.sqlite, "
                     "the racs.sqlite of a run's output folder) or [DATABASE] db_url")


def _web_password(args):
    import getpass
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if os.environ.get("RACS_WEB_PASSWORD"):
        return os.environ["RACS_WEB_PASSWORD"]
    if not sys.stdin.isatty():
        raise InputError("createuser: no password; give --password-stdin, $RACS_WEB_PASSWORD or run it in a terminal")
    first, second = getpass.getpass("password: "), getpass.getpass("again: ")
    if first != second:
        raise InputError("createuser: the two passwords differ")
    return first


def _web_command(args, config):
    """``web migrate|createuser|serve``: the review website (racs_web, imported only here)."""
    opts = flat_options(config)
    url = _web_database(args, opts)
    try:
        import django  # noqa: F401  (racs_web itself imports Django only when configured)
        import racs_web
        import waitress  # noqa: F401
        import whitenoise  # noqa: F401
    except ImportError as exc:
        raise ToolError("the review website needs Django, waitress and whitenoise (make venv installs them): %s"
                        % exc) from None
    web = racs_web.WebOptions(**{k.key: opts[k.key] for k in CONFIG_SCHEMA if k.section == "WEB"})
    web.secret_key_file = str(web.secret_key_file or "")
    try:
        if args.action == "migrate":
            racs_web.migrate(url, web)
            log.info("database %s: pipeline and website tables are up to date", _hide_password(url))
        elif args.action == "createuser":
            if not args.username:
                raise InputError("createuser needs --username NAME")
            racs_web.create_user(url, args.username, _web_password(args), args.email, args.staff, web)
            log.info("user %s created%s", args.username, " (staff)" if args.staff else "")
        else:
            racs_web.serve(url, web, ready=lambda where: log.info("racs_web on %s (database %s); Ctrl-C stops it",
                                                                  where, _hide_password(url)))
    except racs_web.WebError as exc:
        raise InputError(str(exc)) from None
    return EXIT_OK


def _hide_password(url):
    import sqlalchemy as sa
    return sa.engine.make_url(str(url)).render_as_string(hide_password=True)


def _apply_general(opts, args):
    if args.verbose == 0 and not args.quiet:
        level = getattr(logging, opts["log_level"])
        for handler in log.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(level)
    target = opts["nice"]
    try:
        current = os.nice(0)
        if target > current:
            os.nice(target - current)
    except OSError:
        pass


def _process_command(args, config):
    import warnings
    if args.cite:
        print(CITATION)
        return EXIT_OK
    opts = flat_options(config)
    images, csvs = [Path(p) for p in args.images], None
    if not images:
        if opts["askap_csv"] is None or "{stem}" in str(opts["askap_csv"]):
            raise InputError("no image given: python racs_pipeline.py process -c parset.in IMAGE.fits [...], "
                             "or --askap-csv FILE (and no image) for a catalogue-only run")
        images, csvs = [None], [opts["askap_csv"]]
    _apply_general(opts, args)
    log.info("racs_pipeline %s; configuration %r", __version__, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RacsDataWarning)      # already in the log (_data_warning)
        summaries, failures = process_images(images, config, args.overwrite, csvs)
    if failures:
        log.error("%d of %d images failed: %s", len(failures), len(images), ", ".join(f[0] for f in failures))
        return EXIT_FAILURE
    return EXIT_OK


SUBCOMMANDS = {
    "process": ("process ASKAP images: find sources, crossmatch, search for transients",
                _process_command, _process_arguments),
    "web": ("the review website: migrate the database, create users, serve it",
            _web_command, _web_arguments),
}


def _command_line_keys(argv):
    """Schema keys set on the command line (``--key-name`` or ``--set SECTION.key=``)."""
    flags = {"--" + k.key.replace("_", "-"): k.key for k in CONFIG_SCHEMA}
    keys = set()
    for k, word in enumerate(argv):
        head = word.split("=", 1)[0]
        if head in flags:
            keys.add(flags[head])
        elif head == "--set":
            item = word.split("=", 1)[1] if "=" in word and word.startswith("--set=") else \
                (argv[k + 1] if k + 1 < len(argv) else "")
            keys.add(item.partition("=")[0].partition(".")[2].strip().lower())
    return keys


def resolve_parset_paths(config, parset, keep=()):
    """Make the relative path keys read from ``parset`` relative to the parset's folder.

    Keys in ``keep`` (given on the command line) stay relative to the current directory.
    ``{stem}`` templates are kept.  Modifies and returns ``config``.
    """
    base = Path(parset).resolve().parent
    for entry in config.schema:
        if entry.type != "path" or entry.key.lower() in keep:
            continue
        value = config[entry.section][entry.key]
        if value is not None and not Path(value).is_absolute():
            config._values[entry.section][entry.key] = Path(os.path.normpath(base / value))
    return config


def _path_resolver(keep):
    def validator(config):
        if config.sources:
            resolve_parset_paths(config, config.sources[0], keep)
        return []
    return validator


def load_parset(path=None, overrides=None):
    """Load and validate a parset the way the command line does (paths relative to it).

    Parameters
    ----------
    path : path, optional
        INI/TOML parset; None for the defaults.
    overrides : dict, optional
        ``{(section, key): raw value}``; these stay relative to the current directory.

    Returns
    -------
    Config
    """
    keep = {key.lower() for _, key in (overrides or {})}
    return load_config(CONFIG_SCHEMA, path, overrides, (_path_resolver(keep), _cross_key_checks))


def main(argv=None):
    """Run the command line; return the exit code (0 ok, 1 failure, 2 usage/config error).

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.
    """
    return cli_main(argv, SUBCOMMANDS, CONFIG_SCHEMA, prepare_argv=_bare_booleans,
                    validators=lambda args: (_path_resolver(_command_line_keys(args)), _cross_key_checks))


def _bare_booleans(argv):
    """``--transients`` alone means ``--transients true``; ``--force`` means
    ``--force-frequency true``.

    A boolean flag takes the next word as its value unless that word is another option
    or an image (ends in .fits or names an existing file); so ``--clobber maybe`` is
    still reported as an invalid boolean rather than taken as an image.
    """
    flags = {"--" + k.key.replace("_", "-") for k in CONFIG_SCHEMA if k.type == "bool"}
    out = []
    for k, word in enumerate(argv):
        if word == "--force":
            out += ["--force-frequency", "true"]
            continue
        out.append(word)
        if word in flags:
            nxt = argv[k + 1] if k + 1 < len(argv) else None
            if nxt is None or nxt.startswith("-") or nxt.lower().endswith((".fits", ".fit")) \
                    or Path(nxt).is_file():
                out.append("true")
    return out


if invoked_as_script(globals()):
    sys.exit(main())
adopt_into_session(globals(), "racs_pipeline")
