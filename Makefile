# Everything installs itself: a virtualenv in .venv, Kafka jars in .abuse/kafka.
# The interpreter the virtualenv is made from (override: make PYTHON=...): the distribution's build
# of python3's version where it has venv and its headers, else python3. Debian's and Ubuntu's CPython
# are built with profile-guided and link-time optimisation, pyenv's by default with neither: a worker
# on Debian's took 3.2% less CPU per event (docs/performance.md, round 42).
PYTHON ?= $(shell v=$$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	p=/usr/bin/python$$v; \
	if [ -n "$$v" ] && [ -x "$$p" ] && [ -f "/usr/include/python$$v/Python.h" ] && "$$p" -c 'import ensurepip' 2>/dev/null; \
	then echo "$$p"; else echo python3; fi)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test unit integration bench soak kafka-up kafka-down clean

# Reinstalling recompiles the detector modules (setup.py) after they change, then once more with
# the profile of a training run (streams/profiled_build.py, which runs setup.py with the virtualenv's
# setuptools; PGO=0 skips it).
PGO ?= 1
$(STAMP): pyproject.toml setup.py $(wildcard detectors/*.py) streams/profiled_build.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools>=77'
	$(BIN)/python -m pip install -q -e '.[test]'
	if [ "$(PGO)" != 0 ]; then $(BIN)/python -m streams.profiled_build; fi
	touch $(STAMP)

install: $(STAMP)

## Local Kafka, topics, a worker, about a minute of simulated traffic, a summary.
demo: install
	$(BIN)/abuse-detector demo

## Throughput, latency, the plain-loop ceiling and two workers on the local broker (docs/performance.md).
bench: install
	$(BIN)/abuse-detector bench

## One worker at 5,000 events/s with labels for 5 minutes, reported every 10 s (see streams/soak.py).
soak: install
	$(BIN)/abuse-detector soak

## Unit tests (no broker) and integration tests (the tests start a real local Kafka).
test: install
	$(BIN)/python -m pytest

unit: install
	$(BIN)/python -m pytest tests/unit

integration: install
	$(BIN)/python -m pytest tests/integration

kafka-up: install
	$(BIN)/abuse-detector kafka up

kafka-down: install
	$(BIN)/abuse-detector kafka down

clean:
	-$(BIN)/abuse-detector kafka down
	rm -rf $(VENV) .abuse .pytest_cache *.egg-info
