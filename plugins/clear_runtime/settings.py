"""Runtime settings in one place: images, storage mounts, GPUs, shared memory, hosts.

Each value comes from the environment variable of the same name, then the Airflow
Variable of that name, then the default below.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

RUNTIMES = ("local", "docker", "kubernetes")
# Docker's rule for local volume names; anything else must be an absolute host folder.
VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def setting(name: str, default: str) -> str:
    """Read `name` from the environment, then from Airflow Variables, then `default`."""
    value = os.environ.get(name)
    if value:
        return value
    # NOTE: Variable.get at parse time costs one metadata-database or API lookup per
    # setting; set the environment variables on busy deployments to avoid it.
    try:
        from airflow.sdk import Variable

        return Variable.get(name, default=default)
    except (ImportError, RuntimeError, KeyError, OSError):
        return default


@dataclass(frozen=True)
class RuntimeSettings:
    runtime: str = "local"
    cpu_image: str = "clear-pipeline/tasks-cpu:0.1.0"
    torch_image: str = "clear-pipeline/tasks-torch:0.1.0"
    # Docker: a named volume or a host folder mounted at artifact_mount in every container.
    artifact_volume: str = "clear-artifacts"
    artifact_mount: str = "/artifacts"
    shm_size_bytes: int = 8 << 30
    docker_host: str = "unix:///var/run/docker.sock"
    docker_network: str = ""
    # GPUs a GPU stage's container requests: "all", a count, or 0 for none (CPU hosts).
    docker_gpus: str = "all"
    s3_conn_id: str = ""
    namespace: str = "default"
    artifact_claim: str = "clear-artifacts"
    gpus_per_task: int = 1

    @classmethod
    def load(cls) -> RuntimeSettings:
        runtime = setting("CLEAR_RUNTIME", "local")
        if runtime not in RUNTIMES:
            raise ValueError(f"invalid CLEAR_RUNTIME {runtime!r}; valid runtimes: "
                             f"{', '.join(RUNTIMES)}")
        return cls(
            runtime=runtime,
            cpu_image=setting("CLEAR_CPU_IMAGE", cls.cpu_image),
            torch_image=setting("CLEAR_TORCH_IMAGE", cls.torch_image),
            artifact_volume=_artifact_volume(
                setting("CLEAR_ARTIFACT_VOLUME", cls.artifact_volume)),
            artifact_mount=_absolute_path(
                "CLEAR_ARTIFACT_MOUNT", setting("CLEAR_ARTIFACT_MOUNT", cls.artifact_mount)),
            shm_size_bytes=_integer(
                "CLEAR_SHM_SIZE_BYTES", setting("CLEAR_SHM_SIZE_BYTES", str(cls.shm_size_bytes)),
                minimum=1),
            docker_host=setting("CLEAR_DOCKER_HOST",
                                os.environ.get("DOCKER_HOST") or cls.docker_host),
            docker_network=setting("CLEAR_DOCKER_NETWORK", ""),
            docker_gpus=_gpu_count(setting("CLEAR_DOCKER_GPUS", cls.docker_gpus)),
            s3_conn_id=setting("CLEAR_S3_CONN_ID", ""),
            namespace=setting("CLEAR_K8S_NAMESPACE", cls.namespace),
            artifact_claim=setting("CLEAR_K8S_ARTIFACT_CLAIM", cls.artifact_claim),
            gpus_per_task=_integer(
                "CLEAR_GPUS_PER_TASK", setting("CLEAR_GPUS_PER_TASK", str(cls.gpus_per_task)),
                minimum=0),
        )

    def image(self, torch: bool) -> str:
        """Return the torch image for stages that run a model, else the CPU image."""
        return self.torch_image if torch else self.cpu_image


def _gpu_count(value: str) -> str:
    value = value.strip().lower()
    if value == "all":
        return value
    if not re.fullmatch(r"[0-9]+", value):
        raise ValueError(f"invalid CLEAR_DOCKER_GPUS {value!r}; use all, a GPU count, or 0 "
                         "for no GPUs")
    # "00" must mean no GPUs, as "0" does.
    return str(int(value))


def _integer(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"invalid {name} {value!r}; expected a whole number") from None
    if number < minimum:
        raise ValueError(f"invalid {name} {value!r}; the minimum is {minimum}")
    return number


def _absolute_path(name: str, value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"invalid {name} {value!r}; expected an absolute path")
    return value


def _artifact_volume(value: str) -> str:
    if value.startswith("/") or VOLUME_NAME.fullmatch(value):
        return value
    raise ValueError(f"invalid CLEAR_ARTIFACT_VOLUME {value!r}; use an absolute host folder "
                     "or a Docker volume name (letters, digits, _ . -)")


def s3_environment(conn_id: str) -> dict[str, str]:
    """Turn an Airflow AWS connection into the variables boto3 reads inside a task."""
    if not conn_id:
        return {}
    from airflow.providers.amazon.aws.hooks.base_aws import AwsGenericHook
    from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

    # The hook falls back to the worker's own AWS credentials for an unknown connection,
    # which would hand them to the stage, so a missing connection is an error.
    try:
        AwsGenericHook.get_connection(conn_id)
    except AirflowNotFoundException as error:
        raise AirflowFailException(
            f"CLEAR_S3_CONN_ID names the Airflow connection {conn_id!r}, which is not "
            "defined; create it, or unset CLEAR_S3_CONN_ID") from error
    hook = AwsGenericHook(aws_conn_id=conn_id, client_type="s3")
    environment = {}
    # A connection without keys uses boto3's default chain; when that finds none either,
    # the stage's S3 requests are unsigned.
    found = hook.get_session().get_credentials()
    if found is not None:
        credentials = found.get_frozen_credentials()
        environment["AWS_ACCESS_KEY_ID"] = credentials.access_key
        environment["AWS_SECRET_ACCESS_KEY"] = credentials.secret_key
        if credentials.token:
            environment["AWS_SESSION_TOKEN"] = credentials.token
    endpoint = hook.conn_config.endpoint_url
    if endpoint:
        environment["AWS_ENDPOINT_URL"] = endpoint
    if hook.conn_region_name:
        environment["AWS_DEFAULT_REGION"] = hook.conn_region_name
    return environment
