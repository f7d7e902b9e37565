import re

import pytest

from clear_runtime import RuntimeSettings, stage_task
from clear_runtime.containers import container_name
from clear_runtime.factory import GPU_POOL

PIPELINE_TASKS = ["sync_metadata", "plan_shards", "shard_arguments", "download", "segment",
                  "bucket_arguments", "extract_clip", "curate", "train_moco",
                  "extract_features", "split"]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag()


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"clear_pipeline", "clear_refresh"}


def test_pipeline_structure(dagbag):
    dag = dagbag.dags["clear_pipeline"]
    upstream = {task.task_id: set(task.upstream_task_ids) for task in dag.tasks}

    assert sorted(upstream) == sorted(PIPELINE_TASKS)
    assert upstream["plan_shards"] == {"sync_metadata"}
    assert upstream["shard_arguments"] == {"plan_shards"}
    assert upstream["download"] == {"shard_arguments"}
    assert upstream["segment"] == {"download"}
    assert upstream["extract_clip"] == {"segment", "bucket_arguments"}
    assert upstream["curate"] == {"extract_clip"}
    assert upstream["train_moco"] == {"curate"}
    assert upstream["extract_features"] == {"train_moco"}
    assert upstream["split"] == {"extract_features"}


def test_mapped_and_gpu_tasks(dagbag):
    dag = dagbag.dags["clear_pipeline"]
    tasks = {task.task_id: task for task in dag.tasks}

    assert type(tasks["download"]).__name__ == "MappedOperator"
    assert type(tasks["extract_clip"]).__name__ == "MappedOperator"
    for task_id in ("extract_clip", "train_moco", "extract_features"):
        assert tasks[task_id].pool == GPU_POOL
    assert tasks["segment"].pool != GPU_POOL


def test_refresh_dag_is_scheduled(dagbag):
    dag = dagbag.dags["clear_refresh"]

    assert dag.schedule == "@weekly"
    assert {t.task_id for t in dag.tasks} == {"sync_metadata", "plan_shards",
                                              "shard_arguments", "download"}


def test_outlets_are_assets(dagbag):
    dag = dagbag.dags["clear_pipeline"]
    names = {outlet.name for task in dag.tasks for outlet in getattr(task, "outlets", [])}

    assert {"clear_metadata", "clear_images", "clear_buckets", "clear_embeddings",
            "clear_dataset", "clear_moco_checkpoint"} <= names


def test_params_reject_invalid_values(dagbag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["clear_pipeline"]
    for name, value in [("shard_size", 0), ("split_mode", "monthly"), ("years", "2004"),
                        ("mirror_base_url", "ftp://mirror"), ("moco_arch", "vgg16")]:
        params = ParamsDict(dag.params)
        with pytest.raises(ParamValidationError, match=f"param {name}"):
            params[name] = value


def test_local_runtime_runs_tasks_module():
    settings = RuntimeSettings(runtime="local")
    task = stage_task("segment", ["--split", "x"], settings=settings)

    command = task.command()
    assert command[1:5] == ["-m", "tasks", "segment", "--split"]


def test_local_runtime_launches_moco_through_torchrun():
    task = stage_task("train-moco", ["--bucket", "0"], settings=RuntimeSettings())

    assert task.command()[1:4] == ["-m", "tasks.launch", "train-moco"]


def test_docker_runtime_configuration():
    settings = RuntimeSettings(runtime="docker", artifact_volume="/srv/clear",
                               docker_host="tcp://127.0.0.1:2375", shm_size_bytes=2 << 30)
    cpu = stage_task("download", ["--shard", "00000"], settings=settings)
    gpu = stage_task("extract-clip", ["--bucket", "0"], settings=settings)

    assert cpu.image == settings.cpu_image
    assert gpu.image == settings.torch_image
    for stage in ("curate", "split"):
        model_stage = stage_task(stage, [], settings=settings)
        assert model_stage.image == settings.torch_image
        assert model_stage.device_requests is None
    assert cpu.command == ["python", "-m", "tasks", "download", "--shard", "00000"]
    assert cpu.device_requests is None
    assert gpu.device_requests[0]["Count"] == -1
    assert gpu.device_requests[0]["Capabilities"] == [["gpu"]]
    assert cpu.shm_size == 2 << 30
    assert cpu.auto_remove == "force"
    assert cpu.docker_url == "tcp://127.0.0.1:2375"
    mount = cpu.mounts[0]
    assert (mount["Target"], mount["Source"], mount["Type"]) == ("/artifacts", "/srv/clear",
                                                                 "bind")


@pytest.mark.parametrize(("gpus", "count"), [("all", -1), ("2", 2), ("0", None)])
def test_docker_gpu_requests(gpus, count):
    settings = RuntimeSettings(runtime="docker", docker_gpus=gpus)
    operator = stage_task("extract-clip", ["--bucket", "0"], settings=settings)

    if count is None:
        assert operator.device_requests is None
    else:
        assert operator.device_requests[0]["Count"] == count


def test_docker_gpus_setting_rejects_junk(monkeypatch):
    monkeypatch.setenv("CLEAR_DOCKER_GPUS", "two")

    with pytest.raises(ValueError, match="invalid CLEAR_DOCKER_GPUS 'two'"):
        RuntimeSettings.load()


def test_container_names_differ_per_try_and_are_valid():
    first = container_name("clear_pipeline", "download", 2, 1,
                           "manual__2026-12-04T22:00:22.718020+00:00")
    second = container_name("clear_pipeline", "download", 2, 2,
                            "manual__2026-12-04T22:00:22.718020+00:00")

    assert first == "clear-clear_pipeline-download-2-1-manual__2026-12-04T22-00-22.718020-00-00"
    assert second != first
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", second)


def test_kubernetes_runtime_configuration():
    settings = RuntimeSettings(runtime="kubernetes", gpus_per_task=4, namespace="vision")
    pod = stage_task("train-moco", ["--bucket", "0"], settings=settings)
    cpu = stage_task("segment", [], settings=settings)

    assert pod.cmds == ["python"]
    assert pod.arguments[:3] == ["-m", "tasks.launch", "train-moco"]
    assert pod.container_resources.limits == {"nvidia.com/gpu": "4"}
    assert cpu.container_resources is None
    assert pod.namespace == "vision"
    assert pod.do_xcom_push
    assert {m.mount_path for m in pod.volume_mounts} == {"/artifacts", "/dev/shm"}
    env = {e.name: e.value for e in pod.env_vars}
    assert env["CLEAR_SUMMARY_FILE"] == "/airflow/xcom/return.json"


def test_invalid_runtime_is_rejected(monkeypatch):
    monkeypatch.setenv("CLEAR_RUNTIME", "slurm")

    with pytest.raises(ValueError, match="valid runtimes: local, docker, kubernetes"):
        RuntimeSettings.load()
