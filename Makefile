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

.PHONY: setup airflow-db run dag-test test test-torch-image lint bench lock clean images up down

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

# Also build the torch image and run every stage of the DAG in containers, the model
# stages on the CPU. Not part of `make test`, because the image contains several GB of
# CUDA wheels.
test-torch-image: setup
	CLEAR_TORCH_IMAGE_TESTS=1 $(BIN)/python -m pytest tests/test_containers.py

lint: setup
	$(BIN)/ruff check tasks dags plugins tests benchmarks
	dockerfiles=$$(find images -name Dockerfile 2>/dev/null); \
	if [ -n "$$dockerfiles" ]; then $(BIN)/hadolint --failure-threshold warning $$dockerfiles; fi

bench: setup
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

# Re-resolve requirements/main.in into the pinned lock file, then pin each image's
# requirements to the same versions.
lock:
	rm -rf /tmp/clear-lock-venv && $(PYTHON) -m venv /tmp/clear-lock-venv
	/tmp/clear-lock-venv/bin/pip install --quiet -r requirements/main.in
	/tmp/clear-lock-venv/bin/pip freeze --exclude-editable > requirements/lock.txt
	for image in cpu torch airflow; do \
	    $(BIN)/python scripts/lock_subset.py requirements/$$image.in \
	        requirements/$$image-lock.txt || exit 1; \
	done

# The task and Airflow images, built from the repository root with the local engine.
DOCKER ?= docker
IMAGE_VERSION ?= 0.1.0
IMAGES ?= tasks-cpu tasks-torch airflow
images:
	for image in $(IMAGES); do \
	    $(DOCKER) build $(DOCKER_BUILD_FLAGS) --file images/$$image/Dockerfile \
	        --build-arg VERSION=$(IMAGE_VERSION) \
	        --tag clear-pipeline/$$image:$(IMAGE_VERSION) . || exit 1; \
	done

clean:
	rm -rf $(VENV) .airflow artifacts .cache

# The single-host stack of docker/compose.yaml, from the images that `make images` builds.
# `$(DOCKER) compose` when installed, else docker-compose (1.29 or later).
COMPOSE = $(shell $(DOCKER) compose version > /dev/null 2>&1 && echo "$(DOCKER) compose" || echo docker-compose)
DOCKER_SOCKET ?= /var/run/docker.sock

# DOCKER_GID, the socket's group, lets the scheduler's non-root user start containers.
up:
	@test -S $(DOCKER_SOCKET) || { echo "no Docker socket at $(DOCKER_SOCKET); start Docker" \
		"or set DOCKER_SOCKET to its path" >&2; exit 1; }
	DOCKER_SOCKET=$(DOCKER_SOCKET) DOCKER_GID=$${DOCKER_GID:-$$(stat -c %g $(DOCKER_SOCKET))} \
		$(COMPOSE) -f docker/compose.yaml up -d

# Keeps the volumes (database, S3 data, artifacts); `make down VOLUMES=1` deletes them.
down:
	$(COMPOSE) -f docker/compose.yaml down $(if $(filter 1,$(VOLUMES)),--volumes)
