"""The `docker` and `kubernetes` runtimes: the stage's command in its image."""

from __future__ import annotations

import json
import posixpath
import re

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from docker.errors import APIError, DockerException

from clear_runtime.local import USAGE_ERROR, AirflowException, AirflowFailException, stage_failure
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


def _summary_from_logs(lines) -> dict:
    """Return the stage's JSON summary from the container's log lines, or {} when absent.

    Stages print the summary last on stdout, but Docker merges stdout and stderr, so a
    log line written to stderr just before it can arrive after it.
    """
    if isinstance(lines, (str, bytes)):
        lines = [lines]
    for line in reversed(lines or []):
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
        try:
            value = json.loads(text.strip())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "stage" in value:
            return value
    return {}


class StageDockerOperator(DockerOperator):
    """DockerOperator that runs one stage with the project's settings applied."""

    def __init__(self, *, stage: str, command: list[str], extra_arguments: list[str] = (),
                 torch: bool = False, gpu: bool = False, settings: RuntimeSettings,
                 **kwargs):
        from docker.types import Mount

        self.stage = stage
        self.s3_conn_id = settings.s3_conn_id
        self.artifact_volume = settings.artifact_volume
        self.artifact_mount = settings.artifact_mount
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
            xcom_all=True,
            **kwargs,
        )

    def execute(self, context):
        self._check_artifact_root()
        # Credentials are resolved at run time so they never land in the serialized DAG.
        self._private_environment = {**self._private_environment,
                                     **s3_environment(self.s3_conn_id)}
        ti = context.get("ti")
        if ti is not None:
            self.container_name = container_name(ti.dag_id, ti.task_id, ti.map_index,
                                                 ti.try_number, ti.run_id)
        try:
            self.cli  # noqa: B018 - connects to the engine
        except AirflowException as error:
            raise AirflowException(
                f"cannot reach the Docker engine at {self.docker_url}: {error} Start Docker, "
                "or set CLEAR_DOCKER_HOST to its address, e.g. unix:///var/run/docker.sock"
            ) from error
        try:
            return _summary_from_logs(super().execute(context))
        except DockerContainerFailedException as error:
            status = _exit_status(error)
            last_line = _last_line(error.logs)
            hint = ""
            if (status == USAGE_ERROR and "not writable" in last_line
                    and self.artifact_volume.startswith("/")):
                hint = (f"; the task images run as uid 10001, so run `chown -R "
                        f"10001:10001 {self.artifact_volume}` (CLEAR_ARTIFACT_VOLUME)")
            killed = " (killed: out of memory or docker kill)" if status == 137 else ""
            raise stage_failure(self.stage, status, last_line, hint, killed) from error
        except APIError as error:
            raise self._explain(error) from error

    def _check_artifact_root(self) -> None:
        """Reject an artifact root that only the container's own file system would hold.

        Outputs there would be deleted with the container and the next stage would not
        find them, so only s3:// URIs and paths under the artifact mount are accepted.
        """
        root = _argument(self.command, "--artifact-root")
        if root is None or root.startswith("s3://"):
            return
        path = posixpath.normpath(root.removeprefix("file://"))
        mount = posixpath.normpath(self.artifact_mount)
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return
        raise AirflowFailException(
            f"artifact root {root!r} of stage {self.stage} is outside the artifact mount "
            f"{self.artifact_mount}, so the container would delete its outputs; use a path "
            f"under {self.artifact_mount} or an s3:// URI, and unset CLEAR_ARTIFACT_ROOT on "
            "the scheduler if it holds a host path")

    def _explain(self, error: APIError) -> Exception:
        """Turn a Docker API error into one that names the setting to fix."""
        message = error.explanation or str(error)
        if "could not select device driver" in message:
            return AirflowFailException(
                f"stage {self.stage} requests GPUs, but the Docker engine at {self.docker_url} "
                f"has no GPU runtime ({message}); install the NVIDIA Container Toolkit, or set "
                "CLEAR_DOCKER_GPUS=0 to run the stage without GPUs")
        try:
            image_missing = not self.cli.images(name=self.image)
        except DockerException:
            return error
        if image_missing:
            # Retried, because a registry can fail for a moment.
            return AirflowException(
                f"image {self.image} is not on the Docker engine at {self.docker_url}, and "
                f"pulling it failed ({message}); build it with `make images`, or set "
                "CLEAR_CPU_IMAGE or CLEAR_TORCH_IMAGE to an image that the engine has or can "
                "pull")
        if "network" in message and "not found" in message:
            return AirflowFailException(
                f"the Docker engine at {self.docker_url} has no network "
                f"{self.network_mode!r} for the container of stage {self.stage}: {message}; "
                "create it, or set CLEAR_DOCKER_NETWORK to an existing network")
        if error.status_code == 400:
            return AirflowFailException(
                f"the Docker engine at {self.docker_url} rejected the container of stage "
                f"{self.stage}: {message}; check CLEAR_ARTIFACT_VOLUME "
                f"({self.artifact_volume!r}), CLEAR_ARTIFACT_MOUNT, CLEAR_SHM_SIZE_BYTES and "
                "CLEAR_DOCKER_NETWORK")
        return error


def _argument(command: list[str], flag: str) -> str | None:
    """Return the value of `flag` in `command`, given as `flag VALUE` or `flag=VALUE`."""
    for index, item in enumerate(command):
        if item == flag and index + 1 < len(command):
            return command[index + 1]
        if item.startswith(flag + "="):
            return item[len(flag) + 1:]
    return None


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
