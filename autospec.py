r"""AutoSpec: automatic 1D spectral extraction of catalogued objects from IFU cubes.

Re-creation of AutoSpec (Griffiths & Conselice 2018, arXiv:1807.05922, Zenodo 1305848;
a-griffiths/AutoSpec, BSD-3) on mpdaf and ``sep``: for every object of a catalogue, a
stamp of the cube (MUSE or any IFU cube with a celestial + spectral WCS), object and sky
masks from segmentation maps (``sep`` on the white light and on extra images resampled
to the cube, or the user's maps), and these spectra, all with propagated variance:

* mask sum (``<P>_TOT``), white-light and IMG-weighted (``<P>_WHITE``, ``<IMG>``),
  circular apertures (``<P>_APER_<r>``), optimal (Horne 1986, ``<P>_OPTIMAL``), local sky;
* cross-correlation extraction: the map :math:`C_i = \sum_\lambda r_\lambda D_{i\lambda}`
  of every spaxel with the reference spectrum, raw and after a polynomial continuum
  subtraction (vectorised over spaxels), the spectra weighted by those maps
  (``CROSS_CORRELATION[_CONTSUB]``) and an iterated version (``CROSS_CORRELATION_ITER``);
* narrow-band images around given wavelength ranges.

Products: one mpdaf ``Source`` FITS per object (``<OUTPUT>/<PRE_OUT><ID>.fits``), a summary
catalogue (ECSV + CSV: status, reason, mask sizes, S/N of every spectrum), a MARZ input
file, optional JPEG plots, a per-run log and the resolved configuration.  ``<P>`` is the
cube's instrument (``MUSE``) or ``PREFIX``; ``_SKYSUB`` is appended with SKY_SUB.

Use
---
As a module::

    import autospec
    result = autospec.run(DATACUBE="cube.fits", CATALOG="catalogue.txt", APER=[1.0, 2.0])
    autospec.main(["run", "--param", "param.py", "--nproc", "2"])

From the shell, in the working directory (``run`` is the default subcommand)::

    python autospec.py [--param param.py] [--nproc N] [--overwrite]

Inside a CASA 6 session: ``execfile("autospec.py")`` defines the functions and runs nothing.

Configuration
-------------
A ``param.py`` (the original's format, parsed and never executed; ``./param.py`` by
default), or the same keys in the ``[autospec]`` section of an INI file (``--config``;
``--write-config FILE`` writes a template); ``--set autospec.KEY=VALUE`` wins over both.
Relative file names are read from the parameter file's directory.
"""
import argparse
import ast
import configparser
import csv
import logging
import os
import re
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
    "ToolError",
    "ConfigError",
    "InputError",
    "OutputExistsError",
    "ConfigKey",
    "Config",
    "load_config",
    "setup_logging",
    "read_param_file",
    "load_autospec_config",
    "validate_autospec",
    "ObjectError",
    "AutoSpecWarning",
    "NoVarianceWarning",
    "OutsideCubeWarning",
    "EXTRACTIONS",
    "Extraction",
    "ExtractionContext",
    "run",
    "process_catalogue",
    "process_object",
    "extract_object",
    "build_state",
    "build_source",
    "read_cube",
    "read_catalogue",
    "read_aligned_image",
    "read_segmentation",
    "segment_image",
    "white_light",
    "legendre_basis",
    "continuum_fit",
    "sum_extraction",
    "weighted_extraction",
    "optimal_extraction",
    "profile_weights",
    "circular_mask",
    "segment_at",
    "combine_masks",
    "narrow_band_image",
    "integrated_snr",
    "image_tag",
    "write_marz",
    "SourceFileWriter",
    "fits_card",
    "make_plots",
    "QUALITY_FLAGS",
    "quality_flags",
    "split_shared_segments",
    "catalogue_origin",
    "read_fsf",
    "psf_profile",
    "psf_extraction",
    "mad_sigma",
    "import_casa",
    "file_digest",
    "jsonable",
    "StageLedger",
    "write_provenance",
    "cli_main",
]
__version__ = "1.0.0"

log = logging.getLogger("autospec")

# ===========================================================================
# Constants
# ===========================================================================
DEFAULT_SUBCOMMAND = "run"

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
# Exceptions and warnings specific to AutoSpec
# ===========================================================================
class ObjectError(ToolError):
    """One catalogue object cannot be extracted (recorded in the summary; the run goes on)."""


class AutoSpecWarning(UserWarning):
    """Base class of AutoSpec's warnings about problems in the user's data."""


class NoVarianceWarning(AutoSpecWarning):
    """The cube has no variance; it is estimated from the sky spaxels of each channel."""


class OutsideCubeWarning(AutoSpecWarning):
    """Catalogue positions fall outside the cube; those rows are marked and skipped."""


# ===========================================================================
# Configuration schema (the only keys accepted; see --write-config)
# ===========================================================================
CONFIG_SCHEMA = (
    ConfigKey("autospec", "MODE", "str", "param", ("param", "cat"), "param: settings from this file; cat: SIZE and REF per object from the catalogue"),
    ConfigKey("autospec", "DATACUBE", "path", None, help="the IFU data cube (param.py alias: CUBE)"),
    ConfigKey("autospec", "CATALOG", "path", None, help="catalogue of objects: ID RA DEC [SIZE REF] as text/CSV, or a FITS/ECSV table such as MUSELET's (param.py alias: CATALOGUE)"),
    ConfigKey("autospec", "REF", "str", "", help="reference extraction for cross-correlation: '' = white light, an aperture radius from APER, or an IMG image"),
    ConfigKey("autospec", "DATA_EXT", "list", [], help="data and optional variance extension (number or name); empty = DATA/STAT detected"),
    ConfigKey("autospec", "APER", "floatlist", [], (0.0, None), "aperture radii to extract (arcsec; at most SIZE / 2)", bounds=True),
    ConfigKey("autospec", "IMG", "list", [], help="additional images (any grid; resampled to the cube's) to weight extractions and build masks"),
    ConfigKey("autospec", "USE_IMGS", "bool", True, help="use the white-light and IMG segmentations when building the object and sky masks (false: SEG maps only)"),
    ConfigKey("autospec", "OBJ_MASK", "str", "intersection", ("intersection", "union"), "combine segmentation maps by intersection or union (empty intersection falls back to the union)"),
    ConfigKey("autospec", "SEG", "list", [], help="user segmentation maps on the cube's spatial grid"),
    ConfigKey("autospec", "OUTPUT", "path", Path("autospec_output"), help="output directory"),
    ConfigKey("autospec", "PRE_OUT", "str", "autospec_", help="prefix of the output Source files (followed by the ID)"),
    ConfigKey("autospec", "SIZE", "float", 5.0, (0.0, None), "full width of sub-cubes and stamps (arcsec); default for missing catalogue sizes", bounds=True),
    ConfigKey("autospec", "XCOR", "bool", True, help="run the cross-correlation extraction"),
    ConfigKey("autospec", "CONT_SUB", "bool", True, help="subtract a polynomial continuum (with XCOR)"),
    ConfigKey("autospec", "CONT_POLY", "int", 5, (0, 20), "polynomial order of the continuum", bounds=True),
    ConfigKey("autospec", "SKY_SUB", "bool", True, help="subtract the sky (see SKY_METHOD); spectra get the suffix _SKYSUB"),
    ConfigKey("autospec", "PLOTS", "bool", True, help="write ID_IMAGES, ID_MASKS, ID_SPECTRA, ID_XCOR .jpg plots per object"),
    ConfigKey("autospec", "OUT_SUB", "bool", False, help="keep sub-cubes in the Source files (large)"),
    ConfigKey("autospec", "OUT_IMG", "bool", True, help="keep images in the Source files"),
    ConfigKey("autospec", "OUT_SEG", "bool", True, help="keep segmentation maps in the Source files"),
    ConfigKey("autospec", "OUT_MASK", "bool", True, help="keep masks in the Source files"),
    ConfigKey("autospec", "OUT_XCOR", "bool", True, help="keep cross-correlation maps in the Source files"),
    ConfigKey("autospec", "OUT_SPEC", "bool", True, help="keep all spectra in the Source files (false: cross-correlation and reference spectra only)"),
    ConfigKey("autospec", "CMAP", "str", "viridis", help="matplotlib colour map of the plots"),
    ConfigKey("autospec", "ORIG_FROM", "str", "", help="origin: detection software (Source header)"),
    ConfigKey("autospec", "ORIG_FROMV", "str", "", help="origin: detection software version"),
    ConfigKey("autospec", "ORIG_CUBE", "str", "", help="origin: cube name"),
    ConfigKey("autospec", "ORIG_CUBEV", "str", "", help="origin: cube version (param.py alias: ORIGN_CUBEV)"),
    ConfigKey("autospec", "WARNINGS", "bool", False, help="show warnings of astropy and mpdaf"),
    # --- beyond the original ------------------------------------------------
    ConfigKey("autospec", "PREFIX", "str", "", help="name prefix of cube products ('' = the cube's INSTRUME keyword, else CUBE)"),
    ConfigKey("autospec", "OPTIMAL", "bool", True, help="also extract the optimal (Horne 1986) variance-weighted spectrum"),
    ConfigKey("autospec", "NB_SEGMENT", "str", "", help="emission-line objects: '' = masks from the white light (and IMG/SEG); 'auto' = also segment a continuum-subtracted narrow-band image of each object's brightest line; a wavelength (Angstrom) = of the line there. The object mask is then that segment and <P>_NB is weighted by the narrow-band image"),
    ConfigKey("autospec", "NB_WIDTH", "float", 6.0, (0.5, None), "half-width (Angstrom) of the NB_SEGMENT narrow band", bounds=True),
    ConfigKey("autospec", "PSF", "bool", True, help="when the cube has FSF keywords (FSFMODE, FSFnnFWA...): also the optimal extraction with the cube's PSF at the position (<P>_PSF: the total flux of a point source)"),
    ConfigKey("autospec", "XCOR_ITER", "int", 2, (1, 10), "cross-correlation passes (>1: iterate with the last spectrum as reference)", bounds=True),
    ConfigKey("autospec", "XCOR_MASK", "float", 0.1, (0.0, 1.0), "cross-correlation mask: spaxels of the reference mask above this fraction of the map's peak", bounds=True),
    ConfigKey("autospec", "NB_RANGES", "list", [], help="narrow-band images: wavelength ranges 'LMIN-LMAX' in Angstrom"),
    ConfigKey("autospec", "DETECT_THRESH", "float", 1.5, (0.0, None), "sep detection threshold (in units of the background rms)", bounds=True),
    ConfigKey("autospec", "DETECT_MINAREA", "int", 5, (1, None), "sep minimum object area (pixels)", bounds=True),
    ConfigKey("autospec", "DEBLEND_CONT", "float", 0.005, (0.0, 1.0), "sep deblending contrast", bounds=True),
    ConfigKey("autospec", "MATCH_RADIUS", "float", 0.5, (0.0, None), "largest distance (arcsec) from the catalogue position to the object's segment", bounds=True),
    ConfigKey("autospec", "SKY_GROW", "float", 0.6, (0.0, None), "sky mask: grow every segment by this distance (arcsec) so PSF wings stay out of the sky", bounds=True),
    ConfigKey("autospec", "SKY_METHOD", "str", "annulus", ("annulus", "local", "global"), "sky spectrum: annulus = per-channel median of the segment-free spaxels in an annulus beyond the grown object mask (robust to extended emission); local = mean of every segment-free stamp spaxel (the original); global = per-channel median of the segment-free spaxels of the whole field"),
    ConfigKey("autospec", "SKY_WIDTH", "float", 1.5, (0.2, None), "width of the sky annulus (arcsec; widened until it holds SKY_MIN spaxels)", bounds=True),
    ConfigKey("autospec", "SKY_MIN", "int", 10, (3, None), "fewest sky spaxels for a sky estimate", bounds=True),
    ConfigKey("autospec", "SPLIT_SHARED", "bool", True, help="split a segment that holds several catalogue positions between them (nearest position, Voronoi) instead of giving each the whole segment; flagged either way"),
    ConfigKey("autospec", "SUMMARY", "str", "summary", help="summary catalogue name in OUTPUT (written as .csv and .ecsv)"),
    ConfigKey("autospec", "MARZ", "str", "marz.fits", help="MARZ input file of all final spectra in OUTPUT ('' = none)"),
)

#: param.py names of the original that map to another key of the schema.
PARAM_ALIASES = {"CUBE": "DATACUBE", "CATALOGUE": "CATALOG", "ORIGN_CUBEV": "ORIG_CUBEV"}
#: values of the original that map to ours.
VALUE_ALIASES = {"OBJ_MASK": {"inter": "intersection", "intersection": "intersection",
                              "union": "union"}}


# ===========================================================================
# param.py files (the original's parameter format), read without executing them
# ===========================================================================
PARAM_FILE_NAME = "param.py"
PARAM_SECTION = "autospec"


def _param_entries():
    entries = {entry.key.upper(): entry for entry in CONFIG_SCHEMA if entry.section == PARAM_SECTION}
    entries.update({alias: entries[key] for alias, key in PARAM_ALIASES.items()})
    return entries


def _normalise_value(entry, value):
    """Map the original's spellings of values (``OBJ_MASK = 'INTER'``) to ours."""
    aliases = VALUE_ALIASES.get(entry.key)
    if aliases and isinstance(value, str):
        return aliases.get(value.strip().lower(), value)
    return value


def _param_assignment(node, path, entries, errors):
    """``(entry, value)`` of one ``NAME = literal`` statement, or None after an error."""
    where = "%s, line %d" % (path, node.lineno)
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)):
        errors.append("%s: only 'NAME = value' assignments are allowed in a parameter file"
                      % where)
        return None
    name = node.targets[0].id
    entry = entries.get(name.upper())
    if entry is None:
        errors.append("%s: unknown parameter %r; known parameters are %s"
                      % (where, name, ", ".join(sorted(entries))))
        return None
    try:
        value = _normalise_value(entry, ast.literal_eval(node.value))
    except ValueError:
        errors.append("%s: %s must be a plain value (string, number, True/False, or a "
                      "tuple of them), not an expression" % (where, name))
        return None
    try:
        entry.parse(value)
    except (ValueError, TypeError):
        errors.append("%s: %s = %r is invalid: expected %s"
                      % (where, name, value, entry.describe_allowed()))
        return None
    return entry, value


def read_param_file(path):
    """Read an AutoSpec ``param.py`` safely (parsed, never executed).

    Parameters
    ----------
    path : str or Path
        A file of ``NAME = value`` lines, as the original's ``param.py``; names are the
        keys of the ``[autospec]`` section of :data:`CONFIG_SCHEMA` (any case) or the
        original's spellings in :data:`PARAM_ALIASES`.

    Returns
    -------
    dict
        ``{("autospec", KEY): value}``, ready as ``overrides`` for :func:`load_config`.

    Raises
    ------
    ConfigError
        Every problem at once, each naming the file, line, parameter, bad value and
        the allowed values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("parameter file %s does not exist; give one with --param FILE "
                          "(see configs/autospec_param.py)" % path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise ConfigError("parameter file %s is not valid Python (%s); fix the line or "
                          "start again from configs/autospec_param.py" % (path, exc)) from None
    entries, errors, values = _param_entries(), [], {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        found = _param_assignment(node, path, entries, errors)
        if found:
            values[(PARAM_SECTION, found[0].key)] = found[1]
    if errors:
        raise ConfigError("invalid parameter file:\n  " + "\n  ".join(errors))
    return values


def _parse_nb_range(text):
    """``'6550-6580'`` (or ``6550:6580``) -> (6550.0, 6580.0); ValueError when malformed."""
    for sep_char in ("-", ":", " "):
        low, found, high = str(text).strip().partition(sep_char)
        if found and low and high:
            low, high = float(low), float(high)
            if high > low:
                return low, high
    raise ValueError(text)


def _parse_ref(text):
    """REF text -> ('white', None) | ('aper', radius) | ('image', TAG)."""
    text = str(text or "").strip()
    if text.lower() in ("", "white", "muse_white"):
        return "white", None
    try:
        return "aper", float(text)
    except ValueError:
        return "image", image_tag(text)


def image_tag(name):
    """Key of an image: the file name without ``.fits``, upper-cased (as the original)."""
    stem = Path(str(name)).name
    for suffix in (".fits.gz", ".fits", ".fit"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem.upper()


def validate_autospec(config):
    """Cross-key checks of an AutoSpec configuration (pass two); list of messages."""
    c, errors = config[PARAM_SECTION], []
    for key in ("DATACUBE", "CATALOG"):
        if c[key] is None:
            errors.append("[autospec] %s is not set; give the %s file in param.py or the INI"
                          % (key, "cube" if key == "DATACUBE" else "catalogue"))
        elif not Path(c[key]).is_file():
            errors.append("[autospec] %s = %s does not exist; check the path (relative paths "
                          "are read from the directory of the parameter file)" % (key, c[key]))
    for key in ("IMG", "SEG"):
        for name in c[key]:
            if not Path(name).is_file():
                errors.append("[autospec] %s file %s does not exist; fix the name or remove it "
                              "from %s" % (key, name, key))
    if c["APER"] and max(c["APER"]) > c["SIZE"] / 2:
        errors.append("[autospec] APER = %s: the largest radius must be at most SIZE / 2 = %g "
                      "arcsec; raise SIZE or use smaller apertures" % (c["APER"], c["SIZE"] / 2))
    bad = [a for a in c["APER"] if not a > 0]
    if bad:
        errors.append("[autospec] APER = %s: aperture radii must be positive arcsec (got %s)" % (c["APER"], bad))
    nb = str(c["NB_SEGMENT"]).strip().lower()
    if nb not in ("", "auto"):
        try:
            float(nb)
        except ValueError:
            errors.append("[autospec] NB_SEGMENT = %r: use '' (off), 'auto' (each object's brightest line) "
                          "or a wavelength in Angstrom" % c["NB_SEGMENT"])
    if len(c["DATA_EXT"]) > 2:
        errors.append("[autospec] DATA_EXT = %s: give the data extension, or (data, variance)"
                      % (c["DATA_EXT"],))
    kind, value = _parse_ref(c["REF"])
    if kind == "aper" and value not in c["APER"]:
        errors.append("[autospec] REF = %r is an aperture radius that is not in APER = %s; "
                      "add it to APER or choose one of them" % (c["REF"], c["APER"]))
    if kind == "image" and value not in [image_tag(n) for n in c["IMG"]]:
        errors.append("[autospec] REF = %r is neither '', an aperture in APER nor an IMG image "
                      "(%s); allowed: '', %s" % (c["REF"], ", ".join(c["IMG"]) or "none given",
                                                  ", ".join([repr(str(a)) for a in c["APER"]]
                                                            + [repr(n) for n in c["IMG"]]) or "''"))
    if not c["USE_IMGS"] and not c["SEG"]:
        errors.append("[autospec] USE_IMGS = False needs at least one SEG map (otherwise there "
                      "is no segmentation to build the masks from)")
    for text in c["NB_RANGES"]:
        try:
            _parse_nb_range(text)
        except ValueError:
            errors.append("[autospec] NB_RANGES entry %r is invalid: expected 'LMIN-LMAX' in "
                          "Angstrom with LMIN < LMAX" % (text,))
    return errors


def _resolve_paths(values, base):
    """Make relative file names of a param/INI file relative to that file's directory."""
    base = Path(base)
    for key in ("DATACUBE", "CATALOG", "OUTPUT"):
        if values.get(key) is not None and not Path(values[key]).is_absolute():
            values[key] = base / values[key]
    for key in ("IMG", "SEG"):
        values[key] = [str(n if Path(n).is_absolute() else base / n) for n in values[key]]


def load_autospec_config(param=None, config=None, overrides=None, validate=False):
    """Configuration from an INI file, then a ``param.py``, then command-line overrides.

    Parameters
    ----------
    param : str or Path, optional
        ``param.py`` file; None uses ``./param.py`` when it exists.
    config : str or Path, optional
        INI (or TOML) file with an ``[autospec]`` section.
    overrides : dict, optional
        ``{(section, key): raw}`` from ``--set``; they win over both files.
    validate : bool
        Also run the cross-key checks of :func:`validate_autospec` (files exist, REF
        matches APER/IMG, ...).  Relative paths are then resolved against the directory
        of the parameter file (else the INI file, else the working directory).

    Raises
    ------
    ConfigError
        Every problem found, each naming the key, the value and what is allowed.
    """
    if param is None and Path(PARAM_FILE_NAME).is_file():
        param = Path(PARAM_FILE_NAME)
        log.info("using %s from the working directory", param.resolve())
    merged = dict(read_param_file(param)) if param is not None else {}
    merged.update(overrides or {})
    loaded = load_config(CONFIG_SCHEMA, config, merged)
    if validate:
        base = Path(param).parent if param else Path(config).parent if config else Path.cwd()
        _resolve_paths(loaded[PARAM_SECTION], base)
        errors = validate_autospec(loaded)
        if errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return loaded


# ===========================================================================
# Pure science functions (numpy only)
# ===========================================================================
def legendre_basis(nwave, degree):
    """Design matrix of Legendre polynomials P_0..P_degree over the channel index.

    Parameters
    ----------
    nwave : int
        Number of channels.
    degree : int
        Polynomial degree (CONT_POLY).

    Returns
    -------
    ndarray, shape (nwave, degree + 1)

    Notes
    -----
    The channel index is mapped onto [-1, 1] so that the least-squares problem stays
    well conditioned up to degree 20 (a plain power basis, as ``numpy.polyfit`` on the
    raw index, loses precision well before that).
    """
    import numpy.polynomial.legendre as legendre
    return legendre.legvander(np.linspace(-1.0, 1.0, nwave), degree)


