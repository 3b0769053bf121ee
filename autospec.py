"""AutoSpec: automatic 1D spectral extraction of catalogued objects from IFU cubes.

Re-creation of AutoSpec (Griffiths & Conselice 2018; a-griffiths/AutoSpec) on mpdaf:
white-light and image-weighted, aperture, optimal and cross-correlation extractions of
every object of a catalogue from a MUSE-like cube, with segmentation-based object and
sky masks, continuum subtraction, and one mpdaf ``Source`` file per object.

Status: skeleton with the shared command-line conventions; the extraction itself is
issue #6.

Use
---
As a module::

    import autospec
    autospec.main(["run", "--param", "param.py"])

From the shell, in the working directory (``run`` is the default subcommand)::

    python autospec.py [--param param.py] [--nproc N]

Inside a CASA 6 session: ``execfile("autospec.py")`` defines the functions and runs nothing.

Configuration
-------------
A ``param.py`` in the working directory (the original's format), or the same keys in
the ``[autospec]`` section of an INI file (``--write-config FILE`` writes a template).
"""
import argparse
import ast
import configparser
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
]
__version__ = "0.1.0"

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
def atomic_output(path, overwrite=False, mode="w"):
    """Write a file through a temporary sibling that is renamed into place on success.

    Raises OutputExistsError when ``path`` exists and ``overwrite`` is false; on any
    error the temporary file is removed, so no half-written output is ever left.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError("%s exists already; use --overwrite to replace it" % path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as stream:
            yield stream
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
# Configuration schema (the only keys accepted; see --write-config)
# ===========================================================================
CONFIG_SCHEMA = (
    ConfigKey("autospec", "MODE", "str", "param", ("param", "cat"), "param: settings from this file; cat: SIZE and REF per object from the catalogue"),
    ConfigKey("autospec", "CATALOGUE", "path", None, help="catalogue of objects (ID RA DEC [SIZE REF])"),
    ConfigKey("autospec", "CUBE", "path", None, help="the IFU data cube"),
    ConfigKey("autospec", "REF", "str", "", help="reference extraction for cross-correlation: an aperture size or an image"),
    ConfigKey("autospec", "DATA_EXT", "list", [], help="data and optional variance extension (number or name)"),
    ConfigKey("autospec", "APER", "floatlist", [], (0.0, None), "aperture diameters to extract (arcsec)", bounds=True),
    ConfigKey("autospec", "IMG", "list", [], help="additional images to weight extractions and build masks"),
    ConfigKey("autospec", "USE_IMGS", "bool", True, help="use IMG images when building the object and sky masks"),
    ConfigKey("autospec", "OBJ_MASK", "str", "intersection", ("intersection", "union"), "combine segmentation maps by intersection or union"),
    ConfigKey("autospec", "SEG", "list", [], help="user segmentation maps on the cube's grid"),
    ConfigKey("autospec", "OUTPUT", "path", Path("autospec_output"), help="output directory"),
    ConfigKey("autospec", "PRE_OUT", "str", "autospec_", help="prefix of the output Source files"),
    ConfigKey("autospec", "SIZE", "float", 5.0, (0.0, None), "full width of sub-cubes and stamps (arcsec)", bounds=True),
    ConfigKey("autospec", "XCOR", "bool", True, help="run the cross-correlation extraction"),
    ConfigKey("autospec", "CONT_SUB", "bool", True, help="subtract a polynomial continuum (with XCOR)"),
    ConfigKey("autospec", "CONT_POLY", "int", 5, (0, 20), "polynomial order of the continuum", bounds=True),
    ConfigKey("autospec", "PLOTS", "bool", True, help="write diagnostic plots per object"),
    ConfigKey("autospec", "OUT_SUB", "bool", False, help="keep sub-cubes in the Source files"),
    ConfigKey("autospec", "OUT_IMG", "bool", True, help="keep images in the Source files"),
    ConfigKey("autospec", "OUT_SEG", "bool", True, help="keep segmentation maps in the Source files"),
    ConfigKey("autospec", "OUT_MASK", "bool", True, help="keep masks in the Source files"),
    ConfigKey("autospec", "OUT_XCOR", "bool", True, help="keep cross-correlation maps in the Source files"),
    ConfigKey("autospec", "OUT_SPEC", "bool", True, help="keep all spectra in the Source files"),
    ConfigKey("autospec", "CMAP", "str", "viridis", help="matplotlib colour map of the plots"),
    ConfigKey("autospec", "ORIG_FROM", "str", "", help="origin: detection software (Source header)"),
    ConfigKey("autospec", "ORIG_FROMV", "str", "", help="origin: detection software version"),
    ConfigKey("autospec", "ORIG_CUBE", "str", "", help="origin: cube name"),
    ConfigKey("autospec", "ORIG_CUBEV", "str", "", help="origin: cube version"),
    ConfigKey("autospec", "WARNINGS", "bool", False, help="show warnings of astropy and mpdaf"),
)


# ===========================================================================
# param.py files (the original's parameter format), read without executing them
# ===========================================================================
PARAM_FILE_NAME = "param.py"
PARAM_SECTION = "autospec"


def _param_entries():
    return {entry.key.upper(): entry for entry in CONFIG_SCHEMA if entry.section == PARAM_SECTION}


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
        value = ast.literal_eval(node.value)
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
        keys of the ``[autospec]`` section of :data:`CONFIG_SCHEMA` (any case).

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


def load_autospec_config(param=None, config=None, overrides=None):
    """Configuration from an INI file, then a ``param.py``, then command-line overrides.

    Parameters
    ----------
    param : str or Path, optional
        ``param.py`` file; None uses ``./param.py`` when it exists.
    config : str or Path, optional
        INI (or TOML) file with an ``[autospec]`` section.
    overrides : dict, optional
        ``{(section, key): raw}`` from ``--set``; they win over both files.
    """
    if param is None and Path(PARAM_FILE_NAME).is_file():
        param = Path(PARAM_FILE_NAME)
        log.info("using %s from the working directory", param.resolve())
    merged = dict(read_param_file(param)) if param is not None else {}
    merged.update(overrides or {})
    return load_config(CONFIG_SCHEMA, config, merged)


def _run_arguments(parser):
    """Options of ``autospec run``."""
    parser.add_argument("--param", metavar="FILE",
                        help="parameter file in the original param.py format "
                             "(default: ./param.py when it exists); INI files go to --config")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="objects processed in parallel (default 1)")


def _run(args, config):
    """``autospec run``: resolve param.py + INI + --set, then extract (issue #6)."""
    config = load_autospec_config(args.param, args.config, parse_overrides(args.set))
    log.debug("parameters: %r", config)
    return not_yet_implemented(6)(args, config)


def _with_default_subcommand(argv):
    """Insert ``run`` when no subcommand is given (``python autospec.py --nproc 2``)."""
    if any(a in SUBCOMMANDS for a in argv) or any(a in ("-h", "--help", "--version") for a in argv[:1]):
        return argv
    if any(a == "--write-config" or a.startswith("--write-config=") for a in argv):
        return argv
    return [DEFAULT_SUBCOMMAND] + argv


# ===========================================================================
# Command line
# ===========================================================================
def _no_arguments(parser):
    """Subcommands without arguments of their own (the common options only)."""


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
    argv = _with_default_subcommand(list(sys.argv[1:] if argv is None else argv))
    parser = build_cli(__doc__.strip().splitlines()[0], SUBCOMMANDS, __version__, CONFIG_SCHEMA)
    return run_cli(parser, argv)


if invoked_as_script(globals()):
    sys.exit(main())
