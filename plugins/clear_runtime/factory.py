"""Build the Airflow task of a stage for the configured runtime."""

from __future__ import annotations

from airflow.sdk import task

from clear_runtime.settings import RuntimeSettings

GPU_POOL = "clear_gpu"
# Stages that import torch (split reads feature tensors); they run in the torch image
# and, when also in GPU_STAGES, get a GPU.
TORCH_STAGES = {"extract-clip", "curate", "train-moco", "extract-features", "split"}
GPU_STAGES = {"extract-clip", "train-moco", "extract-features"}
# Stages launched through torchrun with one process per visible GPU.
DISTRIBUTED_STAGES = {"train-moco"}


def runtime_name() -> str:
    return RuntimeSettings.load().runtime


def stage_command(stage: str, arguments: list[str], python: str = "python") -> list[str]:
    """Build the command line of a stage, which is identical in every runtime."""
    module = "tasks.launch" if stage in DISTRIBUTED_STAGES else "tasks"
    return [python, "-m", module, stage, *arguments]


def _operator_kwargs(stage: str, task_id: str | None, kwargs: dict) -> dict:
    kwargs.setdefault("task_id", task_id or stage.replace("-", "_"))
    if stage in GPU_STAGES:
        kwargs.setdefault("pool", GPU_POOL)
    return kwargs


def _operator_class(settings: RuntimeSettings):
    if settings.runtime == "docker":
        from clear_runtime.containers import StageDockerOperator

        return StageDockerOperator
    if settings.runtime == "kubernetes":
        from clear_runtime.containers import StagePodOperator

        return StagePodOperator
    from clear_runtime.local import StageSubprocessOperator

    return StageSubprocessOperator


def _constructor_kwargs(stage: str, arguments: list[str], settings: RuntimeSettings) -> dict:
    if settings.runtime == "local":
        command = stage_command(stage, arguments)
        return {"stage": stage, "command_prefix": command[1:3], "arguments": command[4:],
                "s3_conn_id": settings.s3_conn_id}
    return {"stage": stage, "command": stage_command(stage, arguments),
            "torch": stage in TORCH_STAGES, "gpu": stage in GPU_STAGES, "settings": settings}


def stage_task(stage: str, arguments: list[str], task_id: str | None = None,
               settings: RuntimeSettings | None = None, **kwargs):
    """Create one task that runs `stage` with `arguments` (Jinja templates allowed)."""
    settings = settings or RuntimeSettings.load()
    operator = _operator_class(settings)
    return operator(**_constructor_kwargs(stage, arguments, settings),
                    **_operator_kwargs(stage, task_id, kwargs))


def mapped_stage_task(stage: str, arguments: list[str], expand, task_id: str | None = None,
                      settings: RuntimeSettings | None = None, **kwargs):
    """Create one task per item of `expand`, an XComArg with a list of argument lists."""
    settings = settings or RuntimeSettings.load()
    operator = _operator_class(settings)
    partial = operator.partial(**_constructor_kwargs(stage, arguments, settings),
                               **_operator_kwargs(stage, task_id, kwargs))
    return partial.expand(extra_arguments=expand)


@task
def arguments_per_item(summary: dict, key: str, flag: str) -> list[list[str]]:
    """Turn `summary[key]`, a list of ids, into one `[flag, id]` argument list per id."""
    if key not in summary:
        raise ValueError(f"the upstream summary has no {key!r}; it has {sorted(summary)}")
    return [[flag, str(item)] for item in summary[key]]
