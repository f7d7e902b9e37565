"""
### CLEAR benchmark pipeline

Builds a CLEAR-style continual-learning benchmark from YFCC100M:

`sync-metadata -> plan-shards -> download (one task per shard) -> segment ->
extract-clip (one task per bucket) -> curate -> train-moco -> extract-features -> split`

Every task runs `python -m tasks <stage> ...` through the runtime chosen by
`CLEAR_RUNTIME` (`local`, `docker` or `kubernetes`). Outputs go under the artifact
root parameter. GPU stages take slots from the `clear_gpu` pool. The defaults build
the embedded sample: 600 real YFCC100M lines, images from the local sample mirror and
the tiny CLIP model, whose weights carry no semantic meaning.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, chain

from clear_runtime import arguments_per_item, mapped_stage_task, stage_task
from clear_runtime.params import pipeline_params
from clear_runtime.wiring import (
    BUCKETS,
    DATASET,
    EMBEDDINGS,
    MOCO,
    ROOT_ARGUMENTS,
    metadata_to_download,
)

ROOT = ROOT_ARGUMENTS
CLIP = ["--model", "{{ params.clip_model }}",
        "{{ '--pretrained' if params.clip_pretrained else '--checkpoint' }}",
        "{{ params.clip_pretrained or params.clip_checkpoint }}"]
DATASET_NAME = "{{ ti.xcom_pull(task_ids='curate')['name'] }}"
MOCO_RUN = "{{ params.split }}-bucket{{ params.moco_bucket }}-{{ params.moco_arch }}"

with DAG(
    dag_id="clear_pipeline",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=pipeline_params(),
    doc_md=__doc__,
    tags=["clear", "yfcc100m"],
    default_args={"retries": 2, "retry_delay": pendulum.duration(seconds=30)},
):
    sync_metadata, plan_shards, download = metadata_to_download()
    segment = stage_task(
        "segment",
        ROOT + ["--split", "{{ params.split }}", "--mode", "{{ params.split_mode }}",
                "--buckets", "{{ params.buckets }}", "--years", "{{ params.split_years }}",
                "--ranges-file", "{{ params.ranges_file }}"],
        outlets=[BUCKETS],
    )
    extract_clip = mapped_stage_task(
        "extract-clip",
        ROOT + ["--split", "{{ params.split }}"] + CLIP,
        expand=arguments_per_item.override(task_id="bucket_arguments")(
            segment.output, key="buckets", flag="--bucket"),
        outlets=[EMBEDDINGS],
    )
    curate = stage_task(
        "curate",
        ROOT + ["--split", "{{ params.split }}", "--config", "{{ params.concept_config }}"]
        + CLIP,
        outlets=[DATASET],
    )
    train_moco = stage_task(
        "train-moco",
        ROOT + ["--split", "{{ params.split }}", "--bucket", "{{ params.moco_bucket }}",
                "--run", MOCO_RUN, "--arch", "{{ params.moco_arch }}",
                "--epochs", "{{ params.moco_epochs }}",
                "--batch-size", "{{ params.moco_batch_size }}",
                "--image-size", "{{ params.moco_image_size }}",
                "--queue-size", "{{ params.moco_queue_size }}"],
        outlets=[MOCO],
    )
    extract_features = stage_task(
        "extract-features",
        ROOT + ["--dataset", DATASET_NAME, "--moco-run", MOCO_RUN,
                "--image-size", "{{ params.moco_image_size }}"],
        outlets=[DATASET],
    )
    split = stage_task(
        "split", ROOT + ["--dataset", DATASET_NAME, "--test-ratio", "{{ params.test_ratio }}"],
        outlets=[DATASET],
    )

    chain(download, segment, extract_clip, curate, train_moco, extract_features, split)
