# Everything installs itself: a virtualenv in .venv, Kafka jars in .abuse/kafka.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test unit integration bench soak kafka-up kafka-down clean

# Reinstalling recompiles the detector modules (setup.py) after they change.
$(STAMP): pyproject.toml setup.py $(wildcard detectors/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
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
