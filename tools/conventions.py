"""The shared conventions block: THE source of the copy inside each tool.

Every tool (faust_imaging.py, clover.py, autospec.py, racs_pipeline.py, ir_blobs.py) must stay
one self-contained file, so each carries a copy of the text between the markers below.  Edit
it here, then run ``make sync-conventions`` (``python tools/sync_conventions.py``), which
rewrites the copies; ``tests/test_conventions.py`` fails when a copy differs from this file.
The imports above the block are the ones the block needs (each tool imports them itself).
"""
import argparse  # noqa: F401
import configparser  # noqa: F401
import logging  # noqa: F401
import os  # noqa: F401
import sys  # noqa: F401
import tempfile  # noqa: F401
import warnings  # noqa: F401
from contextlib import contextmanager  # noqa: F401
from dataclasses import dataclass  # noqa: F401
from pathlib import Path  # noqa: F401

# each tool defines these two itself, above its copy of the block
__version__ = "0"
log = logging.getLogger("conventions")

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