def continuum_fit(data, degree, basis=None):
    """Least-squares polynomial continuum of every spectrum at once (vectorised).

    Parameters
    ----------
    data : ndarray, shape (nwave, ...)
        Spectra along the first axis (a cube or a stack of spectra); NaNs count as 0
        (the original's convention for masked values).
    degree : int
        Polynomial degree.
    basis : ndarray, shape (nwave, degree + 1), optional
        Precomputed :func:`legendre_basis`.

    Returns
    -------
    ndarray, same shape as ``data``
        The continuum; subtract it for the continuum-subtracted cube.

    Notes
    -----
    With design matrix :math:`B` the coefficients of all spaxels are
    :math:`C = B^{+} D` with the pseudo-inverse :math:`B^{+}`, and the continuum is
    :math:`B C`: two matrix products instead of one fit per spaxel.

    Examples
    --------
    >>> x = np.linspace(0, 1, 50)
    >>> cube = np.stack([1 + 2 * x, 3 - x], axis=1)
    >>> np.allclose(continuum_fit(cube, 1), cube)
    True
    """
    data = np.asarray(data, dtype=np.float64)
    shape = data.shape
    flat = np.nan_to_num(data.reshape(shape[0], -1), nan=0.0, posinf=0.0, neginf=0.0)
    basis = legendre_basis(shape[0], degree) if basis is None else basis
    coeffs = np.linalg.pinv(basis) @ flat
    return (basis @ coeffs).reshape(shape)


def integrated_snr(flux, var):
    """Integrated signal-to-noise ratio :math:`\\sum F / \\sqrt{\\sum \\sigma^2}` of a spectrum.

    Channels where the flux or the variance is not finite are ignored; returns NaN when
    no variance is available.
    """
    flux, var = np.asarray(flux, float), np.asarray(var, float)
    good = np.isfinite(flux) & np.isfinite(var) & (var > 0)
    if not good.any():
        return float("nan")
    return float(flux[good].sum() / np.sqrt(var[good].sum()))


def sum_extraction(data, var, weights, sky_var=None):
    """Weighted sums of spaxels: aperture, mask sum and cross-correlation-weighted spectra.

    Parameters
    ----------
    data, var : ndarray, shape (nwave, npix)
        Sky-subtracted spectra of the stamp's spaxels and their variance (NaN-free).
    weights : ndarray, shape (npix, k)
        One column per spectrum; 0 outside each extraction's mask.
    sky_var : ndarray, shape (nwave,), optional
        Variance of the subtracted sky spectrum (adds :math:`(\\sum w)^2 \\sigma_s^2`).

    Returns
    -------
    flux, variance : ndarray, shape (nwave, k)

    Notes
    -----
    :math:`F = \\sum_i w_i D_i`, :math:`\\sigma_F^2 = \\sum_i w_i^2 V_i + (\\sum_i w_i)^2
    \\sigma_s^2`; all extractions of one object are one matrix product.
    """
    flux = data @ weights
    variance = var @ (weights ** 2)
    if sky_var is not None:
        variance = variance + np.outer(sky_var, weights.sum(axis=0) ** 2)
    return flux, variance


def profile_weights(image, mask):
    """Non-negative profile from a weight image inside a mask, normalised to unit sum.

    Negative values inside the mask are clipped to 0 and everything outside the mask is
    0; a flat profile is used when nothing is left.  The original (through mpdaf)
    instead offset the image so that its minimum inside the mask is 0: that changes the
    shape of the profile and biases the weighted flux low (by ~15 % for the
    cross-correlation map, whose mask edge sits at 10 % of its peak), so it is not copied.
    """
    image = np.nan_to_num(np.asarray(image, float).ravel(), nan=0.0)
    mask = np.asarray(mask, bool).ravel()
    weights = np.zeros_like(image)
    if not mask.any():
        return weights
    weights[mask] = np.clip(image[mask], 0.0, None)
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:
        weights[mask] = 1.0
        total = mask.sum()
    return weights / total


def weighted_extraction(data, var, profile, sky_var=None):
    """Profile-weighted spectrum (no variance weighting) with propagated variance.

    Parameters
    ----------
    data, var : ndarray, shape (nwave, npix)
    profile : ndarray, shape (npix,)
        Unit-sum profile from :func:`profile_weights`.
    sky_var : ndarray, shape (nwave,), optional

    Returns
    -------
    flux, variance : ndarray, shape (nwave,)

    Notes
    -----
    For data :math:`D_i = F P_i + n_i` the estimator
    :math:`\\hat F = \\sum P_i D_i / \\sum P_i^2` is unbiased for the flux inside the
    mask, with :math:`\\sigma^2 = \\sum P_i^2 V_i / (\\sum P_i^2)^2` (plus the sky term).
    The sums run per channel over the spaxels with data in that channel (blank spaxels -
    variance 0 - are left out of numerator and normalisation alike), so a NaN strip
    does not bias the flux low.
    """
    valid = (np.asarray(var) > 0).astype(float)          # channels x spaxels with data
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = valid @ (profile ** 2)                       # per channel: blank spaxels left out
        norm = np.where(norm > 0, norm, np.nan)
        flux = (data * valid) @ profile / norm
        variance = (var * valid) @ (profile ** 2) / norm ** 2
        if sky_var is not None:
            variance = variance + ((valid @ profile) / norm) ** 2 * sky_var
    return flux, variance


def optimal_extraction(data, var, profile, sky_var=None):
    """Optimal (variance-weighted) extraction of Horne (1986, PASP 98, 609).

    Parameters
    ----------
    data, var : ndarray, shape (nwave, npix)
        Sky-subtracted data and variance; channels with non-positive variance get no
        weight.
    profile : ndarray, shape (npix,)
        Unit-sum spatial profile :math:`P_i` (e.g. the white-light image in the mask).
    sky_var : ndarray, shape (nwave,), optional

    Returns
    -------
    flux, variance : ndarray, shape (nwave,)

    Notes
    -----
    :math:`\\hat F_\\lambda = \\sum_i P_i D_{i\\lambda} / V_{i\\lambda} \\big/ \\sum_i
    P_i^2 / V_{i\\lambda}`, :math:`\\sigma^2_\\lambda = 1 / \\sum_i P_i^2 /
    V_{i\\lambda}` (Horne 1986, eqs. 8-9); the minimum-variance unbiased estimator for a
    known profile, identical to mpdaf's ``compute_optimal_spectrum``.
    """
    inv = np.zeros_like(var)
    np.divide(1.0, var, out=inv, where=var > 0)
    weight = inv * profile[None, :]
    denom = weight @ profile
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = (weight * data).sum(axis=1) / denom
        variance = 1.0 / denom
        if sky_var is not None:
            variance = variance + (weight.sum(axis=1) / denom) ** 2 * sky_var
    return flux, variance


def circular_mask(shape, center, radius, step):
    """Boolean disc of ``radius`` (arcsec) at a sub-pixel ``center`` (y, x) of a stamp.

    Uses both pixel steps ``step = (dy, dx)`` (arcsec), so non-square stamps and
    non-square pixels are handled (the original used ``shape[0] / 2`` for both axes).
    """
    yy, xx = np.indices(shape, dtype=float)
    dist2 = ((yy - center[0]) * step[0]) ** 2 + ((xx - center[1]) * step[1]) ** 2
    return dist2 <= radius ** 2


def segment_at(labels, center, radius_pix):
    """Label of the segment at ``center`` (y, x), or of the nearest one within a radius.

    Returns 0 when no segment lies within ``radius_pix`` pixels (an empty segmentation).
    """
    ny, nx = labels.shape
    cy, cx = int(round(center[0])), int(round(center[1]))
    if 0 <= cy < ny and 0 <= cx < nx and labels[cy, cx] > 0:
        return int(labels[cy, cx])
    r = int(np.ceil(radius_pix))
    y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, ny), max(cx - r, 0), min(cx + r + 1, nx)
    window = labels[y0:y1, x0:x1]
    if window.size == 0 or not (window > 0).any():
        return 0
    yy, xx = np.nonzero(window > 0)
    dist2 = (yy + y0 - center[0]) ** 2 + (xx + x0 - center[1]) ** 2
    best = int(np.argmin(dist2))
    return int(window[yy[best], xx[best]]) if dist2[best] <= radius_pix ** 2 else 0


def combine_masks(object_maps, rule):
    """Object mask from per-map object regions: the seed's union/intersection rule.

    Parameters
    ----------
    object_maps : dict
        ``{tag: bool ndarray}`` of the object's region in each segmentation map; empty
        regions (no segment at the position) are left out, never removed while iterating
        (the original mutated its list in the loop and could skip entries).
    rule : {'intersection', 'union'}

    Returns
    -------
    mask : bool ndarray or None
        None when every map is empty.
    used : str
        'intersection', 'union', or 'union (empty intersection)'.
    union, inter : bool ndarray or None
    """
    regions = [m for m in object_maps.values() if m.any()]
    if not regions:
        return None, "none", None, None
    union = np.logical_or.reduce(regions)
    inter = np.logical_and.reduce(regions)
    if rule == "union":
        return union, "union", union, inter
    if inter.any():
        return inter, "intersection", union, inter
    return union, "union (empty intersection)", union, inter


def narrow_band_image(data, wave, low, high):
    """Sum of the channels with ``low <= wavelength <= high`` of a (nwave, ny, nx) array."""
    sel = (wave >= low) & (wave <= high)
    if not sel.any():
        return None
    return np.nansum(data[sel], axis=0)


# ===========================================================================
# I/O: cube, images, catalogue
# ===========================================================================
@dataclass
class CubeData:
    """The cube as plain arrays plus the mpdaf coordinates needed to write products."""

    data: object          # (nwave, ny, nx) float32, NaN where invalid
    var: object           # same, or estimated
    wave: object          # (nwave,) Angstrom
    wcs: object           # mpdaf WCS
    wavecoord: object     # mpdaf WaveCoord
    unit: object
    step: tuple           # (dy, dx) arcsec
    prefix: str
    filename: str
    has_variance: bool


def _ext_value(text):
    text = str(text).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def read_cube(path, data_ext=(), prefix=""):
    """Read an IFU cube with mpdaf: DATA/STAT detected, or ``DATA_EXT`` (data[, var]).

    Parameters
    ----------
    path : str or Path
    data_ext : sequence
        Empty: mpdaf's detection (MUSE DATA/STAT, else the first image HDU).  One entry:
        the data extension (number or name).  Two: data and variance extensions.
    prefix : str
        Name of the products (MUSE_WHITE, ...); '' = the INSTRUME keyword, else CUBE.

    Returns
    -------
    CubeData

    Raises
    ------
    InputError
        When the file or an extension cannot be read.

    Warns
    -----
    NoVarianceWarning
        When the cube has no variance; a per-channel variance is then estimated from the
        robust scatter (1.4826 MAD) of all spaxels of each channel.
    """
    from mpdaf.obj import Cube
    import astropy.units as u
    exts = [_ext_value(e) for e in data_ext]
    if len(exts) == 2:
        _check_extension_shapes(path, exts)
    try:
        cube = Cube(str(path), ext=(tuple(exts) if len(exts) == 2 else exts[0])) if exts \
            else Cube(str(path))
    except (OSError, KeyError, IndexError, ValueError, np.ma.MaskError) as exc:
        raise InputError("cannot read the cube %s (DATA_EXT = %s): %s; give the data and "
                         "variance extensions with DATA_EXT, e.g. (1, 2) or ('DATA', 'STAT') "
                         "(the variance, not an inverse variance or a field map)"
                         % (path, tuple(data_ext), exc)) from None
    data = np.ascontiguousarray(cube.data.filled(np.nan), dtype=np.float32)
    has_var = cube._var is not None
    if has_var:
        var = np.ascontiguousarray(cube.var.filled(np.nan), dtype=np.float32)
    else:
        warnings.warn("cube %s has no variance; estimating it per channel from the robust "
                      "scatter of its segment-free spaxels (flag estimated_variance)" % path,
                      NoVarianceWarning, stacklevel=2)
        var = _estimate_variance(data)
    if not prefix:
        prefix = str(cube.primary_header.get("INSTRUME", "") or cube.data_header.get(
            "INSTRUME", "") or "CUBE").strip().upper().replace(" ", "_") or "CUBE"
    step = tuple(float(s) for s in cube.wcs.get_step(unit=u.arcsec))
    return CubeData(data, var, cube.wave.coord(), cube.wcs, cube.wave, cube.unit,
                    (abs(step[0]), abs(step[1])), prefix, str(path), has_var)


def _check_extension_shapes(path, exts):
    """InputError when the DATA_EXT variance extension is not the data's shape."""
    from astropy.io import fits
    try:
        with fits.open(path) as hdul:
            shapes = [hdul[e].shape for e in exts]
    except (OSError, KeyError, IndexError) as exc:
        raise InputError("cannot read extensions %s of %s: %s; list them with astropy's "
                         "fits.info" % (tuple(exts), path, exc)) from None
    if shapes[0] != shapes[1]:
        raise InputError("DATA_EXT = %s of %s: the variance extension %r has shape %s but the data %s; "
                         "give the data's variance extension (e.g. ('DATA', 'STAT')), or the data "
                         "extension alone to estimate the variance" % (tuple(exts), path, exts[1],
                                                                       shapes[1], shapes[0]))


_MAD_BLOCK = 4_000_000      # values per block of channels in _estimate_variance


def _estimate_variance(data, sky=None, smooth=31):
    """Per-channel variance broadcast to the cube's shape.

    With ``sky`` (a spatial mask of segment-free spaxels, >= 20 of them): each sky spaxel's
    spectrum minus its running median over ``smooth`` channels (removing the smooth glow
    of extended objects that a spatial scatter would count as noise), then the square of
    :func:`mad_sigma` (1.4826 MAD) over the sky spaxels per channel.  On the Abell 478
    minicube this is 0.89x the pipeline's STAT (median over channels); the plain spatial
    scatter is 1.6x (sky spaxels) to 2.4-2.8x (all spaxels) too large.  Without ``sky``: the spatial scatter of
    all spaxels (the provisional estimate of :func:`read_cube`).
    """
    flat = data.reshape(data.shape[0], -1)
    if sky is not None and sky.sum() >= 20:
        from scipy.ndimage import median_filter
        flat = np.asarray(flat[:, sky.ravel()], np.float64)
        flat = flat - median_filter(np.nan_to_num(flat), size=(smooth, 1), mode="mirror")
        flat[~np.isfinite(data.reshape(data.shape[0], -1)[:, sky.ravel()])] = np.nan
    # mad_sigma works in float64 with two temporaries: in blocks of channels its peak memory
    # stays ~100 MB (the whole cube at once: 6x the float32 cube); 1.2x the time of an
    # inline float32 nanmedian (1.0 s vs 0.8 s for 1000 x 200 x 200), once per run
    rows = max(1, _MAD_BLOCK // max(flat.shape[1], 1))
    sigma = np.concatenate([np.atleast_1d(mad_sigma(flat[i:i + rows], axis=1))
                            for i in range(0, flat.shape[0], rows)])
    good = np.isfinite(sigma) & (sigma > 0)
    if good.any() and not good.all():       # a channel without an estimate: its neighbours'
        idx = np.arange(len(sigma))
        sigma = np.interp(idx, idx[good], sigma[good])
    var = np.where(np.isfinite(sigma) & (sigma > 0), sigma ** 2, np.nan).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(var[:, None, None], data.shape))


def white_light(cube):
    """White-light image (sum over wavelength, as the original) and its variance."""
    good = np.isfinite(cube.data)
    image = np.where(good, cube.data, 0).sum(axis=0, dtype=np.float64)
    var = np.where(good & np.isfinite(cube.var), cube.var, 0).sum(axis=0, dtype=np.float64)
    image[~good.any(axis=0)] = np.nan
    return image, var


def read_aligned_image(path, reference_wcs, shape):
    """An IMG image resampled onto the cube's spatial grid (mpdaf ``align_with_image``)."""
    from mpdaf.obj import Image
    try:
        image = Image(str(path))
    except (OSError, KeyError, IndexError, ValueError) as exc:
        raise InputError("cannot read the IMG image %s: %s; give a FITS image with a "
                         "celestial WCS" % (path, exc)) from None
    template = Image(wcs=reference_wcs.copy(), data=np.zeros(shape))
    if not image.wcs.isEqual(template.wcs):
        image = image.align_with_image(template)
    return np.asarray(image.data.filled(np.nan), dtype=np.float64)


def read_segmentation(path, shape):
    """A user segmentation map, used as-is: it must be on the cube's spatial grid."""
    from astropy.io import fits
    try:
        with fits.open(str(path)) as hdul:
            data = next(h.data for h in hdul if h.data is not None and h.data.ndim == 2)
    except (OSError, StopIteration) as exc:
        raise InputError("cannot read the segmentation map %s: %s" % (path, exc)) from None
    if data.shape != tuple(shape):
        raise InputError("segmentation map %s has shape %s but the cube's spatial shape is %s; "
                         "segmentation maps are not resampled: make them on the cube's grid "
                         "(e.g. run SExtractor on an image registered to the white light)"
                         % (path, data.shape, tuple(shape)))
    return np.nan_to_num(np.asarray(data, dtype=np.float64)).astype(np.int32)


