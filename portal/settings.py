"""Django settings for the portal.

Every value comes from the environment (or a `.env` file beside `manage.py`)
through django-environ, and every value has a default that runs a fresh
checkout: SQLite in WAL mode and kombu's filesystem broker under `var/`.
`DATABASE_URL` and `CELERY_BROKER_URL` switch to PostgreSQL and Redis.
The README lists every variable.
"""

import os
from pathlib import Path

import environ
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

# Production mode turns on the deploy checks below and refuses to start
# without the values that have no safe default.
PRODUCTION = env.bool("PORTAL_PRODUCTION", default=False)
# Off by default even in development: Django's debug page would show request
# bodies and settings to any client that triggers an error.
DEBUG = env.bool("DJANGO_DEBUG", default=False)

_DEVELOPMENT_SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default=_DEVELOPMENT_SECRET_KEY)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "events",
    "integrations",
]

MIDDLEWARE = [
    "events.middleware.InboundBodyLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# Messages stay on the server: a new feed secret is shown once in one.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite in WAL mode by default, so that the web server and the
# workers can read while one of them writes. IMMEDIATE transactions take the
# write lock at BEGIN, which avoids SQLite's "database is locked" upgrade
# failures under concurrent writers.
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'portal.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
        }
    )
    # A file, not SQLite's in-memory default, so that Celery worker processes
    # started by the tests share the test database; one per test run.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("DJANGO_STATIC_ROOT", default=BASE_DIR / "staticfiles")
# WhiteNoise serves the admin's static files from gunicorn. Outside production
# it finds them in the installed apps, so no collectstatic is needed.
WHITENOISE_USE_FINDERS = not PRODUCTION
if not PRODUCTION:
    Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.BasicAuthentication",
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "mParticle to Qualtrics portal API",
    "DESCRIPTION": "Inbound mParticle batches and the management API for Qualtrics connections.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "ENUM_NAME_OVERRIDES": {
        "DeliveryStatusEnum": "integrations.models.Delivery.Status",
        "InboundBatchStatusEnum": "events.models.InboundBatch.Status",
    },
}

# Celery. The default broker is kombu's filesystem transport, which needs no
# server: messages are files under var/broker. Its polling interval bounds the
# latency of every task, so it is short by default.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = Path(env.str("PORTAL_FILESYSTEM_BROKER_DIR", default=str(VAR_DIR / "broker")))
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir),
        "data_folder_out": str(_broker_dir),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": env.float("PORTAL_FILESYSTEM_BROKER_POLL_SECONDS", default=0.05),
    }
    CELERY_BROKER_TRANSPORT = "portal.filesystem_broker:Transport"
    for _folder in (_broker_dir, _broker_dir / "processed", _broker_dir / "control"):
        _folder.mkdir(parents=True, exist_ok=True)
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # A task unacknowledged for this long is handed to another worker. The
    # delivery state machine makes a second run harmless, so the value only
    # bounds how long a killed worker's task waits.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600)}

# The cache stores the shared per-brand rate-limit counters. It is Redis when
# the broker is Redis, so every worker counts together, and per process otherwise.
CACHE_URL = env.str(
    "CACHE_URL",
    default=CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else "locmemcache://",
)
CACHES = {"default": env.cache_url_config(CACHE_URL)}

CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
# One queue per kind of work, so that routing, deliveries and maintenance can
# be given their own workers (`celery worker -Q deliveries`). Every worker
# consumes all three by default. A task without a route goes to
# `maintenance`, which every deployment consumes. Each queue has its own
# exchange and routing key: without them Celery binds every queue to the
# default queue's key, and each task would reach all three.
CELERY_TASK_QUEUES = [
    Queue(name, Exchange(name), routing_key=name) for name in ("routing", "deliveries", "maintenance")
]
CELERY_TASK_DEFAULT_QUEUE = "maintenance"
CELERY_TASK_ROUTES = {
    "events.tasks.route_batch": {"queue": "routing"},
    "events.tasks.route_received": {"queue": "routing"},
    "integrations.tasks.deliver": {"queue": "deliveries"},
    "integrations.tasks.send_due": {"queue": "deliveries"},
    "events.tasks.sweep_unrouted_batches": {"queue": "maintenance"},
    "integrations.tasks.flush_due_windows": {"queue": "maintenance"},
    "integrations.tasks.sweep_deliveries": {"queue": "maintenance"},
}
# The worker heartbeat task lives outside the apps' `tasks` modules.
CELERY_IMPORTS = ["portal.health"]
# Seconds between worker heartbeats; one is sent to each queue.
_HEARTBEAT_SECONDS = env.float("PORTAL_HEARTBEAT_INTERVAL_SECONDS", default=30.0)
CELERY_BEAT_SCHEDULE = {
    "flush-due-windows": {
        "task": "integrations.tasks.flush_due_windows",
        "schedule": env.float("PORTAL_FLUSH_INTERVAL_SECONDS", default=5.0),
    },
    "sweep-deliveries": {
        "task": "integrations.tasks.sweep_deliveries",
        "schedule": env.float("PORTAL_SWEEP_INTERVAL_SECONDS", default=5.0),
    },
    "sweep-inbound-batches": {
        "task": "events.tasks.sweep_unrouted_batches",
        "schedule": env.float("PORTAL_SWEEP_INTERVAL_SECONDS", default=5.0),
    },
    **{
        f"worker-heartbeat-{queue.name}": {
            "task": "portal.health.worker_heartbeat",
            "schedule": _HEARTBEAT_SECONDS,
            "args": (queue.name,),
            # A heartbeat no worker took in time proves nothing, so it expires instead of piling up.
            "options": {"queue": queue.name, "expires": _HEARTBEAT_SECONDS},
        }
        for queue in CELERY_TASK_QUEUES
    },
    # Daily, at a quiet hour; a run that stops at its chunk limit queues the next one itself.
    "purge-old-records": {
        "task": "integrations.tasks.purge_old_records",
        "schedule": crontab(hour=3, minute=30),
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# The portal's own settings, read through portal.conf.
PORTAL = {
    # Largest inbound body accepted, in bytes; larger bodies get 413.
    "MAX_BODY_BYTES": env.int("PORTAL_MAX_BODY_BYTES", default=20 * 1024 * 1024),
    # Failed inbound authentications per client address and minute before
    # further attempts get 429.
    "AUTH_FAILURES_PER_MINUTE": env.int("PORTAL_AUTH_FAILURES_PER_MINUTE", default=20),
    # Seconds a web process keeps a feed it authenticated, so that a rotated
    # secret or a deactivated feed can still pass for this long. 0 turns it off.
    "FEED_AUTH_CACHE_SECONDS": env.float("PORTAL_FEED_AUTH_CACHE_SECONDS", default=30.0),
    # Largest outbound POST body, in bytes of encoded JSON (Qualtrics' limit is 100 KB).
    "MAX_PAYLOAD_BYTES": env.int("PORTAL_MAX_PAYLOAD_BYTES", default=100_000),
    # Allow http:// and loopback POST URLs, for development and tests only.
    "ALLOW_LOOPBACK_TARGETS": env.bool("PORTAL_ALLOW_LOOPBACK_TARGETS", default=False),
    # Seconds to wait for a TCP and TLS connection to a Qualtrics host.
    "CONNECT_TIMEOUT_SECONDS": env.float("PORTAL_CONNECT_TIMEOUT_SECONDS", default=5.0),
    # CA bundle (a PEM file) that verifies Qualtrics' TLS certificates; empty
    # means the bundle that ships with certifi. Verification cannot be turned off.
    "CA_BUNDLE": env.str("PORTAL_CA_BUNDLE", default=""),
    # Seconds one attempt may take in total, response body included.
    "TOTAL_TIMEOUT_SECONDS": env.float("PORTAL_TOTAL_TIMEOUT_SECONDS", default=15.0),
    # Seconds a connection paused by its circuit breaker waits between probes.
    "BREAKER_PROBE_SECONDS": env.float("PORTAL_BREAKER_PROBE_SECONDS", default=60.0),
    # Seconds of recent attempts the circuit breaker judges.
    "BREAKER_WINDOW_SECONDS": env.float("PORTAL_BREAKER_WINDOW_SECONDS", default=300.0),
    # First retry delay in seconds; each later retry doubles it, with jitter.
    "RETRY_BASE_SECONDS": env.float("PORTAL_RETRY_BASE_SECONDS", default=30.0),
    # Maximum delay between two attempts, in seconds.
    "RETRY_MAX_SECONDS": env.float("PORTAL_RETRY_MAX_SECONDS", default=6 * 3600.0),
    # Seconds a web process waits after publishing a routing task before it
    # publishes the next, so that the batches stored meanwhile share one task.
    "ROUTING_WAKE_SECONDS": env.float("PORTAL_ROUTING_WAKE_SECONDS", default=0.02),
    # Most deliveries of one connection claimed and POSTed together; a run
    # sizes each chunk to take about half a second at the connection's pace.
    "DELIVERY_CHUNK_MAX": env.int("PORTAL_DELIVERY_CHUNK_MAX", default=100),
    # Seconds a worker keeps a claimed delivery before the sweeper may hand it to another.
    "LEASE_SECONDS": env.float("PORTAL_LEASE_SECONDS", default=60.0),
    # Seconds after which a batch not yet routed, or a delivery still pending,
    # is queued again because its task was lost (a broker restart, say).
    "REQUEUE_AFTER_SECONDS": env.float("PORTAL_REQUEUE_AFTER_SECONDS", default=60.0),
    # Seconds during which an event with the same mpid and source_message_id
    # is dropped as a duplicate, per connection.
    "EVENT_DEDUP_SECONDS": env.int("PORTAL_EVENT_DEDUP_SECONDS", default=24 * 3600),
    # Fernet keys that encrypt POST URLs and Authorization headers at rest. The
    # first key encrypts; every key decrypts, so a new key is put first to
    # rotate. Empty means one key derived from DJANGO_SECRET_KEY.
    "ENCRYPTION_KEYS": env.list("PORTAL_ENCRYPTION_KEYS", default=[]),
    # Bearer token that GET /metrics requires; empty leaves /metrics open.
    "METRICS_TOKEN": env.str("PORTAL_METRICS_TOKEN", default=""),
    # Seconds after which a queue's last worker heartbeat counts as stale on /readyz.
    "HEARTBEAT_STALE_SECONDS": 3 * _HEARTBEAT_SECONDS,
    # Days inbound batches and finished delivery records are kept before the daily purge deletes them.
    "RETENTION_DAYS": env.int("PORTAL_RETENTION_DAYS", default=30),
}

# Inbound bodies larger than Django's 2.5 MB default are normal for big
# mParticle batches, so Django's limit follows the portal's own.
DATA_UPLOAD_MAX_MEMORY_SIZE = PORTAL["MAX_BODY_BYTES"]

# JSON lines for log collectors in production, `event key=value` lines on a
# console otherwise (portal.logging).
LOG_FORMAT = env.str("PORTAL_LOG_FORMAT", default="json" if PRODUCTION else "console")
if LOG_FORMAT not in ("json", "console"):
    raise ImproperlyConfigured(f"PORTAL_LOG_FORMAT must be json or console, not {LOG_FORMAT!r}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "portal.logging.RequestIdFilter"}},
    "formatters": {
        "json": {"()": "portal.logging.JsonFormatter"},
        "console": {"()": "portal.logging.ConsoleFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["request_id"]},
    },
    "root": {"handlers": ["console"], "level": env.str("PORTAL_LOG_LEVEL", default="INFO")},
}
# Celery workers keep the handler above instead of installing their own format.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# prometheus-client reads PROMETHEUS_MULTIPROC_DIR itself; every process of a
# host writes its metrics there, so the folder must exist before the first one.
_metrics_dir = env.str("PROMETHEUS_MULTIPROC_DIR", default="")
if _metrics_dir:
    Path(_metrics_dir).mkdir(parents=True, exist_ok=True)

if PRODUCTION:
    _missing = [
        name
        for name, present in (
            ("DJANGO_SECRET_KEY", SECRET_KEY not in ("", _DEVELOPMENT_SECRET_KEY)),
            ("DJANGO_ALLOWED_HOSTS", "DJANGO_ALLOWED_HOSTS" in env),
            ("PORTAL_ENCRYPTION_KEYS", bool(PORTAL["ENCRYPTION_KEYS"])),
        )
        if not present
    ]
    if _missing:
        raise ImproperlyConfigured(
            f"PORTAL_PRODUCTION is set but {', '.join(_missing)} is missing from the environment."
        )
    if PORTAL["ALLOW_LOOPBACK_TARGETS"]:
        raise ImproperlyConfigured("PORTAL_ALLOW_LOOPBACK_TARGETS must not be set when PORTAL_PRODUCTION is set.")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
