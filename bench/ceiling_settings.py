"""Settings of the bare-insert ceiling (`bench.ceiling_app`): the least Django that stores a POST body.

No apps, no middleware, no authentication: only the database settings the
portal uses (`DATABASE_URL`, `DATABASE_CONN_MAX_AGE`, health checks), so
that the ceiling and the portal differ by the portal's own work alone.
"""

import environ

env = environ.Env()

DEBUG = False
SECRET_KEY = "bench-ceiling-not-a-secret"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "bench.ceiling_app"
WSGI_APPLICATION = "bench.ceiling_app.application"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"
DATA_UPLOAD_MAX_MEMORY_SIZE = 20 * 1024 * 1024

DATABASES = {"default": env.db_url("DATABASE_URL")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