def segment_image(image, thresh, minarea, deblend_cont):
    """Segmentation map of an image with ``sep`` (SExtractor as a library).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        NaNs are treated as masked.
    thresh : float
        Detection threshold in units of the background rms (DETECT_THRESH).
    minarea : int
    deblend_cont : float

    Returns
    -------
    ndarray of int32, labels 1..n, 0 = no object

    Notes
    -----
    Bertin & Arnouts (1996, A&AS 117, 393); Barbary (2016, JOSS 1, 58).  The background
    and its rms come from ``sep.Background`` (64-pixel meshes, smaller for small images).
    """
    import sep
    data = np.ascontiguousarray(np.nan_to_num(image, nan=0.0), dtype=np.float64)
    mask = ~np.isfinite(image)
    box = int(max(8, min(64, min(data.shape) // 2)))
    bkg = sep.Background(data, mask=mask, bw=box, bh=box)
    sub = data - bkg.back()
    rms = bkg.globalrms if bkg.globalrms > 0 else float(np.nanstd(sub)) or 1.0
    old = sep.get_extract_pixstack()
    sep.set_extract_pixstack(max(old, data.size * 2))
    try:
        _, seg = sep.extract(sub, thresh, err=rms, mask=mask, minarea=minarea,
                             deblend_cont=deblend_cont, segmentation_map=True)
    except Exception as exc:  # sep raises plain Exception on internal overflows
        raise InputError("sep could not segment the image: %s; raise DETECT_THRESH or "
                         "DETECT_MINAREA" % exc) from None
    return seg.astype(np.int32)


@dataclass
class CatalogueRow:
    """One catalogue object: ID, position (deg), stamp size (arcsec), REF and ORIGIN.

    ``ORIGIN`` is the detection software of the row (a catalogue ORIGIN/FROM column, or
    MUSELET/ORIGIN named in the catalogue's comments or header); '' when unknown.
    """

    ID: int
    RA: float
    DEC: float
    SIZE: float
    REF: str
    ORIGIN: str = ""


#: Catalogue columns: the name used here -> accepted names in a header (any case).
CATALOGUE_COLUMNS = {
    "ID": ("ID", "ID_OBJ"),
    "RA": ("RA", "RA_DEG", "ALPHA"),
    "DEC": ("DEC", "DEC_DEG", "DELTA"),
    "SIZE": ("SIZE",),
    "REF": ("REF",),
    "ORIGIN": ("ORIGIN", "FROM", "ORIGIN_NAME"),
}
#: Catalogue values that mean "missing" (any case); masked table cells are missing too.
MISSING_WORDS = ("", "--", "nan")
_TABLE_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz", ".ecsv", ".vot", ".votable", ".xml")
_POSITIONAL = ("ID", "RA", "DEC", "SIZE", "REF")
_MIN_SIZE_PIX = 3
_MAX_LISTED = 20


def read_catalogue(path, mode="param", size=5.0, ref="", step_arcsec=None, apertures=(),
                   images=None):
    """Read and check a catalogue: text/CSV, or a FITS/ECSV/VOTable table.

    Parameters
    ----------
    path : str or Path
        Text/CSV (whitespace- or comma-separated, ``#`` comments), or a table with suffix
        .fits/.fit[.gz]/.ecsv/.vot/.votable/.xml (read with astropy).  A text file whose
        first non-comment line starts with a non-number is read by column name (see
        :data:`CATALOGUE_COLUMNS`; any case), as is one whose last comment line before
        the data names ID, RA and DEC with one name per data field (``# ID RA DEC Z``);
        otherwise columns are positional: ``ID RA DEC [SIZE REF]``, extra fields
        ignored.  Tables are always read by name.
    mode : {'param', 'cat'}
        'cat': SIZE and REF per row, from the SIZE/REF columns; missing values (``--``,
        ``nan``, empty, masked) and absent columns fall back to ``size`` and ``ref``.
        'param': every row gets ``size`` and ``ref``.
    size : float
        Default full width of the stamps (arcsec), > 0.
    ref : str
        Default reference extraction (see :func:`_parse_ref`).
    step_arcsec : float or tuple of float, optional
        Pixel size of the cube (arcsec; the largest of a tuple is used): SIZE must then
        cover at least 3 pixels.
    apertures : sequence of float
        Aperture radii (arcsec, APER): SIZE must be at least twice the largest of them
        and of a REF aperture radius.
    images : sequence of str, optional
        IMG images (file names or :func:`image_tag` tags) a REF may name; None skips
        that check.

    Returns
    -------
    list of CatalogueRow
        In file order.  ``ORIGIN`` is read from an ORIGIN/FROM/ORIGIN_NAME column, else
        from the catalogue's comments or table header (see :func:`_origin_from_text`).

    Raises
    ------
    InputError
        Every problem at once, each naming the file, line (text) or row (table), column
        and value and saying what is valid: a missing or unreadable ID/RA/DEC, a
        non-integer or duplicated ID, a SIZE that is not positive or too small for the
        pixels or apertures, a REF that is no aperture, white light or IMG image; also
        a bad ``size`` or ``ref`` default.
    """
    path = Path(path)
    if mode not in ("param", "cat"):
        raise InputError("MODE = %r is invalid: use 'param' or 'cat'" % (mode,))
    if not path.is_file():
        raise InputError("catalogue %s does not exist; check CATALOG" % path)
    checks = _row_checks(step_arcsec, apertures, images)
    _check_defaults(path, size, ref, checks)
    if path.name.lower().endswith(_TABLE_SUFFIXES):
        records, columns, origin, errors = _table_records(path)
    else:
        records, columns, origin, errors = _text_records(path)
    if not records and not errors:
        raise InputError("catalogue %s has no objects; expected lines 'ID RA DEC [SIZE REF]' "
                         "or a table with ID, RA and DEC columns" % path)
    _log_defaults(path, mode, columns, size, ref)
    rows, wheres = [], []
    for where, values in records:
        row = _catalogue_row(where, values, mode, size, ref, origin, checks, errors)
        if row is not None:
            rows.append(row)
            wheres.append(where)
    _raise_errors(path, _duplicate_ids(rows, wheres) + errors)
    return rows


def catalogue_origin(rows):
    """The detection software shared by every row (their common ``ORIGIN``), else ''.

    Parameters
    ----------
    rows : sequence of CatalogueRow

    Returns
    -------
    str
        E.g. ``'MUSELET'`` for a MUSELET catalogue; '' when the rows name no origin, or
        different ones, or only some of them name one.  Meant for the Source header FROM
        (``ORIG_FROM or catalogue_origin(rows) or 'AutoSpec'``).
    """
    origins = {getattr(row, "ORIGIN", "") or "" for row in rows}
    return origins.pop() if len(origins) == 1 else ""


# ---------------------------------------------------------------------------
# Checks of SIZE and REF (defaults and per row)
# ---------------------------------------------------------------------------
def _row_checks(step_arcsec, apertures, images):
    """Normalised limits: (pixel size or None, largest APER radius, image tags or None)."""
    step = None
    if step_arcsec is not None:
        step = float(np.max(np.atleast_1d(np.asarray(step_arcsec, dtype=float))))
    largest = max((float(a) for a in apertures), default=0.0)
    tags = None if images is None else sorted({image_tag(n) for n in images})
    return step, largest, tags


def _size_problem(value, ref_radius, checks):
    """Why a SIZE (arcsec) is invalid, or None."""
    step, largest, _ = checks
    if not np.isfinite(value) or value <= 0:
        return "must be a positive number of arcsec"
    if step is not None and value < _MIN_SIZE_PIX * step:
        return ("is smaller than %d pixels of %g arcsec; give SIZE >= %g arcsec"
                % (_MIN_SIZE_PIX, step, _MIN_SIZE_PIX * step))
    radius = max(largest, ref_radius)
    if value < 2 * radius:
        which = "the REF aperture radius" if ref_radius > largest else "the largest APER radius"
        return ("is smaller than twice %s (%g arcsec); give SIZE >= %g arcsec or use smaller "
                "apertures" % (which, radius, 2 * radius))
    return None


def _ref_problem(text, checks):
    """Why a REF is invalid (as a sentence ending in what is valid), or None."""
    kind, value = _parse_ref(text)
    tags = checks[2]
    if kind == "aper" and not (np.isfinite(value) and value > 0):
        return "is not a positive aperture radius (arcsec); " + _valid_refs(tags)
    if kind == "image" and tags is not None and value not in tags:
        return "names no IMG image; " + _valid_refs(tags)
    return None


def _valid_refs(tags):
    images = ", ".join(tags) if tags else "none given in IMG"
    return ("valid: '' / WHITE / MUSE_WHITE (white light), an aperture radius in arcsec "
            "(e.g. 1.5), or an IMG image tag (%s)" % images)


def _ref_radius(text):
    kind, value = _parse_ref(text)
    return value if kind == "aper" and np.isfinite(value) else 0.0


def _check_defaults(path, size, ref, checks):
    """InputError when the SIZE or REF parameter (the defaults of every row) is invalid."""
    problems = []
    try:
        size = float(size)
    except (TypeError, ValueError):
        problems.append("the SIZE parameter %r is not a number of arcsec" % (size,))
    else:
        why = _size_problem(size, _ref_radius(ref), checks)
        if why:
            problems.append("the SIZE parameter (%g arcsec) %s" % (size, why))
    why = _ref_problem(ref, checks)
    if why:
        problems.append("the REF parameter %r %s" % (ref, why))
    if problems:
        raise InputError("cannot use catalogue %s: %s" % (path, "; ".join(problems)))


def _log_defaults(path, mode, columns, size, ref):
    """Say which of SIZE/REF come from the parameters for every object, and why."""
    if mode == "param":
        present = [name for name in ("SIZE", "REF") if name in columns]
        if present:
            log.info("catalogue %s: its %s column%s ignored in MODE='param' (SIZE = %r, "
                     "REF = %r for every object; MODE='cat' reads them)", path,
                     "/".join(present), "s are" if len(present) > 1 else " is", size, ref)
        return
    absent = [name for name in ("SIZE", "REF") if name not in columns]
    if absent:
        log.info("catalogue %s has no %s column%s: %s come%s from the parameters (%s) for "
                 "every object", path, "/".join(absent), "s" if len(absent) > 1 else "",
                 "/".join(absent), "" if len(absent) > 1 else "s",
                 ", ".join("%s = %r" % (n, size if n == "SIZE" else ref) for n in absent))


# ---------------------------------------------------------------------------
# One row: raw values -> CatalogueRow
# ---------------------------------------------------------------------------
def _is_missing(value):
    if value is None or value is np.ma.masked:
        return True
    if isinstance(value, float):
        return bool(np.isnan(value))
    return isinstance(value, str) and value.strip().lower() in MISSING_WORDS


def _parse_id(value):
    """An integer ID from 3, 3.0 or '3'; ValueError otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    number = float(str(value).strip())
    if not (np.isfinite(number) and number == int(number)):
        raise ValueError(value)
    return int(number)


def _parse_angle(value, axis):
    """Degrees from a number (deg) or sexagesimal text (RA in hours unless 'd' is used)."""
    from astropy.coordinates import Angle
    import astropy.units as u
    try:
        degrees = float(value)
    except (TypeError, ValueError):
        text = str(value).strip()
        unit = u.deg if axis == "DEC" or re.search("[d\u00b0]", text, re.I) else u.hourangle
        try:
            degrees = float(Angle(text, unit=unit).deg)
        except u.UnitsError:
            raise ValueError(value) from None
    low, high = (0.0, 360.0) if axis == "RA" else (-90.0, 90.0)
    if not (np.isfinite(degrees) and low <= degrees <= high):
        raise ValueError(value)
    return degrees


_PARSERS = {
    "ID": (_parse_id, "is not an integer; IDs must be whole numbers (e.g. 3 or 3.0)"),
    "RA": (lambda v: _parse_angle(v, "RA"),
           "is not a right ascension: give degrees in [0, 360] or hours such as "
           "04:13:25.5 / 04h13m25.5s (or 63d21m22s)"),
    "DEC": (lambda v: _parse_angle(v, "DEC"),
            "is not a declination: give degrees in [-90, 90] such as 10.465, "
            "+10:27:54 or 10d27m54s"),
    "SIZE": (float, "is not a number: give the stamp width in arcsec, or -- for the SIZE "
             "parameter"),
}


def _catalogue_row(where, values, mode, size, ref, origin, checks, errors):
    """The CatalogueRow of one record ``{name: (column, raw)}``; None after an error."""
    parsed, bad = {}, False
    for name in ("ID", "RA", "DEC"):
        column, raw = values[name]
        if _is_missing(raw):
            errors.append("%s, column %s: the %s is missing (%r); every object needs ID, RA "
                          "and DEC" % (where, column, name, _show(raw)))
            bad = True
            continue
        bad |= not _parse_field(where, name, column, raw, parsed, errors)
    if bad:
        return None
    row_size, row_ref = float(size), str(ref)
    if mode == "cat":
        row_size, row_ref = _row_size_ref(where, parsed["ID"], values, row_size, row_ref,
                                          checks, errors)
    column, raw = values.get("ORIGIN", (None, None))
    row_origin = origin if _is_missing(raw) else str(raw).strip()
    return CatalogueRow(parsed["ID"], parsed["RA"], parsed["DEC"], row_size, row_ref,
                        row_origin)


def _parse_field(where, name, column, raw, parsed, errors):
    parse, why = _PARSERS[name]
    try:
        parsed[name] = parse(raw)
    except (ValueError, TypeError):
        errors.append("%s, column %s: %s %r %s" % (where, column, name, _show(raw), why))
        return False
    return True


def _row_size_ref(where, ident, values, size, ref, checks, errors):
    """SIZE and REF of one row in MODE='cat' (defaults for missing values), checked."""
    ref_column, raw = values.get("REF", (None, None))
    own_ref = not _is_missing(raw)
    if own_ref:
        ref = _ref_text(raw)
        why = _ref_problem(ref, checks)
        if why:
            errors.append("%s (ID %d), column %s: REF %r %s" % (where, ident, ref_column, ref, why))
            return size, ref
    column, raw = values.get("SIZE", (None, None))
    if not _is_missing(raw):
        parsed = {}
        if not _parse_field(where, "SIZE", column, raw, parsed, errors):
            return size, ref
        size, label = parsed["SIZE"], "column %s: SIZE" % column
    elif own_ref:
        label = "column %s: the SIZE parameter" % ref_column
    else:
        return size, ref  # the defaults, checked once by _check_defaults
    why = _size_problem(size, _ref_radius(ref), checks)
    if why:
        errors.append("%s (ID %d), %s = %g arcsec %s" % (where, ident, label, size, why))
    return size, ref


def _ref_text(raw):
    """REF as text: a numeric cell 1.5 -> '1.5' (an aperture radius)."""
    if isinstance(raw, (float, np.floating)):
        return repr(float(raw))
    return str(raw).strip()


def _show(raw):
    return "" if raw is None or raw is np.ma.masked else raw


def _duplicate_ids(rows, wheres):
    """One message listing every duplicated ID with its lines/rows, or none."""
    seen = {}
    for row, where in zip(rows, wheres):
        seen.setdefault(row.ID, []).append(where)
    dups = ["%d (%s)" % (ident, ", ".join(places)) for ident, places in seen.items()
            if len(places) > 1]
    if not dups:
        return []
    return ["duplicate IDs %s; every object needs its own ID (it names its Source file)"
            % "; ".join(dups)]


def _raise_errors(path, errors):
    if not errors:
        return
    if len(errors) == 1:
        joiner = ", " if errors[0].startswith(("line ", "row ")) else ": "
        raise InputError("catalogue %s%s%s" % (path, joiner, errors[0]))
    shown = errors[:_MAX_LISTED]
    more = len(errors) - len(shown)
    raise InputError("catalogue %s has %d problems:\n  %s%s" % (
        path, len(errors), "\n  ".join(shown), "\n  ... and %d more" % more if more else ""))


# ---------------------------------------------------------------------------
# Column names and the origin of a catalogue
# ---------------------------------------------------------------------------
def _match_columns(names):
    """``{ID/RA/DEC/SIZE/REF/ORIGIN: index}`` of the header names that match (any case)."""
    upper = [str(n).strip().upper() for n in names]
    found = {}
    for key, aliases in CATALOGUE_COLUMNS.items():
        for alias in aliases:
            if alias in upper:
                found[key] = upper.index(alias)
                break
    return found


def _missing_columns_error(path, where, names):
    need = "; ".join("%s (or %s)" % (k, ", ".join(CATALOGUE_COLUMNS[k][1:]))
                     for k in ("ID", "RA", "DEC"))
    return ("catalogue %s%s: needs columns %s; it has %s" % (
        path, where, need, ", ".join(map(str, names)) or "none"))


def _origin_from_text(texts):
    """'MUSELET' or 'ORIGIN' when the texts name exactly one of them, else ''.

    MUSELET is matched in any case; ORIGIN only in capitals as a word (the software's
    spelling), so that "origin of the data" does not count.
    """
    joined = "\n".join(texts)
    named = [name for name, pattern, flags in (("MUSELET", r"\bMUSELET\b", re.I),
                                               ("ORIGIN", r"\bORIGIN\b", 0))
             if re.search(pattern, joined, flags)]
    return named[0] if len(named) == 1 else ""


def _log_origin(path, origin, how):
    if origin:
        log.info("catalogue %s: %s; ORIGIN = %r for rows without an ORIGIN value",
                 path, how, origin)


# ---------------------------------------------------------------------------
# Text / CSV catalogues
# ---------------------------------------------------------------------------
def _catalogue_fields(text):
    """Fields of one line: comma-separated (empty fields kept) or whitespace-separated;
    double quotes group a field (``""`` is an empty one, as astropy writes it)."""
    if "," in text:
        return [f.strip() for f in next(csv.reader([text], skipinitialspace=True))]
    return next(csv.reader([text.replace("\t", " ")], delimiter=" ", skipinitialspace=True))


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _text_lines(path):
    """``[(line number, fields)]`` of the data lines and ``[(line number, text)]`` of
    the comments."""
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("catalogue %s is not a UTF-8 text file; give text/CSV, or a table "
                         "with suffix %s" % (path, "/".join(_TABLE_SUFFIXES))) from None
    data, comments = [], []
    for number, line in enumerate(content.splitlines(), 1):
        text, hashed, comment = line.partition("#")
        if hashed and comment.strip():
            comments.append((number, comment.strip()))
        if text.strip():
            data.append((number, _catalogue_fields(text.strip())))
    return data, comments


def _comment_header(data, comments):
    """``(line, names)`` of the last comment before the data when it names ID, RA and DEC
    with one name per field of every data line (``# ID RA DEC Z``), else None (the
    catalogue is then positional, as a ragged ``#ID RA DEC SIZE REF`` one)."""
    before = [c for c in comments if data and c[0] < data[0][0]]
    if not before:
        return None
    number, text = before[-1]
    names = _catalogue_fields(text)
    if (all(len(fields) == len(names) for _, fields in data)
            and not any(_is_number(n) for n in names)
            and {"ID", "RA", "DEC"} <= set(_match_columns(names))):
        return number, names
    return None


def _text_records(path):
    """Records ``(where, {name: (column, raw)})``, found columns, origin and errors."""
    data, comments = _text_lines(path)
    header = None
    first = data[0][1][0] if data else ""
    if data and not (_is_number(first) or _is_missing(first)):
        header, data = data[0], data[1:]
    elif data:
        header = _comment_header(data, comments)
    used = [c for c in comments if header is None or c[0] != header[0]]
    origin = _origin_from_text([text for _, text in used])
    _log_origin(path, origin, "its comments name %s" % origin)
    if header is None:
        records, columns, errors = _positional_records(data)
        return records, columns, origin, errors
    columns = _match_columns(header[1])
    if not {"ID", "RA", "DEC"} <= set(columns):
        raise InputError(_missing_columns_error(path, ", line %d (the header)" % header[0],
                                                header[1]))
    records, errors = [], []
    for number, fields in data:
        if len(fields) != len(header[1]):
            errors.append("line %d: %d values, but the header (line %d) names %d columns "
                          "(%s); write -- for a missing value"
                          % (number, len(fields), header[0], len(header[1]), " ".join(header[1])))
            continue
        records.append(("line %d" % number,
                        {k: (header[1][i], fields[i]) for k, i in columns.items()}))
    return records, columns, origin, errors


def _positional_records(data):
    """Records of a headerless catalogue ``ID RA DEC [SIZE REF]``, its columns, errors."""
    records, errors, width = [], [], 0
    for number, fields in data:
        if len(fields) < 3:
            errors.append("line %d: expected ID RA DEC [SIZE REF], got %r"
                          % (number, " ".join(fields)))
            continue
        width = max(width, min(len(fields), len(_POSITIONAL)))
        records.append(("line %d" % number, {
            name: ("%d (%s)" % (i + 1, name), fields[i])
            for i, name in enumerate(_POSITIONAL) if i < len(fields)}))
    return records, {name: i for i, name in enumerate(_POSITIONAL[:width])}, errors


# ---------------------------------------------------------------------------
# FITS / ECSV / VOTable catalogues (astropy Table)
# ---------------------------------------------------------------------------
def _read_table(path):
    from astropy.table import Table
    try:
        return Table.read(str(path))
    except Exception as exc:  # astropy raises many types for unreadable files
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError("cannot read catalogue %s as a table (%s); give a FITS, ECSV or "
                         "VOTable file, or text/CSV with another suffix" % (path, why)) from None


def _table_origin(meta):
    """The origin named by a table's header: a FROM keyword, else MUSELET/ORIGIN in its
    comments, history or description."""
    upper = {str(k).upper(): v for k, v in meta.items()}
    if str(upper.get("FROM", "")).strip():
        return str(upper["FROM"]).strip(), "its header has FROM = %r" % upper["FROM"]
    texts = []
    for key in ("COMMENTS", "COMMENT", "HISTORY", "DESCRIPTION"):
        value = upper.get(key, [])
        texts.extend([value] if isinstance(value, str) else map(str, value))
    origin = _origin_from_text(texts)
    return origin, "its header comments name %s" % origin


def _unit_factor(column, target):
    """Factor from the column's unit to ``target`` (1 when it has none, or no angle)."""
    import astropy.units as u
    unit = getattr(column, "unit", None)
    if unit is None or column.dtype.kind not in "iuf":
        return 1.0
    try:
        return float(unit.to(target))
    except (u.UnitsError, ValueError, TypeError, AttributeError):
        return 1.0


def _table_value(column, index, factor):
    """One cell as a Python value; None when masked."""
    mask = getattr(column, "mask", None)
    if mask is not None and np.ndim(mask) and bool(mask[index]):
        return None
    value = column[index]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if factor != 1.0 and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = value * factor
    return value


def _table_records(path):
    """Records ``(where, {name: (column, raw)})``, found columns, origin and errors."""
    import astropy.units as u
    table = _read_table(path)
    columns = _match_columns(table.colnames)
    if not {"ID", "RA", "DEC"} <= set(columns):
        raise InputError(_missing_columns_error(path, "", table.colnames))
    origin, how = _table_origin(table.meta)
    _log_origin(path, origin, how)
    targets = {"RA": u.deg, "DEC": u.deg, "SIZE": u.arcsec}
    cols = {k: table.columns[i] for k, i in columns.items()}
    factors = {k: _unit_factor(c, targets[k]) if k in targets else 1.0 for k, c in cols.items()}
    records = [("row %d" % (index + 1),
                {k: (c.name, _table_value(c, index, factors[k])) for k, c in cols.items()})
               for index in range(len(table))]
    return records, columns, origin, []


# ===========================================================================
# Run state: the cube, its images and segmentations, shared by all objects
# ===========================================================================
@dataclass
class RunState:
    """Everything the per-object extraction needs; built once, shared by the workers."""

    cube: CubeData
    params: dict
    images: dict          # tag -> (ny, nx) weight image on the cube grid (white first)
    segmaps: dict         # tag -> (ny, nx) labels from sep (used when USE_IMGS)
    user_segs: dict       # tag -> (ny, nx) labels from SEG files
    basis: object         # Legendre design matrix
    basis_pinv: object
    nb_ranges: list
    outdir: Path
    overwrite: bool
    writer: object = None
    shared: dict = None       # ID -> IDs of the other catalogue positions in its segment
    global_sky: tuple = None  # (spectrum, variance, npix) of SKY_METHOD = global
    fsf: list = None          # mpdaf FSF models of the cube (FSF keywords), or None


def build_state(params, overwrite=False, rows=None):
    """Read the cube, IMG and SEG files and segment every image (once, on the full field).

    Segmenting the whole field once (instead of SExtractor on every stamp, as the
    original) gives a better background estimate and segments that do not depend on
    where a stamp was cut, and it is the main speed-up over the per-object loop.

    Parameters
    ----------
    params : dict
    overwrite : bool
    rows : list of CatalogueRow, optional
        The catalogue: segments holding several positions are found (and split with
        SPLIT_SHARED, see :func:`split_shared_segments`).

    Notes
    -----
    A cube without variance gets a per-channel variance from the robust scatter (1.4826
    MAD) of its segment-free spaxels (objects and their glow left out; the whole-field
    scatter of a galaxy-filled cube is several times too large).
    """
    cube = read_cube(params["DATACUBE"], params["DATA_EXT"], params["PREFIX"])
    shape = cube.data.shape[1:]
    white, _ = white_light(cube)
    images = {cube.prefix + "_WHITE": white}
    for name in params["IMG"]:
        images[image_tag(name)] = read_aligned_image(name, cube.wcs, shape)
    segmaps = {}
    if params["USE_IMGS"]:
        for tag, image in images.items():
            segmaps["SEG_" + tag] = segment_image(image, params["DETECT_THRESH"],
                                                  params["DETECT_MINAREA"], params["DEBLEND_CONT"])
    user_segs = {"SEG_" + image_tag(n): read_segmentation(n, shape) for n in params["SEG"]}
    allsegs = list(segmaps.values()) + list(user_segs.values())
    segfree = np.logical_and.reduce([s == 0 for s in allsegs]) if allsegs else np.ones(shape, bool)
    if not cube.has_variance:
        cube.var = _estimate_variance(cube.data, segfree)
    shared = {}
    if rows:
        radius = params["MATCH_RADIUS"] / min(cube.step)
        positions = {row.ID: object_pixel(cube, row) for row in rows}
        for maps in (segmaps, user_segs):
            for tag in maps:
                maps[tag], found = split_shared_segments(maps[tag], positions, radius, params["SPLIT_SHARED"])
                for ident, others in found.items():
                    shared[ident] = sorted(set(shared.get(ident, ())) | set(others))
        if shared:
            log.info("%d catalogue objects share a segment with another (%s): %s", len(shared),
                     "split between them" if params["SPLIT_SHARED"] else "flagged", sorted(shared))
    global_sky = _global_sky(cube, segfree) if params["SKY_METHOD"] == "global" else None
    fsf = read_fsf(params["DATACUBE"], cube.step) if params["PSF"] else None
    basis = legendre_basis(cube.data.shape[0], params["CONT_POLY"])
    return RunState(cube, params, images, segmaps, user_segs, basis, np.linalg.pinv(basis),
                    [_parse_nb_range(t) for t in params["NB_RANGES"]],
                    Path(params["OUTPUT"]), overwrite, SourceFileWriter(cube, params), shared, global_sky, fsf)


def read_fsf(path, step):
    """The cube's FSF (PSF) models from its FSF keywords (mpdaf ``FSFModel``), or None.

    A mosaic (NFIELDS > 1) has one model per field; their mean profile is used (the
    fields' FWHM differ by ~10 % in the UDF mosaic).
    """
    try:
        from astropy.io import fits
        from mpdaf.MUSE import FSFModel
        with fits.open(path) as hdul:
            header = next((h.header for h in hdul if "FSFMODE" in h.header), None)
        if header is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = FSFModel.read(header, pixstep=float(min(step)))
    except (ImportError, ValueError, KeyError, NotImplementedError, TypeError) as exc:
        log.warning("cannot read the FSF keywords of %s (%s): no PSF extraction", path, exc)
        return None
    models = [m for m in (model if isinstance(model, list) else [model]) if m is not None]
    if models:
        log.info("FSF of %s: %d model(s), FWHM %.2f\" at 7000 A (PSF extraction)", path, len(models),
                 float(np.mean([m.get_fwhm(7000.0) for m in models])))
    return models or None


def psf_profile(models, wave, shape, center, nodes=8):
    """PSF profile (nwave, ny * nx) at ``center`` (y, x) of a stamp: the FSF models' mean
    2-D profile (unit sum over the stamp) at ``nodes`` wavelengths, linearly interpolated
    per channel (the FWHM varies slowly with wavelength)."""
    grid = np.linspace(wave[0], wave[-1], nodes)
    planes = np.array([np.mean([m.get_2darray(lbda, shape, center=center) for m in models], axis=0).ravel()
                       for lbda in grid])
    pos = np.interp(wave, grid, np.arange(nodes))
    i0 = np.minimum(pos.astype(int), nodes - 2)
    f = (pos - i0)[:, None]
    return planes[i0] * (1 - f) + planes[i0 + 1] * f


def psf_extraction(data, var, profile, mask, sky_var=None):
    """Optimal extraction with a per-channel profile (the PSF) inside ``mask``:
    :math:`\\hat F_\\lambda = \\sum_i P_{i\\lambda} D_{i\\lambda} / V_{i\\lambda} \\big/ \\sum_i
    P_{i\\lambda}^2 / V_{i\\lambda}` - with P normalised over the whole stamp, the total flux
    of a point source, whatever part of it the mask holds."""
    weight = np.where((var > 0) & mask.ravel()[None, :], profile / np.where(var > 0, var, 1.0), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = (weight * profile).sum(axis=1)
        flux = (weight * data).sum(axis=1) / denom
        variance = 1.0 / denom
        if sky_var is not None:
            variance = variance + (weight.sum(axis=1) / denom) ** 2 * sky_var
    return flux, variance


def split_shared_segments(labels, positions, radius_pix, split=True):
    """Find segments that hold several catalogue positions; split them between those.

    Parameters
    ----------
    labels : ndarray of int, shape (ny, nx)
    positions : dict
        ID -> (y, x) pixel position.
    radius_pix : float
        Matching radius (:func:`segment_at`).
    split : bool
        Give each position the part of the segment nearer to it than to the others
        (a Voronoi split inside the segment, new labels); False leaves the map as it is.

    Returns
    -------
    labels : ndarray
        The (possibly) relabelled map (a copy when changed).
    shared : dict
        ID -> list of the other IDs found in its segment.
    """
    owners = {}
    for ident, yx in positions.items():
        label = segment_at(labels, yx, radius_pix)
        if label:
            owners.setdefault(label, []).append(ident)
    shared = {i: [j for j in ids if j != i] for ids in owners.values() if len(ids) > 1 for i in ids}
    if not split or not shared:
        return labels, shared
    labels = labels.copy()
    next_label = int(labels.max()) + 1
    for label, ids in owners.items():
        if len(ids) < 2:
            continue
        yy, xx = np.nonzero(labels == label)
        pos = np.array([positions[i] for i in ids])
        nearest = np.argmin((yy[:, None] - pos[None, :, 0]) ** 2 + (xx[:, None] - pos[None, :, 1]) ** 2, axis=1)
        for k in range(1, len(ids)):             # the first position keeps the old label
            labels[yy[nearest == k], xx[nearest == k]] = next_label
            next_label += 1
    return labels, shared


def _global_sky(cube, segfree):
    """Per-channel median of the segment-free spaxels of the field, its variance, count."""
    data = cube.data[:, segfree]
    var = cube.var[:, segfree]
    good = np.isfinite(data) & np.isfinite(var) & (var > 0)
    count = good.sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spec = np.nanmedian(np.where(good, data, np.nan), axis=1)
        svar = np.pi / 2 * np.where(good, var, 0).sum(axis=1) / np.maximum(count, 1) ** 2
    return np.nan_to_num(spec), np.where(count > 0, svar, 0.0), int(segfree.sum())


# ===========================================================================
# Per-object extraction
# ===========================================================================
@dataclass
class Stamp:
    """A cut-out of the cube around one object: flattened spaxels and their geometry."""

    ylo: int
    yhi: int
    xlo: int
    xhi: int
    center: tuple         # (y, x) within the stamp, sub-pixel
    data: object          # (nwave, npix) float64, NaN -> 0
    var: object           # (nwave, npix), invalid -> 0 (no weight)
    valid: object         # (ny, nx) bool: spaxel has data

    @property
    def shape(self):
        return (self.yhi - self.ylo, self.xhi - self.xlo)


def stamp_slices(stamp):
    """(y, x) slices of a stamp in the full cube."""
    return slice(stamp.ylo, stamp.yhi), slice(stamp.xlo, stamp.xhi)


def object_pixel(cube, row):
    """(y, x) pixel position of a catalogue row on the cube grid."""
    yx = cube.wcs.sky2pix([[row.DEC, row.RA]])[0]
    return float(yx[0]), float(yx[1])


def cut_stamp(cube, center, size_arcsec):
    """The stamp of ``size_arcsec`` full width centred on ``center`` (clipped at edges)."""
    ny, nx = cube.data.shape[1:]
    hy = max(1, int(round(size_arcsec / 2.0 / cube.step[0])))
    hx = max(1, int(round(size_arcsec / 2.0 / cube.step[1])))
    cy, cx = int(round(center[0])), int(round(center[1]))
    ylo, yhi, xlo, xhi = max(cy - hy, 0), min(cy + hy + 1, ny), max(cx - hx, 0), min(cx + hx + 1, nx)
    data = cube.data[:, ylo:yhi, xlo:xhi].reshape(cube.data.shape[0], -1).astype(np.float64)
    var = cube.var[:, ylo:yhi, xlo:xhi].reshape(cube.data.shape[0], -1).astype(np.float64)
    bad = ~np.isfinite(data) | ~np.isfinite(var) | (var <= 0)
    valid = (~bad).any(axis=0).reshape(yhi - ylo, xhi - xlo)
    data[bad] = 0.0
    var[bad] = 0.0
    return Stamp(ylo, yhi, xlo, xhi, (center[0] - ylo, center[1] - xlo), data, var, valid)


@dataclass
class ObjectResult:
    """Products of one object: spectra (flux, var), images, masks, summary fields, and the
    :data:`EXTRACTIONS` entry that made each spectrum."""

    spectra: dict
    images: dict
    masks: dict
    segs: dict
    xcor: dict
    info: dict
    subcubes: dict
    families: dict = field(default_factory=dict)   # spectrum name -> EXTRACTIONS key


def _object_masks(state, stamp, radius_pix):
    """Object regions in every segmentation map, the combined masks and the sky mask."""
    sl = (slice(stamp.ylo, stamp.yhi), slice(stamp.xlo, stamp.xhi))
    segs = {tag: seg[sl] for tag, seg in list(state.segmaps.items()) + list(state.user_segs.items())}
    regions, empty = {}, []
    for tag, labels in segs.items():
        label = segment_at(labels, stamp.center, radius_pix)
        regions[tag] = (labels == label) if label else np.zeros(labels.shape, bool)
        if not label:
            empty.append(tag)
    mask, used, union, inter = combine_masks(regions, state.params["OBJ_MASK"])
    sky = np.logical_and.reduce([labels == 0 for labels in segs.values()]) & stamp.valid
    grow = state.params["SKY_GROW"] / min(state.cube.step)
    if grow > 0 and (~sky).any():
        sky = _grow_sky_mask(sky, stamp.valid, grow)
    return segs, mask, used, union, inter, sky, empty


def _grow_sky_mask(sky, valid, radius_pix):
    """Shrink the sky mask: drop spaxels within ``radius_pix`` of any segment."""
    from scipy import ndimage
    distance = ndimage.distance_transform_edt(sky)
    grown = sky & (distance > radius_pix)
    return grown if grown.sum() >= 3 else sky & valid


def _sky(state, stamp, sky_mask, obj_mask, enabled):
    """Sky spectrum per channel and its variance by SKY_METHOD; blank spaxels left out.

    Returns
    -------
    spectrum, variance : ndarray, shape (nwave,)
        Zeros when disabled or impossible.
    info : dict
        ``method``, ``npix`` (spaxels used), ``failed`` (bool), ``mask`` (the spaxels used).

    Notes
    -----
    annulus: the segment-free spaxels (every segment grown by SKY_GROW) at distances from
    the object between the grown object mask's extent and SKY_WIDTH beyond it (widened
    until SKY_MIN spaxels), per-channel median (variance ``pi/2`` x that of the mean);
    local: mean of all segment-free stamp spaxels (the original); global: the field's
    per-channel median (:func:`build_state`).  In every case only the spaxels with data in
    a channel count for that channel, and object and sky spaxels never overlap.
    """
    p = state.params
    nwave = stamp.data.shape[0]
    zeros = np.zeros(nwave)
    info = {"method": p["SKY_METHOD"] if enabled else "none", "npix": 0, "failed": False,
            "mask": np.zeros(sky_mask.shape, bool)}
    if not enabled:
        return zeros, zeros, info
    if p["SKY_METHOD"] == "global":
        info["npix"] = state.global_sky[2]
        return state.global_sky[0], state.global_sky[1], info
    sky_mask = sky_mask & ~obj_mask
    assert not (sky_mask & obj_mask).any(), "sky and object masks overlap"
    if p["SKY_METHOD"] == "annulus":
        clean = sky_mask & _line_free(state, stamp)
        if clean.sum() >= p["SKY_MIN"]:       # leave out spaxels of extended line emission
            sky_mask = clean
        sky_mask = _annulus(sky_mask, obj_mask, stamp.center, state.cube.step, p["SKY_WIDTH"], p["SKY_MIN"])
    info["mask"], info["npix"] = sky_mask, int(sky_mask.sum())
    if sky_mask.sum() < (3 if p["SKY_METHOD"] == "local" else p["SKY_MIN"]):
        info["failed"] = True
        return zeros, zeros, info
    flat = sky_mask.ravel()
    data, var = stamp.data[:, flat], stamp.var[:, flat]
    good = var > 0
    count = good.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if p["SKY_METHOD"] == "local":
            spec = np.where(good, data, 0).sum(axis=1) / count
            svar = np.where(good, var, 0).sum(axis=1) / count ** 2
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                spec = np.nanmedian(np.where(good, data, np.nan), axis=1)
            svar = np.pi / 2 * np.where(good, var, 0).sum(axis=1) / count ** 2
    bad = count == 0
    return np.where(bad, 0.0, spec), np.where(bad, 0.0, svar), info


def _line_free(state, stamp, threshold=5.0):
    """Spaxels of a stamp without significant emission lines: after removing a polynomial
    continuum, no 5-channel run above ``threshold`` sigma (extended line emission - cluster
    filaments, ionised gas - is kept out of the sky)."""
    from scipy.ndimage import uniform_filter1d
    data, var = stamp.data, stamp.var
    resid = data - state.basis @ (state.basis_pinv @ data)
    # 5-channel running sums along wavelength, zero beyond the ends (one call for all spaxels)
    run = 5 * uniform_filter1d(resid, 5, axis=0, mode="constant")
    err = np.sqrt(np.maximum(5 * uniform_filter1d(var, 5, axis=0, mode="constant"), 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(err > 0, run / err, 0.0)
    return (snr.max(axis=0) < threshold).reshape(stamp.shape)


def _annulus(sky_mask, obj_mask, center, step, width, min_pix):
    """Sky spaxels in an annulus beyond the object mask, widened until ``min_pix``."""
    yy, xx = np.indices(sky_mask.shape, dtype=float)
    dist = np.hypot((yy - center[0]) * step[0], (xx - center[1]) * step[1])
    inner = float(dist[obj_mask].max()) if obj_mask.any() else 0.0
    outer = inner + width
    while True:
        ring = sky_mask & (dist > inner) & (dist <= outer)
        if ring.sum() >= min_pix or outer > dist.max():
            return ring if ring.sum() >= min_pix else sky_mask
        outer += width / 2


def _resolve_reference(kind, value, prefix, images_available, apertures, suffix):
    """Name of the reference spectrum for a parsed REF; ObjectError when unknown."""
    if kind == "white":
        return prefix + "_WHITE" + suffix
    if kind == "aper":
        return "%s_APER_%.1f%s" % (prefix, value, suffix)
    if value not in images_available:
        raise ObjectError("REF %r is not an IMG image; allowed: '', an aperture radius, or "
                          "one of %s" % (value, ", ".join(images_available) or "no images"))
    return value + suffix


@dataclass
class ExtractionContext:
    """One object's stamp, masks, sky and reference, built by :func:`extract_object` and
    handed to every entry of :data:`EXTRACTIONS` in turn.

    Arrays are over the stamp's spaxels, flattened: ``data`` and ``var`` have shape
    (nwave, npix) with blank values 0 (variance 0 = no weight); ``mask`` (ny, nx) is the
    object mask; ``sky_var`` is None without sky subtraction.  ``spectra`` holds what
    the entries before this one made (the reference spectrum ``ref_name`` among them,
    for the cross-correlation).  An entry may add to ``masks``, ``maps`` (images of the
    Source file) and ``fractions`` (aperture fractions inside the cube).
    ``segs`` are the stamp's segmentation maps.
    """

    state: RunState
    row: CatalogueRow
    stamp: Stamp
    data: object          # (nwave, npix) sky-subtracted when suffix is "_SKYSUB"
    mask: object          # (ny, nx) bool
    sky_spec: object      # (nwave,) the subtracted sky (zeros when none)
    sky_var: object       # (nwave,) its variance, or None
    suffix: str           # "_SKYSUB" or ""
    prefix: str           # MUSE, CUBE or PREFIX
    images: dict          # tag -> (ny, nx) stamp of the white light, IMG images, NB_LINE
    nb: dict              # line_segment() result, or None
    apertures: list       # radii (arcsec): APER and an aperture REF
    ref_name: str         # name of the reference spectrum
    ref_mask: object      # (ny, nx) bool mask of the reference extraction
    masks: dict           # name -> (ny, nx) bool: MASK_OBJ, MASK_SKY, ...
    segs: dict            # tag -> (ny, nx) segmentation labels of the stamp
    spectra: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)
    fractions: list = field(default_factory=list)

    @property
    def var(self):
        """(nwave, npix) variance of the stamp's spaxels (0 = no data)."""
        return self.stamp.var


def extract_object(state, row):
    """All extractions of one catalogue object; the heart of AutoSpec.

    Parameters
    ----------
    state : RunState
    row : CatalogueRow

    Returns
    -------
    ObjectResult
        ``families`` maps every spectrum to the :data:`EXTRACTIONS` entry that made it.

    Raises
    ------
    ObjectError
        When the position lies outside the cube or the REF of the row is unknown.

    Notes
    -----
    Steps (Griffiths & Conselice 2018, sect. 2): object and sky masks from the
    segmentation maps; the sky spectrum (SKY_METHOD); then every entry of
    :data:`EXTRACTIONS` in order - mask sum, profile-weighted (white light and every IMG
    image), narrow-band weighted, optimal (Horne 1986), PSF, aperture spectra, and the
    reference spectrum's cross-correlation map :math:`C_i = \\sum_\\lambda r_\\lambda
    D_{i\\lambda}` with and without polynomial continuum subtraction with the spectra of
    the cube weighted by each map inside the reference (or cross-correlation) mask,
    optionally iterated with the last spectrum as the new reference.
    """
    ctx, info, notes, flags = _prepare_extraction(state, row)
    families = {}
    for key, extraction in EXTRACTIONS.items():
        for name, spectrum in extraction.function(ctx).items():
            ctx.spectra[name] = spectrum
            families[name] = key
    return _finish_extraction(ctx, info, notes, flags, families)


def _prepare_extraction(state, row):
    """Stamp, object and sky masks, sky spectrum and reference of one object.

    Returns ``(ExtractionContext, info, notes, flags)``; raises ObjectError when the
    position is outside the cube, the mask is empty or REF is unknown.
    """
    p, cube = state.params, state.cube
    center = object_pixel(cube, row)
    ny, nx = cube.data.shape[1:]
    if not (-0.5 <= center[0] < ny - 0.5 and -0.5 <= center[1] < nx - 0.5):
        raise ObjectError("position RA=%.6f DEC=%.6f lies outside the cube (pixel x=%.1f, "
                          "y=%.1f; cube %d x %d)" % (row.RA, row.DEC, center[1], center[0], nx, ny))
    stamp = cut_stamp(cube, center, row.SIZE)
    radius_pix = p["MATCH_RADIUS"] / min(cube.step)
    segs, mask, used, union, inter, sky_mask, empty = _object_masks(state, stamp, radius_pix)
    info = {"EMPTY_SEG": ",".join(empty), "MASK_USED": used}
    notes = []
    if empty:
        notes.append("no segment at the position in %s" % ", ".join(empty))
    flags = []
    nb = line_segment(state, stamp, radius_pix) if p["NB_SEGMENT"] else None
    if nb is not None:
        mask, info["MASK_USED"] = nb["mask"], "narrow band %.1f A" % nb["wave"]
        notes.append("mask from the narrow-band image of the line at %.1f A" % nb["wave"])
    if mask is None:
        radius = min(p["APER"]) if p["APER"] else 1.0
        mask = circular_mask(stamp.shape, stamp.center, radius, cube.step) & stamp.valid
        info["MASK_USED"] = "circle r=%.1f (empty segmentation)" % radius
        notes.append("all segmentations empty at the position; used a circular mask of "
                     "radius %.1f arcsec" % radius)
        flags.append("fallback_mask")
    mask &= stamp.valid
    if not mask.any():
        raise ObjectError("the object mask has no valid spaxel (the stamp is empty or NaN)")
    grow = p["SKY_GROW"] / min(cube.step)
    sky_mask = sky_mask & ~(_grow(mask, grow) if grow > 0 else mask)   # never the object's own light
    sky_spec, sky_var, sky = _sky(state, stamp, sky_mask, mask, p["SKY_SUB"])
    if sky["failed"]:
        notes.append("fewer than %d sky spaxels; no sky subtraction" % p["SKY_MIN"])
    suffix = "_SKYSUB" if p["SKY_SUB"] and not sky["failed"] else ""
    if p["SKY_METHOD"] != "global" or not suffix:
        sky_mask = sky["mask"] if suffix else sky_mask
    info.update(SKY_METHOD=sky["method"] if suffix else "none",
                MASK_OBJ_NPIX=int(mask.sum()), MASK_SKY_NPIX=int(sky_mask.sum()),
                MASK_UNION_NPIX=int(union.sum()) if union is not None else 0,
                MASK_INTER_NPIX=int(inter.sum()) if inter is not None else 0)
    masks = {"MASK_OBJ": mask, "MASK_SKY": sky_mask}
    if union is not None:
        masks["MASK_UNION"], masks["MASK_INTER"] = union, inter
    sl = stamp_slices(stamp)
    images = {tag: image[sl] for tag, image in state.images.items()}
    if nb is not None:
        images["NB_LINE"] = nb["image"]
    kind, value = _parse_ref(row.REF)
    apertures = sorted(set(p["APER"]) | ({value} if kind == "aper" else set()))
    ref_mask = mask
    if kind == "aper":
        ref_mask = circular_mask(stamp.shape, stamp.center, value, cube.step) & stamp.valid
        masks["MASK_APER_%.1f_OBJ" % value] = ref_mask
        masks["MASK_APER_%.1f_SKY" % value] = ~ref_mask & stamp.valid
    ref_name = _resolve_reference(kind, value, cube.prefix, list(images), apertures, suffix)
    info["REF_SPECTRUM"] = ref_name
    ctx = ExtractionContext(
        state, row, stamp, stamp.data - sky_spec[:, None] if suffix else stamp.data, mask,
        sky_spec if suffix else np.zeros_like(sky_spec), sky_var if suffix else None, suffix,
        cube.prefix, images, nb, apertures, ref_name, ref_mask, masks, segs)
    return ctx, info, notes, flags


def _finish_extraction(ctx, info, notes, flags, families):
    """Narrow-band images, sub-cubes, final spectrum and quality flags: the ObjectResult."""
    state, stamp, p, cube = ctx.state, ctx.stamp, ctx.state.params, ctx.state.cube
    images = ctx.images
    if state.nb_ranges:
        nb_source = ctx.data
        if p["CONT_SUB"]:
            nb_source = ctx.data - state.basis @ (state.basis_pinv @ ctx.data)
        for low, high in state.nb_ranges:
            sel = (cube.wave >= low) & (cube.wave <= high)
            if sel.any():
                images["NB_%d_%d" % (low, high)] = nb_source[sel].sum(axis=0).reshape(stamp.shape)
    subcubes = {}
    if p["OUT_SUB"]:
        subcubes[ctx.prefix] = stamp_slices(stamp)
        if "_CONTSUB_CUBE" in ctx.maps:   # continuum-subtracted cube, variance unchanged
            subcubes[ctx.prefix + "_CONTSUB"] = ctx.maps.pop("_CONTSUB_CUBE").reshape(
                (-1,) + stamp.shape)
    info["APER_FRACTION"] = float(min(ctx.fractions)) if ctx.fractions else 1.0
    info["FINAL_SPECTRUM"] = _final_spectrum_name(ctx.spectra, ctx.ref_name, ctx.suffix)
    shared = state.shared.get(ctx.row.ID, ())
    info["SHARED_SEGMENT"] = ",".join(str(i) for i in shared)
    flags += quality_flags(state, stamp, ctx.spectra, info, ctx.mask,
                           ctx.sky_spec if ctx.suffix else None, ctx.sky_var, ctx.prefix, ctx.suffix)
    if shared:
        flags.append("shared_segment")
    info["FLAGS"] = ",".join(dict.fromkeys(flags))
    if flags:
        notes.append("flags: " + info["FLAGS"])
    info["NOTES"] = "; ".join(notes)
    return ObjectResult(ctx.spectra, images, ctx.masks, ctx.segs, ctx.maps, info,
                        {"slices": subcubes, "stamp": stamp}, families)


# ---------------------------------------------------------------------------
# The registered extractions: each returns {spectrum name: (flux, variance)}
# ---------------------------------------------------------------------------
def _extract_sky(ctx):
    """The subtracted sky spectrum itself (``<P>_SKY``); nothing without sky subtraction."""
    return {ctx.prefix + "_SKY": (ctx.sky_spec, ctx.sky_var)} if ctx.suffix else {}


def _extract_total(ctx):
    """Sum of the object-mask spaxels (``<P>_TOT``)."""
    flux, var = sum_extraction(ctx.data, ctx.var, ctx.mask.ravel().astype(float)[:, None], ctx.sky_var)
    return {ctx.prefix + "_TOT" + ctx.suffix: (flux[:, 0], var[:, 0])}


def _extract_weighted(ctx):
    """Profile-weighted by the white light and every IMG image (``<P>_WHITE``, ``<IMG>``)."""
    return {tag + ctx.suffix: weighted_extraction(ctx.data, ctx.var,
                                                  profile_weights(ctx.images[tag], ctx.mask), ctx.sky_var)
            for tag in ctx.state.images}


def _extract_narrow_band(ctx):
    """Weighted by the narrow-band image of the object's line (``<P>_NB``, NB_SEGMENT)."""
    if ctx.nb is None:
        return {}
    profile = profile_weights(ctx.nb["image"], ctx.mask)
    return {ctx.prefix + "_NB" + ctx.suffix: weighted_extraction(ctx.data, ctx.var, profile, ctx.sky_var)}


def _extract_optimal(ctx):
    """Horne (1986) optimal extraction with the white-light profile (``<P>_OPTIMAL``)."""
    if not ctx.state.params["OPTIMAL"]:
        return {}
    profile = profile_weights(ctx.images[ctx.prefix + "_WHITE"], ctx.mask)
    return {ctx.prefix + "_OPTIMAL" + ctx.suffix: optimal_extraction(ctx.data, ctx.var, profile, ctx.sky_var)}


def _extract_psf(ctx):
    """Optimal extraction with the cube's FSF at the position (``<P>_PSF``, PSF)."""
    state, stamp, cube = ctx.state, ctx.stamp, ctx.state.cube
    if not state.fsf:
        return {}
    fwhm = float(np.max([m.get_fwhm(cube.wave[len(cube.wave) // 2]) for m in state.fsf]))
    disc = circular_mask(stamp.shape, stamp.center, 1.5 * fwhm, cube.step) & stamp.valid
    profile = psf_profile(state.fsf, cube.wave, stamp.shape, stamp.center)
    return {ctx.prefix + "_PSF" + ctx.suffix: psf_extraction(ctx.data, ctx.var, profile, disc, ctx.sky_var)}


def _extract_apertures(ctx):
    """Sums within circular apertures (``<P>_APER_<r>``); records the aperture fractions."""
    stamp, step = ctx.stamp, ctx.state.cube.step
    spectra = {}
    for radius in ctx.apertures:
        disc = circular_mask(stamp.shape, stamp.center, radius, step) & stamp.valid
        ctx.fractions.append(disc.sum() / max(_disc_pixels(stamp.center, radius, step), 1))
        flux, var = sum_extraction(ctx.data, ctx.var, disc.ravel().astype(float)[:, None], ctx.sky_var)
        spectra["%s_APER_%.1f%s" % (ctx.prefix, radius, ctx.suffix)] = (flux[:, 0], var[:, 0])
    return spectra


def _extract_cross_correlation(ctx):
    """Cross-correlation weighted spectra (``CROSS_CORRELATION[_CONTSUB|_ITER]``, XCOR)."""
    if not ctx.state.params["XCOR"]:
        return {}
    if ctx.ref_name not in ctx.spectra:
        raise ObjectError("the reference spectrum %s was not extracted (EXTRACTIONS lists the "
                          "cross-correlation before the extraction of its reference)" % ctx.ref_name)
    spectra, ctx.maps, ctx.masks["MASK_XCOR"] = _cross_correlation(
        ctx.state, ctx.stamp, ctx.data, ctx.sky_var, ctx.spectra[ctx.ref_name], ctx.ref_name,
        ctx.ref_mask, ctx.suffix)
    return spectra


def line_segment(state, stamp, radius_pix, threshold=3.0):
    """Object segment on a continuum-subtracted narrow-band image of the object's line.

    The line is at NB_SEGMENT (Angstrom) or, with 'auto', at the most significant
    5-channel emission peak of the continuum-subtracted spectrum of a 1" disc at the
    position.  The image sums +-NB_WIDTH around it; the segment is the connected region
    above ``threshold`` sigma (its propagated noise) at, or within ``radius_pix`` of, the
    position.  None when there is no such region.
    """
    from scipy import ndimage
    p, cube = state.params, state.cube
    contsub = stamp.data - state.basis @ (state.basis_pinv @ stamp.data)
    if str(p["NB_SEGMENT"]).strip().lower() == "auto":
        disc = circular_mask(stamp.shape, stamp.center, 1.0, cube.step) & stamp.valid
        if not disc.any():
            return None
        w = disc.ravel().astype(float)
        spec, var = contsub @ w, stamp.var @ w
        snr = _boxcar(spec, 5) / np.sqrt(np.where(var > 0, var, np.inf) / 5)
        wave = float(cube.wave[int(np.argmax(snr))])
    else:
        wave = float(p["NB_SEGMENT"])
    sel = np.abs(cube.wave - wave) <= p["NB_WIDTH"]
    if not sel.any():
        return None
    image = contsub[sel].sum(axis=0).reshape(stamp.shape)
    noise = np.sqrt(stamp.var[sel].sum(axis=0)).reshape(stamp.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        labels, _ = ndimage.label(np.where(noise > 0, image / noise, 0.0) > threshold)
    label = segment_at(labels, stamp.center, radius_pix)
    if not label:
        return None
    return {"mask": (labels == label) & stamp.valid, "image": image, "wave": wave}


def _grow(mask, radius_pix):
    """``mask`` grown by ``radius_pix`` pixels (Euclidean)."""
    from scipy import ndimage
    return ndimage.distance_transform_edt(~mask) <= radius_pix


def _disc_pixels(center, radius, step):
    """Pixels of a disc of ``radius`` arcsec at ``center`` on an unbounded grid (the
    denominator of the aperture fraction inside the cube)."""
    ry, rx = int(np.ceil(radius / step[0])) + 2, int(np.ceil(radius / step[1])) + 2
    cy, cx = int(round(center[0])), int(round(center[1]))
    yy, xx = np.mgrid[cy - ry:cy + ry + 1, cx - rx:cx + rx + 1].astype(float)
    return int((((yy - center[0]) * step[0]) ** 2 + ((xx - center[1]) * step[1]) ** 2 <= radius ** 2).sum())


#: quality flags of an extraction (summary column FLAGS, FLAG_<NAME> booleans, Source header)
QUALITY_FLAGS = {
    "inverted_line": "the final spectrum has a significant negative line (S/N < -5) where the "
                     "spectrum before sky subtraction has none: the sky subtracted a line",
    "negative_flux": "the final spectrum's integrated flux is negative at more than 3 sigma",
    "sky_brighter": "the sky (per spaxel) is brighter than the object's mean spaxel",
    "sky_lines": "the sky spectrum has significant emission lines (S/N > 5 in 3+ channels after "
                 "continuum removal): extended line emission in the sky region",
    "shared_segment": "the object's segment held other catalogue positions (split between them "
                      "with SPLIT_SHARED)",
    "truncated": "an aperture is cut by the cube edge or blank spaxels (APER_FRACTION < 0.99)",
    "estimated_variance": "the cube has no variance; it was estimated from the sky spaxels",
    "fallback_mask": "no segment at the position: a circular mask was used",
}


def quality_flags(state, stamp, spectra, info, mask, sky_spec, sky_var, prefix, suffix):
    """Names of the :data:`QUALITY_FLAGS` that apply to one extraction."""
    flags = []
    final = spectra[info["FINAL_SPECTRUM"]]
    basis, pinv = state.basis, state.basis_pinv
    resid = final[0] - basis @ (pinv @ np.nan_to_num(final[0]))
    err = np.sqrt(np.where(final[1] > 0, final[1], np.nan))
    line_snr = _boxcar(resid, 5) / (err / np.sqrt(5))
    if sky_spec is not None:
        sky_resid = sky_spec - basis @ (pinv @ sky_spec)
        sky_err = np.sqrt(np.where(sky_var > 0, sky_var, np.nan))
        sky_snr = np.nan_to_num(sky_resid / sky_err)
        # inverted: a negative line (S/N < -5) where the sky has a line, at least half as
        # significant as the spectrum's strongest emission line (night-sky residuals of a
        # sky-subtracted cube make weak negative features everywhere; those are not flagged)
        sky_line = np.nan_to_num(_boxcar(sky_resid, 5) / (sky_err / np.sqrt(5))) > 3
        snr = np.nan_to_num(line_snr)
        neg = np.min(np.where(sky_line, snr, 0.0), initial=0.0)
        if neg < -5 and -neg > 0.5 * max(snr.max(initial=0.0), 0.0):
            flags.append("inverted_line")
        raw = sum_extraction(stamp.data, stamp.var, mask.ravel().astype(float)[:, None])[0][:, 0]
        npix = max(int(mask.sum()), 1)
        if np.nanmedian(sky_spec) > 0 and np.nanmedian(sky_spec) > np.nanmedian(raw / npix):
            flags.append("sky_brighter")
        # sky lines: significant (S/N > 5 over 3 channels) and, summed over the object mask,
        # at least 20 % of the object's strongest line before sky subtraction
        run = np.convolve((sky_snr > 5).astype(float), np.ones(3), mode="same") >= 3
        raw_line = np.max(_boxcar(raw - basis @ (pinv @ raw), 3), initial=0.0)
        if run.any() and np.max(np.where(run, _boxcar(sky_resid, 3), 0.0)) * npix > 0.2 * max(raw_line, 0.0):
            flags.append("sky_lines")
    total = integrated_snr(final[0], final[1])
    if np.isfinite(total) and total < -3:
        flags.append("negative_flux")
    if info["APER_FRACTION"] < 0.99:
        flags.append("truncated")
    if not state.cube.has_variance:
        flags.append("estimated_variance")
    return flags


def _boxcar(values, width):
    """Running mean over ``width`` channels (NaN counted as 0)."""
    return np.convolve(np.nan_to_num(np.asarray(values, float)), np.ones(width) / width, mode="same")


def _final_spectrum_name(spectra, ref_name, suffix):
    for name in ("CROSS_CORRELATION_ITER" + suffix, "CROSS_CORRELATION" + suffix):
        if name in spectra:
            return name
    return ref_name


def _xcor_weighted(data, var, sky_v, cmap, ref_mask, fraction):
    """Spectrum weighted by a cross-correlation map inside its mask, and that mask."""
    peak = np.nanmax(np.where(ref_mask.ravel(), cmap, -np.inf))
    xmask = ref_mask.ravel() & (cmap >= fraction * peak) if peak > 0 else ref_mask.ravel()
    if not xmask.any():
        xmask = ref_mask.ravel()
    return weighted_extraction(data, var, profile_weights(cmap, xmask), sky_v), \
        xmask.reshape(ref_mask.shape)


def _cross_correlation(state, stamp, data, sky_v, ref, ref_name, ref_mask, suffix):
    """Cross-correlation maps and spectra (raw, continuum-subtracted, iterated).

    Continuum subtraction of every spaxel is two matrix products with the shared
    Legendre basis (see :func:`continuum_fit`).  The raw map is computed once even when
    CONT_SUB is off (the original computed it twice).

    Returns
    -------
    spectra : dict
        ``{name: (flux, var)}`` of the cross-correlation spectra (and of the
        continuum-subtracted reference).
    maps : dict
        The maps, (ny, nx) each (and ``_CONTSUB_CUBE`` with OUT_SUB).
    xmask : ndarray of bool, (ny, nx)
        The mask of the last weighted spectrum (``MASK_XCOR``).
    """
    p = state.params
    raw_map = ref[0] @ data
    maps = {"CROSS_CORRELATION": raw_map.reshape(stamp.shape)}
    (flux, var), xmask = _xcor_weighted(data, stamp.var, sky_v, raw_map, ref_mask, p["XCOR_MASK"])
    spectra = {"CROSS_CORRELATION" + suffix: (flux, var)}
    if not p["CONT_SUB"]:
        return spectra, maps, xmask
    contsub = data - state.basis @ (state.basis_pinv @ data)
    if p["OUT_SUB"]:
        maps["_CONTSUB_CUBE"] = contsub
    current = ref[0]
    for iteration in range(p["XCOR_ITER"]):
        ref_cs = current - state.basis @ (state.basis_pinv @ current)
        if iteration == 0:
            spectra[ref_name.replace(suffix, "") + "_CONTSUB" + suffix if suffix else
                    ref_name + "_CONTSUB"] = (ref_cs, ref[1])
        cmap = ref_cs @ contsub
        (flux, var), xmask = _xcor_weighted(data, stamp.var, sky_v, cmap, ref_mask, p["XCOR_MASK"])
        name = "CROSS_CORRELATION_CONTSUB" if iteration == 0 else "CROSS_CORRELATION_ITER"
        spectra[name + suffix] = (flux, var)
        maps[name] = cmap.reshape(stamp.shape)
        current = flux
    return spectra, maps, xmask


# ===========================================================================
# Registry of extractions: extract_object runs these, in this order
# ===========================================================================
@dataclass(frozen=True)
class Extraction:
    """One entry of :data:`EXTRACTIONS`.

    Parameters
    ----------
    function : callable
        ``function(ctx) -> {spectrum name: (flux, variance)}`` for an
        :class:`ExtractionContext`; ``{}`` when the extraction is switched off.  Fluxes
        are in the cube's unit, summed over the spaxels the extraction covers (the sky:
        per spaxel), shape (nwave,).
    names : str
        The spectrum names it makes (``<P>`` the cube prefix, ``_SKYSUB`` appended with
        sky subtraction).
    description : str
        One line, copied into the summary table's metadata.
    """

    function: object
    names: str
    description: str


#: The extractions of every object, in order: adding an entry adds a family of spectra to
#: the Source files, the summary (S/N) and the plots.  An entry may use the spectra of
#: those before it (the cross-correlation needs its reference, a TOT, WEIGHTED or APER
#: spectrum).
EXTRACTIONS = {
    "SKY": Extraction(_extract_sky, "<P>_SKY",
                      "the subtracted sky spectrum (per spaxel; SKY_METHOD)"),
    "TOT": Extraction(_extract_total, "<P>_TOT",
                      "sum of the object-mask spaxels (mpdaf MUSE_TOT)"),
    "WEIGHTED": Extraction(_extract_weighted, "<P>_WHITE, <IMG>",
                           "profile-weighted by the white light or an IMG image"),
    "NB": Extraction(_extract_narrow_band, "<P>_NB",
                     "profile-weighted by the narrow-band image of the object's line (NB_SEGMENT)"),
    "OPTIMAL": Extraction(_extract_optimal, "<P>_OPTIMAL",
                          "Horne (1986) optimal extraction with the white-light profile"),
    "PSF": Extraction(_extract_psf, "<P>_PSF",
                      "optimal extraction with the cube's FSF (PSF) profile: a point source's total flux"),
    "APER": Extraction(_extract_apertures, "<P>_APER_<r>",
                       "sum within a circular aperture of radius r (arcsec)"),
    "XCOR": Extraction(_extract_cross_correlation,
                       "CROSS_CORRELATION, CROSS_CORRELATION_CONTSUB, CROSS_CORRELATION_ITER, <REF>_CONTSUB",
                       "weighted by the cross-correlation map of the reference spectrum"),
}


# ===========================================================================
# Output: mpdaf Source files, summary catalogue, MARZ file, plots
# ===========================================================================
def source_path(params, ident):
    """``<OUTPUT>/<PRE_OUT><ID>.fits``."""
    return Path(params["OUTPUT"]) / ("%s%s.fits" % (params["PRE_OUT"], ident))


def _keep_spectrum(name, params, result):
    if params["OUT_SPEC"]:
        return True
    return name.startswith("CROSS_CORRELATION") or name == result.info["REF_SPECTRUM"]


def build_source(state, row, result):
    """The mpdaf ``Source`` of one object, honouring OUT_XXX and ORIG_XXX."""
    from mpdaf.sdetect import Source
    from mpdaf.obj import Spectrum, Image, Cube
    p, cube = state.params, state.cube
    origin = (p["ORIG_FROM"] or "AutoSpec", p["ORIG_FROMV"] or __version__,
              p["ORIG_CUBE"] or Path(cube.filename).name, p["ORIG_CUBEV"] or "")
    src = Source.from_data(row.ID, row.RA, row.DEC, origin)
    src.header["EXT"] = ("AutoSpec", "extraction software")
    src.header["EXT_V"] = (__version__, "extraction software version")
    src.header["AUTH"] = ("autospec.py (after Griffiths & Conselice 2018)", "author")
    src.header["MASKUSED"] = (result.info["MASK_USED"], "object mask used")
    src.header["REFSPEC"] = (result.info["REF_SPECTRUM"], "reference spectrum")
    for name, (flux, var) in result.spectra.items():
        if _keep_spectrum(name, p, result):
            src.spectra[name] = Spectrum(wave=cube.wavecoord, unit=cube.unit, data=flux,
                                         var=var, copy=False)
    stamp = result.subcubes["stamp"]
    wcs = cube.wcs[stamp.ylo:stamp.yhi, stamp.xlo:stamp.xhi]
    groups = [(result.images, p["OUT_IMG"], float), (result.segs, p["OUT_SEG"], np.int32),
              (result.masks, p["OUT_MASK"], np.uint8), (result.xcor, p["OUT_XCOR"], float)]
    for group, keep, dtype in groups:
        for name, array in (group.items() if keep else ()):
            src.images[name] = Image(wcs=wcs.copy(), data=np.asarray(array, dtype=dtype), copy=False)
    for name, sl in result.subcubes["slices"].items():
        data = sl if isinstance(sl, np.ndarray) else cube.data[(slice(None),) + sl]
        var = cube.var[(slice(None),) + stamp_slices(stamp)]
        src.cubes[name] = Cube(wcs=wcs.copy(), wave=cube.wavecoord.copy(), unit=cube.unit,
                               data=data, var=var if cube.has_variance else None)
    return src


# ---------------------------------------------------------------------------
# Fast writer of mpdaf Source files (same FITS layout, without per-HDU astropy objects)
# ---------------------------------------------------------------------------
_BLOCK = 2880
_STRUCTURAL = ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "EXTEND", "END")
_BITPIX = {np.dtype(">f4"): -32, np.dtype(">i4"): 32}


_CARD = 80
_STANDARD_KEY = re.compile(r"[A-Z0-9_-]{1,8}\Z")
_COMMENTARY = ("COMMENT", "HISTORY", "CONTINUE", "END")


def fits_card(key, value, comment=""):
    """A FITS header card, character for character as astropy's ``fits.Card(key, value,
    comment).image`` (one 80-character card, or several for a long string).

    The usual card (keyword of up to 8 characters A-Z 0-9 ``-`` ``_``, lower case made
    upper; a bool, int, float or string that fits) is built here without astropy: the fast
    writer makes thousands.  A string too long for one card is continued on ``CONTINUE``
    cards (the FITS long-string convention) and a longer keyword becomes a ``HIERARCH``
    card - both written by astropy itself.  A value is never shortened: floats are written
    as Python's shortest round-trip ``str`` with ``E`` (astropy's image whenever that has
    at most 20 characters; for the rare longer ones - 17 digits and a 3-digit exponent -
    astropy drops digits, here they are written in full, in free format).  Only a comment
    may be shortened: on a one-card value it is cut at column 80, as astropy does.

    Parameters
    ----------
    key : str
    value : bool, int, float or str (numpy scalars too)
    comment : str

    Returns
    -------
    str
        The card image, a multiple of 80 characters.

    Raises
    ------
    ValueError
        Naming the key and the value, for what a FITS header cannot hold: NaN or infinite
        floats, text that is not printable ASCII, other types, or a HIERARCH keyword and
        value that do not fit on one card (astropy would cut them; only strings continue).

    Examples
    --------
    >>> fits_card("EXPTIME", 1200.0, "seconds").rstrip()
    'EXPTIME =               1200.0 / seconds'
    >>> len(fits_card("OBJECT", "x" * 120))     # the first card and one CONTINUE card
    160
    """
    if not isinstance(key, str) or not isinstance(comment, str):
        raise ValueError("FITS card %r = %r (comment %r): keyword and comment must be strings"
                         % (key, value, comment))
    name = key.upper()
    if not _STANDARD_KEY.match(name) or name in _COMMENTARY:
        return _astropy_card(key, value, comment)
    text = _card_value(key, value)
    if not (comment.isascii() and comment.isprintable()):
        raise ValueError("FITS card %s = %r: the comment %r is not printable ASCII"
                         % (key, value, comment))
    card = "%-8s= %s" % (name, text) + (" / " + comment if comment else "")
    if len(card) <= _CARD:
        return card.ljust(_CARD)
    if isinstance(value, str) and len(text) > _CARD - 10:
        return _astropy_card(key, value, comment)          # CONTINUE cards
    return card[:_CARD]                                    # the comment is cut (value kept)


def _card_value(key, value):
    """The value field of a card (astropy's formatting; floats never cut)."""
    if isinstance(value, (bool, np.bool_)):
        return "%20s" % ("T" if value else "F")
    if isinstance(value, (int, np.integer)):
        return "%20d" % value
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            raise ValueError("FITS card %s = %r: FITS headers cannot hold NaN or infinite "
                             "values; write a finite number or leave the keyword out" % (key, value))
        return "%20s" % str(value).replace("e", "E")
    if isinstance(value, str):
        if not (value.isascii() and value.isprintable()):
            raise ValueError("FITS card %s = %r: header text must be printable ASCII" % (key, value))
        return "''" if not value else "%-20s" % ("'%-8s'" % value.replace("'", "''"))
    raise ValueError("FITS card %s = %r: a card holds a bool, int, float or str, not %s"
                     % (key, value, type(value).__name__))


def _astropy_card(key, value, comment):
    """``fits.Card(...).image`` for HIERARCH and long-string cards, read back to make sure
    astropy kept the keyword and the value (it cuts a HIERARCH card that is too long)."""
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyUserWarning
    _card_value(key, value)                               # the same checks as a one-card value
    try:
        with warnings.catch_warnings():
            # VerifyWarning: "a HIERARCH card will be created", "comment will be truncated";
            # AstropyUserWarning: an unparsable read-back (the error below says it instead)
            warnings.simplefilter("ignore", AstropyUserWarning)
            image = fits.Card(key, value, comment).image
            back = fits.Card.fromstring(image)
            kept = back.keyword, back.value
    except (ValueError, TypeError) as exc:
        raise ValueError("FITS card %s = %r cannot be written: %s" % (key, value, exc)) from None
    name = key[9:] if key.upper().startswith("HIERARCH ") else key
    if kept[0].upper() != name.strip().upper() or not _same_card_value(kept[1], value):
        raise ValueError("FITS card %s = %r cannot be written: keyword and value do not fit on "
                         "a HIERARCH card (astropy would write %r); use a shorter keyword"
                         % (key, value, image.rstrip()))
    return image


def _same_card_value(read, value):
    """Whether a value read back from a card is the value written (FITS drops trailing
    blanks of strings; floats are compared as written, ``str``)."""
    if isinstance(value, str):
        return isinstance(read, str) and read == value.rstrip()
    if isinstance(value, (bool, np.bool_)):
        return isinstance(read, bool) and read == bool(value)
    if isinstance(value, (int, np.integer)):
        return isinstance(read, int) and not isinstance(read, bool) and read == int(value)
    return isinstance(read, float) and read == float(str(value))


def _header_cards(header):
    """Non-structural cards of an astropy header, as 80-character strings by keyword."""
    return [(card.keyword, card.image) for card in header.cards
            if card.keyword not in _STRUCTURAL and not card.keyword.startswith("NAXIS")]


class SourceFileWriter:
    """Writes mpdaf ``Source`` FITS files directly from numpy arrays.

    The layout is mpdaf's own (primary header with ID/RA/DEC/FROM/..., then
    ``SPE_<name>_DATA/_STAT``, ``IMA_<name>_DATA`` and ``CUB_<name>_DATA/_STAT``
    extensions with mpdaf's WCS cards), so ``mpdaf.sdetect.Source.from_file`` reads the
    files; header cards are built once from mpdaf templates and only EXTNAME and the
    reference pixel change per object.  Building mpdaf objects and writing them with
    astropy took ~0.3 s per object, which would be 90 % of the run.
    """

    def __init__(self, cube, params):
        from astropy.io import fits
        from mpdaf.obj import Cube, Image, Spectrum
        from mpdaf.sdetect import Source
        nwave = cube.data.shape[0]
        spec = Spectrum(wave=cube.wavecoord, unit=cube.unit, data=np.zeros(nwave),
                        var=np.ones(nwave))
        head = spec.get_data_hdu(name="X", savemask="nan").header
        self.spec_cards = _header_cards(head)
        self.spec_stat_cards = _header_cards(spec.get_stat_hdu(name="X", header=head).header)
        wcs = cube.wcs[0:2, 0:2]
        image = Image(wcs=wcs.copy(), data=np.zeros((2, 2)), unit=cube.unit)
        head = image.get_data_hdu(name="X", savemask="nan").header
        self.image_cards = _header_cards(head)
        self.crpix = (float(head["CRPIX1"]), float(head["CRPIX2"]))
        plain = Image(wcs=wcs.copy(), data=np.zeros((2, 2), np.int32))
        self.int_cards = _header_cards(plain.get_data_hdu(name="X", savemask="dq").header)
        sub = Cube(wcs=wcs.copy(), wave=cube.wavecoord.copy(), unit=cube.unit,
                   data=np.zeros((nwave, 2, 2)), var=np.ones((nwave, 2, 2)))
        head = sub.get_data_hdu(name="X", savemask="nan").header
        self.cube_cards = _header_cards(head)
        self.cube_stat_cards = _header_cards(sub.get_stat_hdu(name="X", header=head).header)
        origin = (params["ORIG_FROM"] or "AutoSpec", params["ORIG_FROMV"] or __version__,
                  params["ORIG_CUBE"] or Path(cube.filename).name, params["ORIG_CUBEV"] or "")
        template = Source.from_data(0, 0.0, 0.0, origin)
        primary = fits.PrimaryHDU(header=template.header).header
        primary["DATE"] = (time.strftime("%Y-%m-%dT%H:%M:%S"), "Creation date")
        primary["AUTHOR"] = ("MPDAF", "Origin of the file")
        from mpdaf.sdetect.source import TABLES_SCHEMA
        primary["FORMAT"] = (TABLES_SCHEMA["version"], "Version of the Source format")
        primary["EXT"] = ("AutoSpec", "extraction software")
        primary["EXT_V"] = (__version__, "extraction software version")
        primary["AUTH"] = ("autospec.py (after Griffiths & Conselice 2018)", "author")
        self.primary_cards = [(k, c) for k, c in _header_cards(primary)]
        self.params = params

    @staticmethod
    def _replace(cards, updates):
        return [(key, updates.get(key, card)) for key, card in cards]

    def _hdu(self, cards, array, extname):
        array = np.asarray(array)
        data = np.ascontiguousarray(array, dtype=">i4" if array.dtype.kind in "iub" else ">f4")
        header = [fits_card("XTENSION", "IMAGE", "Image extension"),
                  fits_card("BITPIX", _BITPIX[data.dtype]), fits_card("NAXIS", data.ndim)]
        header += [fits_card("NAXIS%d" % (i + 1), n) for i, n in enumerate(data.shape[::-1])]
        header += [fits_card("PCOUNT", 0), fits_card("GCOUNT", 1)]
        updates = {"EXTNAME": fits_card("EXTNAME", extname, "extension name")}
        header += [c for k, c in self._replace(cards, updates) if k != "BITPIX"]
        if not any(c.startswith("EXTNAME ") for c in header):
            header.append(updates["EXTNAME"])
        return self._pad("".join(header) + "END".ljust(80), b" ") + \
            self._pad(data.tobytes(), b"\0")

    @staticmethod
    def _pad(content, fill):
        if isinstance(content, str):
            content = content.encode("ascii")
        return content + fill * (-len(content) % _BLOCK)

    def _wcs_updates(self, stamp):
        return {"CRPIX1": fits_card("CRPIX1", self.crpix[0] - stamp.xlo,
                                    "Pixel coordinate of reference point"),
                "CRPIX2": fits_card("CRPIX2", self.crpix[1] - stamp.ylo,
                                    "Pixel coordinate of reference point")}

    def tobytes(self, row, result, cube):
        """The whole Source file as bytes."""
        p = self.params
        updates = {"ID": fits_card("ID", int(row.ID), "object ID %d"),
                   "RA": fits_card("RA", float(row.RA), "RA u.degree %.7f"),
                   "DEC": fits_card("DEC", float(row.DEC), "DEC u.degree %.7f")}
        cards = [fits_card("SIMPLE", True, "conforms to FITS standard"),
                 fits_card("BITPIX", 8, "array data type"), fits_card("NAXIS", 0),
                 fits_card("EXTEND", True)]
        cards += [c for _, c in self._replace(self.primary_cards, updates)]
        if getattr(row, "ORIGIN", "") and not p["ORIG_FROM"]:       # the catalogue's detection software
            cards = [fits_card("FROM", str(row.ORIGIN), "detection software") if c.startswith("FROM    ")
                     else c for c in cards]
        info = result.info
        cards += [fits_card("MASKUSED", info["MASK_USED"], "object mask used"),
                  fits_card("REFSPEC", info["REF_SPECTRUM"], "reference spectrum"),
                  fits_card("SKYMETH", info.get("SKY_METHOD", "none"), "sky estimate"),
                  fits_card("APERFRAC", round(float(info.get("APER_FRACTION", 1.0)), 4),
                            "aperture fraction inside the cube"),
                  fits_card("VAREST", not cube.has_variance, "variance estimated from sky spaxels"),
                  fits_card("QFLAGS", info.get("FLAGS", "") or "none", "autospec quality flags")]
        if info.get("SHARED_SEGMENT"):
            cards.append(fits_card("SHARED", info["SHARED_SEGMENT"], "IDs sharing the segment"))
        chunks = [self._pad("".join(cards) + "END".ljust(80), b" ")]
        for name, (flux, var) in result.spectra.items():
            if _keep_spectrum(name, p, result):
                chunks.append(self._hdu(self.spec_cards, flux, "SPE_%s_DATA" % name))
                chunks.append(self._hdu(self.spec_stat_cards, var, "SPE_%s_STAT" % name))
        stamp = result.subcubes["stamp"]
        wcs = self._wcs_updates(stamp)
        image_cards = self._replace(self.image_cards, wcs)
        int_cards = self._replace(self.int_cards, wcs)
        groups = [(result.images, p["OUT_IMG"], image_cards, float),
                  (result.segs, p["OUT_SEG"], int_cards, np.int32),
                  (result.masks, p["OUT_MASK"], int_cards, np.int32),
                  (result.xcor, p["OUT_XCOR"], image_cards, float)]
        for group, keep, base, dtype in groups:
            for name, array in (group.items() if keep else ()):
                chunks.append(self._hdu(base, np.asarray(array, dtype), "IMA_%s_DATA" % name))
        for name, sl in result.subcubes["slices"].items():
            data = sl if isinstance(sl, np.ndarray) else cube.data[(slice(None),) + sl]
            var = cube.var[(slice(None),) + (stamp_slices(stamp))]
            cards = self._replace(self.cube_cards, wcs)
            chunks.append(self._hdu(cards, data, "CUB_%s_DATA" % name))
            if cube.has_variance:
                cards = self._replace(self.cube_stat_cards, wcs)
                chunks.append(self._hdu(cards, var, "CUB_%s_STAT" % name))
        return b"".join(chunks)

    def write(self, path, row, result, cube):
        """Write one object's Source file atomically."""
        with atomic_output(path, overwrite=True, mode="wb") as out:
            out.write(self.tobytes(row, result, cube))


def write_table(rows, path, columns):
    """Summary rows as ECSV and CSV (atomic writes)."""
    from astropy.table import Table
    table = Table(rows=[[r.get(c, _missing(c)) for c in columns] for r in rows], names=columns) \
        if rows else Table(names=columns)
    from collections import OrderedDict              # ECSV keeps its order (a dict is sorted)
    table.meta["extractions"] = OrderedDict((name, e.description) for name, e in EXTRACTIONS.items())
    table.meta["autospec_version"] = __version__
    for suffix, fmt in ((".ecsv", "ascii.ecsv"), (".csv", "ascii.csv")):
        with atomic_path(Path(path).with_suffix(suffix), overwrite=True) as tmp:
            table.write(tmp, format=fmt, overwrite=True)
    return Path(path).with_suffix(".ecsv")


def _missing(column):
    return float("nan") if column.startswith("SN_") or column.endswith("_NPIX") else ""


def write_marz(path, entries, wave):
    """MARZ input FITS: intensity, VARIANCE, WAVELENGTH and a FIBRES table.

    Hinton et al. (2016, A&C 15, 61).  ``entries`` are dicts with ID, RA, DEC, flux,
    var; RA and DEC are written in radians, as MARZ expects.
    """
    from astropy.io import fits
    if not entries:
        return None
    flux = np.array([e["flux"] for e in entries], dtype=np.float32)
    var = np.array([e["var"] for e in entries], dtype=np.float32)
    cols = [fits.Column("NAME", "20A", array=[str(e["ID"]) for e in entries]),
            fits.Column("RA", "D", array=np.radians([e["RA"] for e in entries])),
            fits.Column("DEC", "D", array=np.radians([e["DEC"] for e in entries])),
            fits.Column("MAGNITUDE", "E", array=np.zeros(len(entries))),
            fits.Column("TYPE", "1A", array=["P"] * len(entries)),
            fits.Column("COMMENT", "40A", array=[e["name"] for e in entries])]
    hdul = fits.HDUList([fits.PrimaryHDU(flux), fits.ImageHDU(var, name="VARIANCE"),
                         fits.ImageHDU(np.asarray(wave, np.float64), name="WAVELENGTH"),
                         fits.BinTableHDU.from_columns(cols, name="FIBRES")])
    with atomic_path(path, overwrite=True, suffix=".part.fits") as tmp:
        hdul.writeto(tmp, overwrite=True)
    return Path(path)


PLOT_DPI = 80                  # pixels per inch of the JPEG plots
PLOT_JPEG_QUALITY = 85         # PIL JPEG quality (1-95)
_PLOT_FONT = 7                 # points
_PLOT_CACHE_SIZE = 8           # figures kept for reuse (one per layout and thread)
_PLOT_FIGURES = {}             # (thread, kind, layout...) -> _PlotFigure, reused across objects
_OBJ_COLOUR, _SKY_COLOUR, _MARK_COLOUR, _COMPASS_COLOUR = "red", "white", "red", "orange"


def make_plots(state, row, result):
    """ID_IMAGES, ID_MASKS, ID_SPECTRA and ID_XCOR .jpg under ``OUTPUT/images/<ID>/``.

    * IMAGES: every weight image of the stamp (white light first, IMG, NB) with a colour
      bar, then the segmentation maps; the catalogue position (+), N/E arrows from the
      WCS, and on the white light the outlines of the object (red) and sky (white) masks.
    * MASKS: every mask of the object, with its number of spaxels.
    * XCOR: the cross-correlation maps with colour bars and the MASK_XCOR outline (only
      when XCOR ran).
    * SPECTRA: the reference and cross-correlation spectra with the 1-sigma band of the
      propagated variance, each with its integrated S/N; flux in the cube's unit.

    Six to seven times cheaper than pyplot figures built per object: Agg canvases without
    pyplot state, built once per layout and re-used for every object; what does not change
    between objects (frames, names, axis labels, the wavelength axis) is drawn once and
    restored from a saved copy of the canvas, and only the data, the flux and colour-bar
    ticks, S/N values and IDs are drawn per object.  Files are written atomically (JPEG by
    PIL).  Figures are per thread (and forked workers have their own copies).
    """
    outdir = Path(state.params["OUTPUT"]) / "images" / str(row.ID)
    outdir.mkdir(parents=True, exist_ok=True)
    for kind, panels in _image_panels(state, result).items():
        if panels:
            _save_figure(_image_figure(kind, panels, state, result, "ID %s" % row.ID),
                         outdir / ("%s_%s.jpg" % (row.ID, kind)))
    title = "ID %s   RA %.6f   Dec %.6f" % (row.ID, row.RA, row.DEC)
    _save_figure(_spectra_figure(state, result, title), outdir / ("%s_SPECTRA.jpg" % row.ID))


def _save_figure(fig, path):
    """Render ``fig`` (see :func:`_render_figure`) and write it as JPEG, atomically."""
    from PIL import Image
    canvas = _render_figure(fig)
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(),
                             "raw", "RGBA", 0, 1).convert("RGB")     # opaque white face
    with atomic_path(path, overwrite=True, suffix=".jpg") as tmp:
        image.save(tmp, format="JPEG", quality=PLOT_JPEG_QUALITY)


def _render_figure(fig):
    """Draw ``fig`` on an Agg canvas and return the canvas.

    A figure of :func:`make_plots` restores its saved static layer and draws only its
    per-object artists on it; any other figure is drawn in full.
    """
    slot = getattr(fig, "_autospec_plot", None)
    if slot is not None:
        return slot.render()
    canvas = fig.canvas
    if not hasattr(canvas, "copy_from_bbox"):        # a figure of another backend
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas


class _PlotFigure:
    """A re-used figure: its panels' artists and a static layer drawn once per layout.

    ``dynamic`` lists the artists that change from object to object, in drawing order;
    all the others are static and are drawn (with the dynamic ones hidden) only when
    ``signature`` - a tuple of everything the static layer shows - changes.
    """

    def __init__(self, fig):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        self.fig, self.canvas = fig, FigureCanvasAgg(fig)
        self.panels, self.dynamic = [], []
        self.signature, self.drawn_signature, self.background = None, None, None
        self.suptitle = fig.text(0.5, 1 - 0.06 / fig.get_figheight(), "", ha="center",
                                 va="top", fontsize=_PLOT_FONT)
        self.dynamic.append(self.suptitle)
        fig._autospec_plot = self

    def render(self):
        if self.background is None or self.signature != self.drawn_signature:
            shown = [a.get_visible() for a in self.dynamic]
            for artist in self.dynamic:
                artist.set_visible(False)
            try:
                self.canvas.draw()
            finally:
                for artist, visible in zip(self.dynamic, shown):
                    artist.set_visible(visible)
            self.background = self.canvas.copy_from_bbox(self.fig.bbox)
            self.drawn_signature = self.signature
        else:
            self.canvas.restore_region(self.background)
        for artist in self.dynamic:
            if artist.get_visible():
                self.fig.draw_artist(artist)
        return self.canvas


def _plot_cached_figure(key, build):
    """The figure of ``key`` for this thread, built on first use (bounded cache)."""
    import threading
    key = (threading.get_ident(),) + key
    slot = _PLOT_FIGURES.pop(key, None) or build()
    _PLOT_FIGURES[key] = slot                    # most recently used last
    while len(_PLOT_FIGURES) > _PLOT_CACHE_SIZE:
        del _PLOT_FIGURES[next(iter(_PLOT_FIGURES))]
    return slot


def _plot_new_figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=PLOT_DPI, facecolor="white")


def _plot_offset(fig, dx, dy):
    """A translation by (dx, dy) points."""
    from matplotlib.transforms import ScaledTranslation
    return ScaledTranslation(dx / 72.0, dy / 72.0, fig.dpi_scale_trans)


def _plot_tick_artists(ax, side, fontsize, nmax=8):
    """Own tick marks and labels on the left or right side of ``ax`` (data y).

    Cheaper than a matplotlib Axis when they change for every object; set by
    :func:`_plot_set_ticks`.
    """
    from matplotlib.markers import TICKLEFT, TICKRIGHT
    from matplotlib.transforms import offset_copy
    left = side == "left"
    ax.set_yticks([])
    trans = ax.get_yaxis_transform()                         # x: axes, y: data
    marks, = ax.plot([], [], ls="none", marker=TICKLEFT if left else TICKRIGHT, ms=3, mew=0.8,
                     color="k", transform=trans, clip_on=False)
    text_trans = offset_copy(trans, fig=ax.get_figure(), x=-4.5 if left else 4.5, units="points")
    labels = [ax.text(0.0 if left else 1.0, 0.0, "", transform=text_trans, fontsize=fontsize,
                      ha="right" if left else "left", va="center", clip_on=False)
              for _ in range(nmax)]
    offset = ax.text(0.004, 0.97, "", transform=ax.transAxes, ha="left", va="top",
                     fontsize=fontsize) if left else \
        ax.text(0.5, 1.01, "", transform=ax.transAxes, ha="center", va="bottom", fontsize=fontsize)
    return dict(marks=marks, labels=labels, offset=offset, x=0.0 if left else 1.0,
                artists=[marks, *labels, offset])


def _plot_set_ticks(ticks, lo, hi, nbins, to_axis=None):
    """Nice ticks of the values ``lo``-``hi`` (placed at ``to_axis(values)``)."""
    values, labels, offset = _plot_tick_labels(lo, hi, nbins)
    positions = to_axis(values) if to_axis is not None else values
    positions, labels = positions[:len(ticks["labels"])], labels[:len(ticks["labels"])]
    ticks["marks"].set_data(np.full(len(positions), ticks["x"]), positions)
    for k, text in enumerate(ticks["labels"]):
        if k < len(labels):
            text.set_y(positions[k])
            text.set_text(labels[k])
        else:
            text.set_text("")
    ticks["offset"].set_text(offset)


def _plot_tick_labels(lo, hi, nbins):
    """Nice values inside [lo, hi], their labels and a common 'x1eN' factor."""
    from matplotlib.ticker import MaxNLocator
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        return np.empty(0), [], ""
    values = MaxNLocator(nbins=nbins).tick_values(lo, hi)
    eps = 1e-9 * (hi - lo)
    values = values[(values >= lo - eps) & (values <= hi + eps)]
    big = max(abs(lo), abs(hi))
    exponent = int(np.floor(np.log10(big))) if big > 0 else 0
    scale, offset = (10.0 ** exponent, "x1e%d" % exponent) if not -3 < exponent < 5 else (1.0, "")
    return values, ["%g" % (round(v / scale, 10) + 0.0) for v in values], offset


# ---------------------------------------------------------------------------
# Image plots: IMAGES, MASKS, XCOR
# ---------------------------------------------------------------------------
def _image_panels(state, result):
    """{kind: [(name, array, role, outlines)]}; role 'flux', 'seg' or 'mask'."""
    masks = result.masks
    white = state.cube.prefix + "_WHITE"
    if white not in result.images:
        white = next(iter(result.images), None)
    images = [(name, image, "flux",
               ((masks.get("MASK_OBJ"), _OBJ_COLOUR), (masks.get("MASK_SKY"), _SKY_COLOUR))
               if name == white else ()) for name, image in result.images.items()]
    images += [(name, seg, "seg", ()) for name, seg in result.segs.items()]
    return {"IMAGES": images,
            "MASKS": [(name, mask, "mask", ()) for name, mask in masks.items()],
            "XCOR": [(name, cmap, "flux", ((masks.get("MASK_XCOR"), _OBJ_COLOUR),))
                     for name, cmap in (result.xcor or {}).items() if np.ndim(cmap) == 2]}


def _plot_cmap(name, role):
    import matplotlib
    if role == "seg":
        return matplotlib.colormaps["tab20"].with_extremes(bad="black")
    if role == "mask":
        return matplotlib.colormaps["gray"].with_extremes(bad="0.6")
    try:
        cmap = matplotlib.colormaps[name]
    except (KeyError, ValueError):
        cmap = matplotlib.colormaps["viridis"]
    return cmap.with_extremes(bad="0.75")


def _build_image_figure(roles, ncol, cmap_name):
    """One panel per (role, number of outlines, compass); colour bars on 'flux' panels."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle
    nrow = -(-len(roles) // ncol)
    bar = any(role == "flux" for role, _, _ in roles)
    cell_w, cell_h, box, top = (2.5 if bar else 2.05), 2.2, 1.8, 0.3
    width, height = cell_w * ncol + 0.05, cell_h * nrow + top
    slot = _PlotFigure(_plot_new_figure(width, height))
    fig = slot.fig
    for k, (role, noutline, compass) in enumerate(roles):
        i, j = divmod(k, ncol)
        x0, y0 = j * cell_w + 0.12, height - top - (i + 1) * cell_h + 0.1
        ax = fig.add_axes((x0 / width, y0 / height, box / width, box / height))
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)     # a frame is drawn over the image instead
        ax.set_facecolor("0.75")         # outside the cube: as blank spaxels
        cmap = _plot_cmap(cmap_name, role)
        im = ax.imshow(np.zeros((2, 2)), origin="lower", interpolation="nearest", cmap=cmap,
                       vmin=-0.5 if role == "seg" else 0.0, vmax=19.5 if role == "seg" else 1.0)
        above = ax.transAxes + _plot_offset(fig, 0, 3)   # not titles: no title placement pass
        name = ax.text(0.0, 1.0, "", transform=above, ha="left", va="baseline",
                       fontsize=_PLOT_FONT)
        note = ax.text(1.0, 1.0, "", transform=above, ha="right", va="baseline",
                       fontsize=_PLOT_FONT)
        outlines = [ax.plot([], [], lw=1.0, scalex=False, scaley=False)[0]
                    for _ in range(noutline)]
        cross, = ax.plot([], [], marker="+", ms=11, mew=1.4, color=_MARK_COLOUR, ls="none",
                         scalex=False, scaley=False)
        arrows = []
        if compass:
            for label in ("N", "E"):
                arrow = ax.annotate("", xy=(0, 0), xytext=(0, 0), annotation_clip=False,
                                    arrowprops=dict(arrowstyle="-|>", color=_COMPASS_COLOUR,
                                                    lw=1.1, shrinkA=0, shrinkB=0,
                                                    mutation_scale=7))
                text = ax.text(0, 0, label, color=_COMPASS_COLOUR, fontsize=_PLOT_FONT,
                               fontweight="bold", ha="center", va="center", clip_on=False)
                arrows.append((arrow, text))
        frame = ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False,
                                       lw=0.8, edgecolor="k", clip_on=False))
        slot.dynamic += [im, *outlines, cross, *[a for pair in arrows for a in pair], note,
                         frame]
        ticks = None
        if role == "flux":   # a fixed 0-1 colour bar; the image is scaled to it
            cax = fig.add_axes(((x0 + box + 0.05) / width, y0 / height, 0.09 / width, box / height))
            fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), cax=cax).set_ticks([])
            ticks = _plot_tick_artists(cax, "right", _PLOT_FONT - 1)
            slot.dynamic += ticks["artists"]
        slot.panels.append(dict(ax=ax, im=im, name=name, note=note, outlines=outlines,
                                cross=cross, arrows=arrows, ticks=ticks))
    return slot


def _image_figure(kind, panels, state, result, title=""):
    """The (cached) figure of one kind of image plot, updated for ``result``."""
    ncol = min(len(panels), 5 if kind == "MASKS" else 4)
    roles = tuple((role, len(outlines), k == 0 and kind != "MASKS")   # N/E on the first panel
                  for k, (_, _, role, outlines) in enumerate(panels))
    cmap_name = state.params.get("CMAP", "viridis")
    slot = _plot_cached_figure((kind, roles, ncol, cmap_name),
                               lambda: _build_image_figure(roles, ncol, cmap_name))
    stamp = (result.subcubes or {}).get("stamp")
    center = getattr(stamp, "center", None)
    compass = _compass_vectors(getattr(state.cube, "wcs", None))
    static = []
    for (name, image, role, outlines), p in zip(panels, slot.panels):
        static.append(_update_image_panel(p, name, np.asarray(image), role, outlines, center,
                                          compass))
    slot.suptitle.set_text(title)
    slot.signature = tuple(static)
    return slot.fig


def _update_image_panel(p, name, image, role, outlines, center, compass):
    """Set one panel's data; returns what its static layer shows (its name)."""
    ax, im = p["ax"], p["im"]
    if image.ndim != 2 or image.size == 0:
        image = np.full((1, 1), np.nan)
    ny, nx = image.shape
    note = ""
    if role == "flux":
        data = np.asarray(image, float)
        vmin, vmax = _plot_limits(data)
        with np.errstate(invalid="ignore"):
            im.set_data((data - vmin) / (vmax - vmin))
        _plot_set_ticks(p["ticks"], vmin, vmax, 3, lambda v: (v - vmin) / (vmax - vmin))
        note = "" if np.isfinite(data).any() else "no data"
    elif role == "seg":
        labels = np.asarray(image)
        _, rank = np.unique(labels, return_inverse=True)
        blank = ~np.isfinite(labels) | (labels == 0)
        im.set_data(np.ma.masked_array(((rank.reshape(labels.shape) - 1) % 20).astype(float),
                                       mask=blank))
    else:
        mask = np.nan_to_num(np.asarray(image, float)) != 0
        im.set_data(mask.astype(float))
        note = "N=%d" % int(mask.sum())
    if p.get("shape") != (ny, nx):
        im.set_extent((-0.5, nx - 0.5, -0.5, ny - 0.5))
        p["shape"] = (ny, nx)
    known = center is not None and len(center) == 2 and np.all(np.isfinite(center))
    cy, cx = (float(center[0]), float(center[1])) if known else ((ny - 1) / 2.0, (nx - 1) / 2.0)
    # a square view centred on the object's pixel (as the stamp is) that holds the whole
    # stamp: a stamp cut by the cube's edge keeps square pixels, the object in the middle
    # and the frame in place (what lies outside the cube is grey)
    vy, vx = (float(np.round(cy)), float(np.round(cx))) if known else (cy, cx)
    half = max(vx + 0.5, nx - 0.5 - vx, vy + 0.5, ny - 0.5 - vy, 1.0)
    ax.set_xlim(vx - half, vx + half)
    ax.set_ylim(vy - half, vy + half)
    p["name"].set_text(name)
    p["note"].set_text(note)
    for line, (mask, colour) in zip(p["outlines"], outlines):
        line.set_data(*_mask_outline(mask if np.shape(mask) == (ny, nx) else None))
        line.set_color(colour)
    p["cross"].set_data([cx] if known else [], [cy] if known else [])   # center is (y, x)
    if p["arrows"]:
        _place_compass(p["arrows"], compass, (vx, vy), half)
    return name


def _plot_limits(data):
    """Display range of an image: the 0.5-99.5 percentiles of its finite pixels."""
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, (0.5, 99.5)))
    if not hi > lo:
        pad = 0.1 * abs(lo) or 1.0
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _mask_outline(mask):
    """Pixel-edge outline of a boolean mask as (x, y) line data, NaN between edges.

    The edges between a mask spaxel and a non-mask one (the stamp border is no edge): a
    single spaxel is a square, an empty or full mask (or None) has no outline.
    """
    if mask is None:
        return np.empty(0), np.empty(0)
    m = np.pad(np.nan_to_num(np.asarray(mask, float)) != 0, 1, mode="edge")
    ny, nx = m.shape[0] - 2, m.shape[1] - 2
    vy, vx = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])     # vertical edges at x = vx - 0.5
    hy, hx = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])     # horizontal edges at y = hy - 0.5
    keep_v, keep_h = (vx > 0) & (vx < nx), (hy > 0) & (hy < ny)
    vy, vx, hy, hx = vy[keep_v], vx[keep_v], hy[keep_h], hx[keep_h]
    gap_v, gap_h = np.full(vx.size, np.nan), np.full(hx.size, np.nan)
    x = np.concatenate([np.stack([vx - 0.5, vx - 0.5, gap_v], 1).ravel(),
                        np.stack([hx - 0.5, hx + 0.5, gap_h], 1).ravel()])
    y = np.concatenate([np.stack([vy - 0.5, vy + 0.5, gap_v], 1).ravel(),
                        np.stack([hy - 0.5, hy - 0.5, gap_h], 1).ravel()])
    return x, y


def _compass_vectors(wcs):
    """Unit (dx, dy) pixel directions of north and east from an mpdaf WCS, or None.

    A pixel offset ``d`` moves by ``CD @ d`` in the projected (east, north) plane, so north
    is along ``CD^-1 (0, 1)`` and east along ``CD^-1 (1, 0)``: (0, 1) and (-1, 0), up and
    left, for the usual orientation; rotations and flips follow from the CD matrix.
    """
    try:
        cd = np.array(wcs.get_cd(), dtype=float)
        inner = wcs.wcs.wcs
        if (inner.lng, inner.lat) == (1, 0):            # latitude on the first axis
            cd = cd[::-1]
        inv = np.linalg.inv(cd)
    except (AttributeError, TypeError, ValueError, np.linalg.LinAlgError):
        return None
    north, east = inv @ (0.0, 1.0), inv @ (1.0, 0.0)
    if not (np.all(np.isfinite(north)) and np.all(np.isfinite(east))):
        return None
    return north / np.hypot(*north), east / np.hypot(*east)


def _place_compass(arrows, vectors, centre, half):
    """N and E arrows (20 % of the view) on the side opposite to where they point."""
    if vectors is None:
        for arrow, text in arrows:
            arrow.set_visible(False)
            text.set_visible(False)
        return
    size = 2.0 * half
    total = vectors[0] + vectors[1]
    norm = np.hypot(*total)
    anchor = np.asarray(centre, float) - (0.36 * size * total / norm if norm > 0 else 0.0)
    for (arrow, text), vec in zip(arrows, vectors):
        arrow.xy = tuple(anchor + 0.2 * size * vec)
        arrow.set_position(tuple(anchor))
        text.set_position(tuple(anchor + 0.27 * size * vec))
        arrow.set_visible(True)
        text.set_visible(True)


# ---------------------------------------------------------------------------
# SPECTRA
# ---------------------------------------------------------------------------
def _spectrum_names(result):
    """The reference spectrum, then the cross-correlation spectra (as before)."""
    names = [result.info.get("REF_SPECTRUM")] + [n for n in result.spectra
                                                 if n.startswith("CROSS_CORRELATION")]
    names = [n for n in dict.fromkeys(names) if n in result.spectra]
    return names or list(result.spectra)[:1]


def _flux_label(unit):
    text = "" if unit is None else str(unit).strip()
    return "flux (%s)" % text if text else "flux"


def _wave_label(state):
    unit = getattr(getattr(state.cube, "wavecoord", None), "unit", None)
    return "wavelength (%s)" % (unit or "Angstrom")


def _build_spectra_figure(n):
    from matplotlib.patches import PathPatch
    width, panel, top, bottom = 10.0, 1.9, 0.3, 0.45
    height = top + bottom + panel * n
    slot = _PlotFigure(_plot_new_figure(width, height))
    fig = slot.fig
    slot.ylabel = fig.supylabel(" ", fontsize=_PLOT_FONT, x=0.008)
    first = None
    for i in range(n):
        y0 = height - top - (i + 1) * panel + bottom - 0.1
        ax = fig.add_axes((0.07, y0 / height, 0.92, (panel - 0.45) / height), sharex=first)
        first = first or ax
        ax.tick_params(labelsize=_PLOT_FONT, length=3, pad=2)
        ticks = _plot_tick_artists(ax, "left", _PLOT_FONT)
        name = ax.set_title(" ", loc="left", fontsize=_PLOT_FONT, pad=3)
        above = ax.transAxes + _plot_offset(fig, 0, 3)               # where the titles are
        ax.text(0.955, 1.0, "S/N = ", transform=above, ha="right", va="baseline",
                fontsize=_PLOT_FONT)                               # static; the value is not
        snr = ax.text(0.955, 1.0, "", transform=above, ha="left", va="baseline",
                      fontsize=_PLOT_FONT)
        zero = ax.axhline(0.0, color="0.6", lw=0.5)
        band = ax.add_patch(PathPatch(_band_path([], [], []), facecolor="tab:orange",
                                      alpha=0.45, lw=0, edgecolor="none"))
        line, = ax.plot([], [], color="k", lw=0.5)
        note = ax.text(0.5, 0.5, "", transform=ax.transAxes, ha="center", va="center",
                       fontsize=_PLOT_FONT + 1, color="0.4")
        if i < n - 1:
            ax.tick_params(labelbottom=False)
        else:
            ax.set_xlabel(" ", fontsize=_PLOT_FONT, labelpad=2)
        slot.dynamic += [zero, band, line, *ax.spines.values(), *ticks["artists"], snr, note]
        slot.panels.append(dict(ax=ax, band=band, line=line, name=name, snr=snr, note=note,
                                ticks=ticks))
    return slot


def _spectra_figure(state, result, title=""):
    """The (cached) SPECTRA figure updated for ``result``: flux, 1-sigma band, S/N."""
    names = _spectrum_names(result)
    slot = _plot_cached_figure(("SPECTRA", len(names)), lambda: _build_spectra_figure(len(names)))
    wave = np.asarray(state.cube.wave, float)
    for name, p in zip(names, slot.panels):
        flux, var = (np.asarray(a, float) for a in result.spectra[name][:2])
        _update_spectrum_panel(p, name, wave, flux, var)
    ax = slot.panels[-1]["ax"]
    finite = wave[np.isfinite(wave)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ax.set_xlim(lo, hi if hi > lo else lo + 1.0)
    xlabel, ylabel = _wave_label(state), _flux_label(getattr(state.cube, "unit", None))
    ax.xaxis.label.set_text(xlabel)
    slot.ylabel.set_text(ylabel)
    slot.suptitle.set_text(title)
    slot.signature = (tuple(names), xlabel, ylabel, ax.get_xlim())
    return slot.fig


def _update_spectrum_panel(p, name, wave, flux, var):
    n = min(wave.size, flux.size)
    wave, flux = wave[:n], flux[:n]
    var = var[:n] if var.size >= n else np.full(n, np.nan)
    with np.errstate(invalid="ignore"):
        sigma = np.sqrt(np.where(np.isfinite(var) & (var > 0), var, np.nan))
    npix = max(int(p["ax"].bbox.width), 16)       # at most 2 points per pixel column drawn
    p["line"].set_data(*_envelope_line(wave, flux, npix))
    p["band"].set_path(_band_path(*_envelope_band(wave, flux - sigma, flux + sigma, npix)))
    snr = integrated_snr(flux, var)
    p["name"].set_text(name)
    p["snr"].set_text("%.1f" % snr if np.isfinite(snr) else "n/a")
    finite = flux[np.isfinite(flux)]
    p["note"].set_text("" if finite.size else "no finite flux")
    lo, hi = _spectrum_limits(finite)
    p["ax"].set_ylim(lo, hi)
    _plot_set_ticks(p["ticks"], lo, hi, 3)


def _plot_chunk(n, npix):
    """Channels per display chunk (1: draw every channel)."""
    return 1 if n <= 2 * npix else int(np.ceil(n / float(npix)))


def _plot_chunked(values, k, fill):
    """``values`` padded with ``fill`` to a multiple of ``k`` and reshaped (-1, k)."""
    pad = (-len(values)) % k
    return np.concatenate([values, np.full(pad, fill)]).reshape(-1, k)


def _envelope_line(x, y, npix):
    """(x, y) to draw for ``npix`` pixel columns: per chunk its minimum and maximum, in
    channel order, so that lines and spikes look as with every channel; a chunk without
    finite values is a gap."""
    k = _plot_chunk(len(y), npix)
    if k == 1:
        return x, y
    bad = ~np.isfinite(y)
    lo = _plot_chunked(np.where(bad, np.inf, y), k, np.inf).argmin(axis=1)
    hi = _plot_chunked(np.where(bad, -np.inf, y), k, -np.inf).argmax(axis=1)
    start = np.arange(len(lo)) * k
    order = np.sort(np.stack([lo, hi], 1), axis=1) + start[:, None]
    index = np.minimum(order.ravel(), len(y) - 1)
    return x[index], y[index]


def _envelope_band(x, low, high, npix):
    """(x, low, high) of a band for ``npix`` pixel columns: per chunk the lowest low and
    highest high (NaN when a chunk has none)."""
    k = _plot_chunk(len(x), npix)
    if k == 1:
        return x, low, high
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN chunks: gaps
        lo = np.nanmin(_plot_chunked(low, k, np.nan), axis=1)
        hi = np.nanmax(_plot_chunked(high, k, np.nan), axis=1)
    xs = _plot_chunked(x, k, np.nan)
    return np.nanmean(xs, axis=1), lo, hi


def _band_path(x, low, high):
    """Closed polygons between ``low`` and ``high``, one per run of finite channels."""
    from matplotlib.path import Path as MplPath
    x, low, high = (np.asarray(a, float) for a in (x, low, high))
    good = np.isfinite(x) & np.isfinite(low) & np.isfinite(high)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], good.view(np.int8), [0]])))
    verts, codes = [], []
    for start, stop in zip(edges[::2], edges[1::2]):
        xs = x[start:stop]
        ring = np.concatenate([np.stack([xs, low[start:stop]], 1),
                               np.stack([xs[::-1], high[start:stop][::-1]], 1),
                               [[xs[0], low[start]]]])
        verts.append(ring)
        codes.append(np.r_[MplPath.MOVETO, np.full(len(ring) - 2, MplPath.LINETO),
                           MplPath.CLOSEPOLY])
    if not verts:
        return MplPath(np.zeros((1, 2)), [MplPath.MOVETO])
    return MplPath(np.concatenate(verts), np.concatenate(codes).astype(MplPath.code_type))


