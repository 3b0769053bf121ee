"""racs_web: the review website of racs_pipeline (Django).

Browse each run's crossmatches, vet transient candidates (tags with hotkeys, claims,
comments), search across runs (filters, cone searches) and share a candidate on Slack.
The site reads the database that ``racs_pipeline.py process`` writes (SQLite by
default, PostgreSQL + Q3C by URL); the pipeline's tables stay the pipeline's (read-only
models), the site's own tables (users, claims, tags, comments) are Django-managed.

Use it through the pipeline's command line::

    python racs_pipeline.py web migrate    --db sqlite:////data/racs.sqlite
    python racs_pipeline.py web createuser --db ... --username ada --staff   # password prompted
    python racs_pipeline.py web serve      --db ... [--host 127.0.0.1 --port 8005]

or from Python: :func:`configure`, :func:`migrate`, :func:`create_user`, :func:`serve`.
``serve`` runs waitress (a production WSGI server) with static files from whitenoise.
Settings come from the ``[WEB]`` section of the pipeline's parset (``WebOptions``);
SECRET_KEY from ``$RACS_WEB_SECRET_KEY`` or a 0600 file generated once outside the
repository (``secret_key_file``, default ``~/.config/racs_web/secret_key``).
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WebOptions", "WebError", "database_settings", "secret_key", "configure", "migrate",
           "create_user", "serve", "wsgi_application"]
__version__ = "0.1.0"


class WebError(Exception):
    """A problem with the website's configuration or command (exit code 2)."""


@dataclass
class WebOptions:
    """Settings of the site (the ``[WEB]`` section of racs_pipeline's parset)."""

    host: str = "127.0.0.1"
    port: int = 8005
    allowed_hosts: list = field(default_factory=lambda: ["127.0.0.1", "localhost"])
    debug: bool = False
    public_read: bool = False
    secret_key_file: str = ""
    slack_webhook_url: str = ""
    base_url: str = ""
    candidate_vs_threshold: float = 4.3
    candidate_m_threshold: float = 1.2
    page_size: int = 50
    threads: int = 8


def database_settings(url):
    """Django's ``DATABASES['default']`` for an SQLAlchemy-style URL.

    ``sqlite:////abs/path.sqlite`` or ``postgresql[+psycopg]://user[:password]@host:port/db``
    (password also from ``$PGPASSWORD`` / ``~/.pgpass``).

    Raises
    ------
    WebError
        For any other kind of URL.
    """
    from sqlalchemy.engine import make_url
    try:
        parsed = make_url(str(url))
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises ArgumentError and others
        raise WebError("database URL %r is not valid (%s); give sqlite:////path/racs.sqlite or "
                       "postgresql+psycopg://user@host:5432/racs" % (str(url), exc)) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database:
            raise WebError("database URL %r has no file; give sqlite:////path/racs.sqlite" % str(url))
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(Path(parsed.database).resolve()),
                "OPTIONS": {"timeout": 30}}
    if backend == "postgresql":
        out = {"ENGINE": "django.db.backends.postgresql", "NAME": parsed.database or "",
               "USER": parsed.username or "", "HOST": parsed.host or "", "PORT": str(parsed.port or ""),
               "CONN_MAX_AGE": 60}
        if parsed.password:
            out["PASSWORD"] = parsed.password
        return out
    raise WebError("database URL %r: the website supports sqlite and postgresql, not %s" % (str(url), backend))


def secret_key(path=""):
    """The site's SECRET_KEY: ``$RACS_WEB_SECRET_KEY``, else a file made once with mode 0600.

    The default file is ``$XDG_CONFIG_HOME/racs_web/secret_key`` (``~/.config/...``), outside
    any repository, so no key is ever committed.
    """
    key = os.environ.get("RACS_WEB_SECRET_KEY")
    if key:
        return key
    if not path:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        path = base / "racs_web" / "secret_key"
    path = Path(path).expanduser()
    if path.is_file():
        return path.read_text().strip()
    from django.core.management.utils import get_random_secret_key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(get_random_secret_key())
    return path.read_text().strip()


def configure(db_url, options=None):
    """Configure Django for ``db_url`` (once per process) and set it up.

    Raises
    ------
    WebError
        When Django is already configured for another database in this process.
    """
    import django
    from django.conf import settings
    from racs_web.settings import build_settings
    options = options or WebOptions()
    wanted = database_settings(db_url)
    if settings.configured:
        if settings.DATABASES["default"]["NAME"] != wanted["NAME"]:
            raise WebError("racs_web is configured for %s in this process already; use one database per "
                           "process" % settings.DATABASES["default"]["NAME"])
        return settings
    settings.configure(**build_settings(wanted, options, secret_key(options.secret_key_file)))
    django.setup()
    return settings


def migrate(db_url, options=None, verbosity=0):
    """Create or upgrade the pipeline's tables (``RacsDatabase``) and the site's (migrations)."""
    import racs_pipeline
    racs_pipeline.RacsDatabase(db_url).engine.dispose()
    configure(db_url, options)
    from django.core.management import call_command
    call_command("migrate", interactive=False, verbosity=verbosity)


def create_user(db_url, username, password, email="", staff=False, options=None):
    """Add a site user (there is no open sign-up); staff may use the staff-only tags and view
    every table in the admin site (superusers are made with Django's own ``createsuperuser``).

    Raises
    ------
    WebError
        When the user exists already or the password is unacceptable.
    """
    configure(db_url, options)
    from django.contrib.auth import get_user_model
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError
    model = get_user_model()
    if model.objects.filter(username=username).exists():
        raise WebError("user %r exists already" % username)
    try:
        validate_password(password)
    except ValidationError as exc:
        raise WebError("password for %r rejected: %s" % (username, " ".join(exc.messages))) from None
    user = model.objects.create_user(username=username, email=email, password=password)
    user.is_staff = bool(staff)
    user.save()
    if staff:            # the admin site, read-only: staff may view every table of the site
        from django.contrib.auth.models import Permission
        user.user_permissions.set(Permission.objects.filter(content_type__app_label="review",
                                                            codename__startswith="view_"))
    return user


def wsgi_application(db_url, options=None):
    """The site's WSGI application (static files served by whitenoise)."""
    configure(db_url, options)
    from django.core.wsgi import get_wsgi_application
    return get_wsgi_application()


def serve(db_url, options=None, ready=None):
    """Serve the site with waitress on ``options.host:options.port`` until interrupted."""
    options = options or WebOptions()
    application = wsgi_application(db_url, options)
    from waitress import serve as waitress_serve
    if ready is not None:
        ready("http://%s:%d/" % (options.host, options.port))
    waitress_serve(application, host=options.host, port=options.port, threads=options.threads,
                   ident="racs_web", clear_untrusted_proxy_headers=True)
