"""Bad container-runtime configuration: caught early, reported with the setting to fix.

No Docker engine is needed. Where DockerOperator must talk to an engine, a stub on a
Unix socket (`StubDockerEngine`) responds to the few Docker API calls made before a
container runs, so the real docker-py client and operator code run up to the engine's
error.
"""

import json
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler

import pytest
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator

from clear_runtime.containers import StageDockerOperator
from clear_runtime.factory import stage_command, stage_task
from clear_runtime.local import AirflowException, AirflowFailException
from clear_runtime.settings import RuntimeSettings, s3_environment

SAMPLE = "/opt/clear/sample/yfcc100m_dataset_sample.tsv"
NO_SUCH_HOST = ("Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup "
                "registry-1.docker.io: no such host")


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class StubDockerEngine:
    """Respond to Docker API requests on a Unix socket from a table of canned responses.

    `routes` maps (method, path without the /v1.xx prefix) to (status, JSON body).
    Every request is recorded in `requests` as (method, path, JSON body or None).
    """

    def __init__(self, socket_path, routes: dict):
        self.routes = {("GET", "/version"): (200, {"ApiVersion": "1.41", "Version": "20.10"}),
                       ("GET", "/_ping"): (200, "OK"), **routes}
        self.requests: list[tuple[str, str, object]] = []
        self.url = f"unix://{socket_path}"
        self.server = _UnixHTTPServer(str(socket_path), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self):
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def _respond(self):
                path = self.path.split("?")[0]
                if path.startswith("/v1."):
                    path = "/" + path.split("/", 2)[2]
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                engine.requests.append((self.command, path, body))
                status, response = engine.routes.get(
                    (self.command, path), (404, {"message": f"no stub for {path}"}))
                if isinstance(response, str):
                    data = response.encode()
                else:
                    data = json.dumps(response).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _respond

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()

    def paths(self, method: str) -> list[str]:
        return [path for verb, path, _ in self.requests if verb == method]


def docker_settings(**overrides) -> RuntimeSettings:
    values = {"runtime": "docker", "artifact_volume": "/srv/clear", "shm_size_bytes": 64 << 20}
    return RuntimeSettings(**{**values, **overrides})


def sync_metadata(settings: RuntimeSettings, root: str = "/artifacts") -> StageDockerOperator:
    operator = StageDockerOperator(
        task_id="sync_metadata", stage="sync-metadata", settings=settings,
        command=stage_command("sync-metadata", ["--artifact-root", root, "--source", SAMPLE]))
    operator.container_name = "clear-test-settings"
    return operator