def _spectrum_limits(finite):
    """y range of the finite flux values (lines included), 5 % margins."""
    if finite.size == 0:
        return -1.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.05 * (hi - lo) if hi > lo else (0.1 * abs(lo) or 1.0)
    return lo - pad, hi + pad


# ===========================================================================
# Stage functions: one object, a chunk of objects, the whole run
# ===========================================================================
_STATE = None  # the RunState inherited by forked workers


def process_object(state, row):
    """Extract, write and summarise one object; never raises for a data problem.

    Returns
    -------
    row : dict
        The summary row (STATUS ok / fallback / failed / outside / skipped, REASON, S/N
        of every spectrum, mask sizes, timing).
    marz : dict or None
        The final spectrum for the MARZ file.
    """
    start = time.perf_counter()
    out = {"ID": row.ID, "RA": row.RA, "DEC": row.DEC, "SIZE": row.SIZE, "REF": row.REF,
           "FILE": str(source_path(state.params, row.ID))}
    path = source_path(state.params, row.ID)
    done = read_done_record(state.params, row) if not state.overwrite else None
    if done is not None and path.exists():
        previous, marz = done
        previous["REASON"] = ("skipped: done in an earlier run; " + str(previous.get("REASON", ""))).strip("; ")
        return previous, marz
    try:
        result = extract_object(state, row)
        state.writer.write(path, row, result, state.cube)
        if state.params["PLOTS"]:
            try:
                make_plots(state, row, result)
            except (ValueError, OSError, RuntimeError) as exc:    # a plot never costs the object
                log.warning("%s: plots failed (%s: %s); the Source file is written", row.ID, type(exc).__name__, exc)
                result.info["NOTES"] = "; ".join(n for n in (result.info["NOTES"], "plots failed: %s" % exc) if n)
    except ObjectError as exc:
        status = "outside" if "outside the cube" in str(exc) else "failed"
        log.warning("%s: Error, %s", row.ID, exc)
        out.update(STATUS=status, REASON=str(exc), TIME_S=time.perf_counter() - start)
        return out, None
    except (ValueError, ArithmeticError, OSError, LookupError, InputError) as exc:
        log.warning("%s: Error, %s: %s", row.ID, type(exc).__name__, exc)
        out.update(STATUS="failed", REASON="%s: %s" % (type(exc).__name__, exc),
                   TIME_S=time.perf_counter() - start)
        return out, None
    info = result.info
    flags = [f for f in info["FLAGS"].split(",") if f]
    status = "fallback" if "fallback_mask" in flags else "flagged" if flags else "ok"
    out.update(STATUS=status, REASON=info["NOTES"], **{k: info[k] for k in (
                   "MASK_USED", "MASK_OBJ_NPIX", "MASK_SKY_NPIX", "MASK_UNION_NPIX",
                   "MASK_INTER_NPIX", "REF_SPECTRUM", "FINAL_SPECTRUM", "EMPTY_SEG", "FLAGS",
                   "SHARED_SEGMENT", "SKY_METHOD", "APER_FRACTION")})
    out["VAR_ESTIMATED"] = not state.cube.has_variance
    for name in QUALITY_FLAGS:
        out["FLAG_" + name.upper()] = name in flags
    for name, (flux, var) in result.spectra.items():
        if "_CONTSUB" not in name or name.startswith("CROSS_CORRELATION"):
            out["SN_" + name] = integrated_snr(flux, var)  # a continuum-free ref has S/N ~ 0
    out["TIME_S"] = time.perf_counter() - start
    log.debug("%s: Extracted Successfully in %.2fs", row.ID, out["TIME_S"])
    final = result.spectra[info["FINAL_SPECTRUM"]]
    marz = {"ID": row.ID, "RA": row.RA, "DEC": row.DEC, "name": info["FINAL_SPECTRUM"],
            "flux": final[0], "var": final[1]}
    write_done_record(state.params, row, out, marz)      # last: the object is complete
    return out, marz


