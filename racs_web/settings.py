"""Django settings of racs_web, built from the database and the ``[WEB]`` options.

There is no module-level settings object: :func:`racs_web.configure` calls
``settings.configure(**build_settings(...))``, so nothing secret lives in a file of the
repository and DEBUG is off unless asked for.
"""
from pathlib import Path

__all__ = ["build_settings"]

HERE = Path(__file__).resolve().parent


def build_settings(database, options, secret):
    """Keyword arguments of ``django.conf.settings.configure``.

    Parameters
    ----------
    database : dict
        ``DATABASES['default']`` (:func:`racs_web.database_settings`).
    options : racs_web.WebOptions
    secret : str
        SECRET_KEY.
    """
    debug = bool(options.debug)
    return dict(
        DEBUG=debug,
        SECRET_KEY=secret,
        ALLOWED_HOSTS=list(options.allowed_hosts) or ["127.0.0.1", "localhost"],
        INSTALLED_APPS=[
            "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
            "django.contrib.sessions", "django.contrib.messages", "django.contrib.staticfiles",
            "racs_web.review",
        ],
        MIDDLEWARE=[
            "django.middleware.security.SecurityMiddleware",
            "whitenoise.middleware.WhiteNoiseMiddleware",
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
            "django.middleware.clickjacking.XFrameOptionsMiddleware",
        ],
        ROOT_URLCONF="racs_web.urls",
        TEMPLATES=[{
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "APP_DIRS": True,
            "OPTIONS": {"context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "racs_web.review.views.site_context",
            ]},
        }],
        DATABASES={"default": database},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        STATIC_URL="/static/",
        WHITENOISE_USE_FINDERS=True,            # app static files served without collectstatic
        WHITENOISE_AUTOREFRESH=debug,
        LOGIN_URL="/accounts/login/",
        LOGIN_REDIRECT_URL="/",
        LOGOUT_REDIRECT_URL="/accounts/login/",
        USE_TZ=True,
        TIME_ZONE="UTC",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        CSRF_COOKIE_SAMESITE="Lax",
        X_FRAME_OPTIONS="DENY",
        CSRF_FAILURE_VIEW="racs_web.review.views.csrf_failure",
        SECURE_CONTENT_TYPE_NOSNIFF=True,
        SECURE_REFERRER_POLICY="same-origin",
        AUTH_PASSWORD_VALIDATORS=[
            {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
             "OPTIONS": {"min_length": 8}},
            {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
        ],
        RACS_WEB=options,
        LOGGING={"version": 1, "disable_existing_loggers": False,
                 "handlers": {"console": {"class": "logging.StreamHandler"}},
                 "loggers": {"django": {"handlers": ["console"], "level": "WARNING"}}},
    )
