"""The CPU stages in the real task image, started by Airflow's DockerOperator.

A private Docker engine (tests/docker_engine.py) builds images/tasks-cpu, then a real
`airflow dags test` with CLEAR_RUNTIME=docker runs sync-metadata, plan-shards, download
(one container per shard) and segment on the embedded sample, with photos from the
local sample mirror. The model stages are marked successful without running, since
the torch image is not built in CI. The first try of one download container is killed
as it starts, as an out-of-memory kill would, and Airflow's retry must finish the shard
in a new container. The same DAG then runs with the local runtime on the same input,
and both sets of outputs must match.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from docker_engine import DOCKER, build_image, uncaptured

from tasks.sample_mirror import SampleMirror

pytestmark = [pytest.mark.docker, pytest.mark.airflow]

REPOSITORY = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CPU_IMAGE = "clear-pipeline/tasks-cpu:0.1.0"
IMAGE_USER = "10001:10001"
MODEL_TASKS = "extract_clip|curate|train_moco|extract_features|split"
CPU_STAGES = {"sync-metadata", "plan-shards", "download", "segment"}
# clear-<dag>-<task>-<map index>-<try>-<run id>, from clear_runtime.containers.
CONTAINER = re.compile(r"^clear-clear_pipeline-(?P<task>[a-z-]+?)-(?P<map>-?\d+)-(?P<try>\d+)-")
# Fields that record where or how fast a run went, not what it produced. Tar offsets
# follow the order in which downloads finish, which differs between any two runs.
VOLATILE = {"uri", "mtime_ns", "duration_seconds", "samples_per_second", "resumed",
            "mirror_base_url", "offset", "inputs"}
# Version folders are named from the source's path, size and time, and the image keeps
# the sample at another path than the repository, so versions are compared by content.
VERSION = re.compile(r"v-[0-9a-f]{12}")


def run_streamed(command, env, log: Path, prefix: str) -> int:
    """Run `command`, echo each output line with `prefix`, keep it all in `log`."""
    with open(log, "w") as kept:
        process = subprocess.Popen(command, env=env, cwd=REPOSITORY, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in process.stdout:
            kept.write(line)
            sys.stdout.write(f"{prefix} {line}")
        return process.wait(timeout=1500)


class ContainerEvents:
    """Follows the engine's container events; kills the first try of one container."""

    def __init__(self, engine, kill_task: str, kill_map_index: str):
        self.events: list[dict] = []
        self.killed: list[str] = []
        self.kill = (kill_task, kill_map_index, "1")
        self.process = subprocess.Popen(
            [DOCKER, "events", "--filter", "type=container", "--format", "{{json .}}"],
            env=engine.environment(), stdout=subprocess.PIPE, text=True)
        self.engine = engine
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self):
        for line in self.process.stdout:
            event = json.loads(line)
            name = event["Actor"]["Attributes"].get("name", "")
            self.events.append({"action": event["Action"], "name": name,
                                "exit": event["Actor"]["Attributes"].get("exitCode")})
            match = CONTAINER.match(name)
            if (event["Action"] == "start" and match
                    and (match["task"], match["map"], match["try"]) == self.kill):
                self.engine.docker("kill", name, check=False)
                self.killed.append(name)

    def stop(self):
        self.process.kill()
        self.process.wait()
        self.thread.join(timeout=10)

    def containers(self, action: str) -> list[re.Match]:
        return [CONTAINER.match(event["name"]) for event in self.events
                if event["action"] == action and CONTAINER.match(event["name"])]


def task_volume(path: Path) -> Path:
    """Create the host folder of the shared volume, owned by the task images' user."""
    path.mkdir()
    os.chown(path, *map(int, IMAGE_USER.split(":")))
    return path


