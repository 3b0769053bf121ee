"""WFC3/IR blob classifier: a CNN that finds blobs on subframes of IR difference images.

Re-creation of the WFC3 IR blob classifier (spacetelescope/wfc3_ir_blob_class, now
spacetelescope/deepwfc3 projects/ir_blob; WFC3 ISR 2021-08) for the Quicklook monitor of
the Channel Select Mechanism (CSM): "blobs" are out-of-focus images of particles on the
CSM, 10-20 px across, that dim the light by up to ~30 % at the centre (typically far
less) and, once there, stay at a fixed position.  A difference image (median stack of
recent frames minus the current frame) shows a *new* blob as a positive ring-like patch.
This module flags which 256 x 256 subframes of such an image hold a blob, locates the
blob in frame pixels, and keeps a monitor log of new blobs over time.

Pipeline
--------
1. **Read** a WFC3/IR-like FITS frame: the ``SCI`` extension (or the primary HDU, or the
   first image HDU), 1014 x 1014 (``_flt``) or 1024 x 1024 (raw, with reference pixels),
   any square frame of at least 256 px; pixels flagged in a ``DQ`` extension (bits
   ``Data.dq_mask``) and non-finite pixels are masked.  A 3-D (n, N, N) file gives its first
   plane (the original's example stacks).
2. **Difference image**: without ``--median-stack`` the frame is taken to be a difference
   image already (blobs positive).  With a median stack (a file, or the median of the last
   ``Data.n_stack`` frames of the same filter before it, by EXPSTART / DATE-OBS), both are
   divided by their median level first (``Data.normalise``), so the difference is in
   fractions of the sky level and a blob's value at its centre is its depth.
3. **Background**: large-scale structure (flat-field and sky mismatch) is removed with a
   block median on ``Data.background_box`` px blocks, bilinearly interpolated.
4. **Scaling** (the original's ``scale_data``, vectorised): zscale limits (astropy
   ``ZScaleInterval``); clip bounds ``median + factor x (limit - median)``, factor 0.5 ~ 3
   sigma; masked pixels and out-of-bound pixels within ``Data.border_fraction`` of the
   frame side from the edge get the median, interior out-of-bound pixels are clipped;
   then standardised to mean 0, std 1.
5. **Tiling**: ``ceil(N / 256)`` subframes per side, origins spread evenly from 0 to
   ``N - 256`` (rounded): a 1024 frame gives the 4 x 4 grid at multiples of 256, a 1014
   frame the origins 0, 253, 505, 758 (tiles overlap by 2-3 px), so every pixel is in a
   tile and every tile is whole.
6. **Classification** by a compact CNN (``build_model``; weights in ``models/ir_blobs/``),
   threshold chosen on the validation set at training time.
7. **Localisation** of the blobs of flagged tiles by a multi-scale compensated matched
   filter on the whole scaled frame (so blobs across tile edges are found whole).

Use
---
From the shell::

    python ir_blobs.py predict frame.fits [--median-stack stack.fits] [--outdir DIR]
    python ir_blobs.py monitor DIR --log blobs.csv [--known known_blobs.csv]
    python ir_blobs.py make-dataset [FRAMES ...] --out dataset.npz
    python ir_blobs.py train            # ~5 min on 2 CPU cores (20,000 subframes), seed from the config
    python ir_blobs.py evaluate --outdir DIR
    python ir_blobs.py simulate DIR     # WFC3/IR-like frames with known blobs
    python ir_blobs.py blob-library blobs.npy

As a module::

    import ir_blobs
    result = ir_blobs.predict("frame.fits", median_stack="stack.fits")

Inside a CASA 6 session: ``execfile("ir_blobs.py")`` defines the functions and runs nothing.

Configuration
-------------
An optional INI file (``configs/ir_blobs.cfg``; ``--write-config FILE`` writes a
template) with the sections ``[Data]``, ``[Predict]``, ``[Monitor]`` and ``[Train]``.
"""
import argparse
import configparser
import csv
import hashlib
import io
import json
import logging
import math
import os
import pickle
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
    "read_image",
    "frame_time",
    "build_median_stack",
    "difference_image",
    "subtract_background",
    "zscale_limits",
    "scale_data",
    "tile_origins",
    "extract_tiles",
    "blob_profile",
    "synthetic_blob_library",
    "save_blob_library",
    "load_blob_library",
    "add_blobs",
    "simulate_frame",
    "write_frame",
    "make_dataset",
    "save_dataset",
    "load_dataset",
    "build_model",
    "BlobModel",
    "train",
    "localise_blobs",
    "predict",
    "read_known_blobs",
    "monitor",
    "evaluate",
    "saliency_maps",
    "run_demo",
    "mad_sigma",
    "import_casa",
    "file_digest",
    "jsonable",
    "StageLedger",
    "write_provenance",
    "cli_main",
]
__version__ = "1.0.0"

log = logging.getLogger("ir_blobs")

# ===========================================================================
# Constants
# ===========================================================================
IMAGE_SIZE = 1024  # WFC3/IR raw frames are 1024 x 1024 pixels (seed); _flt frames 1014
SUBFRAME = 256     # subframe side (seed: 256 x 256 tiles of a 1024 image)
# the source file: __file__, or the file CASA's execfile compiled (it may not set __file__)
HERE = Path(globals().get("__file__") or sys._getframe(0).f_code.co_filename).resolve().parent
MODEL_DIR = HERE / "models" / "ir_blobs"
WEIGHTS_FILE = "ir_blobs.weights.h5"
META_FILE = "ir_blobs_model.json"
TILE_COLUMNS = ("tile", "x0", "y0", "size", "probability", "flagged", "blob_x", "blob_y",
                "blob_radius", "blob_snr", "blob_depth", "n_blobs", "masked_fraction", "flags")
BLOB_COLUMNS = ("blob", "tile", "x", "y", "radius", "snr", "depth")
LOG_COLUMNS = ("file", "date_obs", "mjd", "filter", "status", "tile", "x0", "y0", "probability",
               "flagged", "blob_x", "blob_y", "blob_radius", "blob_snr", "new", "known_id",
               "settings")
# quality bits of the tile table's ``flags`` column
FLAG_MASKED = 1        # more than 10 % of the tile's pixels were masked (NaN, DQ)
FLAG_NOT_LOCATED = 2   # flagged by the network but no blob above Predict.min_snr found
FLAG_TILE_EDGE = 4     # the located blob's disc crosses the tile edge (may span tiles)
FLAG_NEAR_THRESHOLD = 8  # probability within 0.1 of the threshold
FLAG_CLIPPED = 16      # scaling clipped or replaced more than 5 % of the frame's pixels
QUALITY_FLAGS = {FLAG_MASKED: "tile more than 10 % masked", FLAG_NOT_LOCATED: "no blob located",
                 FLAG_TILE_EDGE: "blob crosses the tile edge",
                 FLAG_NEAR_THRESHOLD: "probability within 0.1 of the threshold",
                 FLAG_CLIPPED: "more than 5 % of the frame clipped by the scaling"}

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
# Configuration schema (the only keys accepted; see --write-config)
# ===========================================================================
CONFIG_SCHEMA = (
    ConfigKey("Data", "extension", "str", "auto", help="image HDU: 'auto' (SCI, else the primary, else the first "
              "image HDU), an HDU number or an EXTNAME"),
    ConfigKey("Data", "dq_mask", "int", 4 | 16 | 32 | 256 | 512, (0, None),
              "DQ bits that mask a pixel when the file has a DQ extension (WFC3: 4 bad detector pixel, 16 hot, "
              "32 unstable, 256 saturated, 512 bad flat); 0 = ignore DQ", bounds=True),
    ConfigKey("Data", "normalise", "bool", True, help="divide frame and median stack by their median level before "
              "differencing (difference in fractions of the sky; blob value = depth)"),
    ConfigKey("Data", "n_stack", "int", 30, (1, None), "frames in a median stack built from a directory (the last N "
              "before the frame)", bounds=True),
    ConfigKey("Data", "min_stack", "int", 10, (1, None), "fewest frames a median stack may be built from (stacks of "
              "fewer frames keep blob-like galaxy residuals; 5-frame stacks gave false blobs in simulations)",
              bounds=True),
    ConfigKey("Data", "same_filter", "bool", True, help="build median stacks only from frames of the frame's FILTER"),
    ConfigKey("Data", "background_box", "int", 64, (0, None), "block size (px) of the large-scale background removed "
              "before scaling; 0 = none", bounds=True),
    ConfigKey("Data", "clip_mode", "str", "sigma", ("sigma", "zscale"), "clip bounds: 'sigma' = median +- "
              "clip_sigma x robust (MAD) sigma; 'zscale' = the original's median + clip_factor x (zscale limit - "
              "median)"),
    ConfigKey("Data", "clip_sigma", "float", 3.0, (0.5, None), "clip bounds in robust sigma (clip_mode = sigma)",
              bounds=True),
    ConfigKey("Data", "clip_factor", "float", 0.5, (0.01, None), "clip bounds = median + factor x (zscale limit - "
              "median) (clip_mode = zscale; the original's 0.5 was ~3 sigma on its data, ~1.5 sigma on the "
              "simulated frames here)", bounds=True),
    ConfigKey("Data", "border_fraction", "float", 0.01, (0.0, 0.25), "out-of-bound pixels this close to the frame edge "
              "(fraction of the side; 10 px of 1024) get the median instead of the clip bound", bounds=True),
    ConfigKey("Predict", "threshold", "float", None, (0.0, 1.0), "blob probability above which a tile is flagged "
              "(default: the model's, chosen on its validation set)", bounds=True),
    ConfigKey("Predict", "min_snr", "float", 5.0, (0.0, None), "matched-filter S/N a located blob must reach",
              bounds=True),
    ConfigKey("Predict", "secondary_snr", "float", 7.0, (0.0, None), "further blobs of a flagged subframe are kept "
              "when their S/N reaches this, secondary_fraction x the strongest's, and their radius is >= 3 px (the "
              "rest are noise or residual peaks)", bounds=True),
    ConfigKey("Predict", "secondary_fraction", "float", 0.3, (0.0, 1.0), "see secondary_snr", bounds=True),
    ConfigKey("Predict", "radii", "floatlist", [4.0, 5.0, 6.5, 8.0, 10.0, 12.0, 14.0],
              help="disc radii (px) of the matched filter"),
    ConfigKey("Predict", "plot", "bool", True, help="write the PNG of the frame with flagged tiles and blobs"),
    ConfigKey("Predict", "nproc", "int", None, (1, None), "CPU threads for TensorFlow (default all)", bounds=True),
    ConfigKey("Monitor", "pattern", "str", "*_flt.fits", help="file pattern of the frames in the monitored directory "
              "(WFC3 calibrated frames; e.g. *_raw.fits, *.fits)"),
    ConfigKey("Monitor", "match_radius", "float", 5.0, (0.0, None), "a blob matches a known one when the centres "
              "are closer than this (px) plus the known radius / 2", bounds=True),
    ConfigKey("Train", "seed", "int", 12345, help="seed of the simulation, augmentation and weights"),
    ConfigKey("Train", "epochs", "int", 20, (1, None), "training epochs (early stopping on the validation loss)",
              bounds=True),
    ConfigKey("Train", "n_train", "int", 20000, (10, None), "training subframes (half with blobs)", bounds=True),
    ConfigKey("Train", "n_val", "int", 2000, (10, None), "validation subframes", bounds=True),
    ConfigKey("Train", "n_frames", "int", 24, (1, None), "simulated blob-free frames the subframes are drawn from "
              "(training; half as many each for validation)", bounds=True),
    ConfigKey("Train", "batch_size", "int", 32, (1, None), "mini-batch size", bounds=True),
    ConfigKey("Train", "learning_rate", "float", 1e-3, (0.0, None), "Adam learning rate", bounds=True),
    ConfigKey("Train", "weight_decay", "float", 1e-5, (0.0, None), "decoupled weight decay (original: 1e-5)",
              bounds=True),
    ConfigKey("Train", "noise_max", "float", 0.3, (0.0, None), "augmentation: added Gaussian noise of sigma "
              "U(0, noise_max) in standardised units (original: 0.75 always, which hides the faint residuals a "
              "real difference image has)", bounds=True),
    ConfigKey("Train", "depth_min", "float", 0.03, (0.0, 1.0), "shallowest blob (fraction of the sky) in training",
              bounds=True),
    ConfigKey("Train", "depth_max", "float", 0.30, (0.0, 1.0), "deepest blob in training", bounds=True),
    ConfigKey("Train", "max_blobs", "int", 3, (1, 10), "most blobs added to one subframe (original: 1-5)",
              bounds=True),
    ConfigKey("Train", "blob_library", "path", None, help="blob cut-outs (.npy dict as the original's blob_dict.npy, "
              "or .npz); default: synthetic profiles"),
)


