# Task runner. `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck check migrate web worker beat standin up bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

migrate: $(STAMP)
	$(BIN)/python manage.py migrate --noinput

# The demo's connections POST to the stand-in on 127.0.0.1.
demo up: export PORTAL_ALLOW_LOOPBACK_TARGETS = 1

demo: $(STAMP)
	$(BIN)/python manage.py demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy .

check: $(STAMP)
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python manage.py check

test: lint typecheck check
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@# With PORTAL_TEST_RABBITMQ_URL set, the delivery fault tests run once more on RabbitMQ.
	if [ -n "$$PORTAL_TEST_RABBITMQ_URL" ]; then \
		CELERY_BROKER_URL="$$PORTAL_TEST_RABBITMQ_URL" $(BIN)/python -m pytest -m services tests/test_faults.py tests/test_end_to_end.py; \
	fi

web: migrate
	$(BIN)/gunicorn portal.wsgi --bind $${PORTAL_BIND:-127.0.0.1:8000} --workers $${WEB_CONCURRENCY:-2}

worker: $(STAMP)
	$(BIN)/celery -A portal worker --loglevel INFO --pool threads --concurrency $${WORKER_CONCURRENCY:-8} \
		-Q $${WORKER_QUEUES:-routing,deliveries,maintenance}

beat: $(STAMP)
	$(BIN)/celery -A portal beat --loglevel INFO

standin: $(STAMP)
	$(BIN)/python manage.py qualtrics_standin

up: $(STAMP)
	$(BIN)/python manage.py demo --no-seed --keep-running

# The benchmark's load generator and profilers, installed beside the dev tools.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

# The whole pipeline beside its ceilings, on PostgreSQL and Redis; BENCHMARKS.md has the results.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.pipeline $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