def airflow_environment(home: Path, **settings) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLEAR_")}
    env.update({"AIRFLOW_HOME": str(home), "PYTHON": sys.executable,
                "PATH": f"{BIN}:{os.environ['PATH']}",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPOSITORY / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPOSITORY / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    env.update(settings)
    for args in (["db", "migrate"], ["pools", "set", "clear_gpu", "1", "GPU slots"]):
        result = subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    return env


DAGS_TEST = [str(BIN / "airflow"), "dags", "test", "clear_pipeline",
             "--mark-success-pattern", MODEL_TASKS]


@pytest.fixture(scope="module")
def cpu_image(docker_engine, request):
    with uncaptured(request):
        print(f"\n== building {CPU_IMAGE} from images/tasks-cpu/Dockerfile", flush=True)
        build_image(docker_engine, "tasks-cpu", CPU_IMAGE, REPOSITORY)
    return CPU_IMAGE


@pytest.fixture(scope="module")
def container_runs(docker_engine, cpu_image, tmp_path_factory, request):
    """The CPU stages once in containers and once with the local runtime."""
    work = tmp_path_factory.mktemp("containers")
    volume = task_volume(work / "volume")
    local_root = work / "local"
    with SampleMirror() as mirror:
        docker_env = airflow_environment(
            work / "airflow-docker", CLEAR_RUNTIME="docker", CLEAR_DOCKER_HOST=docker_engine.host,
            CLEAR_DOCKER_NETWORK="host", CLEAR_ARTIFACT_VOLUME=str(volume),
            CLEAR_SHM_SIZE_BYTES=str(256 << 20), CLEAR_MIRROR_BASE_URL=mirror.base_url)
        events = ContainerEvents(docker_engine, kill_task="download", kill_map_index="0")
        try:
            with uncaptured(request):
                print("\n== airflow dags test clear_pipeline with CLEAR_RUNTIME=docker", flush=True)
                docker_status = run_streamed(DAGS_TEST, docker_env, work / "docker.log",
                                             "[docker runtime]")
        finally:
            events.stop()
            left = docker_engine.remove_containers("clear-")
        local_env = airflow_environment(
            work / "airflow-local", CLEAR_RUNTIME="local", CLEAR_ARTIFACT_ROOT=str(local_root),
            CLEAR_MIRROR_BASE_URL=mirror.base_url)
        with uncaptured(request):
            print("\n== the same DAG with CLEAR_RUNTIME=local", flush=True)
            local_status = run_streamed(DAGS_TEST, local_env, work / "local.log",
                                        "[local runtime]")
    return {"docker": (docker_status, work / "docker.log"),
            "local": (local_status, work / "local.log"), "volume": volume,
            "local_root": local_root, "events": events, "left": left}


def test_dag_runs_cpu_stages_in_containers(container_runs):
    status, log = container_runs["docker"]
    output = log.read_text()

    assert status == 0, output[-5000:]
    assert re.search(r"DagRun Finished: dag_id=clear_pipeline, .* state=success", output)
    started = {match["task"] for match in container_runs["events"].containers("start")}
    assert started == CPU_STAGES
    assert output.count(f"Starting docker container from image {CPU_IMAGE}") >= 7


def test_each_download_shard_ran_in_its_own_container(container_runs):
    events = container_runs["events"]
    succeeded = {(match["task"], match["map"]) for match in events.containers("die")
                 if _exit(events, match.string) == "0"}

    assert succeeded == {("sync-metadata", "-1"), ("plan-shards", "-1"), ("download", "0"),
                         ("download", "1"), ("download", "2"), ("segment", "-1")}


def _exit(events: ContainerEvents, name: str) -> str | None:
    codes = [event["exit"] for event in events.events
             if event["name"] == name and event["action"] == "die"]
    return codes[-1] if codes else None


def test_killed_container_is_retried_under_a_new_name(container_runs):
    events = container_runs["events"]
    tries = {match["try"]: match.string for match in events.containers("start")
             if (match["task"], match["map"]) == ("download", "0")}

    assert events.killed == [tries["1"]]
    assert _exit(events, tries["1"]) == "137"
    assert tries["2"] != tries["1"]
    assert _exit(events, tries["2"]) == "0"


def test_no_container_is_left_behind(container_runs, docker_engine):
    assert container_runs["left"] == []
    listed = docker_engine.docker("ps", "--all", "--format", "{{.Names}}").stdout.split()
    assert [name for name in listed if name.startswith("clear-")] == []


def test_container_outputs_match_local_runtime(container_runs):
    status, log = container_runs["local"]
    assert status == 0, log.read_text()[-5000:]
    volume, local_root = container_runs["volume"], container_runs["local_root"]

    assert outputs(volume) == outputs(local_root)
    assert any(key.startswith("images/") and key.endswith(".tar") for key in outputs(volume))
    assert any(key.startswith("buckets/default/") for key in outputs(volume))


def outputs(root: Path) -> dict[str, object]:
    """Return each output file of `root` reduced to its content, in a comparable form."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = VERSION.sub("v-*", path.relative_to(root).as_posix())
        if not path.is_file() or path.suffix == ".lock":
            continue
        if path.suffix == ".parquet":
            rows = [_without_volatile(row) for row in pq.read_table(path).to_pylist()]
            found[key] = sorted(json.dumps(row, sort_keys=True, default=str) for row in rows)
        elif path.suffix == ".tar":
            with tarfile.open(path) as tar:
                found[key] = {member.name: tar.extractfile(member).read()
                              for member in tar.getmembers() if member.isfile()}
        elif path.suffix == ".json":
            found[key] = _without_volatile(json.loads(path.read_text()))
        else:
            found[key] = path.read_bytes()
    return found


def _without_volatile(value):
    if isinstance(value, dict):
        return {key: _without_volatile(item) for key, item in value.items()
                if key not in VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(item) for item in value]
    if isinstance(value, str):
        return VERSION.sub("v-*", value)
    return value


def test_rejected_input_fails_without_retry(docker_engine, cpu_image, tmp_path):
    """Exit status 2 from a stage in a container fails the task for good."""
    from clear_runtime.containers import StageDockerOperator
    from clear_runtime.factory import stage_command
    from clear_runtime.local import AirflowFailException
    from clear_runtime.settings import RuntimeSettings

    volume = task_volume(tmp_path / "volume")
    settings = RuntimeSettings(runtime="docker", docker_host=docker_engine.host,
                               docker_network="host", artifact_volume=str(volume),
                               shm_size_bytes=64 << 20)
    operator = StageDockerOperator(
        task_id="sync_metadata", stage="sync-metadata", settings=settings,
        command=stage_command("sync-metadata", ["--artifact-root", "/artifacts", "--source",
                                                "/opt/clear/sample/missing.tsv"]))
    operator.container_name = "clear-test-rejected-input"

    with pytest.raises(AirflowFailException, match="missing.tsv"):
        operator.execute({})
    listed = docker_engine.docker("ps", "--all", "--format", "{{.Names}}").stdout.split()
    assert "clear-test-rejected-input" not in listed


def test_s3_credentials_come_from_an_airflow_connection(docker_engine, cpu_image, s3_server,
                                                        monkeypatch, tmp_path):
    """A container writes to an s3:// root with the keys of an Airflow connection only."""
    from clear_runtime.containers import StageDockerOperator
    from clear_runtime.factory import stage_command
    from clear_runtime.settings import RuntimeSettings

    for name in s3_server.environment:
        monkeypatch.delenv(name, raising=False)
    environment = s3_server.environment
    monkeypatch.setenv("AIRFLOW_CONN_CLEAR_TEST_S3", json.dumps({
        "conn_type": "aws", "login": environment["AWS_ACCESS_KEY_ID"],
        "password": environment["AWS_SECRET_ACCESS_KEY"],
        "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}))
    volume = tmp_path / "volume"
    volume.mkdir()
    settings = RuntimeSettings(runtime="docker", docker_host=docker_engine.host,
                               docker_network="host", artifact_volume=str(volume),
                               shm_size_bytes=64 << 20, s3_conn_id="clear_test_s3")
    root = f"s3://{s3_server.bucket}/docker-connection"
    operator = StageDockerOperator(
        task_id="sync_metadata", stage="sync-metadata", settings=settings,
        command=stage_command("sync-metadata", [
            "--artifact-root", root, "--source",
            "/opt/clear/sample/yfcc100m_dataset_sample.tsv"]))
    operator.container_name = "clear-test-s3-connection"

    summary = operator.execute({})

    assert summary["stage"] == "sync-metadata"
    assert summary["rows"] == 600
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket,
                                                Prefix="docker-connection/metadata/")
    assert "docker-connection/metadata/manifest.json" in {item["Key"] for item in
                                                          listed["Contents"]}


TORCH_IMAGE = "clear-pipeline/tasks-torch:0.1.0"


@pytest.mark.skipif(os.environ.get("CLEAR_TORCH_IMAGE_TESTS") != "1",
                    reason="builds the multi-GB torch image; run `make test-torch-image`")
def test_whole_dag_runs_in_containers(docker_engine, cpu_image, tmp_path, request):
    """Every stage in its image, the model stages on the CPU (CLEAR_DOCKER_GPUS=0)."""
    with uncaptured(request):
        print(f"\n== building {TORCH_IMAGE} from images/tasks-torch/Dockerfile", flush=True)
        build_image(docker_engine, "tasks-torch", TORCH_IMAGE, REPOSITORY)
    volume = task_volume(tmp_path / "volume")
    with SampleMirror() as mirror:
        env = airflow_environment(
            tmp_path / "airflow", CLEAR_RUNTIME="docker", CLEAR_DOCKER_HOST=docker_engine.host,
            CLEAR_DOCKER_NETWORK="host", CLEAR_ARTIFACT_VOLUME=str(volume),
            CLEAR_DOCKER_GPUS="0", CLEAR_SHM_SIZE_BYTES=str(1 << 30),
            CLEAR_MIRROR_BASE_URL=mirror.base_url)
        try:
            with uncaptured(request):
                print("\n== airflow dags test clear_pipeline, every stage in a container",
                      flush=True)
                status = run_streamed([str(BIN / "airflow"), "dags", "test", "clear_pipeline"],
                                      env, tmp_path / "docker.log", "[docker runtime]")
        finally:
            left = docker_engine.remove_containers("clear-")
    report = subprocess.run([sys.executable, "-m", "tasks.report", "--artifact-root",
                             str(volume), "--check"], capture_output=True, text=True)

    assert status == 0, (tmp_path / "docker.log").read_text()[-5000:]
    assert left == []
    assert report.returncode == 0, report.stdout + report.stderr
