"""Turn a pipeline stage into an Airflow task for the runtime chosen by `CLEAR_RUNTIME`.

`local` (default) runs `python -m tasks <stage> ...` as a subprocess of the worker,
`docker` runs the same command in the stage's image through DockerOperator, and
`kubernetes` through KubernetesPodOperator. The command line is identical in all three.
"""

from clear_runtime.factory import (
    GPU_POOL,
    arguments_per_item,
    mapped_stage_task,
    runtime_name,
    stage_command,
    stage_task,
)
from clear_runtime.settings import RuntimeSettings

__all__ = ["GPU_POOL", "RuntimeSettings", "arguments_per_item", "mapped_stage_task",
           "runtime_name", "stage_command", "stage_task"]
