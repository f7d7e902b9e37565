"""Fixtures shared by every test module."""

import os
import tempfile
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REPOSITORY = Path(__file__).resolve().parents[1]

# Airflow reads its configuration on first import, so point it at this repository and
# a throw-away home before any test module imports it.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="clear-airflow-home-"))
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPOSITORY / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPOSITORY / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


@pytest.fixture
def sample_tsv() -> Path:
    """600 real YFCC100M lines in the 25-column layout."""
    return DATA / "yfcc100m_dataset_sample.tsv"


@pytest.fixture
def artifact_root(tmp_path) -> str:
    root = tmp_path / "artifacts"
    root.mkdir()
    return str(root)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API server on 127.0.0.1 for the whole test session."""
    from s3_server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_root(s3_server, monkeypatch, request) -> str:
    """An empty `s3://bucket/prefix` artifact root, with boto3 pointed at the test server."""
    for name, value in s3_server.environment.items():
        monkeypatch.setenv(name, value)
    prefix = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)
    return f"s3://{s3_server.bucket}/{prefix}"


@pytest.fixture(scope="session")
def docker_engine():
    """A private Docker engine with the stand-in base image; stopped after the session.

    Skipped where Debian's engine cannot be installed (not root, not Debian), except
    under CI=true, where the container tests must run.
    """
    from docker_engine import DockerEngine, ensure_base_image, install_packages_or_skip

    install_packages_or_skip("the container tests")
    engine = DockerEngine()
    engine.start()
    try:
        ensure_base_image(engine)
        yield engine
        # Images replaced by a rebuild would otherwise pile up in the kept data root.
        engine.docker("image", "prune", "--force", check=False)
    finally:
        engine.stop()