# ---------------------------------------------------------------------------
# Completion records: what makes a run resumable after SIGINT or SIGKILL
# ---------------------------------------------------------------------------
DONE_DIR = ".autospec_done"
_HASH_IGNORED = ("OUTPUT", "WARNINGS", "SUMMARY", "MARZ")


def settings_hash(params):
    """SHA-256 of everything that shapes an object's products: the parameters (not where
    or how verbosely they are written) and the cube file's size and modification time."""
    import hashlib
    import json
    cube = Path(params["DATACUBE"])
    stat = cube.stat() if cube.exists() else None
    key = {k: str(v) for k, v in params.items() if k not in _HASH_IGNORED}
    key["_cube"] = [str(cube.resolve()), stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0]
    key["_version"] = __version__
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _done_path(params, ident):
    return Path(params["OUTPUT"]) / DONE_DIR / ("%s.npz" % ident)


def write_done_record(params, row, summary, marz):
    """Record that one object is complete (its Source file, plots and summary row), with
    the settings it was made with; written atomically after everything else."""
    import json
    record = {"summary": json.dumps(summary, default=_json_default), "hash": settings_hash(params),
              "position": json.dumps([row.ID, row.RA, row.DEC, row.SIZE, row.REF]),
              "name": marz["name"], "flux": np.asarray(marz["flux"]), "var": np.asarray(marz["var"])}
    with atomic_path(_done_path(params, row.ID), overwrite=True, suffix=".part.npz") as tmp:
        np.savez(tmp, **record)


