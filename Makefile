# Set-up, run and test targets. `make run` and `make test` are the README's two commands.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
ARTIFACT_ROOT ?= $(CURDIR)/artifacts
TINY_CLIP := .cache/models/clear-tiny.pt

export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
# Recursive, so that the target-specific ARTIFACT_ROOT of dag-test applies.
export CLEAR_ARTIFACT_ROOT = $(ARTIFACT_ROOT)
export PATH := $(BIN):$(PATH)

.PHONY: setup airflow-db run dag-test test lint bench lock clean

setup: $(VENV)/.installed $(TINY_CLIP)

$(VENV)/.installed: requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements/lock.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# Deterministic weights for the tiny CLIP model of the embedded default (no semantic meaning).
$(TINY_CLIP): $(VENV)/.installed
	$(BIN)/python -m tasks.clip_models write-tiny-checkpoint $@

airflow-db: setup
	$(BIN)/airflow db migrate > /dev/null
	$(BIN)/airflow pools set clear_gpu 1 "GPU slots for CLIP, MoCo and feature extraction" > /dev/null

# The main job: the whole pipeline DAG on the embedded default, then where its outputs are.
run: airflow-db
	scripts/with-sample-mirror.sh $(BIN)/airflow dags test clear_pipeline
	$(BIN)/python -m tasks.report --artifact-root $(ARTIFACT_ROOT)

# The same DAG run into a fresh artifact root, then a check that every stage wrote output.
dag-test: ARTIFACT_ROOT := $(CURDIR)/.airflow/dag-test-artifacts
dag-test: airflow-db
	rm -rf $(ARTIFACT_ROOT)
	scripts/with-sample-mirror.sh $(BIN)/airflow dags test clear_pipeline
	$(BIN)/python -m tasks.report --artifact-root $(ARTIFACT_ROOT) --check

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check tasks dags plugins tests benchmarks
	dockerfiles=$$(find images -name Dockerfile 2>/dev/null); \
	if [ -n "$$dockerfiles" ]; then $(BIN)/hadolint --failure-threshold warning $$dockerfiles; fi

bench: setup
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

# Re-resolve requirements/main.in into the pinned lock file.
lock:
	rm -rf /tmp/clear-lock-venv && $(PYTHON) -m venv /tmp/clear-lock-venv
	/tmp/clear-lock-venv/bin/pip install --quiet -r requirements/main.in
	/tmp/clear-lock-venv/bin/pip freeze --exclude-editable > requirements/lock.txt

clean:
	rm -rf $(VENV) .airflow artifacts .cache