@pytest.fixture
def clear_environment(monkeypatch):
    """Unset every CLEAR_* and DOCKER_HOST variable so that each test sets its own."""
    for name in list(os.environ):
        if name.startswith("CLEAR_") or name == "DOCKER_HOST":
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLEAR_RUNTIME", "docker")
    return monkeypatch


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """Leave boto3 no credentials to find, and keep it off the EC2 metadata address."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def test_dag_parse_needs_no_engine(clear_environment, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    missing = f"unix://{tmp_path}/missing.sock"
    clear_environment.setenv("CLEAR_DOCKER_HOST", missing)

    dagbag = DagBag()

    assert dagbag.import_errors == {}
    task = dagbag.dags["clear_pipeline"].get_task("sync_metadata")
    assert isinstance(task, StageDockerOperator)
    assert task.docker_url == missing


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("CLEAR_SHM_SIZE_BYTES", "8g", "invalid CLEAR_SHM_SIZE_BYTES '8g'; expected a whole"),
    ("CLEAR_SHM_SIZE_BYTES", "-1", "invalid CLEAR_SHM_SIZE_BYTES '-1'; the minimum is 1"),
    ("CLEAR_SHM_SIZE_BYTES", "0", "invalid CLEAR_SHM_SIZE_BYTES '0'; the minimum is 1"),
    ("CLEAR_GPUS_PER_TASK", "two", "invalid CLEAR_GPUS_PER_TASK 'two'; expected a whole"),
])
def test_integer_settings_name_value(clear_environment, name, value, expected):
    clear_environment.setenv(name, value)

    with pytest.raises(ValueError, match=expected):
        RuntimeSettings.load()


@pytest.mark.parametrize("volume", ["./artifacts", "~/artifacts", "artifacts/run", "my volume"])
def test_artifact_volume_rejects_relative_paths(clear_environment, volume):
    clear_environment.setenv("CLEAR_ARTIFACT_VOLUME", volume)

    with pytest.raises(ValueError, match=f"invalid CLEAR_ARTIFACT_VOLUME '{volume}'"):
        RuntimeSettings.load()


@pytest.mark.parametrize(("volume", "mount_type"), [
    ("/srv/clear", "bind"), ("clear-artifacts", "volume"), ("clear_artifacts.2", "volume")])
def test_artifact_volume_accepts_folder_or_name(clear_environment, volume, mount_type):
    clear_environment.setenv("CLEAR_ARTIFACT_VOLUME", volume)

    operator = stage_task("segment", [], settings=RuntimeSettings.load())

    assert operator.mounts[0]["Source"] == volume
    assert operator.mounts[0]["Type"] == mount_type


def test_artifact_mount_must_be_absolute(clear_environment):
    clear_environment.setenv("CLEAR_ARTIFACT_MOUNT", "artifacts")

    with pytest.raises(ValueError, match="invalid CLEAR_ARTIFACT_MOUNT 'artifacts'; expected"):
        RuntimeSettings.load()


def test_docker_gpus_zero_forms_and_junk(clear_environment):
    clear_environment.setenv("CLEAR_DOCKER_GPUS", "00")
    settings = RuntimeSettings.load()
    operator = stage_task("extract-clip", ["--bucket", "0"], settings=settings)

    assert settings.docker_gpus == "0"
    assert operator.device_requests is None
    clear_environment.setenv("CLEAR_DOCKER_GPUS", "²")
    with pytest.raises(ValueError, match="invalid CLEAR_DOCKER_GPUS '²'"):
        RuntimeSettings.load()


def test_docker_host_variable_is_default(clear_environment):
    clear_environment.setenv("DOCKER_HOST", "unix:///run/user/1000/docker.sock")

    assert RuntimeSettings.load().docker_host == "unix:///run/user/1000/docker.sock"


def test_clear_docker_host_overrides_docker_host(clear_environment):
    clear_environment.setenv("DOCKER_HOST", "unix:///run/user/1000/docker.sock")
    clear_environment.setenv("CLEAR_DOCKER_HOST", "tcp://127.0.0.1:2375")

    assert RuntimeSettings.load().docker_host == "tcp://127.0.0.1:2375"


def test_missing_s3_connection_fails_without_retry(no_aws_credentials):
    no_aws_credentials.setenv("AWS_ACCESS_KEY_ID", "worker-key")
    no_aws_credentials.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")

    with pytest.raises(AirflowFailException, match="connection 'no_such_connection'"):
        s3_environment("no_such_connection")


def test_s3_connection_without_keys_is_unsigned(no_aws_credentials):
    no_aws_credentials.setenv("AIRFLOW_CONN_CLEAR_TEST_ENDPOINT", json.dumps(
        {"conn_type": "aws", "extra": {"endpoint_url": "http://127.0.0.1:8333"}}))

    environment = s3_environment("clear_test_endpoint")

    assert "AWS_ACCESS_KEY_ID" not in environment
    assert "AWS_SECRET_ACCESS_KEY" not in environment
    assert environment["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"


def test_s3_connection_keys_are_passed(no_aws_credentials):
    no_aws_credentials.setenv("AIRFLOW_CONN_CLEAR_TEST_KEYS", json.dumps(
        {"conn_type": "aws", "login": "connection-key", "password": "connection-secret",
         "extra": {"endpoint_url": "http://127.0.0.1:8333", "region_name": "us-east-1"}}))

    environment = s3_environment("clear_test_keys")

    assert environment["AWS_ACCESS_KEY_ID"] == "connection-key"
    assert environment["AWS_SECRET_ACCESS_KEY"] == "connection-secret"
    assert environment["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert environment["AWS_DEFAULT_REGION"] == "us-east-1"


def test_unreachable_engine_names_docker_host(tmp_path):
    missing = f"unix://{tmp_path}/missing.sock"
    operator = sync_metadata(docker_settings(docker_host=missing))

    with pytest.raises(AirflowException, match="CLEAR_DOCKER_HOST") as raised:
        operator.execute({})
    assert missing in str(raised.value)


def test_missing_image_names_make_images(tmp_path):
    routes = {("GET", "/images/json"): (200, []),
              ("POST", "/images/create"): (500, {"message": NO_SUCH_HOST})}
    with StubDockerEngine(tmp_path / "docker.sock", routes) as engine:
        operator = sync_metadata(docker_settings(docker_host=engine.url))

        with pytest.raises(AirflowException) as raised:
            operator.execute({})

    message = str(raised.value)
    assert "clear-pipeline/tasks-cpu:0.1.0" in message
    assert "make images" in message
    assert "no such host" in message
    assert not isinstance(raised.value, AirflowFailException)
    assert "/containers/create" not in engine.paths("POST")


def test_rejected_container_fails_without_retry(tmp_path):
    rejection = ('invalid mount config for type "bind": bind source path does not exist: '
                 "/srv/clear")
    routes = {("GET", "/images/json"): (200, [{"Id": "sha256:0"}]),
              ("POST", "/containers/create"): (400, {"message": rejection})}
    with StubDockerEngine(tmp_path / "docker.sock", routes) as engine:
        operator = sync_metadata(docker_settings(docker_host=engine.url))

        with pytest.raises(AirflowFailException) as raised:
            operator.execute({})

    assert rejection in str(raised.value)
    assert "CLEAR_ARTIFACT_VOLUME ('/srv/clear')" in str(raised.value)


def test_missing_network_names_docker_network(tmp_path):
    routes = {("GET", "/images/json"): (200, [{"Id": "sha256:0"}]),
              ("POST", "/containers/create"): (404, {"message": "network lab not found"})}
    with StubDockerEngine(tmp_path / "docker.sock", routes) as engine:
        operator = sync_metadata(docker_settings(docker_host=engine.url, docker_network="lab"))

        with pytest.raises(AirflowFailException) as raised:
            operator.execute({})

    assert "no network 'lab'" in str(raised.value)
    assert "CLEAR_DOCKER_NETWORK" in str(raised.value)
    assert "CLEAR_ARTIFACT_VOLUME" not in str(raised.value)


def test_killed_container_says_killed(tmp_path, monkeypatch):
    def kill(self, context):
        raise DockerContainerFailedException(
            "Docker container failed: {'Error': None, 'StatusCode': 137}", logs=["starting"])

    monkeypatch.setattr(DockerOperator, "execute", kill)
    with StubDockerEngine(tmp_path / "docker.sock", {}) as engine:
        operator = sync_metadata(docker_settings(docker_host=engine.url))

        with pytest.raises(AirflowException, match=r"status 137 \(killed: out of memory"):
            operator.execute({})


def test_unwritable_bind_mount_names_chown(tmp_path, monkeypatch):
    def reject(self, context):
        raise DockerContainerFailedException(
            "Docker container failed: {'Error': None, 'StatusCode': 2}",
            logs=["error: stage sync-metadata failed: artifact root '/artifacts' is not "
                  "writable ([Errno 13] Permission denied)"])

    monkeypatch.setattr(DockerOperator, "execute", reject)
    with StubDockerEngine(tmp_path / "docker.sock", {}) as engine:
        operator = sync_metadata(docker_settings(docker_host=engine.url))

        with pytest.raises(AirflowFailException, match="chown -R 10001:10001 /srv/clear"):
            operator.execute({})


def test_gpu_without_runtime_names_docker_gpus(tmp_path, monkeypatch):
    from docker.errors import APIError

    def fail_to_start(self, context):
        raise APIError("500 Server Error", explanation='could not select device driver "" '
                       "with capabilities: [[gpu]]")

    monkeypatch.setattr(DockerOperator, "execute", fail_to_start)
    with StubDockerEngine(tmp_path / "docker.sock", {}) as engine:
        operator = stage_task("extract-clip", ["--artifact-root", "/artifacts"],
                              settings=docker_settings(docker_host=engine.url))

        with pytest.raises(AirflowFailException, match="CLEAR_DOCKER_GPUS=0"):
            operator.execute({})


def test_container_exit_names_last_line(tmp_path, monkeypatch):
    def crash(self, context):
        raise DockerContainerFailedException(
            "Docker container failed: {'Error': None, 'StatusCode': 3}",
            logs=["starting", "MemoryError: cannot allocate 2 GiB"])

    monkeypatch.setattr(DockerOperator, "execute", crash)
    with StubDockerEngine(tmp_path / "docker.sock", {}) as engine:
        operator = sync_metadata(docker_settings(docker_host=engine.url))

        with pytest.raises(AirflowException) as raised:
            operator.execute({})

    assert not isinstance(raised.value, AirflowFailException)
    assert str(raised.value) == ("stage sync-metadata exited with status 3: "
                                 "MemoryError: cannot allocate 2 GiB")


@pytest.mark.parametrize("root", ["/tmp/clear-run", "/work/clear/artifacts", "/artifacts-old",
                                  "/artifacts/../tmp", "file:///tmp/clear-run"])
def test_artifact_root_outside_mount_rejected(tmp_path, root):
    with StubDockerEngine(tmp_path / "docker.sock", {}) as engine:
        operator = sync_metadata(docker_settings(docker_host=engine.url), root=root)

        with pytest.raises(AirflowFailException, match="outside the artifact mount /artifacts"):
            operator.execute({})

    assert engine.requests == []


@pytest.mark.parametrize("root", ["/artifacts", "/artifacts/run-1", "file:///artifacts/run-1",
                                  "s3://clear/run-1"])
def test_shared_artifact_root_reaches_engine(tmp_path, root):
    routes = {("GET", "/images/json"): (200, [{"Id": "sha256:0"}]),
              ("POST", "/containers/create"): (400, {"message": "stub stops here"})}
    with StubDockerEngine(tmp_path / "docker.sock", routes) as engine:
        operator = sync_metadata(docker_settings(docker_host=engine.url), root=root)

        with pytest.raises(Exception, match="stub stops here"):
            operator.execute({})

    created = [body for verb, path, body in engine.requests if path == "/containers/create"]
    assert len(created) == 1
    assert created[0]["Cmd"][-3:] == [root, "--source", SAMPLE]


def test_summary_found_before_late_log_lines():
    from clear_runtime.containers import _summary_from_logs

    lines = ["INFO starting", '{"rows": 600, "stage": "sync-metadata"}',
             "INFO tasks.metadata: wrote 600 rows in 1 parts"]

    assert _summary_from_logs(lines) == {"rows": 600, "stage": "sync-metadata"}
    assert _summary_from_logs(["INFO no summary", "[1, 2]"]) == {}
    assert _summary_from_logs(None) == {}
