# vacfactory: the entry points. `make demo` and `make test` work on a fresh Debian 12 machine
# (run as root: they install what is missing and start libvirtd).

PY := .venv/bin/python
PYTEST := .venv/bin/pytest
DEMO_SECONDS ?= 180
PYTEST_ARGS ?=

.PHONY: setup demo test test-loaded unit integration system bench faults docs clean-demo

setup:
	tools/setup-machine.sh

# Real TCG VMs from conf/demo.conf, state in demo-state/, a live table, then a summary.
demo: setup
	$(PY) tools/demo.py --config conf/demo.conf --seconds $(DEMO_SECONDS)

# The whole suite: pure and libvirt test-driver unit tests, real VMs, network namespaces, and
# the fault suite's short profile (VACFACTORY_FAULTS_PROFILE unset = short; `make faults` = full).
test: setup
	$(PYTEST) -q -p no:cacheprovider tests/unit tests/integration tests/system tests/faults $(PYTEST_ARGS)

# The suite while busy loops keep every core busy (one per core, at the tests' own priority, killed
# by pid at the end): waits follow events and scale their deadlines with the measured load
# (tests/waiting.py), so a busy machine makes the suite slower, never red. LOADED_TESTS narrows it, e.g. LOADED_TESTS=tests/unit.
LOADED_TESTS ?= tests/unit tests/integration tests/system tests/faults
HOGS ?= $(shell nproc)
test-loaded: setup
	HOG_PYTHON=$(PY) tools/with-cpu-hogs.sh -n $(HOGS) $(PYTEST) -q -p no:cacheprovider $(LOADED_TESTS) $(PYTEST_ARGS)

unit:
	$(PYTEST) -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

integration: setup
	$(PYTEST) -q -p no:cacheprovider tests/integration $(PYTEST_ARGS)

system: setup
	$(PYTEST) -q -p no:cacheprovider tests/system $(PYTEST_ARGS)

# Performance figures, printed with their goals. Every bench runs and prints its figures even if
# another missed its goal; a bench exits non-zero on a missed goal, and `make bench` then fails
# at the end naming the benches that failed.
bench: setup
	@failed=""; \
	for b in tests/bench/bench_*.py; do \
		echo "== $$b"; \
		$(PY) $$b || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "make bench: missed goals or failed:$$failed" >&2; exit 1; fi

# Reliability under faults, full profile (>= 500 kill -9 trials, >= 10 with real VMs, a 2-minute
# libvirtd outage, a full disk, clock jumps, a simulated day): prints the table of trials and outcomes.
FAULTS_PROFILE ?= full
faults: setup
	$(PY) tests/faults/run.py --profile $(FAULTS_PROFILE) $(PYTEST_ARGS)

# Regenerate the configuration reference and the man pages (option table, argparse parser).
docs:
	$(PY) -m vacfactory.config.docs markdown > docs/configuration.md
	$(PY) -m vacfactory.config.docs man > docs/vacfactory.conf.5
	$(PY) -m vacfactory.cli.main man > docs/vacfactory.1

clean-demo:
	rm -rf demo-state
