"""Runtime settings in one place: images, storage mounts, GPUs, shared memory, hosts.

Each value comes from the environment variable of the same name, then the Airflow
Variable of that name, then the default below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RUNTIMES = ("local", "docker", "kubernetes")


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
    docker_host: str = "unix://var/run/docker.sock"
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
            artifact_volume=setting("CLEAR_ARTIFACT_VOLUME", cls.artifact_volume),
            artifact_mount=setting("CLEAR_ARTIFACT_MOUNT", cls.artifact_mount),
            shm_size_bytes=int(setting("CLEAR_SHM_SIZE_BYTES", str(cls.shm_size_bytes))),
            docker_host=setting("CLEAR_DOCKER_HOST", cls.docker_host),
            docker_network=setting("CLEAR_DOCKER_NETWORK", ""),
            docker_gpus=_gpu_count(setting("CLEAR_DOCKER_GPUS", cls.docker_gpus)),
            s3_conn_id=setting("CLEAR_S3_CONN_ID", ""),
            namespace=setting("CLEAR_K8S_NAMESPACE", cls.namespace),
            artifact_claim=setting("CLEAR_K8S_ARTIFACT_CLAIM", cls.artifact_claim),
            gpus_per_task=int(setting("CLEAR_GPUS_PER_TASK", str(cls.gpus_per_task))),
        )

    def image(self, torch: bool) -> str:
        """Return the torch image for stages that run a model, else the CPU image."""
        return self.torch_image if torch else self.cpu_image


def _gpu_count(value: str) -> str:
    value = value.strip().lower()
    if value != "all" and not value.isdigit():
        raise ValueError(f"invalid CLEAR_DOCKER_GPUS {value!r}; use all, a GPU count, or 0 "
                         "for no GPUs")
    return value


def s3_environment(conn_id: str) -> dict[str, str]:
    """Turn an Airflow AWS connection into the variables boto3 reads inside a task."""
    if not conn_id:
        return {}
    from airflow.providers.amazon.aws.hooks.base_aws import AwsGenericHook

    hook = AwsGenericHook(aws_conn_id=conn_id, client_type="s3")
    credentials = hook.get_credentials()
    environment = {"AWS_ACCESS_KEY_ID": credentials.access_key,
                   "AWS_SECRET_ACCESS_KEY": credentials.secret_key}
    if credentials.token:
        environment["AWS_SESSION_TOKEN"] = credentials.token
    endpoint = hook.conn_config.endpoint_url
    if endpoint:
        environment["AWS_ENDPOINT_URL"] = endpoint
    if hook.conn_region_name:
        environment["AWS_DEFAULT_REGION"] = hook.conn_region_name
    return environment
