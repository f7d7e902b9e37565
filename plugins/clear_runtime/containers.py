"""The `docker` and `kubernetes` runtimes: the stage's command in its image."""

from __future__ import annotations

import json
import re

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator

from clear_runtime.local import USAGE_ERROR, AirflowFailException
from clear_runtime.settings import RuntimeSettings, s3_environment

KUBERNETES_SUMMARY_FILE = "/airflow/xcom/return.json"


def container_name(dag_id: str, task_id: str, map_index: int, try_number: int,
                   run_id: str) -> str:
    """Return a container name that is unique per DAG run, task, map index and try.

    A retry then never collides with a container left by the try before it, even one
    that a killed worker could not remove. Characters invalid in Docker names become `-`.
    """
    name = (f"clear-{dag_id}-{task_id.replace('_', '-')}-{map_index}-{try_number}-"
            f"{run_id}")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def _device_requests(gpus: str) -> list | None:
    """Return the GPU request of a container: every GPU, a count, or none for "0"."""
    from docker.types import DeviceRequest

    if gpus == "0":
        return None
    count = -1 if gpus == "all" else int(gpus)
    return [DeviceRequest(count=count, capabilities=[["gpu"]])]


def _summary_from_logs(value) -> dict:
    """DockerOperator pushes the last log line; stages print their JSON summary last."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return {}
    try:
        return json.loads(value.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {}


class StageDockerOperator(DockerOperator):
    """DockerOperator that runs one stage with the project's settings applied."""

    def __init__(self, *, stage: str, command: list[str], extra_arguments: list[str] = (),
                 torch: bool = False, gpu: bool = False, settings: RuntimeSettings,
                 **kwargs):
        from docker.types import Mount

        self.stage = stage
        self.s3_conn_id = settings.s3_conn_id
        mount_type = "bind" if settings.artifact_volume.startswith("/") else "volume"
        super().__init__(
            image=settings.image(torch or gpu),
            command=[*command, *extra_arguments],
            docker_url=settings.docker_host,
            mounts=[Mount(target=settings.artifact_mount, source=settings.artifact_volume,
                          type=mount_type)],
            environment={"CLEAR_ARTIFACT_ROOT": settings.artifact_mount},
            shm_size=settings.shm_size_bytes,
            device_requests=_device_requests(settings.docker_gpus) if gpu else None,
            network_mode=settings.docker_network or None,
            auto_remove="force",
            mount_tmp_dir=False,
            do_xcom_push=True,
            xcom_all=False,
            **kwargs,
        )

    def execute(self, context):
        # Credentials are resolved at run time so they never land in the serialized DAG.
        self._private_environment = {**self._private_environment,
                                     **s3_environment(self.s3_conn_id)}
        ti = context.get("ti")
        if ti is not None:
            self.container_name = container_name(ti.dag_id, ti.task_id, ti.map_index,
                                                 ti.try_number, ti.run_id)
        try:
            return _summary_from_logs(super().execute(context))
        except DockerContainerFailedException as error:
            if _exit_status(error) == USAGE_ERROR:
                raise AirflowFailException(
                    f"stage {self.stage} rejected its input: {_last_line(error.logs)}"
                ) from error
            raise


def _exit_status(error: DockerContainerFailedException) -> int | None:
    # The provider reports the container's wait() result in its message.
    match = re.search(r"'StatusCode': (\d+)", str(error))
    return int(match.group(1)) if match else None


def _last_line(logs) -> str:
    lines = [line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
             for line in logs or []]
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1] if lines else ""


class StagePodOperator(KubernetesPodOperator):
    """KubernetesPodOperator that runs one stage with the project's settings applied."""

    def __init__(self, *, stage: str, command: list[str], extra_arguments: list[str] = (),
                 torch: bool = False, gpu: bool = False, settings: RuntimeSettings,
                 **kwargs):
        from kubernetes.client import models as k8s

        self.stage = stage
        volumes = [
            k8s.V1Volume(name="artifacts", persistent_volume_claim=k8s.
                         V1PersistentVolumeClaimVolumeSource(claim_name=settings.artifact_claim)),
            k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
                medium="Memory", size_limit=str(settings.shm_size_bytes))),
        ]
        mounts = [k8s.V1VolumeMount(name="artifacts", mount_path=settings.artifact_mount),
                  k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]
        resources = None
        if gpu:
            limit = {"nvidia.com/gpu": str(settings.gpus_per_task)}
            resources = k8s.V1ResourceRequirements(limits=limit, requests=limit)
        environment = [
            k8s.V1EnvVar(name="CLEAR_ARTIFACT_ROOT", value=settings.artifact_mount),
            k8s.V1EnvVar(name="CLEAR_SUMMARY_FILE", value=KUBERNETES_SUMMARY_FILE),
        ]
        super().__init__(
            image=settings.image(torch or gpu),
            cmds=command[:1],
            arguments=[*command[1:], *extra_arguments],
            namespace=settings.namespace,
            name=f"clear-{stage}",
            random_name_suffix=True,
            volumes=volumes,
            volume_mounts=mounts,
            container_resources=resources,
            env_vars=environment,
            do_xcom_push=True,
            on_finish_action="delete_pod",
            **kwargs,
        )