def read_done_record(params, row):
    """(summary row, MARZ entry) of an object completed with these settings, else None."""
    import json
    path = _done_path(params, row.ID)
    if not path.is_file():
        return None
    try:
        with np.load(path) as rec:
            if str(rec["hash"]) != settings_hash(params) or \
                    str(rec["position"]) != json.dumps([row.ID, row.RA, row.DEC, row.SIZE, row.REF]):
                return None
            summary = json.loads(str(rec["summary"]))
            marz = {"ID": row.ID, "RA": row.RA, "DEC": row.DEC, "name": str(rec["name"]),
                    "flux": rec["flux"], "var": rec["var"]}
    except (OSError, ValueError, KeyError):
        return None
    return summary, marz


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def check_output_settings(params, rows, overwrite):
    """Refuse to mix products of other settings into OUTPUT (unless ``overwrite``); remove
    temporary files left by a killed run."""
    outdir = Path(params["OUTPUT"])
    if not outdir.is_dir():
        return
    for tmp in list(outdir.rglob(".*.part*")):
        log.info("removing %s, left by an interrupted run", tmp)
        tmp.unlink()
    if overwrite:
        return
    current = settings_hash(params)
    other = []
    for row in rows:
        path = _done_path(params, row.ID)
        if path.is_file():
            try:
                with np.load(path) as rec:
                    if str(rec["hash"]) != current:
                        other.append(row.ID)
            except (OSError, ValueError, KeyError):
                other.append(row.ID)
    if other:
        raise OutputExistsError("OUTPUT %s holds products of %d object(s) made with other settings or another "
                                "cube (IDs %s); use --overwrite to redo them, or another OUTPUT"
                                % (outdir, len(other), other[:10]))