def _validate_config(config):
    """Cross-key checks; returns a list of messages (empty = valid)."""
    errors = []
    t = config["Train"]
    if t["depth_min"] > t["depth_max"]:
        errors.append("[Train] depth_min = %g is above depth_max = %g" % (t["depth_min"], t["depth_max"]))
    radii = config["Predict"]["radii"]
    if not radii or min(radii) <= 0 or max(radii) > SUBFRAME / 4:
        errors.append("[Predict] radii = %s: give positive radii up to %d px" % (radii, SUBFRAME // 4))
    ext = str(config["Data"]["extension"]).strip()
    if not ext:
        errors.append("[Data] extension is empty; give 'auto', an HDU number or an EXTNAME")
    return errors


class ImageError(InputError):
    """An image file cannot be used (names the file; exit code 2)."""


# ===========================================================================
# Reading frames
# ===========================================================================
def _open_fits(path):
    from astropy.io import fits
    path = Path(path)
    if not path.is_file():
        raise ImageError("%s: no such file" % path)
    try:
        hdul = fits.open(path, memmap=False)
        hdul.verify("silentfix")
        return hdul
    except (OSError, ValueError, TypeError) as exc:
        raise ImageError("%s: not a readable FITS file (%s)" % (path, exc)) from None


def _image_hdu_index(hdul, extension, path):
    """Index of the image HDU to read (``extension``: 'auto', a number or an EXTNAME)."""
    ext = str(extension).strip()
    names = [h.name.upper() for h in hdul]
    if ext.lower() != "auto":
        if ext.lstrip("-").isdigit():
            i = int(ext)
            if not 0 <= i < len(hdul):
                raise ImageError("%s: no HDU %d (the file has %d: %s)" % (path, i, len(hdul), ", ".join(names)))
            return i
        if ext.upper() not in names:
            raise ImageError("%s: no %s extension (HDUs: %s)" % (path, ext, ", ".join(names)))
        return names.index(ext.upper())
    if "SCI" in names:
        return names.index("SCI")
    for i, hdu in enumerate(hdul):
        if hdu.is_image and hdu.data is not None and hdu.data.ndim >= 2:
            return i
    raise ImageError("%s: no image data (no SCI extension and no image HDU with 2-D data; HDUs: %s)"
                     % (path, ", ".join(names)))


def _dq_mask(hdul, shape, bits):
    """Boolean mask of pixels flagged in the DQ extension (None when there is none)."""
    if not bits or "DQ" not in [h.name.upper() for h in hdul]:
        return None
    dq = hdul["DQ"].data
    if dq is None or dq.shape != shape:
        return None
    return (dq.astype(np.int64) & int(bits)) != 0


def read_image(path, extension="auto", dq_mask=820, min_size=SUBFRAME):
    """Read one frame as a float array with masked pixels set to NaN.

    Parameters
    ----------
    path : str or Path
        FITS file (WFC3/IR ``_flt``/``_raw``-like with ``SCI``/``DQ`` extensions, or a plain image).
    extension : str or int
        'auto' (``SCI``, else the primary or the first image HDU), an HDU number or an EXTNAME.
    dq_mask : int
        DQ bits that mask a pixel (0 = ignore the DQ extension).
    min_size : int
        Smallest accepted side (one subframe).

    Returns
    -------
    data : ndarray, shape (N, N), float32
        NaN where the pixel is non-finite or flagged.
    header : astropy.io.fits.Header
        The primary header updated with the image HDU's cards (EXTNAME, BUNIT, ...).

    Raises
    ------
    ImageError
        Missing/unreadable file, no image data, not square, too small, or all masked.
    """
    path = Path(path)
    with _open_fits(path) as hdul:
        index = _image_hdu_index(hdul, extension, path)
        hdu = hdul[index]
        if not hdu.is_image or hdu.data is None:
            raise ImageError("%s: HDU %d (%s) holds no image data" % (path, index, hdu.name))
        data = np.asarray(hdu.data, dtype=np.float32)
        while data.ndim > 2:
            log.info("%s: %d-D image, using its first plane", path.name, data.ndim)
            data = data[0]
        if data.ndim != 2:
            raise ImageError("%s: HDU %d is %d-D; a 2-D frame is needed" % (path, index, data.ndim))
        header = hdul[0].header.copy()
        if index:
            for card in hdu.header.cards:
                if card.keyword not in ("", "COMMENT", "HISTORY", "XTENSION", "PCOUNT", "GCOUNT"):
                    header[card.keyword] = card.value
        mask = _dq_mask(hdul, data.shape, dq_mask)
    ny, nx = data.shape
    if ny != nx:
        raise ImageError("%s: the image is %d x %d; a square frame is needed (WFC3/IR: 1014 or 1024)" % (path, ny, nx))
    if nx < min_size:
        raise ImageError("%s: the image is %d x %d; at least %d x %d is needed (one subframe)"
                         % (path, ny, nx, min_size, min_size))
    data = np.array(data, dtype=np.float32)
    if mask is not None:
        data[mask] = np.nan
    finite = np.isfinite(data)
    if not finite.any():
        raise ImageError("%s: every pixel is NaN, infinite or DQ-flagged; nothing to classify" % path)
    if not finite.all():
        data[~finite] = np.nan
    return data, header


def frame_time(header):
    """Observation start as MJD: EXPSTART, else DATE-OBS (+ TIME-OBS), else MJD-OBS; None if absent."""
    for key in ("EXPSTART", "MJD-OBS"):
        value = header.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            return float(value)
    date = header.get("DATE-OBS")
    if not date:
        return None
    text = str(date).strip()
    if "T" not in text and header.get("TIME-OBS"):
        text += "T" + str(header["TIME-OBS"]).strip()
    from astropy.time import Time
    try:
        return float(Time(text, format="isot" if "T" in text else "iso", scale="utc").mjd)
    except ValueError:
        try:
            return float(Time(text, scale="utc").mjd)
        except ValueError:
            log.warning("DATE-OBS = %r is not a date; the frame has no time", date)
            return None


def _date_obs(header):
    date = header.get("DATE-OBS")
    if date and header.get("TIME-OBS") and "T" not in str(date):
        return "%sT%s" % (str(date).strip(), str(header["TIME-OBS"]).strip())
    if date:
        return str(date).strip()
    mjd = frame_time(header)
    if mjd is None:
        return ""
    from astropy.time import Time
    return Time(mjd, format="mjd").isot


def _level(data):
    """Median of the finite pixels (the sky level a frame is normalised by)."""
    return float(np.nanmedian(data))


def _normalised(data, path):
    level = _level(data)
    if not np.isfinite(level) or level <= 0:
        raise ImageError("%s: median level %.4g is not positive, so the frame cannot be normalised; give a "
                         "difference image without --median-stack or set Data.normalise = false" % (path, level))
    return data / level


def difference_image(current, stack, normalise=True, names=("frame", "median stack")):
    """Median stack minus the current frame (blobs that are new in the frame are positive).

    Parameters
    ----------
    current, stack : ndarray, shape (N, N)
    normalise : bool
        Divide each by its median level first, so the difference is a fraction of the sky.
    names : tuple of str
        File names for the error messages.

    Returns
    -------
    ndarray, float32
    """
    if current.shape != stack.shape:
        raise ImageError("%s is %s but %s is %s: the median stack must have the frame's shape"
                         % (names[1], "x".join(map(str, stack.shape)), names[0], "x".join(map(str, current.shape))))
    if normalise:
        return (_normalised(stack, names[1]) - _normalised(current, names[0])).astype(np.float32)
    return (stack - current).astype(np.float32)


def build_median_stack(paths, normalise=True, extension="auto", dq_mask=820, min_frames=1, cache=None):
    """Per-pixel median of frames (each divided by its median level first when ``normalise``).

    Parameters
    ----------
    paths : sequence of path
    normalise : bool
    extension, dq_mask
        As :func:`read_image`.
    min_frames : int
    cache : dict, optional
        Path -> prepared frame, kept between calls (the monitor's sliding window reads each
        frame once); only the most recent ``2 x len(paths)`` entries are kept.

    Returns
    -------
    ndarray, float32
        The median stack (in units of the sky level when normalised); NaN only where
        every frame is masked.
    """
    if len(paths) < min_frames:
        raise InputError("a median stack needs at least %d frames; %d given" % (min_frames, len(paths)))
    frames, shape = [], None
    for p in paths:
        key = (str(p), bool(normalise), str(extension), int(dq_mask))
        if cache is not None and key in cache:
            data = cache[key]
        else:
            data, _ = read_image(p, extension, dq_mask)
            data = _normalised(data, p) if normalise else data
            if cache is not None:
                cache[key] = data
                while len(cache) > 2 * len(paths):
                    cache.pop(next(iter(cache)))
        if shape is not None and data.shape != shape:
            raise ImageError("%s is %s, the other stack frames %s: a median stack needs frames of one shape"
                             % (p, "x".join(map(str, data.shape)), "x".join(map(str, shape))))
        shape = data.shape
        frames.append(data)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN pixels stay NaN
        return np.nanmedian(np.stack(frames), axis=0).astype(np.float32)


def _frame_info(path, extension):
    """(mjd, filter, shape) of a frame from its headers only."""
    from astropy.io import fits
    try:
        with fits.open(path, memmap=True) as hdul:
            header = hdul[0].header.copy()
            try:
                index = _image_hdu_index(hdul, extension, path)
            except ImageError:
                return None
            for key in ("EXPSTART", "DATE-OBS", "TIME-OBS", "FILTER", "MJD-OBS"):
                if key not in header and key in hdul[index].header:
                    header[key] = hdul[index].header[key]
            shape = tuple(hdul[index].shape[-2:]) if hdul[index].shape else None
    except (OSError, ValueError):
        return None
    return {"path": Path(path), "mjd": frame_time(header), "filter": str(header.get("FILTER", "")).strip(),
            "date_obs": _date_obs(header), "shape": shape}


def stack_members(frame, candidates, n_stack=30, same_filter=True):
    """The frames a frame's median stack is built from: the last ``n_stack`` before it.

    Parameters
    ----------
    frame : dict
        From ``_frame_info`` (needs ``mjd``).
    candidates : list of dict
    n_stack : int
    same_filter : bool

    Returns
    -------
    list of Path, oldest first
    """
    if frame["mjd"] is None:
        raise ImageError("%s has no EXPSTART / DATE-OBS, so the frames before it are unknown; give --median-stack"
                         % frame["path"])
    pool = [c for c in candidates if c["mjd"] is not None and c["mjd"] < frame["mjd"]
            and c["shape"] == frame["shape"] and c["path"] != frame["path"]
            and (not same_filter or c["filter"] == frame["filter"])]
    pool.sort(key=lambda c: c["mjd"])
    return [c["path"] for c in pool[-n_stack:]]


# ===========================================================================
# Background, scaling and tiling
# ===========================================================================
def subtract_background(data, box=64):
    """Remove large-scale structure: block medians on ``box`` px blocks, bilinearly interpolated.

    Parameters
    ----------
    data : ndarray, shape (N, N)
        NaN pixels are ignored (and stay NaN).
    box : int
        Block side in pixels (0 = return a copy).  Much larger than a blob (10-20 px).

    Returns
    -------
    ndarray, float32
    """
    data = np.asarray(data, dtype=np.float32)
    if not box or box >= min(data.shape):
        return data - np.float32(np.nanmedian(data)) if box else data.copy()
    ny, nx = data.shape
    nby, nbx = int(math.ceil(ny / box)), int(math.ceil(nx / box))
    padded = np.full((nby * box, nbx * box), np.nan, np.float32)
    padded[:ny, :nx] = data
    blocks = padded.reshape(nby, box, nbx, box).transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        grid = np.nanmedian(blocks, axis=2)
    if np.isnan(grid).any():                       # blocks with no data: the global median
        grid[np.isnan(grid)] = np.nanmedian(grid) if np.isfinite(grid).any() else 0.0
    # block centres (partial last blocks: the centre of their data); linear, extrapolated at the edges
    cy = np.minimum((np.arange(nby) + 0.5) * box, (np.arange(nby) * box + ny) / 2.0) - 0.5
    cx = np.minimum((np.arange(nbx) + 0.5) * box, (np.arange(nbx) * box + nx) / 2.0) - 0.5
    if nby < 2 or nbx < 2:
        return data - np.float32(np.median(grid))
    iy, wy = _linear_weights(cy, np.arange(ny))
    ix, wx = _linear_weights(cx, np.arange(nx))
    wy, wx = wy[:, None], wx[None, :]
    g00, g01 = grid[iy][:, ix], grid[iy][:, ix + 1]
    g10, g11 = grid[iy + 1][:, ix], grid[iy + 1][:, ix + 1]
    background = (1 - wy) * ((1 - wx) * g00 + wx * g01) + wy * ((1 - wx) * g10 + wx * g11)
    return (data - background).astype(np.float32)


def _linear_weights(nodes, targets):
    """Left node index and weight of piecewise-linear interpolation, extrapolating beyond the ends."""
    idx = np.clip(np.searchsorted(nodes, targets) - 1, 0, len(nodes) - 2)
    w = (targets - nodes[idx]) / (nodes[idx + 1] - nodes[idx])
    return idx, w.astype(np.float32)


def zscale_limits(data, n_samples=1000, contrast=0.25):
    """zscale display limits of the finite pixels (astropy ``ZScaleInterval``; ginga's in the original)."""
    from astropy.visualization import ZScaleInterval
    values = data[np.isfinite(data)]
    return tuple(float(v) for v in ZScaleInterval(n_samples=n_samples, contrast=contrast).get_limits(values))


def _border_width(n, fraction):
    return int(round(fraction * n))


def clip_bounds(data, mode="sigma", clip_sigma=3.0, factor=0.5, limits=None):
    """Lower and upper clip bounds of an image, and the statistics they came from.

    Parameters
    ----------
    data : ndarray
    mode : {'sigma', 'zscale'}
        'sigma': median -+ clip_sigma x robust sigma (:func:`mad_sigma`, 1.4826 x the median
        absolute deviation; symmetric, in noise units).
        'zscale': the original's rule, median + factor x (zscale limit - median); for a
        difference image centred on zero that is factor x (vmin, vmax).
    clip_sigma, factor : float
    limits : (float, float), optional
        zscale limits to use instead of computing them (mode 'zscale').

    Returns
    -------
    lo, hi : float
    stats : dict
        median, sigma (robust), vmin, vmax (zscale limits; NaN in 'sigma' mode).
    """
    finite = data[np.isfinite(data)]
    med = float(np.median(finite))
    if mode == "zscale":
        vmin, vmax = limits if limits is not None else zscale_limits(data)
        lo, hi = med + factor * (vmin - med), med + factor * (vmax - med)
        sigma = float("nan")
    elif mode == "sigma":
        vmin = vmax = float("nan")
        sigma = mad_sigma(finite)
        lo, hi = med - clip_sigma * sigma, med + clip_sigma * sigma
    else:
        raise ConfigError("[Data] clip_mode = %r: use 'sigma' or 'zscale'" % (mode,))
    if not hi > lo:                                # a flat image: nothing to clip
        lo, hi = med - 1.0, med + 1.0
    return lo, hi, dict(median=med, sigma=sigma, vmin=vmin, vmax=vmax)


def scale_data(data, factor=0.5, border_fraction=0.01, limits=None, mode="zscale", clip_sigma=3.0):
    """The original's clip-and-standardise scaling, vectorised, with the border rule scaled to the frame.

    Steps: clip bounds (:func:`clip_bounds`: the original's zscale rule, or robust
    sigma); NaN pixels and out-of-bound pixels within ``round(border_fraction N)`` px of
    the edge get the median (the original: 10 px, and hard-coded > 1000, i.e. 23 px on
    the far sides of a 1024 frame); interior out-of-bound pixels are clipped to the
    bound; the frame is standardised to mean 0, std 1.

    Parameters
    ----------
    data : ndarray, shape (N, N)
    factor : float
        zscale factor (mode 'zscale').
    border_fraction : float
    limits : (float, float), optional
        zscale limits to use instead of computing them.
    mode : {'zscale', 'sigma'}
    clip_sigma : float
        Bounds in robust sigma (mode 'sigma').

    Returns
    -------
    scaled : ndarray, float32
    info : dict
        vmin, vmax (zscale), median, sigma, lo, hi (bounds), border (px), n_clipped,
        n_replaced, offset and scale (``scaled = (clipped - offset) / scale``), finite
        (True: no non-finite value remains, which the function asserts).

    Examples
    --------
    >>> img = np.zeros((20, 20), np.float32); img[0, 0] = 50.0; img[10, 10] = 50.0; img[5, 5] = np.nan
    >>> s, info = scale_data(img, factor=0.5, border_fraction=0.1, limits=(-2.0, 4.0))
    >>> info["lo"], info["hi"], info["border"], info["n_clipped"], info["n_replaced"]
    (-1.0, 2.0, 2, 1, 2)
    """
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.any():
        raise InputError("the image has no finite pixels to scale")
    lo, hi, stats = clip_bounds(data, mode, clip_sigma, factor, limits)
    med = stats["median"]
    n = data.shape[0]
    border = _border_width(n, border_fraction)
    outside = finite & ((data < lo) | (data > hi))
    edge = np.zeros(data.shape, bool)
    if border:
        edge[:border, :] = edge[-border:, :] = True
        edge[:, :border] = edge[:, -border:] = True
    replace = ~finite | (outside & edge)
    out = np.clip(np.where(finite, data, med), lo, hi)
    out[replace] = med
    offset, scale = float(out.mean(dtype=np.float64)), float(out.std(dtype=np.float64))
    if not scale > 0:
        scale = 1.0
    scaled = ((out - offset) / scale).astype(np.float32)
    ok = bool(np.isfinite(scaled).all())
    assert ok, "non-finite values remain after scaling"
    info = dict(stats, lo=lo, hi=hi, border=border, n_clipped=int((outside & ~edge).sum()),
                n_replaced=int(replace.sum()), offset=offset, scale=scale, finite=ok)
    return scaled, info


def _restandardise(tile):
    """Mean 0, std 1 (the original re-standardises each subframe after adding blobs)."""
    tile = tile - tile.mean(dtype=np.float64)
    std = float(tile.std(dtype=np.float64))
    return (tile / std if std > 0 else tile).astype(np.float32)


def tile_origins(n, size=SUBFRAME):
    """Subframe origins along one axis that cover ``n`` pixels with whole ``size`` tiles.

    ``ceil(n / size)`` tiles with origins spread evenly from 0 to ``n - size``, rounded:
    1024 -> 0, 256, 512, 768; 1014 -> 0, 253, 505, 758 (2-3 px overlaps); 256 -> 0.

    >>> tile_origins(1024)
    [0, 256, 512, 768]
    >>> tile_origins(1014)
    [0, 253, 505, 758]
    """
    if n < size:
        raise InputError("a %d px side is smaller than one %d px subframe" % (n, size))
    count = int(math.ceil(n / size))
    if count == 1:
        return [0]
    return [int(round(i * (n - size) / (count - 1))) for i in range(count)]


def extract_tiles(image, size=SUBFRAME):
    """All subframes of a square image (row-major: y outer, x inner).

    Returns
    -------
    tiles : ndarray, shape (n_tiles, size, size)
    origins : list of (x0, y0)
        0-based pixel origin of each tile (x = column).
    """
    origins = [(x0, y0) for y0 in tile_origins(image.shape[0], size) for x0 in tile_origins(image.shape[1], size)]
    tiles = np.stack([image[y0:y0 + size, x0:x0 + size] for x0, y0 in origins])
    return tiles, origins


def prepare_frame(path, median_stack=None, data_settings=None, stack_paths=None, cache=None):
    """Read a frame (and its median stack) and return the difference, scaled image and context.

    Parameters
    ----------
    path : path
    median_stack : path, optional
        A median stack file; without it (and without ``stack_paths``) the frame is a difference image.
    data_settings : dict, optional
        The ``[Data]`` section (defaults otherwise).
    stack_paths : list of path, optional
        Frames to build the median stack from.
    cache : dict, optional
        Frames already read (:func:`build_median_stack`).

    Returns
    -------
    dict
        difference, background_free, scaled, info (scaling), header, mask (masked pixels),
        normalised (bool)
    """
    d = _section_defaults("Data", data_settings)
    current, header = read_image(path, d["extension"], d["dq_mask"])
    normalised = False
    if median_stack is not None or stack_paths:
        if median_stack is not None:
            stack, _ = read_image(median_stack, d["extension"], d["dq_mask"])
            names = (str(path), str(median_stack))
        else:                                      # already normalised frame by frame
            stack = build_median_stack(stack_paths, d["normalise"], d["extension"], d["dq_mask"], d["min_stack"],
                                       cache)
            names = (str(path), "the median stack of %d frames" % len(stack_paths))
        diff = difference_image(current, stack, d["normalise"], names)
        normalised = bool(d["normalise"])
    else:
        diff = current
        _check_difference_like(current, path)
    mask = ~np.isfinite(diff)
    background_free = subtract_background(diff, d["background_box"])
    scaled, info = scale_data(background_free, d["clip_factor"], d["border_fraction"], mode=d["clip_mode"],
                              clip_sigma=d["clip_sigma"])
    if info["n_clipped"] + info["n_replaced"] > 0.05 * diff.size:
        log.warning("%s: the scaling clipped or replaced %.1f %% of the pixels (unusual data?)",
                    Path(path).name, 100.0 * (info["n_clipped"] + info["n_replaced"]) / diff.size)
    return dict(difference=diff, background_free=background_free, scaled=scaled, info=info, header=header,
                mask=mask, normalised=normalised)


def _check_difference_like(data, path):
    """Warn when a frame given as a difference image looks like a sky frame (blobs would be negative there)."""
    values = data[np.isfinite(data)][::97]
    med = float(np.median(values))
    sigma = mad_sigma(values)
    if sigma > 0 and abs(med) > 5 * sigma:
        log.warning("%s: median %.4g is %.0f sigma from zero - this looks like a sky frame, not a difference "
                    "image (median stack - frame), in which blobs would be dark; give --median-stack", Path(path).name,
                    med, abs(med) / sigma)
        return False
    return True


def _section_defaults(section, values=None):
    """A config section as a dict: the schema defaults updated with ``values``."""
    out = {k.key: k.default for k in CONFIG_SCHEMA if k.section == section}
    if values:
        unknown = set(values) - set(out)
        if unknown:
            raise ConfigError("unknown [%s] keys: %s (valid: %s)" % (section, ", ".join(sorted(unknown)),
                                                                      ", ".join(out)))
        out.update(values)
    return out


# ===========================================================================
# Blob library
# ===========================================================================
def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def blob_profile(radius, width=0.4, fill=0.5, softness=0.15, ellipticity=0.0, angle=0.0, size=None):
    """A ring-like ("donut") blob profile with peak 1 (the fractional dimming of a unit-depth blob).

    Parameters
    ----------
    radius : float
        Outer radius in pixels (blobs are 10-20 px across: radius 5-10).
    width : float
        Ring width as a fraction of the radius (the ring spans (1 - width) R to R).
    fill : float
        Depth inside the ring relative to the ring (1 = a flat disc, 0 = an empty ring).
    softness : float
        Edge softness as a fraction of the radius (logistic edges).
    ellipticity : float
        1 - b/a.
    angle : float
        Position angle of the major axis (radians, from +x towards +y).
    size : int, optional
        Side of the (odd) output array; default just larger than the soft edge.

    Returns
    -------
    ndarray, shape (size, size), float32, centred on the central pixel
    """
    if not radius > 0:
        raise InputError("blob radius must be positive, got %r" % (radius,))
    soft = max(float(softness), 1e-3)
    if size is None:
        size = 2 * int(math.ceil(radius * (1 + 4 * soft))) + 1
    c = (size - 1) / 2.0
    y, x = np.mgrid[:size, :size].astype(np.float64) - c
    u = x * math.cos(angle) + y * math.sin(angle)
    v = (-x * math.sin(angle) + y * math.cos(angle)) / max(1.0 - ellipticity, 0.05)
    rho = np.hypot(u, v) / radius
    outer = _sigmoid((1.0 - rho) / soft)
    inner = _sigmoid((rho - (1.0 - width)) / soft)
    prof = outer * (fill + (1.0 - fill) * inner)
    return (prof / prof.max()).astype(np.float32)


def _random_profile_parameters(rng, radius_range=(5.0, 10.0)):
    return dict(radius=float(rng.uniform(*radius_range)), width=float(rng.uniform(0.25, 0.6)),
                fill=float(rng.uniform(0.2, 1.0)), softness=float(rng.uniform(0.05, 0.3)),
                ellipticity=float(rng.uniform(0.0, 0.25)), angle=float(rng.uniform(0.0, math.pi)))


def synthetic_blob_library(n=150, seed=0, radius_range=(5.0, 10.0), cropped=0.2, binned=0.15):
    """``n`` synthetic blob profiles (peak 1) with varied radius, ring width, fill, softness, ellipticity.

    Like the real cut-outs of the original's ``blob_dict.npy``, a share of the profiles is
    cropped to a square smaller than the blob (hard edges, ``cropped``) or block-binned
    2 x 2 (``binned``), so that the network does not learn only smooth round edges.

    Returns
    -------
    dict
        Keys "1".."n" (the original ``blob_dict.npy`` layout), values 2-D float32 arrays.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        params = _random_profile_parameters(rng, radius_range)
        u = rng.random()
        if u < binned:
            params["radius"] /= 2.0
            prof = np.kron(blob_profile(**params), np.ones((2, 2), np.float32))
        else:
            prof = blob_profile(**params)
            if u < binned + cropped:
                side = max(5, int(round(2 * params["radius"] * rng.uniform(0.6, 0.95))) | 1)
                c, h = prof.shape[0] // 2, side // 2
                prof = prof[c - h:c + h + 1, c - h:c + h + 1]
                prof = prof / prof.max()
        out[str(i + 1)] = prof.astype(np.float32)
    return out


def save_blob_library(library, path, overwrite=False):
    """Write a blob dict as ``.npy`` (the original's format, a pickled dict) or ``.npz`` (plain arrays)."""
    path = Path(path)
    _check_blob_library(library, path)
    with atomic_path(path, overwrite, suffix=path.suffix or ".npy") as tmp:
        if path.suffix == ".npz":
            np.savez_compressed(tmp, **{str(k): np.asarray(v, np.float32) for k, v in library.items()})
        else:
            with open(tmp, "wb") as out:
                np.save(out, {str(k): np.asarray(v, np.float32) for k, v in library.items()}, allow_pickle=True)
    return path


# what a pickled dict of numpy arrays may reference, nothing else (no code can run)
_SAFE_PICKLE_NAMES = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                      ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}


class _ArrayDictUnpickler(pickle.Unpickler):
    """Unpickler that builds dicts, arrays and numbers only (refuses every other class)."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_PICKLE_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError("refusing to load %s.%s (only dicts of numpy arrays are accepted)"
                                     % (module, name))


def _read_npy_object(path):
    """The object stored in a ``.npy`` file, unpickled with :class:`_ArrayDictUnpickler`."""
    fmt = np.lib.format
    with open(path, "rb") as stream:
        try:
            version = fmt.read_magic(stream)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = reader(stream)
        except ValueError as exc:
            raise InputError("%s: not a .npy file (%s)" % (path, exc)) from None
        if dtype != object:
            raise InputError("%s holds a plain %s array of shape %s, not a dict of blob cut-outs"
                             % (path, dtype, shape))
        try:
            obj = _ArrayDictUnpickler(stream).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as exc:
            raise InputError("%s: cannot be read as a dict of arrays (%s)" % (path, exc)) from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    return obj


def load_blob_library(path):
    """Load blob cut-outs safely: a ``.npy`` pickled dict (the original's ``blob_dict.npy``) or a ``.npz``.

    Nothing but dicts, numpy arrays and numbers can be unpickled (no code runs, unlike
    ``np.load(allow_pickle=True)``), and nothing is read at import or from a default path.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    library : dict of str -> ndarray (2-D float32)
    kind : {'profile', 'cutout'}
        'profile' when every entry is a peak-1, non-negative profile (this module's
        synthetic library; amplitude = depth), else 'cutout' (the original's
        pre-normalised cut-outs in standardised units; amplitude x U(0.5, 1.5)).

    Raises
    ------
    InputError
        Missing file, not a dict, an entry that is not a finite 2-D array of 3-128 px.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("blob library %s: no such file" % path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                library = {k: npz[k] for k in npz.files}
        except (ValueError, OSError) as exc:
            raise InputError("blob library %s: not a readable .npz of arrays (%s)" % (path, exc)) from None
    else:
        library = _read_npy_object(path)
    _check_blob_library(library, path)
    library = {str(k): np.asarray(v, dtype=np.float32) for k, v in library.items()}
    profile = all(v.min() >= -1e-6 and abs(v.max() - 1.0) < 1e-3 for v in library.values())
    return library, ("profile" if profile else "cutout")


def _check_blob_library(library, path):
    if not isinstance(library, dict) or not library:
        raise InputError("blob library %s: expected a non-empty dict of 2-D arrays, got %s"
                         % (path, type(library).__name__ if not isinstance(library, dict) else "an empty dict"))
    for key, value in library.items():
        arr = np.asarray(value) if isinstance(value, np.ndarray) else None
        if arr is None or arr.ndim != 2 or arr.dtype.kind not in "fiu":
            raise InputError("blob library %s: entry %r is not a 2-D numeric array" % (path, key))
        if not (3 <= min(arr.shape) and max(arr.shape) <= SUBFRAME // 2):
            raise InputError("blob library %s: entry %r is %s px; cut-outs of 3 to %d px are accepted"
                             % (path, key, "x".join(map(str, arr.shape)), SUBFRAME // 2))
        if not np.isfinite(arr).all():
            raise InputError("blob library %s: entry %r holds NaN or infinite values" % (path, key))


def _profile_radius(profile):
    """Outer radius (px) of a blob cut-out: farthest pixel above half the peak, from the peak-weighted centre."""
    p = np.asarray(profile, dtype=np.float64)
    p = p - np.median(np.concatenate([p[0], p[-1], p[:, 0], p[:, -1]]))
    ny, nx = p.shape
    y, x = np.mgrid[:ny, :nx]
    w = np.clip(p, 0, None)
    total = w.sum()
    cy, cx = ((w * y).sum() / total, (w * x).sum() / total) if total > 0 else ((ny - 1) / 2, (nx - 1) / 2)
    above = p > 0.5 * p.max()
    return float(np.hypot(y - cy, x - cx)[above].max() + 0.5) if above.any() else min(ny, nx) / 2.0


def _dihedral(array, rng):
    """A random one of the 8 flips/90-degree rotations (the original: 4 flips x 4 rotations)."""
    flip = int(rng.integers(4))
    if flip == 1:
        array = array[::-1, ::-1]
    elif flip == 2:
        array = array[::-1, :]
    elif flip == 3:
        array = array[:, ::-1]
    return np.rot90(array, int(rng.integers(4)))


def add_blobs(tile, library, rng, n=1, kind="profile", depth_range=(0.03, 0.3), unit=25.0,
              centre_margin=0):
    """**Add** (not paste) ``n`` random blobs from ``library`` to a standardised subframe.

    Parameters
    ----------
    tile : ndarray, shape (S, S)
        Standardised subframe (modified copy returned, not re-standardised).
    library : dict of str -> ndarray
    rng : numpy.random.Generator
    n : int
    kind : {'profile', 'cutout'}
        Profiles get amplitude ``depth x unit``; cut-outs (already in standardised units)
        ``x U(0.5, 1.5)`` after removing their edge median.
    depth_range : (float, float)
        Depth (fraction of the sky) drawn log-uniformly, for profiles.
    unit : float
        Standardised value of a 100 % dimming (sky level / scaling std).
    centre_margin : int
        Keep centres this far inside the tile (0: anywhere, blobs may be half off).

    Returns
    -------
    tile : ndarray
    truth : list of dict
        x, y (centre in tile pixels, x = column), radius (px), depth (NaN for cut-outs).
    """
    out = np.array(tile, dtype=np.float32)
    size = out.shape[0]
    keys = list(library)
    truth = []
    for _ in range(n):
        blob = _dihedral(library[keys[int(rng.integers(len(keys)))]], rng).astype(np.float32)
        if kind == "profile":
            depth = float(np.exp(rng.uniform(np.log(depth_range[0]), np.log(depth_range[1]))))
            stamp = blob * np.float32(depth * unit)
        else:
            depth = float("nan")
            edge = np.concatenate([blob[0], blob[-1], blob[:, 0], blob[:, -1]])
            stamp = (blob - np.median(edge)) * np.float32(rng.uniform(0.5, 1.5))
        h, w = stamp.shape
        cx = float(rng.uniform(centre_margin, size - centre_margin))
        cy = float(rng.uniform(centre_margin, size - centre_margin))
        x0, y0 = int(round(cx - (w - 1) / 2.0)), int(round(cy - (h - 1) / 2.0))
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
        if xa < xb and ya < yb:
            out[ya:yb, xa:xb] += stamp[ya - y0:yb - y0, xa - x0:xb - x0]
        truth.append(dict(x=x0 + (w - 1) / 2.0, y=y0 + (h - 1) / 2.0, radius=_profile_radius(blob), depth=depth))
    return out, truth


# ===========================================================================
# Simulated WFC3/IR frames (tests, demo, training)
# ===========================================================================
def _smooth_field(rng, size, n_terms=6, scale=(150.0, 600.0)):
    """A smooth random field (sum of broad Gaussians), zero mean, unit peak-to-peak order."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    field = np.zeros((size, size), np.float32)
    for _ in range(n_terms):
        cx, cy = rng.uniform(-0.2, 1.2, 2) * size
        s = rng.uniform(*scale)
        field += np.float32(rng.normal()) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    field -= field.mean()
    return field / max(float(np.abs(field).max()), 1e-6)


def _add_stamp(image, x, y, stamp):
    h, w = stamp.shape
    x0, y0 = int(round(x - (w - 1) / 2.0)), int(round(y - (h - 1) / 2.0))
    xa, ya = max(x0, 0), max(y0, 0)
    xb, yb = min(x0 + w, image.shape[1]), min(y0 + h, image.shape[0])
    if xa < xb and ya < yb:
        image[ya:yb, xa:xb] += stamp[ya - y0:yb - y0, xa - x0:xb - x0]


def _gaussian_stamp(sigma, flux, ellipticity=0.0, angle=0.0):
    half = int(math.ceil(4 * sigma)) + 1
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = (-x * math.sin(angle) + y * math.cos(angle)) / max(1 - ellipticity, 0.1)
    g = np.exp(-(u * u + v * v) / (2 * sigma * sigma))
    return (flux * g / g.sum()).astype(np.float32)


def _blob_positions(rng, n, size, radius_range, min_separation=40.0, existing=()):
    out = list(existing)
    placed = []
    for _ in range(200 * max(n, 1)):
        if len(placed) >= n:
            break
        x, y = rng.uniform(8, size - 8, 2)
        if all(math.hypot(x - p[0], y - p[1]) > min_separation for p in out):
            out.append((x, y))
            placed.append((float(x), float(y), float(rng.uniform(*radius_range))))
    return placed


def simulate_frame(rng, size=IMAGE_SIZE, n_blobs=4, depth_range=(0.03, 0.3), radius_range=(5.0, 10.0),
                   level=None, read_noise=15.0, n_stack=None, known=(), n_stars=60, n_galaxies=15,
                   n_cosmic=250, n_hot=150, n_persistence=4, n_residual=8, depths=None, trail=None):
    """A WFC3/IR-like frame and its median stack, with new blobs of known position, radius and depth.

    Physics: both images see the sky ``level`` (electrons) through a flat field with
    ~3 % large-scale structure and the *known* (old) blobs; the current frame also has
    the new blobs (multiplicative dimming), stars and galaxies of its own field,
    persistence of a previous exposure, residual cosmic rays and unstable hot pixels,
    Poisson + read noise; the median stack is the median of ``n_stack`` frames of other
    fields (their stars and galaxies, noise; :func:`_stack_median`), with a slightly
    different sky colour (0.3 % flat mismatch) and a few compact residuals.  One frame in five (``trail=None``) has a satellite trail
    and a bad column.

    Parameters
    ----------
    rng : numpy.random.Generator
    size : int
        1024 (raw) or 1014 (flt), or any size >= 256.
    n_blobs : int
        New blobs.
    depth_range : (float, float)
        Peak fractional dimming, drawn log-uniformly.
    radius_range : (float, float)
        Outer radius (px).
    level : float, optional
        Sky level of the current frame in electrons (default log-uniform 150-2000: WFC3/IR
        sky of 0.5-1.5 e-/s in 300-1400 s; sky/noise 8-42 per pixel).
    read_noise : float
    n_stack : int, optional
        Frames in the median stack (default log-uniform 5-30, as Data.min_stack).
    known : sequence of (x, y, radius, depth)
        Old blobs, present in both images.
    n_stars, n_galaxies, n_cosmic, n_hot, n_persistence, n_residual : int
        Contaminants (see above).
    depths : sequence of float, optional
        Depths of the new blobs (overrides ``depth_range``).
    trail : bool, optional
        Force (True) or suppress (False) the satellite trail and bad column.

    Returns
    -------
    dict
        current, stack (float32 electrons), difference (normalised, float32), level,
        sky_snr (sky / noise per pixel of the current frame), truth (list of dict x, y,
        radius, depth of the new blobs; x = column, 0-based).
    """
    level = float(np.exp(rng.uniform(np.log(150.0), np.log(2000.0)))) if level is None else float(level)
    flat = 1.0 + 0.03 * _smooth_field(rng, size)
    occult_old = np.zeros((size, size), np.float32)
    for (x, y, r, d) in known:
        _add_stamp(occult_old, x, y, d * blob_profile(r, **_shape_only(rng)))
    occult_new = np.zeros((size, size), np.float32)
    truth = []
    for i, (x, y, r) in enumerate(_blob_positions(rng, n_blobs, size, radius_range,
                                                  existing=[(k[0], k[1]) for k in known])):
        d = float(depths[i]) if depths is not None else float(np.exp(rng.uniform(*np.log(depth_range))))
        _add_stamp(occult_new, x, y, d * blob_profile(r, **_shape_only(rng)))
        truth.append(dict(x=x, y=y, radius=r, depth=d))
    sky = level * flat
    current = sky * (1.0 - occult_old - occult_new)
    for _ in range(n_stars):
        flux = level * 10 ** rng.uniform(0.5, 3.0)
        _add_stamp(current, *rng.uniform(0, size, 2), _gaussian_stamp(rng.uniform(0.7, 1.2), flux))
    for _ in range(n_galaxies):
        _add_stamp(current, *rng.uniform(0, size, 2),
                   _gaussian_stamp(rng.uniform(2.0, 7.0), level * 10 ** rng.uniform(0.5, 2.0),
                                   rng.uniform(0, 0.6), rng.uniform(0, math.pi)))
    for _ in range(n_persistence):
        _add_stamp(current, *rng.uniform(0, size, 2), _gaussian_stamp(rng.uniform(1.5, 3.0), level * rng.uniform(1, 5)))
    if trail if trail is not None else rng.random() < 0.2:
        _add_trail(current, rng, level)
    noise = np.sqrt(np.clip(current, 0, None) + read_noise ** 2)
    current = current + noise * rng.standard_normal((size, size)).astype(np.float32)
    idx = rng.integers(0, size, (n_cosmic, 2))
    current[idx[:, 0], idx[:, 1]] += level * rng.uniform(0.2, 5.0, n_cosmic)
    hot = rng.integers(0, size, (n_hot, 2))
    current[hot[:, 0], hot[:, 1]] += level * rng.normal(0.0, 1.0, n_hot)
    stack_sky = level * rng.uniform(0.7, 1.3)
    colour = 1.0 + 0.003 * _smooth_field(rng, size)
    if n_stack is None:
        n_stack = int(round(np.exp(rng.uniform(np.log(5), np.log(30)))))
    stack = stack_sky * flat * colour * (1.0 - occult_old) + _stack_median(rng, size, n_stack, stack_sky, read_noise,
                                                                           n_stars, n_galaxies)
    for _ in range(n_residual):
        _add_stamp(stack, *rng.uniform(0, size, 2), _gaussian_stamp(rng.uniform(0.7, 1.5), stack_sky * rng.uniform(1, 10)))
    stack[hot[:, 0], hot[:, 1]] += level * rng.normal(0.0, 0.05, n_hot)
    current = current.astype(np.float32)
    stack = stack.astype(np.float32)
    difference = (stack / np.median(stack) - current / np.median(current)).astype(np.float32)
    return dict(current=current, stack=stack, difference=difference, level=level, truth=truth,
                sky_snr=level / math.sqrt(level + read_noise ** 2))


def _add_trail(image, rng, level):
    """A satellite trail (a 2-4 px wide line across the frame) and a bad column."""
    size = image.shape[0]
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    x0, y0 = rng.uniform(0, size, 2)
    dist = np.abs((xx - x0) * math.sin(angle) - (yy - y0) * math.cos(angle))
    image += np.float32(level * rng.uniform(0.05, 1.0)) * np.exp(-0.5 * (dist / rng.uniform(1.0, 2.0)) ** 2)
    col = int(rng.integers(0, size))
    image[:, col] += np.float32(level * rng.uniform(-0.3, 0.3))


def _stack_median(rng, size, n, sky, read_noise, n_stars, n_galaxies):
    """Median over ``n`` frames of other fields of their sources + noise (the stack minus its sky).

    The median rejects a source seen in one frame, but not wholly: where it is, the median
    moves up by ~sigma / n (0.4 sigma for 3 frames), so a stack of few frames keeps faint,
    extended positive residuals of its frames' galaxies - blob-like, and in real stacks too.
    """
    sigma = np.float32(math.sqrt(sky + read_noise ** 2))
    frames = np.empty((n, size, size), np.float32)
    for i in range(n):
        img = sigma * rng.standard_normal((size, size), dtype=np.float32)
        for _ in range(n_stars):
            _add_stamp(img, *rng.uniform(0, size, 2), _gaussian_stamp(rng.uniform(0.7, 1.2), sky * 10 ** rng.uniform(0.5, 3.0)))
        for _ in range(n_galaxies):
            _add_stamp(img, *rng.uniform(0, size, 2),
                       _gaussian_stamp(rng.uniform(2.0, 7.0), sky * 10 ** rng.uniform(0.5, 2.0), rng.uniform(0, 0.6),
                                       rng.uniform(0, math.pi)))
        frames[i] = img
    return np.median(frames, axis=0)


def _shape_only(rng):
    p = _random_profile_parameters(rng)
    p.pop("radius")
    return p


def write_frame(path, data, mjd=60000.0, filt="F140W", dq=None, overwrite=False, extra=None):
    """Write a WFC3/IR-like FITS file: header-only primary + ``SCI`` (+ ``DQ``) extensions.

    Parameters
    ----------
    path : path
    data : ndarray, shape (N, N)
    mjd : float
        EXPSTART; DATE-OBS / TIME-OBS follow from it.
    filt : str
        FILTER keyword.
    dq : ndarray of int, optional
    overwrite : bool
    extra : dict, optional
        More primary-header keywords.
    """
    from astropy.io import fits
    from astropy.time import Time
    t = Time(mjd, format="mjd", scale="utc")
    date, clock = t.isot.split("T")
    primary = fits.PrimaryHDU()
    h = primary.header
    h["TELESCOP"], h["INSTRUME"], h["DETECTOR"] = "HST", "WFC3", "IR"
    h["FILTER"], h["EXPSTART"], h["DATE-OBS"], h["TIME-OBS"] = filt, float(mjd), date, clock[:8]
    h["EXPTIME"] = 500.0
    h["ORIGIN"] = "ir_blobs %s simulation" % __version__
    for key, value in (extra or {}).items():
        h[key] = value
    sci = fits.ImageHDU(np.asarray(data, np.float32), name="SCI")
    sci.header["BUNIT"] = "ELECTRONS"
    hdus = [primary, sci]
    if dq is not None:
        hdus.append(fits.ImageHDU(np.asarray(dq, np.int16), name="DQ"))
    with atomic_path(path, overwrite, suffix=".fits") as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    return Path(path)


# ===========================================================================
# Data sets
# ===========================================================================
def _split_regions(n, size, split):
    """Allowed origin ranges ((x_lo, x_hi), (y_lo, y_hi)) of a split in one frame.

    Frames of at least 2 subframes per side are cut in quadrants: training draws from the
    top two, validation from the lower left, test from the lower right, each anywhere in
    its quadrant (the original drew validation always at x = 896).  'any' = the whole frame.
    """
    if split == "any" or n < 2 * size:
        return (0, n - size), (0, n - size)
    half = n // 2
    lo, hi = (0, half - size), (half, n - size)
    if split == "train":
        return (0, n - size), (0, half - size)
    if split == "val":
        return lo, hi
    if split == "test":
        return hi, hi
    raise InputError("split must be 'train', 'val', 'test' or 'any', got %r" % (split,))


def make_dataset(frames, n, seed=0, positive_fraction=0.5, library=None, kind="profile", split="any",
                 noise_max=0.3, depth_range=(0.03, 0.3), max_blobs=3, size=SUBFRAME, distractors=True):
    """Random augmented subframes with and without added blobs (the original's ``make_dataset``).

    Each sample: a random subframe of a random frame (within the split's region), a random
    flip and 90-degree rotation, added Gaussian noise of sigma U(0, noise_max), for
    distractors (see below), for positives 1 to ``max_blobs`` blobs **added** with centres
    inside the subframe, then re-standardised.

    Parameters
    ----------
    frames : list of dict
        Each with ``scaled`` (standardised frame, :func:`scale_data`) and ``unit``
        (standardised value of a 100 % dimming; ``None`` = unknown, taken as 25).
    n : int
    seed : int
    positive_fraction : float
    library : dict, optional
        Blob cut-outs (default: :func:`synthetic_blob_library` of ``seed``).
    kind : {'profile', 'cutout'}
    split : {'train', 'val', 'test', 'any'}
    noise_max, depth_range, max_blobs, size
        Augmentation settings.
    distractors : bool
        Half the subframes (either label) get 1-3 blob-like things that are not blobs:
        compact positive residuals (stars left in a median stack) and faint extended
        Gaussian smudges (galaxy residuals of stacks of few frames).

    Returns
    -------
    dict
        images (n, size, size) float32, labels (n,) int8 (1 blob, 0 none), and the
        truth of the brightest blob per sample: blob_x, blob_y, blob_radius, blob_depth
        (NaN for negatives), n_blobs.
    """
    if not frames:
        raise InputError("make_dataset needs at least one frame")
    rng = np.random.default_rng(seed)
    if library is None:
        library, kind = synthetic_blob_library(seed=seed), "profile"
    images = np.empty((n, size, size), np.float32)
    labels = np.zeros(n, np.int8)
    cols = {k: np.full(n, np.nan, np.float32) for k in ("blob_x", "blob_y", "blob_radius", "blob_depth")}
    n_blobs = np.zeros(n, np.int8)
    unknown_unit = [f for f in frames if f.get("unit") is None]
    if unknown_unit and kind == "profile":
        log.warning("%d frame(s) have no sky level: blob depths are taken relative to a sky/noise of 25",
                    len(unknown_unit))
    for i in range(n):
        frame = frames[int(rng.integers(len(frames)))]
        scaled = frame["scaled"]
        (xl, xh), (yl, yh) = _split_regions(scaled.shape[0], size, split)
        x0, y0 = int(rng.integers(xl, xh + 1)), int(rng.integers(yl, yh + 1))
        tile = _dihedral(scaled[y0:y0 + size, x0:x0 + size], rng)
        sigma = float(rng.uniform(0.0, noise_max))
        tile = tile + np.float32(sigma) * rng.standard_normal((size, size)).astype(np.float32)
        if distractors and rng.random() < 0.5:
            tile = _add_distractors(tile, rng, int(rng.integers(1, 4)))
        if rng.random() < positive_fraction:
            k = int(rng.integers(1, max_blobs + 1))
            unit = frame.get("unit") or 25.0
            tile, truth = add_blobs(tile, library, rng, k, kind, depth_range, unit)
            best = max(truth, key=lambda t: t["depth"] if np.isfinite(t["depth"]) else t["radius"])
            labels[i], n_blobs[i] = 1, k
            cols["blob_x"][i], cols["blob_y"][i] = best["x"], best["y"]
            cols["blob_radius"][i], cols["blob_depth"][i] = best["radius"], best["depth"]
        images[i] = _restandardise(tile)
    return dict(images=images, labels=labels, n_blobs=n_blobs, **cols)


def _add_distractors(tile, rng, n):
    """Add ``n`` non-blobs: compact bright positive spots or faint extended Gaussian smudges."""
    out = np.array(tile, dtype=np.float32)
    size = out.shape[0]
    for _ in range(n):
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            sigma = rng.uniform(0.6, 1.5)
            peak = rng.uniform(2.0, 10.0)
        else:
            sigma = rng.uniform(2.0, 7.0)
            peak = rng.uniform(0.1, 0.6)
        stamp = _gaussian_stamp(sigma, 1.0, rng.uniform(0, 0.6), rng.uniform(0, math.pi))
        _add_stamp(out, x, y, (peak / stamp.max()) * stamp)
    return out


def save_dataset(dataset, path, overwrite=False, meta=None):
    """Write a data set as a compressed npz (images as float16 to halve the size; keys as make_dataset)."""
    path = Path(path)
    arrays = {k: (v.astype(np.float16) if k == "images" else v) for k, v in dataset.items()}
    arrays["meta"] = np.array(json.dumps(meta or {}))
    with atomic_path(path, overwrite, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return path


def load_dataset(path):
    """Read a data set written by :func:`save_dataset` (or the original's ``image_set`` / ``labels`` npz)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("data set %s: no such file" % path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise InputError("data set %s: not a readable npz (%s)" % (path, exc)) from None
    if "image_set" in data and "images" not in data:        # the original's layout
        data["images"] = data.pop("image_set")
    if "images" not in data or "labels" not in data:
        raise InputError("data set %s has keys %s; 'images' and 'labels' are needed" % (path, sorted(data)))
    images = np.asarray(data["images"], np.float32)
    if images.ndim == 4 and images.shape[1] == 1:            # (N, 1, S, S) torch layout
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1] != images.shape[2] or len(images) != len(data["labels"]):
        raise InputError("data set %s: images %s and labels %s do not match (N, S, S) / (N,)"
                         % (path, images.shape, data["labels"].shape))
    data["images"] = images
    data["labels"] = np.asarray(data["labels"]).astype(np.int8)
    data["meta"] = json.loads(str(data["meta"])) if "meta" in data else {}
    return data


def simulated_frames(n, seed, size=IMAGE_SIZE, n_blobs=0, data_settings=None, **kwargs):
    """``n`` simulated frames prepared like predict's input (scaled difference images + truth).

    Returns
    -------
    list of dict
        scaled, unit (standardised value of a 100 % dimming), info, truth, level.
    """
    d = _section_defaults("Data", data_settings)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sim = simulate_frame(rng, size=size, n_blobs=n_blobs, **kwargs)
        diff = subtract_background(sim["difference"], d["background_box"])
        scaled, info = scale_data(diff, d["clip_factor"], d["border_fraction"], mode=d["clip_mode"],
                                  clip_sigma=d["clip_sigma"])
        out.append(dict(scaled=scaled, unit=1.0 / info["scale"], info=info, truth=sim["truth"],
                        level=sim["level"], sky_snr=sim["sky_snr"], difference=sim["difference"]))
    return out


def frame_tile_set(frames, size=SUBFRAME):
    """Grid tiles of prepared frames with labels from the frames' blob truth.

    A tile *holds* a blob when the blob's centre lies in it; tiles that only overlap a
    blob's disc are marked ``ambiguous`` (excluded from precision by :func:`evaluate`).

    Returns
    -------
    dict
        images, labels, ambiguous, blob_x/y (tile pixels), blob_radius, blob_depth
        (deepest blob of the tile), frame, x0, y0, sky_snr (of the frame).
    """
    rows = {k: [] for k in ("labels", "ambiguous", "blob_x", "blob_y", "blob_radius", "blob_depth", "frame",
                            "x0", "y0", "sky_snr")}
    images = []
    for fi, frame in enumerate(frames):
        tiles, origins = extract_tiles(frame["scaled"], size)
        for tile, (x0, y0) in zip(tiles, origins):
            inside = [t for t in frame["truth"] if x0 <= t["x"] < x0 + size and y0 <= t["y"] < y0 + size]
            touching = [t for t in frame["truth"] if t not in inside
                        and x0 - t["radius"] <= t["x"] < x0 + size + t["radius"]
                        and y0 - t["radius"] <= t["y"] < y0 + size + t["radius"]]
            best = max(inside, key=lambda t: t["depth"]) if inside else None
            images.append(_restandardise(tile))
            rows["labels"].append(1 if inside else 0)
            rows["ambiguous"].append(bool(touching) and not inside)
            rows["blob_x"].append(best["x"] - x0 if best else np.nan)
            rows["blob_y"].append(best["y"] - y0 if best else np.nan)
            rows["blob_radius"].append(best["radius"] if best else np.nan)
            rows["blob_depth"].append(best["depth"] if best else np.nan)
            rows["frame"].append(fi)
            rows["sky_snr"].append(frame.get("sky_snr", np.nan))
            rows["x0"].append(x0)
            rows["y0"].append(y0)
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["images"] = np.stack(images)
    out["labels"] = out["labels"].astype(np.int8)
    return out


# ===========================================================================
# Localisation (multi-scale compensated matched filter)
# ===========================================================================
NEGATIVE_CLIP = -1.5  # standardised floor before matched filtering (blobs are positive)


def _disc_kernel(radius):
    """Compensated disc: +1/area inside ``radius``, -1/area in the annulus to 2 x radius; unit L2 norm."""
    half = int(math.ceil(2 * radius)) + 1
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    r = np.hypot(x, y)
    inner, outer = r <= radius, (r > radius) & (r <= 2 * radius)
    k = np.where(inner, 1.0 / inner.sum(), 0.0) - np.where(outer, 1.0 / outer.sum(), 0.0)
    return (k / np.sqrt((k * k).sum())).astype(np.float32)


def matched_filter(image, radii):
    """S/N maps of compensated-disc matched filters (white noise of unit variance -> unit-variance maps).

    Returns
    -------
    snr : ndarray, shape image.shape
        Maximum over the radii.
    best : ndarray of int
        Index into ``radii`` of the maximum.
    """
    from scipy.signal import fftconvolve
    image = np.asarray(image, np.float32)
    image = np.clip(image, NEGATIVE_CLIP, None)   # negative sources (stars of the frame) must not ring
    stack = np.stack([fftconvolve(image, _disc_kernel(r), mode="same") for r in radii])
    best = np.argmax(stack, axis=0)
    return np.take_along_axis(stack, best[None], 0)[0], best


def localise_blobs(image, radii=(4.0, 5.0, 6.5, 8.0, 10.0, 12.0, 14.0), min_snr=5.0, max_blobs=50):
    """Blob candidates of a standardised image: centre, radius and matched-filter S/N.

    Peaks of the maximum-over-radii S/N map above ``min_snr``, strongest first, with
    weaker peaks inside a stronger one's radius suppressed; centres refined to sub-pixel
    by the S/N-weighted centroid of the 3 x 3 neighbourhood.

    Parameters
    ----------
    image : ndarray, shape (N, M)
        Standardised (noise ~ 1) image, blobs positive.
    radii : sequence of float
    min_snr : float
    max_blobs : int

    Returns
    -------
    list of dict
        x, y (pixels, x = column), radius, snr.
    """
    from scipy.ndimage import maximum_filter
    radii = [float(r) for r in radii]
    snr, best = matched_filter(image, radii)
    footprint = 2 * int(math.ceil(min(radii))) + 1
    peaks = (snr == maximum_filter(snr, size=footprint)) & (snr > min_snr)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(snr[ys, xs])[::-1]
    out = []
    ny, nx = snr.shape
    for j in order:
        y, x = int(ys[j]), int(xs[j])
        r = radii[int(best[y, x])]
        if any(math.hypot(x - c["x"], y - c["y"]) < max(r, c["radius"]) for c in out):
            continue
        ya, yb, xa, xb = max(y - 1, 0), min(y + 2, ny), max(x - 1, 0), min(x + 2, nx)
        w = np.clip(snr[ya:yb, xa:xb] - snr[ya:yb, xa:xb].min(), 0, None)
        gy, gx = np.mgrid[ya:yb, xa:xb]
        cy, cx = ((w * gy).sum() / w.sum(), (w * gx).sum() / w.sum()) if w.sum() > 0 else (y, x)
        out.append(dict(x=float(cx), y=float(cy), radius=_radial_radius(image, cx, cy, r), snr=float(snr[y, x])))
        if len(out) >= max_blobs:
            break
    return out


def _radial_radius(image, x, y, guess, rmax=None):
    """Outer radius of a blob: where its azimuthal mean profile falls to half its peak (linear interpolation).

    ``guess`` (the matched filter's radius) is returned when the profile never drops to half.
    """
    rmax = rmax or max(2.5 * guess, 8.0)
    ny, nx = image.shape
    r = int(math.ceil(rmax)) + 1
    ya, yb, xa, xb = max(int(y) - r, 0), min(int(y) + r + 2, ny), max(int(x) - r, 0), min(int(x) + r + 2, nx)
    gy, gx = np.mgrid[ya:yb, xa:xb]
    dist = np.hypot(gx - x, gy - y).ravel()
    values = np.asarray(image[ya:yb, xa:xb], np.float64).ravel()
    edges = np.arange(0.0, rmax + 1.0, 1.0)
    idx = np.digitize(dist, edges) - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    counts = np.bincount(idx[ok], minlength=len(edges) - 1)
    sums = np.bincount(idx[ok], values[ok], minlength=len(edges) - 1)
    prof = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    outer = np.nanmedian(prof[int(len(prof) * 0.75):]) if np.isfinite(prof).any() else 0.0
    prof = prof - (outer if np.isfinite(outer) else 0.0)
    centres = 0.5 * (edges[:-1] + edges[1:])
    if len(prof) >= 3:                             # 3-bin running mean: one noisy ring must not decide
        padded = np.concatenate([prof[:1], prof, prof[-1:]])
        prof = (padded[:-2] + padded[1:-1] + padded[2:]) / 3.0
    inner = centres <= guess * 1.2
    if not np.isfinite(prof[inner]).any():
        return float(guess)
    k = int(np.nanargmax(np.where(inner, prof, -np.inf)))
    half = 0.5 * prof[k]
    if not half > 0:
        return float(guess)
    radius = float(guess)
    for j in range(k + 1, len(prof)):
        if np.isfinite(prof[j]) and prof[j] < half:
            a, b = prof[j - 1], prof[j]
            radius = float(centres[j - 1] + (a - half) / (a - b) * (centres[j] - centres[j - 1])) if a != b \
                else float(centres[j])
            break
    # a profile too noisy to trust gives a radius far from the matched filter's: keep the filter's
    return radius if 0.5 * guess <= radius <= 2.0 * guess else float(guess)


def _mean_dimming(difference, x, y, radius):
    """Mean of a (normalised, background-free) difference image inside a disc: the mean fractional dimming."""
    ny, nx = difference.shape
    r = int(math.ceil(radius))
    ya, yb, xa, xb = max(int(y) - r, 0), min(int(y) + r + 2, ny), max(int(x) - r, 0), min(int(x) + r + 2, nx)
    gy, gx = np.mgrid[ya:yb, xa:xb]
    inside = np.hypot(gx - x, gy - y) <= radius
    values = difference[ya:yb, xa:xb][inside]
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# ===========================================================================
# Model
# ===========================================================================
# training blobs: the catalogued 10-20 px across, and smaller, as some of the real cut-outs
# of the original's blob_dict.npy (cores of radius 3-4 px); below 4 px they would be confused
# with stars left in a median stack
TRAIN_RADII = (4.0, 10.0)
ARCHITECTURE = dict(size=SUBFRAME, pool=2, filters=(8, 16, 32, 32), kernels=(5, 3, 3, 3), dense=16, dropout=0.15)


def build_model(size=SUBFRAME, pool=2, filters=(8, 16, 32, 32), kernels=(5, 3, 3, 3), dense=16, dropout=0.15):
    """The compact blob CNN (keras): ~20 k parameters instead of the original's 8.4 M.

    Input (size, size, 1) -> 2x2 average pooling (blobs are 10-20 px, so half resolution
    keeps them 5-10 px and halves the noise) -> four conv + ReLU blocks (5x5 then 3x3,
    8-16-32-32 filters; max-pooling after the first three) -> global max pooling ("is
    there a blob *anywhere*": translation invariant, any position in the tile) -> dropout
    -> dense 16 ReLU -> 1 sigmoid (blob probability).  The original flattened
    16 x 64 x 64 features into a 128-unit layer (8.4 M weights, 32 MB).

    Returns
    -------
    keras.Model (not compiled)
    """
    keras = _import_keras()
    layers = keras.layers
    inputs = keras.Input((size, size, 1), name="subframe")
    x = layers.AveragePooling2D(pool)(inputs) if pool > 1 else inputs
    for i, (f, k) in enumerate(zip(filters, kernels)):
        x = layers.Conv2D(f, k, padding="same", activation="relu", name="conv%d" % (i + 1))(x)
        if i < len(filters) - 1:
            x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(dense, activation="relu", name="dense")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="blob")(x)
    return keras.Model(inputs, outputs, name="ir_blobs")


class BlobModel:
    """The trained classifier: weights, threshold and metadata from a model directory.

    Parameters
    ----------
    model_dir : path, optional
        Directory with ``ir_blobs.weights.h5`` and ``ir_blobs_model.json`` (default
        ``models/ir_blobs`` beside this file).
    threads : int, optional
        CPU threads for TensorFlow.
    """

    def __init__(self, model_dir=None, threads=None):
        self.model_dir = Path(model_dir) if model_dir else MODEL_DIR
        meta_path, weights = self.model_dir / META_FILE, self.model_dir / WEIGHTS_FILE
        for p in (meta_path, weights):
            if not p.is_file():
                raise InputError("model file %s is missing; train with 'python ir_blobs.py train' or give "
                                 "--model-dir (the shipped model is in models/ir_blobs/)" % p)
        try:
            self.meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise InputError("%s is not valid JSON (%s)" % (meta_path, exc)) from None
        self.sha256 = file_digest(weights)
        if self.meta.get("weights_sha256") not in (None, self.sha256):
            raise InputError("%s does not match the checksum in %s (weights from another training?)"
                             % (weights, meta_path))
        self.threshold = float(self.meta.get("threshold", 0.5))
        self.size = int(self.meta.get("architecture", ARCHITECTURE)["size"])
        _import_keras(threads)
        self.model = build_model(**self.meta.get("architecture", ARCHITECTURE))
        self.model.load_weights(str(weights))

    def predict(self, tiles, batch_size=64):
        """Blob probabilities of standardised tiles, shape (n, size, size) -> (n,)."""
        tiles = np.asarray(tiles, np.float32)
        if tiles.ndim != 3 or tiles.shape[1:] != (self.size, self.size):
            raise InputError("tiles of shape %s given; the model takes (n, %d, %d)" % (tiles.shape, self.size,
                                                                                       self.size))
        out = []
        for i in range(0, len(tiles), batch_size):
            out.append(self.model(tiles[i:i + batch_size, ..., None], training=False).numpy()[:, 0])
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def saliency_maps(model, tiles):
    """|d logit / d input| of each tile (the original's diagnostic): where the network looks.

    The gradient of the logit, not of the probability: a confident p = 1.000 saturates the
    sigmoid and would give an all-zero map.
    """
    import tensorflow as tf
    keras = _import_keras()
    features = keras.Model(model.model.inputs, model.model.get_layer("dense").output)
    weights, bias = model.model.get_layer("blob").get_weights()
    x = tf.convert_to_tensor(np.asarray(tiles, np.float32)[..., None])
    with tf.GradientTape() as tape:
        tape.watch(x)
        logit = tf.matmul(features(x, training=False), weights) + bias
    return np.abs(tape.gradient(logit, x).numpy()[..., 0])


# ===========================================================================
# Training
# ===========================================================================
def _threshold_from_validation(labels, prob, max_fpr=0.005):
    """Lowest threshold (0.01 grid) at which at most ``max_fpr`` of the validation negatives are flagged.

    A false-positive-rate rule, not best F1: the validation set is half blobs (many of them
    faint), a monitored frame has few, so a threshold tuned for F1 at 50 % prevalence
    floods the Quicklook team with false alarms (measured: 4 % of blob-free tiles flagged
    at the best-F1 threshold 0.37, 0.3 % at 0.7).
    """
    labels = np.asarray(labels).astype(bool)
    prob = np.asarray(prob)
    for t in np.round(np.arange(0.05, 0.991, 0.01), 2):
        if (prob[~labels] >= t).mean() <= max_fpr:
            return float(t)
    return 0.99


def _binary_metrics(labels, flagged):
    labels, flagged = np.asarray(labels).astype(bool), np.asarray(flagged).astype(bool)
    tp, fp = int((labels & flagged).sum()), int((~labels & flagged).sum())
    fn, tn = int((labels & ~flagged).sum()), int((~labels & ~flagged).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return dict(tp=tp, fp=fp, fn=fn, tn=tn, precision=precision, recall=recall, f1=f1,
                accuracy=(tp + tn) / max(tp + fp + fn + tn, 1))


def train(model_dir=None, seed=12345, epochs=20, n_train=20000, n_val=2000, n_frames=24, batch_size=32,
          learning_rate=1e-3, weight_decay=1e-5, noise_max=0.3, depth_min=0.03, depth_max=0.30, max_blobs=3,
          blob_library=None, frames=None, median_stack=None, nproc=None, overwrite=False, data_settings=None):
    """Simulate (or read) frames, make training/validation sets, train the CNN, save weights + metadata.

    Validation frames are simulated with another seed than the training frames, and the
    validation set is scored against its own labels (the original used the training
    labels).  The threshold is the validation set's best-F1 one.

    Parameters
    ----------
    model_dir : path, optional
        Output directory (default ``models/ir_blobs``).
    seed : int
        Seeds the simulation (seed, seed + 1), the augmentation (seed + 2, seed + 3) and
        keras (seed); TensorFlow op determinism is on.
    epochs, n_train, n_val, n_frames, batch_size, learning_rate, weight_decay
        Training settings (``[Train]``).
    noise_max, depth_min, depth_max, max_blobs
        Augmentation settings.
    blob_library : path, optional
        Blob cut-outs (:func:`load_blob_library`); default synthetic profiles.
    frames : list of path, optional
        Real blob-free frames (difference images, or frames differenced against
        ``median_stack``) whose subframes join the simulated ones.
    median_stack : path, optional
    nproc : int, optional
    overwrite : bool
    data_settings : dict, optional

    Returns
    -------
    dict
        The metadata written to ``ir_blobs_model.json`` (through :func:`write_provenance`:
        with the tool, version, command line and date).
    """
    model_dir = Path(model_dir) if model_dir else MODEL_DIR
    weights, meta_path = model_dir / WEIGHTS_FILE, model_dir / META_FILE
    if (weights.exists() or meta_path.exists()) and not overwrite:
        raise OutputExistsError("%s holds a model already; use --overwrite to replace it" % model_dir)
    library, kind = load_blob_library(blob_library) if blob_library else (
        synthetic_blob_library(600, seed=seed, radius_range=TRAIN_RADII), "profile")
    t0 = time.time()
    d = _section_defaults("Data", data_settings)
    train_frames = simulated_frames(n_frames, seed, data_settings=d)
    val_frames = simulated_frames(max(n_frames // 2, 1), seed + 1, data_settings=d)
    real = [_frame_for_dataset(p, median_stack, d) for p in (frames or [])]
    aug = dict(library=library, kind=kind, noise_max=noise_max, depth_range=(depth_min, depth_max),
               max_blobs=max_blobs)
    train_set = make_dataset(train_frames + real, n_train, seed + 2, split="train" if real else "any", **aug)
    val_set = make_dataset(val_frames + real, n_val, seed + 3, split="val" if real else "any", **aug)
    t_data = time.time() - t0
    log.info("data: %d training / %d validation subframes from %d + %d simulated and %d real frames (%.0f s)",
             n_train, n_val, len(train_frames), len(val_frames), len(real), t_data)
    keras = _import_keras(nproc)
    import tensorflow as tf
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = build_model(**ARCHITECTURE)
    for layer in model.layers:                     # the original's count_parameters
        log.debug("layer %-24s %8d parameters", layer.name, layer.count_params())
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay),
                  loss="binary_crossentropy", metrics=["accuracy", keras.metrics.AUC(name="auc")])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)
    t1 = time.time()
    history = model.fit(train_set["images"][..., None], train_set["labels"].astype(np.float32),
                        validation_data=(val_set["images"][..., None], val_set["labels"].astype(np.float32)),
                        epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0,
                        callbacks=[stop, _EpochLogger(epochs)])
    t_fit = time.time() - t1
    prob = np.asarray(model.predict(val_set["images"][..., None], batch_size=64, verbose=0))[:, 0]
    threshold = _threshold_from_validation(val_set["labels"], prob)
    val_metrics = _binary_metrics(val_set["labels"], prob >= threshold)
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights, overwrite=True, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)
    settings = dict(seed=seed, epochs=epochs, n_train=n_train, n_val=n_val, n_frames=n_frames,
                    batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
                    noise_max=noise_max, depth_min=depth_min, depth_max=depth_max, max_blobs=max_blobs,
                    blob_library=str(blob_library) if blob_library else "synthetic", real_frames=len(real),
                    data=d)
    meta = dict(architecture=dict(ARCHITECTURE), threshold=threshold,
                weights_sha256=file_digest(weights), n_parameters=int(model.count_params()), settings=settings,
                history={k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()},
                epochs_run=len(history.history["loss"]), validation=val_metrics,
                seconds=dict(data=round(t_data, 1), fit=round(t_fit, 1), total=round(time.time() - t0, 1)),
                threads=nproc or os.cpu_count(),
                versions={"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__})
    meta = json.loads(write_provenance(meta_path, None, **meta).read_text())   # + tool, version, argv, date
    try:
        _plot_history(meta, model_dir / "ir_blobs_training.png")
    except Exception as exc:          # a plot must not lose a trained model
        log.warning("training plot not written: %s", exc)
    log.info("trained in %.0f s (%d epochs), validation precision %.3f recall %.3f at threshold %.2f; wrote %s",
             t_fit, meta["epochs_run"], val_metrics["precision"], val_metrics["recall"], threshold, model_dir)
    return meta


def _plot_history(meta, path):
    """Training and validation loss and accuracy against epoch (the original's plot_metrics)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure(figsize=(10, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    h = meta["history"]
    epochs = np.arange(1, len(h["loss"]) + 1)
    for k, (key, label) in enumerate((("loss", "binary cross-entropy"), ("accuracy", "accuracy"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot(epochs, h[key], "o-", label="training")
        ax.plot(epochs, h["val_" + key], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("ir_blobs training (seed %d, %d + %d subframes, threshold %.2f)"
                 % (meta["settings"]["seed"], meta["settings"]["n_train"], meta["settings"]["n_val"],
                    meta["threshold"]), fontsize=10)
    fig.tight_layout()
    with atomic_path(path, overwrite=True, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _epoch_logger_base():
    keras = _import_keras()
    return keras.callbacks.Callback


class _EpochLogger:
    """keras callback that logs one line per epoch (created lazily, keras is not imported at load)."""

    def __new__(cls, epochs):
        base = _epoch_logger_base()

        class EpochLogger(base):
            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                log.info("epoch %d/%d: loss %.4f acc %.3f | validation loss %.4f acc %.3f auc %.4f",
                         epoch + 1, epochs, logs.get("loss", float("nan")), logs.get("accuracy", float("nan")),
                         logs.get("val_loss", float("nan")), logs.get("val_accuracy", float("nan")),
                         logs.get("val_auc", float("nan")))
        return EpochLogger()


def _frame_for_dataset(path, median_stack, data_settings):
    prep = prepare_frame(path, median_stack, data_settings)
    unit = 1.0 / prep["info"]["scale"] if prep["normalised"] else None
    return dict(scaled=prep["scaled"], unit=unit)


# ===========================================================================
# Predict
# ===========================================================================
_MODELS = {}


def _model(model_dir=None, threads=None):
    """A cached :class:`BlobModel` per model directory (and weights checksum)."""
    key = str(Path(model_dir).resolve()) if model_dir else str(MODEL_DIR)
    weights = Path(key) / WEIGHTS_FILE
    stamp = weights.stat().st_mtime_ns if weights.exists() else None
    cached = _MODELS.get(key)
    if cached is None or cached[0] != stamp:
        _MODELS[key] = (stamp, BlobModel(key, threads))
    return _MODELS[key][1]


def classify_frame(prep, model, threshold=None, min_snr=5.0, radii=(4.0, 5.0, 6.5, 8.0, 10.0, 12.0, 14.0),
                   secondary_fraction=0.3, secondary_snr=7.0):
    """Tile rows (dicts with TILE_COLUMNS) and blob candidates of a prepared frame.

    Parameters
    ----------
    prep : dict
        From :func:`prepare_frame`.
    model : BlobModel
    threshold : float, optional
        Default the model's.
    min_snr, radii, secondary_fraction, secondary_snr
        Localisation settings: a flagged tile keeps its strongest candidate and those with
        S/N >= max(secondary_snr, secondary_fraction x the strongest's) and a radius >= 3 px.

    Returns
    -------
    rows : list of dict
    candidates : list of dict
        All located blobs of the frame (x, y, radius, snr, tile or -1 when in no flagged tile).
    """
    threshold = model.threshold if threshold is None else float(threshold)
    tiles, origins = extract_tiles(prep["scaled"], model.size)
    prob = model.predict(np.stack([_restandardise(t) for t in tiles]))
    candidates = localise_blobs(prep["scaled"], radii, min_snr)
    clipped = prep["info"]["n_clipped"] + prep["info"]["n_replaced"] > 0.05 * prep["scaled"].size
    rows = []
    size = model.size
    for i, ((x0, y0), p) in enumerate(zip(origins, prob)):
        flagged = bool(p >= threshold)
        masked = float(prep["mask"][y0:y0 + size, x0:x0 + size].mean())
        inside = [c for c in candidates if x0 <= c["x"] < x0 + size and y0 <= c["y"] < y0 + size]
        inside = inside[:1] + [c for c in inside[1:] if c["radius"] >= 3.0
                               and c["snr"] >= max(secondary_snr, secondary_fraction * inside[0]["snr"])]
        flags = (FLAG_MASKED if masked > 0.1 else 0) | (FLAG_NEAR_THRESHOLD if abs(p - threshold) < 0.1 else 0)
        flags |= FLAG_CLIPPED if clipped else 0
        row = dict(tile=i, x0=x0, y0=y0, size=size, probability=round(float(p), 5), flagged=int(flagged),
                   blob_x=float("nan"), blob_y=float("nan"), blob_radius=float("nan"), blob_snr=float("nan"),
                   blob_depth=float("nan"), n_blobs=0, masked_fraction=round(masked, 4), flags=0)
        if flagged and inside:
            for c in inside:                       # mean dimming: only with a normalised difference
                c["depth"] = _mean_dimming(prep["background_free"], c["x"], c["y"], c["radius"]) \
                    if prep["normalised"] else float("nan")
            best = inside[0]                       # candidates are sorted by S/N
            row.update(blob_x=round(best["x"], 2), blob_y=round(best["y"], 2), blob_radius=best["radius"],
                       blob_snr=round(best["snr"], 2), n_blobs=len(inside), blob_depth=round(best["depth"], 5))
            if (best["x"] - best["radius"] < x0 or best["x"] + best["radius"] >= x0 + size
                    or best["y"] - best["radius"] < y0 or best["y"] + best["radius"] >= y0 + size):
                flags |= FLAG_TILE_EDGE
            for c in inside:
                c["tile"] = i
        elif flagged:
            flags |= FLAG_NOT_LOCATED
        row["flags"] = flags
        rows.append(row)
    for c in candidates:
        c.setdefault("tile", -1)
    return rows, candidates


def _output_paths(path, outdir):
    path = Path(path)
    stem = path.name[:-5] if path.name.lower().endswith(".fits") else path.stem
    if stem.lower().endswith(".fits"):
        stem = stem[:-5]
    outdir = Path(outdir) if outdir else path.parent
    out = {kind: outdir / ("%s_tiles.%s" % (stem, kind)) for kind in ("csv", "png", "json")}
    out["blobs"] = outdir / ("%s_blobs.csv" % stem)
    return out


def _csv_text(rows, columns):
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return stream.getvalue()


def _csv_value(v):
    if isinstance(v, float):
        return "" if not np.isfinite(v) else repr(round(v, 6))
    return "" if v is None else v


def predict(path, median_stack=None, outdir=None, model_dir=None, threshold=None, overwrite=False,
            data_settings=None, predict_settings=None, stack_paths=None, write=True, cache=None):
    """Classify the subframes of one frame; write ``<frame>_tiles.csv`` / ``.png`` / ``.json`` and ``<frame>_blobs.csv``.

    ``_tiles.csv``: one row per subframe (``TILE_COLUMNS``; the strongest located blob of a
    flagged tile, ``n_blobs`` located in it, quality ``flags``, see ``QUALITY_FLAGS``);
    ``_blobs.csv``: every blob located in a flagged tile (``BLOB_COLUMNS``); ``_tiles.json``:
    provenance (:func:`write_provenance`: version, command line; inputs, settings, model
    checksum, threshold, scaling); ``_tiles.png``: the frame with the tile grid, flagged
    tiles and blob circles.

    Parameters
    ----------
    path : path
        The frame: a difference image (blobs positive) or, with ``median_stack``, the current frame.
    median_stack : path, optional
    outdir : path, optional
        Default: beside the frame.
    model_dir : path, optional
    threshold : float, optional
        Overrides the model's threshold (and ``[Predict] threshold``).
    overwrite : bool
    data_settings, predict_settings : dict, optional
        ``[Data]`` and ``[Predict]`` values.
    stack_paths : list of path, optional
        Frames to build the median stack from (instead of a file).
    write : bool
        False: compute only (the monitor).
    cache : dict, optional
        Frames already read for median stacks (the monitor).

    Returns
    -------
    dict
        rows (tile table), candidates, paths, threshold, seconds, n_tiles.
    """
    p = _section_defaults("Predict", predict_settings)
    if threshold is not None:
        p["threshold"] = threshold
    paths = _output_paths(path, outdir) if write else {}
    if write and not p["plot"]:
        paths.pop("png")
    if write and not overwrite:
        for out in paths.values():
            if out.exists():
                raise OutputExistsError("%s exists already; use --overwrite to replace it" % out)
    t0 = time.time()
    prep = prepare_frame(path, median_stack, data_settings, stack_paths, cache)
    model = _model(model_dir, p["nproc"])
    if prep["scaled"].shape[0] < model.size:
        raise ImageError("%s: %d px frame, smaller than the model's %d px subframes"
                         % (path, prep["scaled"].shape[0], model.size))
    rows, candidates = classify_frame(prep, model, p["threshold"], p["min_snr"], p["radii"], p["secondary_fraction"],
                                      p["secondary_snr"])
    seconds = time.time() - t0
    thr = model.threshold if p["threshold"] is None else float(p["threshold"])
    result = dict(rows=rows, candidates=candidates, paths=paths, threshold=thr, seconds=seconds,
                  n_tiles=len(rows), header=prep["header"], model_sha256=model.sha256)
    if write:
        provenance = dict(frame=str(Path(path).resolve()),
                          median_stack=str(Path(median_stack).resolve()) if median_stack else None,
                          stack_frames=[str(s) for s in stack_paths or []], threshold=thr,
                          model_dir=str(model.model_dir), model_sha256=model.sha256,
                          data=_section_defaults("Data", data_settings), predict=p,
                          scaling=dict(prep["info"]), quality_flags=QUALITY_FLAGS)
        blobs = _blob_rows(candidates)
        writers = {"csv": lambda tmp: Path(tmp).write_text(_csv_text(rows, TILE_COLUMNS)),
                   "blobs": lambda tmp: Path(tmp).write_text(_csv_text(blobs, BLOB_COLUMNS)),
                   "json": lambda tmp: write_provenance(tmp, None, **provenance)}
        if "png" in paths:
            writers["png"] = lambda tmp: plot_tiles(prep["scaled"], rows, candidates, tmp, title=Path(path).name,
                                                    threshold=thr)
        _write_together(paths, writers, overwrite)
        stale = _output_paths(path, outdir)["png"]
        if "png" not in paths and stale.exists():    # a PNG of an earlier run must not sit beside new tables
            stale.unlink()
            log.info("removed %s (from an earlier run; this run makes no plot)", stale)
        n_flag = sum(r["flagged"] for r in rows)
        log.info("%s: %d of %d subframes flagged (threshold %.2f), %d blob(s) located; %.2f s",
                 Path(path).name, n_flag, len(rows), thr, sum(r["n_blobs"] for r in rows), seconds)
    return result


def _blob_rows(candidates):
    """One row per blob located in a flagged tile (``<frame>_blobs.csv``), strongest first."""
    rows = []
    for c in candidates:
        if c.get("tile", -1) < 0:
            continue
        rows.append(dict(blob=len(rows) + 1, tile=c["tile"], x=round(c["x"], 2), y=round(c["y"], 2),
                         radius=round(c["radius"], 2), snr=round(c["snr"], 2), depth=round(c["depth"], 5)))
    return rows


def _write_together(paths, writers, overwrite):
    """Write every output to a temporary sibling, then rename them all; on error none is left."""
    tmps = {}
    try:
        for kind, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix="." + kind, dir=path.parent)
            os.close(fd)
            tmps[kind] = tmp
            writers[kind](tmp)
            os.chmod(tmp, 0o644)
        for kind, path in paths.items():
            if path.exists() and not overwrite:
                raise OutputExistsError("%s exists already; use --overwrite to replace it" % path)
        for kind, path in paths.items():
            os.replace(tmps.pop(kind), path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def plot_tiles(scaled, rows, candidates, path, title="", threshold=0.5):
    """PNG of the scaled frame with the tile grid, flagged tiles (probability) and located blobs."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Circle, Rectangle
    fig = Figure(figsize=(8.6, 7.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    im = ax.imshow(scaled, origin="lower", cmap="gray", vmin=-3, vmax=3, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("standardised difference (median stack - frame) [sigma]")
    for r in rows:
        flagged = bool(r["flagged"])
        ax.add_patch(Rectangle((r["x0"] - 0.5, r["y0"] - 0.5), r["size"], r["size"], fill=False,
                               edgecolor="red" if flagged else "deepskyblue", lw=2.2 if flagged else 0.8,
                               alpha=1.0 if flagged else 0.7))
        ax.text(r["x0"] + 6, r["y0"] + 6, "tile %d  p = %.2f" % (r["tile"], r["probability"]),
                color="orangered" if flagged else "white", fontsize=8, fontweight="bold" if flagged else "normal",
                ha="left", va="bottom", bbox=dict(facecolor="black", alpha=0.7, lw=0, pad=1.5))
    for c in candidates:
        if c.get("tile", -1) >= 0:
            ax.add_patch(Circle((c["x"], c["y"]), c["radius"] * 1.6, fill=False, edgecolor="yellow", lw=1.2))
    n_flag = sum(r["flagged"] for r in rows)
    ax.set_title("%s: %d/%d subframes flagged (p >= %.2f), %d blob(s)" % (title, n_flag, len(rows), threshold,
                 sum(c.get("tile", -1) >= 0 for c in candidates)), fontsize=9)
    ax.set_xlabel("x [pixel]")
    ax.set_ylabel("y [pixel]")
    fig.savefig(path, format="png", bbox_inches="tight")


# ===========================================================================
# Monitor
# ===========================================================================
def read_known_blobs(path):
    """Known-blob catalogue: CSV with columns x, y, radius (frame pixels, 0-based; optional id).

    Returns
    -------
    list of dict
        id, x, y, radius.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("known-blob catalogue %s: no such file" % path)
    with open(path, newline="") as stream:
        reader = csv.DictReader(row for row in stream if row.strip() and not row.startswith("#"))
        fields = {f.strip().lower(): f for f in (reader.fieldnames or [])}
        missing = [c for c in ("x", "y", "radius") if c not in fields]
        if missing:
            raise InputError("known-blob catalogue %s: missing column(s) %s (has: %s; needed: x, y, radius "
                             "[, id])" % (path, ", ".join(missing), ", ".join(reader.fieldnames or []) or "none"))
        out = []
        for n, row in enumerate(reader, start=2):
            try:
                entry = {c: float(row[fields[c]]) for c in ("x", "y", "radius")}
            except (TypeError, ValueError):
                raise InputError("known-blob catalogue %s, line %d: x, y and radius must be numbers, got %s"
                                 % (path, n, {c: row.get(fields[c]) for c in ("x", "y", "radius")})) from None
            entry["id"] = str(row[fields["id"]]).strip() if "id" in fields else str(len(out) + 1)
            out.append(entry)
    return out


def _match_known(blob, known, match_radius):
    for k in known:
        if math.hypot(blob["x"] - k["x"], blob["y"] - k["y"]) <= match_radius + 0.5 * k["radius"]:
            return k["id"]
    return ""


def _settings_hash(model, data, predict_settings, median_stack, match_radius):
    text = json.dumps(dict(model=model.sha256, data=data, predict=predict_settings, match_radius=match_radius,
                           median_stack=file_digest(median_stack) if median_stack else None), sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_log(path):
    """Rows of an existing monitor log (checked header); [] when absent."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as stream:
        text = stream.read()
    if not text.endswith("\n") and text:
        raise InputError("monitor log %s ends in a partial line (interrupted write?); remove the last line and "
                         "re-run" % path)
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != LOG_COLUMNS:
        raise InputError("%s is not an ir_blobs monitor log (columns %s; expected %s); give another --log"
                         % (path, reader.fieldnames, ",".join(LOG_COLUMNS)))
    return list(reader)


def _append_rows(path, rows, new_file):
    """Append rows with one write (+ fsync); the header first when the log is new."""
    text = _csv_text(rows, LOG_COLUMNS)
    if not new_file:
        text = text.split("\n", 1)[1]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def monitor(directory, log_path, known=None, median_stack=None, model_dir=None, data_settings=None,
            predict_settings=None, monitor_settings=None, outdir=None, overwrite=False):
    """Process the new frames of a directory and append them to a monitor log.

    Frames already in the log (with status ``ok`` or ``no-stack``) are skipped; rows are
    only ever appended (one write per frame).  Each frame is differenced against
    ``median_stack`` or, by default, the median of the last ``Data.n_stack`` frames of
    its filter before it (status ``no-stack`` when fewer than ``Data.min_stack`` exist).
    Blobs located in flagged subframes that match no known blob (``--known``) are
    reported as *new*.

    Parameters
    ----------
    directory : path
    log_path : path
        CSV log (columns ``LOG_COLUMNS``).
    known : path, optional
        Known-blob catalogue (:func:`read_known_blobs`).
    median_stack : path, optional
    model_dir : path, optional
    data_settings, predict_settings, monitor_settings : dict, optional
    outdir : path, optional
        Also write each frame's tile table and PNG there.
    overwrite : bool
        For the per-frame outputs in ``outdir``.

    Returns
    -------
    dict
        processed, skipped, no_stack, errors (file names), new_blobs (list of dict).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError("%s is not a directory" % directory)
    d = _section_defaults("Data", data_settings)
    p = _section_defaults("Predict", predict_settings)
    m = _section_defaults("Monitor", monitor_settings)
    known_blobs = read_known_blobs(known) if known else []
    log_path = Path(log_path)
    with _log_lock(log_path):
        return _monitor_locked(directory, log_path, known_blobs, known, median_stack, model_dir, d, p, m, outdir,
                               overwrite)


@contextmanager
def _log_lock(log_path):
    """An exclusive lock on ``<log>.lock`` while a monitor appends (a second monitor is refused)."""
    import fcntl
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lock = log_path.with_name(log_path.name + ".lock")
    stream = open(lock, "a")
    try:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError("another ir_blobs monitor is writing %s (lock %s held); wait for it to finish"
                             % (log_path, lock)) from None
        yield
    finally:
        stream.close()
        try:
            lock.unlink()
        except OSError:
            pass


def _monitor_locked(directory, log_path, known_blobs, known, median_stack, model_dir, d, p, m, outdir, overwrite):
    previous = _read_log(log_path)
    model = _model(model_dir, p["nproc"])
    settings = _settings_hash(model, d, p, median_stack, m["match_radius"])
    other = sorted({r["settings"] for r in previous} - {settings})
    if other:
        raise InputError("monitor log %s holds frames processed with other settings or model (%s; now %s); use "
                         "another --log, or the settings it was made with" % (log_path, ", ".join(other), settings))
    done = {r["file"] for r in previous if r["status"] in ("ok", "no-stack")}
    skip = {log_path.resolve()} | ({Path(known).resolve()} if known else set()) | \
        ({Path(median_stack).resolve()} if median_stack else set())
    infos = []
    for f in sorted(directory.glob(m["pattern"])):
        if f.resolve() in skip or not f.is_file():
            continue
        info = _frame_info(f, d["extension"])
        if info is None:
            log.warning("%s: not a readable FITS frame; skipped", f.name)
            continue
        infos.append(info)
    infos.sort(key=lambda i: (i["mjd"] is None, i["mjd"] or 0.0, i["path"].name))
    summary = dict(processed=[], skipped=[], no_stack=[], errors=[], new_blobs=[])
    todo = [i for i in infos if i["path"].name not in done]
    summary["skipped"] = [i["path"].name for i in infos if i["path"].name in done]
    log.info("%s: %d frames, %d already in %s, %d to process", directory, len(infos), len(summary["skipped"]),
             log_path.name, len(todo))
    cache = {}
    for info in _progress(todo, len(todo) > 1, "ir_blobs monitor"):
        rows = _monitor_frame(info, infos, median_stack, model, d, p, m, known_blobs, settings, outdir,
                              overwrite, summary, cache)
        if rows:
            _append_rows(log_path, rows, new_file=not log_path.exists())
    for b in summary["new_blobs"]:
        log.warning("NEW blob in %s (%s): x = %.1f, y = %.1f, r = %.0f px, S/N %.1f, tile %d, p = %.3f",
                    b["file"], b["date_obs"], b["x"], b["y"], b["radius"], b["snr"], b["tile"], b["probability"])
    log.info("monitor: %d processed, %d skipped (in the log), %d without a median stack, %d errors, %d new blob(s)",
             len(summary["processed"]), len(summary["skipped"]), len(summary["no_stack"]), len(summary["errors"]),
             len(summary["new_blobs"]))
    return summary


def _monitor_frame(info, infos, median_stack, model, d, p, m, known_blobs, settings, outdir, overwrite, summary,
                   cache=None):
    base = dict(file=info["path"].name, date_obs=info["date_obs"],
                mjd=round(info["mjd"], 6) if info["mjd"] is not None else "", filter=info["filter"],
                settings=settings)
    empty = dict(tile=-1, x0="", y0="", probability="", flagged="", blob_x="", blob_y="", blob_radius="",
                 blob_snr="", new="", known_id="")
    stack_paths = None
    try:
        if median_stack is None:
            stack_paths = stack_members(info, infos, d["n_stack"], d["same_filter"])
            if len(stack_paths) < d["min_stack"]:
                log.info("%s: %d earlier frame(s) of filter %s, %d needed for a median stack; recorded as no-stack",
                         info["path"].name, len(stack_paths), info["filter"] or "?", d["min_stack"])
                summary["no_stack"].append(info["path"].name)
                return [dict(base, status="no-stack", **empty)]
        res = predict(info["path"], median_stack, outdir, model.model_dir, None, overwrite, d, p, stack_paths,
                      write=outdir is not None, cache=cache)
    except ToolError as exc:
        log.error("%s: %s", info["path"].name, exc)
        summary["errors"].append(info["path"].name)
        return [dict(base, status="error: %s" % str(exc)[:200], **empty)]
    rows = []
    for r in res["rows"]:
        row = dict(base, status="ok", tile=r["tile"], x0=r["x0"], y0=r["y0"], probability=r["probability"],
                   flagged=r["flagged"], blob_x="", blob_y="", blob_radius="", blob_snr="", new="", known_id="")
        blobs = [c for c in res["candidates"] if c["tile"] == r["tile"]] if r["flagged"] else []
        if not blobs:
            rows.append(row)
        for c in blobs:                       # one row per blob located in a flagged subframe
            kid = _match_known(c, known_blobs, m["match_radius"])
            rows.append(dict(row, blob_x=round(c["x"], 2), blob_y=round(c["y"], 2), blob_radius=round(c["radius"], 2),
                             blob_snr=round(c["snr"], 2), known_id=kid, new=int(not kid)))
            if not kid:
                summary["new_blobs"].append(dict(c, file=info["path"].name, date_obs=info["date_obs"],
                                                 probability=r["probability"]))
    summary["processed"].append(info["path"].name)
    return rows


def _progress(items, enabled, desc):
    """``items`` in a tqdm bar when enabled and tqdm exists."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


# ===========================================================================
# Evaluation
# ===========================================================================
DEPTH_BINS = (0.0, 0.015, 0.02, 0.03, 0.05, 0.075, 0.10, 0.15, 0.20, 0.31)
SKY_SNR_BINS = (0.0, 10.0, 15.0, 20.0, 30.0, 50.0)
RADIUS_BINS = (5.0, 6.25, 7.5, 8.75, 10.0)


def _recall_by(values, labels, flagged, bins):
    out = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = labels.astype(bool) & (values >= lo) & (values < hi)
        out.append(dict(lo=lo, hi=hi, n=int(sel.sum()),
                        recall=float(flagged[sel].mean()) if sel.any() else float("nan")))
    return out


def evaluate(model_dir=None, outdir=None, seed=777, n_frames=40, n_blobs=6, threshold=None, n_saliency=4,
             min_depth=0.10, size=IMAGE_SIZE, overwrite=False, data_settings=None, predict_settings=None,
             depth_range=(0.01, 0.3)):
    """Score the model on fresh simulated frames (a seed not used in training).

    Frames with ``n_blobs`` new blobs each (``depth_range``, log-uniform: 1-30 %, below the
    3 % of training, so that the recall curve shows where detection ends) are prepared like
    predict's input and cut into grid tiles; a tile holds a blob when a blob centre lies
    in it, and tiles only touched by a blob are left out of the precision.  Reports
    precision, recall, F1, ROC AUC, the confusion matrix, recall against blob depth and
    radius, recall and precision for blobs of depth >= ``min_depth``, and the
    localisation error of flagged tiles' blobs; with ``outdir``: ``evaluation.json`` (the
    results with :func:`write_provenance`'s fields), ``evaluation.png`` and ``saliency.png``.

    Returns
    -------
    dict
    """
    from sklearn.metrics import roc_auc_score
    p = _section_defaults("Predict", predict_settings)
    model = _model(model_dir, p["nproc"])
    thr = model.threshold if threshold is None else float(threshold)
    t0 = time.time()
    frames = simulated_frames(n_frames, seed, size=size, n_blobs=n_blobs, data_settings=data_settings,
                              depth_range=depth_range)
    tiles = frame_tile_set(frames, model.size)
    t_sim = time.time() - t0
    t1 = time.time()
    prob = model.predict(tiles["images"])
    t_pred = time.time() - t1
    labels = tiles["labels"].astype(bool)
    flagged = prob >= thr
    scored = ~tiles["ambiguous"]
    depth = np.nan_to_num(tiles["blob_depth"], nan=0.0)
    bright = labels & (depth >= min_depth)
    faint = labels & (depth < min_depth)
    res = dict(seed=seed, n_frames=n_frames, frame_size=size, threshold=thr, n_tiles=int(len(labels)),
               n_positive=int(labels.sum()), n_ambiguous=int(tiles["ambiguous"].sum()),
               all=_binary_metrics(labels[scored], flagged[scored]),
               roc_auc=float(roc_auc_score(labels[scored], prob[scored])),
               min_depth=min_depth)
    sel = scored & (~labels | bright)                   # negatives + blobs of depth >= min_depth
    res["bright"] = _binary_metrics(labels[sel], flagged[sel])
    res["faint_recall"] = float(flagged[faint].mean()) if faint.any() else float("nan")
    res["n_faint"] = int(faint.sum())
    res["recall_by_depth"] = _recall_by(depth, labels, flagged, DEPTH_BINS)
    res["recall_by_radius"] = _recall_by(np.nan_to_num(tiles["blob_radius"]), labels, flagged,
                                         RADIUS_BINS[:-1] + (RADIUS_BINS[-1] + 1e-6,))
    res["recall_by_sky_snr"] = _recall_by(tiles["sky_snr"], labels & bright, flagged, SKY_SNR_BINS)
    res["localisation"] = _localisation_errors(frames, tiles, flagged, bright, p)
    res["confusion"] = [[res["all"]["tn"], res["all"]["fp"]], [res["all"]["fn"], res["all"]["tp"]]]
    res["seconds"] = dict(simulate=round(t_sim, 1), predict=round(t_pred, 2),
                          subframes_per_s=round(len(labels) / max(t_pred, 1e-9), 1))
    log.info("evaluate: %d tiles (%d with blobs): precision %.3f recall %.3f AUC %.4f; depth >= %.2f: precision "
             "%.3f recall %.3f; faint recall %.3f; median centre error %.2f px", len(labels), labels.sum(),
             res["all"]["precision"], res["all"]["recall"], res["roc_auc"], min_depth, res["bright"]["precision"],
             res["bright"]["recall"], res["faint_recall"], res["localisation"]["median_centre_error_px"])
    if outdir is not None:
        outdir = Path(outdir)
        paths = {"json": outdir / "evaluation.json", "png": outdir / "evaluation.png",
                 "saliency": outdir / "saliency.png"}
        if not overwrite:
            for path in paths.values():
                if path.exists():
                    raise OutputExistsError("%s exists already; use --overwrite to replace it" % path)
        picks = _saliency_picks(labels, flagged, depth, n_saliency)
        sal = saliency_maps(model, tiles["images"][picks]) if len(picks) else np.zeros((0,) + tiles["images"].shape[1:])
        res["paths"] = {k: str(v) for k, v in paths.items()}
        writers = {"json": lambda tmp: write_provenance(tmp, None, **res),
                   "png": lambda tmp: _plot_evaluation(res, labels[scored], prob[scored], tmp),
                   "saliency": lambda tmp: _plot_saliency(tiles, picks, sal, prob, tmp)}
        _write_together({k: paths[k] for k in ("json", "png", "saliency")},
                        {"json": writers["json"], "png": writers["png"], "saliency": writers["saliency"]}, overwrite)
    return res


def _localisation_errors(frames, tiles, flagged, bright, p):
    errors, radius_err = [], []
    cand_cache = {}
    for i in np.nonzero(flagged & bright)[0]:
        fi = int(tiles["frame"][i])
        if fi not in cand_cache:
            cand_cache[fi] = localise_blobs(frames[fi]["scaled"], p["radii"], p["min_snr"])
        x0, y0, s = int(tiles["x0"][i]), int(tiles["y0"][i]), tiles["images"].shape[1]
        inside = [c for c in cand_cache[fi] if x0 <= c["x"] < x0 + s and y0 <= c["y"] < y0 + s]
        truth = [t for t in frames[fi]["truth"] if x0 <= t["x"] < x0 + s and y0 <= t["y"] < y0 + s]
        if not inside or not truth:
            errors.append(np.inf)
            continue
        best = inside[0]
        t = min(truth, key=lambda t: math.hypot(t["x"] - best["x"], t["y"] - best["y"]))
        errors.append(math.hypot(t["x"] - best["x"], t["y"] - best["y"]))
        radius_err.append(best["radius"] - t["radius"])
    errors = np.asarray(errors, float)
    finite = errors[np.isfinite(errors)]
    return dict(n=int(len(errors)), n_not_located=int((~np.isfinite(errors)).sum()),
                median_centre_error_px=float(np.median(errors)) if len(errors) else float("nan"),
                p90_centre_error_px=float(np.percentile(finite, 90)) if len(finite) else float("nan"),
                median_radius_error_px=float(np.median(radius_err)) if radius_err else float("nan"),
                mad_radius_error_px=float(np.median(np.abs(np.asarray(radius_err) - np.median(radius_err))))
                if radius_err else float("nan"))


def _saliency_picks(labels, flagged, depth, n):
    """A few tiles for saliency maps: detected blobs (deep and shallow), a miss, a negative."""
    picks = []
    for sel in (labels & flagged & (depth >= 0.1), labels & flagged & (depth < 0.1), labels & ~flagged,
                ~labels & ~flagged, ~labels & flagged):
        idx = np.nonzero(sel)[0]
        if len(idx):
            picks.append(int(idx[0]))
    return np.asarray(picks[:max(n, 1)], int)


def _figure(w, h):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plot_evaluation(res, labels, prob, path):
    from sklearn.metrics import roc_curve
    fig = _figure(13, 3.8)
    ax = fig.add_subplot(141)
    cm = np.asarray(res["confusion"], float)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (r, c), v in np.ndenumerate(norm):
        ax.text(c, r, "%.3f\n(%d)" % (v, cm[r, c]), ha="center", va="center",
                color="white" if v > 0.5 else "black", fontsize=8)
    ax.set_xticks([0, 1], ["no blob", "blob"])
    ax.set_yticks([0, 1], ["no blob", "blob"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalised)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("fraction of the true class")
    ax = fig.add_subplot(142)
    fpr, tpr, _ = roc_curve(labels, prob)
    ax.plot(fpr, tpr, color="C0")
    ax.plot([0, 1], [0, 1], ls=":", color="0.5")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, AUC = %.4f" % res["roc_auc"], fontsize=9)
    for k, (key, xlabel, scale) in enumerate((("recall_by_depth", "blob depth [%]", 100.0),
                                              ("recall_by_radius", "blob radius [px]", 1.0))):
        ax = fig.add_subplot(143 + k)
        bins = res[key]
        centres = [0.5 * (b["lo"] + b["hi"]) * scale for b in bins]
        ax.errorbar(centres, [b["recall"] for b in bins], xerr=[0.5 * (b["hi"] - b["lo"]) * scale for b in bins],
                    yerr=[math.sqrt(max(b["recall"] * (1 - b["recall"]), 0.0) / max(b["n"], 1))
                          if np.isfinite(b["recall"]) else 0 for b in bins], fmt="o", color="C1")
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("recall at p >= %.2f" % res["threshold"])
        if key == "recall_by_depth":
            ax.axvline(res["min_depth"] * 100, ls="--", color="0.5")
    fig.suptitle("ir_blobs %s on %d simulated frames (seed %d): precision %.3f, recall %.3f"
                 % (__version__, res["n_frames"], res["seed"], res["all"]["precision"], res["all"]["recall"]),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_saliency(tiles, picks, sal, prob, path):
    n = max(len(picks), 1)
    fig = _figure(2.6 * n, 5.4)
    for j, i in enumerate(picks):
        ax = fig.add_subplot(2, n, j + 1)
        ax.imshow(tiles["images"][i], origin="lower", cmap="gray", vmin=-3, vmax=3)
        truth = "blob d=%.0f%%" % (100 * tiles["blob_depth"][i]) if tiles["labels"][i] else "no blob"
        ax.set_title("%s, p=%.2f" % (truth, prob[i]), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax = fig.add_subplot(2, n, n + j + 1)
        im = ax.imshow(sal[j], origin="lower", cmap="hot")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("|d logit / d pixel|", fontsize=7)
    fig.suptitle("saliency: where the network looks (top: standardised subframe)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_frame(path, out, median_stack=None, data_settings=None, overwrite=False):
    """The original's ``plot_pre_processed`` + ``plot_scaled_blobs``: a frame before and after scaling.

    Four panels: the difference image (zscale display) and its histogram (log counts), the
    scaled image and its histogram with the clip bounds marked.
    """
    prep = prepare_frame(path, median_stack, data_settings)
    fig = _figure(12, 9.5)
    diff = prep["background_free"]
    finite = diff[np.isfinite(diff)]
    vmin, vmax = zscale_limits(diff)
    for row, (img, title, lim, values) in enumerate((
            (diff, "difference (background removed), zscale", (vmin, vmax), finite),
            (prep["scaled"], "scaled: clipped at %.3g / %.3g, standardised" % (prep["info"]["lo"], prep["info"]["hi"]),
             (-3, 3), prep["scaled"].ravel()))):
        ax = fig.add_subplot(2, 2, 2 * row + 1)
        im = ax.imshow(img, origin="lower", cmap="Greys_r", vmin=lim[0], vmax=lim[1], interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(
            "fraction of the sky" if row == 0 and prep["normalised"] else "sigma" if row else "image units")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x [pixel]")
        ax.set_ylabel("y [pixel]")
        ax = fig.add_subplot(2, 2, 2 * row + 2)
        rng_hist = (float(np.percentile(values, 0.05)), float(np.percentile(values, 99.95)))
        ax.hist(values, bins=60, range=rng_hist, log=True, color="0.4")
        if row == 0:
            for v in (prep["info"]["lo"], prep["info"]["hi"]):
                ax.axvline(v, color="red", ls="--")
        ax.set_xlabel("pixel value" + (" (clip bounds dashed; 0.05-99.95 percentiles)" if row == 0 else " [sigma]"))
        ax.set_ylabel("pixels")
    fig.suptitle(Path(path).name, fontsize=10)
    fig.tight_layout()
    with atomic_path(out, overwrite, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(out)


def plot_gallery(dataset, out, n=16, overwrite=False):
    """A 4 x 4 gallery of data-set subframes with their labels (and blob truth circles)."""
    from matplotlib.patches import Circle
    n = min(n, len(dataset["labels"]))
    side = int(math.ceil(math.sqrt(n)))
    fig = _figure(2.4 * side, 2.5 * side)
    for i in range(n):
        ax = fig.add_subplot(side, side, i + 1)
        ax.imshow(dataset["images"][i], origin="lower", cmap="gray", vmin=-3, vmax=3)
        if dataset["labels"][i]:
            ax.add_patch(Circle((dataset["blob_x"][i], dataset["blob_y"][i]), 1.8 * dataset["blob_radius"][i],
                                fill=False, edgecolor="yellow"))
            depth = dataset["blob_depth"][i]
            ax.set_title("blob x%d%s" % (dataset["n_blobs"][i], ", d=%.0f%%" % (100 * depth) if np.isfinite(depth)
                                         else ""), fontsize=8)
        else:
            ax.set_title("no blob", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(out, overwrite, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(out)


# ===========================================================================
# Demo
# ===========================================================================
def simulate_files(outdir, n_frames=6, seed=2025, size=IMAGE_SIZE, n_blobs=3, filt="F140W", overwrite=False):
    """Write a time series of simulated frames (``sim_NNN_flt.fits``) with a median stack and truth.

    The first frames have no new blobs; blobs appear in the last frame only (the others
    see the earlier ones as known).  Writes ``median_stack.fits``, ``difference.fits``
    (of the last frame), ``truth.csv`` (x, y, radius, depth of the last frame's new blobs)
    and ``known_blobs.csv`` (the old blobs).

    Returns
    -------
    dict
        frames (paths), median_stack, difference, truth (list of dict), known (list of tuples).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    known = [(float(x), float(y), float(rng.uniform(5, 10)), float(rng.uniform(0.05, 0.2)))
             for x, y in rng.uniform(40, size - 40, (3, 2))]
    paths = []
    for i in range(n_frames):
        last = i == n_frames - 1
        sim = simulate_frame(rng, size=size, n_blobs=n_blobs if last else 0, known=known,
                             depths=[0.15, 0.08, 0.25][:n_blobs] if last else None)
        paths.append(write_frame(outdir / ("sim_%03d_flt.fits" % i), sim["current"], mjd=60000.0 + i, filt=filt,
                                 overwrite=overwrite))
        if last:
            write_frame(outdir / "median_stack.fits", sim["stack"], mjd=60000.0 + i - 0.5, filt=filt,
                        overwrite=overwrite)
            write_frame(outdir / "difference.fits", sim["difference"], mjd=60000.0 + i, filt=filt,
                        overwrite=overwrite)
            truth = sim["truth"]
    with atomic_output(outdir / "truth.csv", overwrite=True) as out:
        out.write(_csv_text(truth, ("x", "y", "radius", "depth")))
    with atomic_output(outdir / "known_blobs.csv", overwrite=True) as out:
        out.write(_csv_text([dict(id="K%d" % (j + 1), x=k[0], y=k[1], radius=k[2]) for j, k in enumerate(known)],
                            ("id", "x", "y", "radius")))
    return dict(frames=paths, median_stack=outdir / "median_stack.fits", difference=outdir / "difference.fits",
                truth=truth, known=known)


def run_demo(outdir, seed=2025):
    """A simulated frame through predict (with its median stack), the PNG and the tile table.

    Returns
    -------
    dict
        Summary: flagged tiles, truth, located blobs and their errors, the output paths.
    """
    outdir = Path(outdir)
    sim = simulate_files(outdir / "frames", n_frames=2, seed=seed, overwrite=True)
    res = predict(sim["frames"][-1], median_stack=sim["median_stack"], outdir=outdir, overwrite=True)
    located = [r for r in res["rows"] if r["flagged"] and np.isfinite(r["blob_x"])]
    errors = []
    for t in sim["truth"]:
        if located:
            errors.append(min(math.hypot(t["x"] - r["blob_x"], t["y"] - r["blob_y"]) for r in located))
    return dict(frame=str(sim["frames"][-1]), tiles_csv=str(res["paths"]["csv"]), png=str(res["paths"]["png"]),
                flagged_tiles=[r["tile"] for r in res["rows"] if r["flagged"]],
                truth=[{k: round(v, 3) for k, v in t.items()} for t in sim["truth"]],
                blob_position_errors_px=[round(e, 2) for e in errors], seconds=round(res["seconds"], 2),
                tile_table="\n" + "\n".join(" " * 26 + _tile_line(r) for r in res["rows"]))


def _tile_line(r):
    """One line of the demo summary's tile table."""
    text = "tile %2d  x0 %4d  y0 %4d  p = %.3f" % (r["tile"], r["x0"], r["y0"], r["probability"])
    if r["flagged"]:
        text += "  FLAGGED"
        if np.isfinite(r["blob_x"]):
            text += "  blob at (%.1f, %.1f) r = %.1f px, S/N %.1f, depth %.3f" % (
                r["blob_x"], r["blob_y"], r["blob_radius"], r["blob_snr"], r["blob_depth"])
    return text


# ===========================================================================
# Command line
# ===========================================================================
def _common_model_arguments(parser):
    parser.add_argument("--model-dir", help="trained model directory (default models/ir_blobs)")
    parser.add_argument("--threshold", type=float, help="blob probability threshold (default: the model's)")
    parser.add_argument("--nproc", type=int, help="CPU threads for TensorFlow")


def _predict_arguments(parser):
    parser.add_argument("frame", nargs="*", help="FITS frame(s): difference images, or current frames with "
                        "--median-stack (SCI extension or primary HDU; 1014 or 1024 px)")
    parser.add_argument("--median-stack", help="median stack FITS of the same shape: the difference is stack - frame")
    parser.add_argument("--outdir", help="output directory (default: beside each frame)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="no PNG")
    _common_model_arguments(parser)


def _monitor_arguments(parser):
    parser.add_argument("directory", help="directory of frames (Monitor.pattern, default *_flt.fits)")
    parser.add_argument("--log", required=True, help="monitor log CSV (created, then only appended to)")
    parser.add_argument("--known", help="known-blob catalogue CSV (x, y, radius [, id])")
    parser.add_argument("--median-stack", help="one median stack for every frame (default: the median of the last "
                        "Data.n_stack frames of the same filter before each frame)")
    parser.add_argument("--outdir", help="also write each frame's tile table and PNG here")
    _common_model_arguments(parser)


def _dataset_arguments(parser):
    parser.add_argument("frames", nargs="*", help="blob-free FITS frames (difference images, or frames with "
                        "--median-stack); default: simulated frames")
    parser.add_argument("--median-stack", help="median stack for the frames")
    parser.add_argument("--out", required=True, help="output .npz (images float16, labels, blob truth)")
    parser.add_argument("-n", "--n-samples", type=int, default=1000, help="subframes (default 1000)")
    parser.add_argument("--split", choices=("train", "val", "test", "any"), default="any",
                        help="frame region to draw from (quadrants; default any)")
    parser.add_argument("--positive-fraction", type=float, default=0.5, help="share with blobs (default 0.5)")
    parser.add_argument("--seed", type=int, help="default [Train] seed")
    parser.add_argument("--gallery", help="also write a PNG gallery of the first 16 subframes")


def _train_arguments(parser):
    parser.add_argument("--model-dir", help="output directory (default models/ir_blobs)")
    parser.add_argument("--frames", nargs="*", help="real blob-free frames whose subframes join the simulated ones")
    parser.add_argument("--median-stack", help="median stack for --frames")
    parser.add_argument("--nproc", type=int, help="CPU threads for TensorFlow")


def _evaluate_arguments(parser):
    parser.add_argument("--outdir", required=True, help="where evaluation.json/.png and saliency.png go")
    parser.add_argument("--seed", type=int, default=777, help="simulation seed (default 777; training uses "
                        "[Train] seed and seed + 1)")
    parser.add_argument("--n-frames", type=int, default=40, help="simulated frames (default 40, 16 tiles each)")
    parser.add_argument("--frame-size", type=int, default=IMAGE_SIZE, help="1024 (default) or 1014")
    _common_model_arguments(parser)


def _simulate_arguments(parser):
    parser.add_argument("outdir", help="output directory")
    parser.add_argument("--n-frames", type=int, default=6, help="frames in the time series (default 6)")
    parser.add_argument("--frame-size", type=int, default=IMAGE_SIZE, help="1024 (default) or 1014")
    parser.add_argument("--seed", type=int, default=2025)


def _inspect_arguments(parser):
    parser.add_argument("frame", nargs="?", help="FITS frame (difference image, or with --median-stack)")
    parser.add_argument("--median-stack", help="median stack FITS")
    parser.add_argument("--out", help="output PNG (default <frame>_inspect.png beside the frame)")


def _cli_inspect(args, config):
    if not args.frame:
        raise InputError("no frame given; usage: ir_blobs inspect FRAME.fits [--median-stack STACK.fits] [--out PNG]")
    out = args.out or str(_output_paths(args.frame, None)["png"]).replace("_tiles.png", "_inspect.png")
    plot_frame(args.frame, out, args.median_stack, dict(config["Data"]), args.overwrite)
    log.info("wrote %s", out)
    return EXIT_OK


def _library_arguments(parser):
    parser.add_argument("out", help="output .npy (pickled dict, the original's blob_dict.npy layout) or .npz")
    parser.add_argument("-n", type=int, default=150, help="profiles (default 150, as many as blobs catalogued)")
    parser.add_argument("--seed", type=int, default=0)


def _predict_settings(args, config):
    p = dict(config["Predict"])
    for key in ("threshold", "nproc", "plot"):
        if getattr(args, key, None) is not None:
            p[key] = getattr(args, key)
    return p


def _cli_predict(args, config):
    if not args.frame:
        raise InputError("no frame given; usage: ir_blobs predict FRAME.fits [FRAME ...] [--median-stack STACK.fits] "
                         "[--outdir DIR]")
    p = _predict_settings(args, config)
    for frame in args.frame:
        predict(frame, args.median_stack, args.outdir, args.model_dir, overwrite=args.overwrite,
                data_settings=dict(config["Data"]), predict_settings=p)
    return EXIT_OK


def _cli_monitor(args, config):
    res = monitor(args.directory, args.log, args.known, args.median_stack, args.model_dir, dict(config["Data"]),
                  _predict_settings(args, config), dict(config["Monitor"]), args.outdir, args.overwrite)
    return EXIT_FAILURE if res["errors"] else EXIT_OK


def _cli_make_dataset(args, config):
    t = config["Train"]
    seed = t["seed"] if args.seed is None else args.seed
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputExistsError("%s exists already; use --overwrite to replace it" % out)
    d = dict(config["Data"])
    library, kind = load_blob_library(t["blob_library"]) if t["blob_library"] else (None, "profile")
    if args.frames:
        frames = [_frame_for_dataset(f, args.median_stack, d) for f in args.frames]
    else:
        frames = simulated_frames(max(t["n_frames"] // 4, 1), seed + {"train": 0, "val": 1, "test": 5, "any": 7}[
            args.split], data_settings=d)
    data = make_dataset(frames, args.n_samples, seed, args.positive_fraction, library, kind, args.split,
                        t["noise_max"], (t["depth_min"], t["depth_max"]), t["max_blobs"])
    save_dataset(data, out, args.overwrite, meta=dict(seed=seed, split=args.split, frames=list(args.frames),
                                                      ir_blobs_version=__version__))
    if args.gallery:
        plot_gallery(data, args.gallery, overwrite=args.overwrite)
    log.info("wrote %d subframes (%d with blobs) to %s", len(data["labels"]), int(data["labels"].sum()), out)
    return EXIT_OK


def _cli_train(args, config):
    t = dict(config["Train"])
    train(args.model_dir, t["seed"], t["epochs"], t["n_train"], t["n_val"], t["n_frames"], t["batch_size"],
          t["learning_rate"], t["weight_decay"], t["noise_max"], t["depth_min"], t["depth_max"], t["max_blobs"],
          t["blob_library"], args.frames, args.median_stack, args.nproc, args.overwrite, dict(config["Data"]))
    return EXIT_OK


def _cli_evaluate(args, config):
    p = _predict_settings(args, config)
    evaluate(args.model_dir, args.outdir, args.seed, args.n_frames, threshold=p["threshold"], size=args.frame_size,
             overwrite=args.overwrite, data_settings=dict(config["Data"]), predict_settings=p)
    return EXIT_OK


def _cli_simulate(args, config):
    res = simulate_files(args.outdir, args.n_frames, args.seed, args.frame_size, overwrite=args.overwrite)
    log.info("wrote %d frames, median_stack.fits, difference.fits, truth.csv and known_blobs.csv to %s",
             len(res["frames"]), args.outdir)
    return EXIT_OK


def _cli_library(args, config):
    save_blob_library(synthetic_blob_library(args.n, args.seed), args.out, args.overwrite)
    log.info("wrote %d blob profiles to %s", args.n, args.out)
    return EXIT_OK


SUBCOMMANDS = {
    "predict": ("classify the subframes of frames: <frame>_tiles.csv / .png / .json", _cli_predict,
                _predict_arguments),
    "monitor": ("process new frames of a directory into an append-only blob log; report new blobs",
                _cli_monitor, _monitor_arguments),
    "make-dataset": ("augmented subframes with and without added blobs -> npz", _cli_make_dataset,
                     _dataset_arguments),
    "train": ("simulate frames, train the CNN, write models/ir_blobs", _cli_train, _train_arguments),
    "evaluate": ("precision, recall, ROC, recall vs depth/radius, localisation, saliency on fresh simulations",
                 _cli_evaluate, _evaluate_arguments),
    "simulate": ("write simulated WFC3/IR frames, a median stack and the blob truth", _cli_simulate,
                 _simulate_arguments),
    "blob-library": ("write a synthetic blob library (.npy dict or .npz)", _cli_library, _library_arguments),
    "inspect": ("a frame before and after scaling, with histograms (the original's diagnostic plots)",
                _cli_inspect, _inspect_arguments),
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
adopt_into_session(globals(), "ir_blobs")
