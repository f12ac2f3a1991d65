# emailsync: `make demo` runs the main job, `make test` runs every test. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all setup system-deps demo demo-crm test lint typecheck unit integration bench bench-full profile soak chaos \
	clean dist test-dist deb test-deb deb-deps image image-deps test-image

all: test

# Debian packages the daemon's tests and demo need (run as root; skipped when present).
system-deps:
	@bash .ci/system-deps

$(STAMP): pyproject.toml
	@bash .ci/system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/emailsync demo

demo-crm: setup  # the same against the reference CRM: groups from it, events delivered to it
	$(BIN)/emailsync demo --crm

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache  # the layers in pyproject.toml [tool.importlinter]

typecheck: setup
	$(BIN)/mypy

# Unit tests mostly wait (timers, threads, a PostgreSQL): four workers on two cores.
unit: setup
	$(BIN)/python -m pytest tests/unit -q -n 4

integration: setup
	$(BIN)/python -m pytest tests/integration -q

# Most of the suite's time is spent waiting for servers (user + sys is a third of the wall
# time): four workers on two cores, each with its own Dovecot and PostgreSQL. worksteal keeps
# the long tests (chaos, soak, cluster) from queueing behind each other on one worker, and
# tests/conftest.py (LONG_TESTS) starts them first, spread over the workers.
PYTEST_WORKERS ?= -n 4 --dist worksteal

# Everything CI runs: lint, types, every test (Dovecot, PostgreSQL, Prometheus) and the bench
# smoke. The bench smoke (~2 min, mostly waiting on its servers: ~20 s of CPU) runs beside
# pytest, in its own process group (set -m) so that an interrupt stops it with SIGINT (it
# closes its servers); its output is printed once pytest is done, then pytest's summary
# again, so that the run's closing line is still that summary.
BENCH_LOG := test-artifacts/bench-smoke.log
test: setup lint typecheck
	@mkdir -p test-artifacts; \
	set -m; \
	{ $(BIN)/python bench/run.py --smoke && \
	  $(BIN)/python bench/shapes.py --messages 100 --repeats 1; } > $(BENCH_LOG) 2>&1 & \
	bench=$$!; \
	set +m; \
	trap 'kill -INT -- -$$bench 2>/dev/null' INT TERM EXIT; \
	echo "bench smoke started beside pytest (output: $(BENCH_LOG))"; \
	set -o pipefail; \
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) | tee test-artifacts/pytest.log; \
	tests=$$?; \
	wait $$bench; smoke=$$?; trap - INT TERM EXIT; \
	echo; echo "bench smoke (ran beside pytest; exit status $$smoke):"; cat $(BENCH_LOG); \
	echo; tail -n 1 test-artifacts/pytest.log; \
	[ $$tests -eq 0 ] && [ $$smoke -eq 0 ]

# Issue 10's full table, 2,000 mailboxes and 10,000 messages included (~20 min on 2 cores).
bench: setup
	$(BIN)/python bench/run.py --big-mailboxes 2000 --backlog 10000
	$(BIN)/python bench/shapes.py --messages 2000 --repeats 3
	$(BIN)/python bench/failover.py --mailboxes 2000 --instances 1
	$(BIN)/python bench/failover.py --mailboxes 6000 --instances 3 --lease 12 --memory

# Flame graphs (py-spy, SVG) of one backlog pass, for issue 10's profile: bench/results/.
PROFILE_MESSAGES ?= 10000
profile: setup
	mkdir -p bench/results
	$(BIN)/py-spy record --rate 200 --output bench/results/backlog-flame.svg -- \
		$(BIN)/python bench/profile_backlog.py $(PROFILE_MESSAGES)
	$(BIN)/py-spy record --rate 200 --format raw --output bench/results/backlog-flame.txt -- \
		$(BIN)/python bench/profile_backlog.py $(PROFILE_MESSAGES)
	$(BIN)/python bench/top_frames.py bench/results/backlog-flame.txt run_pass

# Issue 7's soak: 200 mailboxes, 10 minutes of mail and random faults (make test runs 20 s of 20).
soak: setup
	EMAILSYNC_SOAK_SECONDS=600 EMAILSYNC_SOAK_MAILBOXES=200 \
		$(BIN)/python -m pytest tests/integration/test_soak.py -q -s
# Issue 19's chaos run: 3 instances over PostgreSQL with 300 mailboxes, and one CRM-connected
# instance, for 10 minutes each (make test runs 20 s of 24 mailboxes).
chaos: setup
	EMAILSYNC_CHAOS_SECONDS=600 EMAILSYNC_CHAOS_MAILBOXES=300 \
		$(BIN)/python -m pytest tests/integration/test_chaos.py -q -s

# sdist + wheel into dist/ (version from daemon/emailsync/__init__.py).
dist: setup
	$(BIN)/python -m build --outdir dist .

# Builds both, installs the wheel in a fresh venv, runs --version, check-config and demo --once.
test-dist: setup
	bash .ci/test-dist

# Debian packages `make deb` needs (debhelper, dh-virtualenv); not needed by `make test`.
deb-deps:
	@bash .ci/deb-deps

# dist/emailsync_<version>_amd64.deb (dh-virtualenv: Python deps in /opt/venvs/emailsync; pip
# fetches them from PyPI at build time). Version: emailsync.__version__ = debian/changelog.
deb: deb-deps
	bash .ci/build-deb

# Builds the .deb, dpkg -i on this machine (root), --version, check-config on the example,
# systemd-analyze verify on the installed units, then dpkg --purge and checks nothing is left.
test-deb: deb-deps setup
	bash .ci/test-deb

# Tools `make image` needs (mmdebstrap, buildah, podman, runc); not needed by `make test`.
image-deps:
	@bash .ci/image-deps

# The OCI image config/kubernetes/ runs, localhost/emailsync:<version>, with no registry: a
# minimal Debian root (mmdebstrap, this machine's suite and mirror) with the .deb installed,
# committed by buildah to containers-storage and build/image/emailsync_<version>.oci.tar. Runs
# as uid 10001 (emailsync). Reuses the .deb when it is newer than the sources, and the root
# and the image while the .deb is unchanged. podman here: .ci/podman (runc, cgroupfs, ulimits).
image: deb-deps image-deps
	bash .ci/build-image

# Builds (or reuses) the image and files the demo's mail with it: the daemon in the container
# as uid 10001 with a read-only root, the demo's Dovecot outside (.ci/image_demo.py).
test-image: deb-deps image-deps setup
	bash .ci/test-image

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info test-artifacts