def _process_chunk(rows):
    """Worker entry point: process rows with the inherited global state."""
    with _quiet_warnings(_STATE.params["WARNINGS"]):
        return [process_object(_STATE, row) for row in rows]


@contextmanager
def _quiet_warnings(show):
    """WARNINGS = False hides astropy/mpdaf chatter (not AutoSpec's own warnings)."""
    with warnings.catch_warnings():
        if not show:
            from astropy.utils.exceptions import AstropyWarning
            warnings.filterwarnings("ignore", category=AstropyWarning)
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            warnings.filterwarnings("ignore", module="mpdaf")
            logging.getLogger("mpdaf").setLevel(logging.WARNING)
        yield


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _progress(total, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the stack
        return None
    return tqdm(total=total, unit="obj", desc="autospec", disable=None if enabled else True)


@contextmanager
def _single_threaded_blas():
    """Limit BLAS to one thread: per-stamp matrices are small, and on a busy machine a
    multi-threaded BLAS spends 10x longer synchronising than computing; parallelism
    comes from the worker processes instead (--nproc)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is in the stack
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def process_catalogue(state, rows, nproc=1, progress=True):
    """Process every row, in ``nproc`` forked workers; returns (summary rows, marz entries)."""
    with _single_threaded_blas():
        return _process_catalogue(state, rows, nproc, progress)


def _process_catalogue(state, rows, nproc, progress):
    global _STATE
    _STATE = state
    results, bar = [], _progress(len(rows), progress)
    try:
        if nproc <= 1 or len(rows) < 2:
            with _quiet_warnings(state.params["WARNINGS"]):
                for row in rows:
                    results.append(process_object(state, row))
                    if bar is not None:
                        bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed
            chunks = _chunks(rows, max(1, min(16, len(rows) // (4 * nproc) or 1)))
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=nproc, mp_context=context) as pool:
                futures = [pool.submit(_process_chunk, chunk) for chunk in chunks]
                for future in as_completed(futures):
                    done = future.result()
                    results.extend(done)
                    if bar is not None:
                        bar.update(len(done))
    finally:
        if bar is not None:
            bar.close()
        _STATE = None
    order = {row.ID: i for i, row in enumerate(rows)}
    results.sort(key=lambda item: order.get(item[0]["ID"], 0))
    return [r for r, _ in results], [m for _, m in results if m is not None]


SUMMARY_COLUMNS = ("ID", "RA", "DEC", "STATUS", "FLAGS", "REASON", "SIZE", "REF", "REF_SPECTRUM",
                   "FINAL_SPECTRUM", "MASK_USED", "MASK_OBJ_NPIX", "MASK_SKY_NPIX",
                   "MASK_UNION_NPIX", "MASK_INTER_NPIX", "EMPTY_SEG", "SHARED_SEGMENT", "SKY_METHOD",
                   "APER_FRACTION", "VAR_ESTIMATED") + tuple("FLAG_" + f.upper() for f in QUALITY_FLAGS) + (
                   "TIME_S", "FILE")


def _write_partial(values, rows, state):
    """Summary and MARZ file of the objects completed before an interrupt."""
    done = [read_done_record(values, row) for row in rows]
    done = [d for d in done if d is not None]
    outdir = Path(values["OUTPUT"])
    summary_rows = [d[0] for d in done]
    if summary_rows:
        write_table(summary_rows, outdir / (values["SUMMARY"] or "summary"), _summary_columns(summary_rows))
        if values["MARZ"]:
            write_marz(outdir / values["MARZ"], [d[1] for d in done], state.cube.wave)
    log.warning("interrupted: %d of %d objects complete; run again to resume", len(done), len(rows))


def _summary_columns(rows):
    extra = sorted({k for r in rows for k in r if k.startswith("SN_")})
    return list(SUMMARY_COLUMNS) + extra


def run(param=None, config=None, nproc=1, overwrite=False, progress=True, **params):
    """Run AutoSpec: extract every catalogue object of a cube.

    Parameters
    ----------
    param : str or Path, optional
        The original's ``param.py`` (read safely); None uses ``./param.py`` if present.
    config : str or Path, optional
        INI file with an ``[autospec]`` section (read before ``param``).
    nproc : int
        Objects processed in parallel (forked workers sharing the cube).
    overwrite : bool
        Redo objects whose Source file exists (otherwise they are skipped).
    progress : bool
        Show a tqdm progress bar on a terminal.
    **params
        Any key of :data:`CONFIG_SCHEMA` (e.g. ``DATACUBE="cube.fits", APER=(1.0, 2.0)``);
        wins over both files.

    Returns
    -------
    dict
        ``rows`` (summary rows), ``summary`` and ``marz`` paths, counts ``n_ok``,
        ``n_fallback``, ``n_failed``, ``n_outside``, ``n_skipped``; timings ``elapsed_s``
        (all), ``setup_s`` (reading, white light, segmentation) and ``objects_s`` (the
        per-object extraction and writing).

    Raises
    ------
    ConfigError, InputError
        Before any object is processed, naming what is wrong and how to fix it.

    Examples
    --------
    >>> autospec.run(DATACUBE="cube.fits", CATALOG="cat.txt", APER=[1.0])  # doctest: +SKIP
    """
    start = time.perf_counter()
    overrides = {(PARAM_SECTION, k.upper()): _normalise_value(
        _param_entries().get(k.upper(), CONFIG_SCHEMA[0]), v) for k, v in params.items()}
    unknown = [k for k in params if k.upper() not in _param_entries()]
    if unknown:
        raise ConfigError("unknown parameter(s) %s; known parameters are %s"
                          % (", ".join(unknown), ", ".join(sorted(_param_entries()))))
    overrides = {(s, PARAM_ALIASES.get(k, k)): v for (s, k), v in overrides.items()}
    cfg = load_autospec_config(param, config, overrides, validate=True)
    values = cfg[PARAM_SECTION]
    if nproc < 1:
        raise ConfigError("--nproc %d is invalid: give 1 or more processes" % nproc)
    outdir = Path(values["OUTPUT"])
    with _quiet_warnings(values["WARNINGS"]):
        rows = read_catalogue(values["CATALOG"], values["MODE"], values["SIZE"], values["REF"],
                              apertures=values["APER"])
        values["ORIG_FROM"] = values["ORIG_FROM"] or catalogue_origin(rows)
        state = build_state(values, overwrite, rows)
        if values["MODE"] == "cat":   # now that the pixel size and image tags are known
            read_catalogue(values["CATALOG"], "cat", values["SIZE"], values["REF"],
                           step_arcsec=state.cube.step, apertures=values["APER"], images=list(state.images))
    check_output_settings(values, rows, overwrite)
    outdir.mkdir(parents=True, exist_ok=True)        # only once the inputs are known to be good
    write_provenance(outdir / "autospec_run.json", cfg)
    log.info("%d objects, cube %s (%d x %d x %d), %d worker(s)", len(rows), values["DATACUBE"],
             *state.cube.data.shape[::-1], nproc)
    setup_s = time.perf_counter() - start
    try:
        summary_rows, marz = process_catalogue(state, rows, nproc, progress)
    except KeyboardInterrupt:                 # keep what is finished: summary + MARZ of done objects
        _write_partial(values, rows, state)
        raise
    objects_s = time.perf_counter() - start - setup_s
    outside = [r["ID"] for r in summary_rows if r["STATUS"] == "outside"]
    if outside:
        warnings.warn("%d catalogue position(s) outside the cube: IDs %s (marked 'outside' in "
                      "the summary)" % (len(outside), outside[:20]), OutsideCubeWarning, stacklevel=2)
    summary_path = outdir / (values["SUMMARY"] or "summary")
    write_table(summary_rows, summary_path, _summary_columns(summary_rows))
    marz_path = write_marz(outdir / values["MARZ"], marz, state.cube.wave) \
        if values["MARZ"] else None
    counts = {"n_%s" % s: sum(1 for r in summary_rows if r["STATUS"] == s)
              for s in ("ok", "flagged", "fallback", "failed", "outside", "skipped")}
    flag_counts = {f: sum(1 for r in summary_rows if f in str(r.get("FLAGS", "")).split(",")) for f in QUALITY_FLAGS}
    flag_counts = {f: n for f, n in flag_counts.items() if n}
    log.info("quality flags: %s", ", ".join("%d %s" % (n, f) for f, n in flag_counts.items()) or "none")
    elapsed = time.perf_counter() - start
    log.info("done in %.1fs: %s; summary %s", elapsed, counts, summary_path.with_suffix(".ecsv"))
    return dict(rows=summary_rows, summary=summary_path.with_suffix(".ecsv"), marz=marz_path,
                elapsed_s=elapsed, setup_s=setup_s, objects_s=objects_s, flags=flag_counts, **counts)


# ===========================================================================
# Command line
# ===========================================================================
def _run_arguments(parser):
    """Options of ``autospec run``."""
    parser.add_argument("--param", metavar="FILE",
                        help="parameter file in the original param.py format "
                             "(default: ./param.py when it exists); INI files go to --config")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="objects processed in parallel (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run(args, config):
    """``autospec run``: resolve param.py + INI + --set, then extract every object."""
    param = args.param
    if param is None and not Path(PARAM_FILE_NAME).is_file() and args.config is None:
        raise ConfigError("no parameters: there is no ./param.py and neither --param FILE nor "
                          "--config FILE was given; copy configs/autospec_param.py to "
                          "param.py and set DATACUBE and CATALOG")
    overrides = {k: v for (s, k), v in parse_overrides(args.set).items()}
    handler = _run_log_handler(param, args.config, overrides)
    shown = warnings.showwarning
    warnings.showwarning = _log_warning                     # NoVariance/Outside warnings in the run log
    try:
        result = run(param=param, config=args.config, nproc=args.nproc, overwrite=args.overwrite,
                     progress=not (args.no_progress or args.quiet), **overrides)
    except ToolError as exc:                                 # the run log keeps fatal errors too
        if handler is not None:                              # (the console gets it from run_cli)
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (exc,), None))
        raise
    finally:
        warnings.showwarning = shown
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
    return EXIT_OK if result["n_ok"] + result["n_fallback"] + result["n_flagged"] + result["n_skipped"] > 0 or \
        not result["rows"] else EXIT_FAILURE


def _log_warning(message, category, filename, lineno, file=None, line=None):
    """AutoSpec's warnings as log lines (console and run log) without source lines."""
    if issubclass(category, AutoSpecWarning):
        log.warning("%s", message)
    else:
        log.debug("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


class _DeferredFileHandler(logging.Handler):
    """Log file handler that holds records until the output directory exists.

    A run that fails before any object (bad cube, bad catalogue) creates no output
    directory; its records are then dropped when the handler closes (the console shows
    them).  Once ``outdir`` exists the file ``outdir/logs/<name>`` is opened, the held
    records written, and later ones appended.
    """

    def __init__(self, outdir, name, header):
        super().__init__(logging.DEBUG)
        self.outdir, self.name, self.header = Path(outdir), name, header
        self.held, self.stream = [], None

    def _open(self):
        if self.stream is None and self.outdir.is_dir():
            path = self.outdir / "logs" / self.name
            path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(path, "a")
            self.stream.write(self.header)
            for record in self.held:
                self.stream.write(self.format(record) + "\n")
            self.held = []
        return self.stream

    def emit(self, record):
        stream = self._open()
        if stream is None:
            self.held.append(record)
        else:
            stream.write(self.format(record) + "\n")
            stream.flush()

    def close(self):
        self._open()
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


def _run_log_handler(param, config, overrides):
    """Per-run log file ``<OUTPUT>/logs/<DDMonYYYY_HHMMSS>.log`` (as the original's logs/).

    Starts with the original's header lines ``# Log file: <date>`` and
    ``# AutoSpec: <version>``; OUTPUT is resolved as the run resolves it (relative to the
    param/INI file), so a run started from another directory logs beside its products.
    None when the configuration cannot be read yet (the run then reports the problem).
    """
    try:
        cfg = load_autospec_config(param, config, {(PARAM_SECTION, PARAM_ALIASES.get(
            k.upper(), k.upper())): v for k, v in overrides.items()}, validate=False)
    except ToolError:
        return None
    output = Path(cfg[PARAM_SECTION]["OUTPUT"])
    if not output.is_absolute():
        base = Path(param).parent if param else Path(config).parent if config else Path.cwd()
        output = base / output
    header = "# Log file: %s\n# AutoSpec: %s (autospec.py %s)\n" % (
        time.strftime("%d %b %Y %H:%M:%S"), "1.1.2-compatible", __version__)
    handler = _DeferredFileHandler(output, "%s.log" % time.strftime("%d%b%Y_%H%M%S"), header)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
    handler._toolkit_handler = True
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    return handler


def _with_default_subcommand(argv):
    """Insert ``run`` when no subcommand is given (``python autospec.py --nproc 2``)."""
    if any(a in SUBCOMMANDS for a in argv) or any(a in ("-h", "--help", "--version") for a in argv[:1]):
        return argv
    if any(a == "--write-config" or a.startswith("--write-config=") for a in argv):
        return argv
    return [DEFAULT_SUBCOMMAND] + argv


SUBCOMMANDS = {
    "run": ("extract spectra of every catalogue object", _run, _run_arguments),
}


def main(argv=None):
    """Run the command line; return the exit code (0 ok, 1 failure, 2 usage/config error).

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.
    """
    return cli_main(argv, SUBCOMMANDS, CONFIG_SCHEMA, prepare_argv=_with_default_subcommand)


if invoked_as_script(globals()):
    sys.exit(main())
adopt_into_session(globals(), "autospec")
