"""Task groups and assets shared by the pipeline DAGs."""

from __future__ import annotations

from airflow.sdk import Asset

from clear_runtime.factory import arguments_per_item, mapped_stage_task, stage_task

METADATA = Asset(name="clear_metadata", uri="clear://artifacts/metadata")
IMAGES = Asset(name="clear_images", uri="clear://artifacts/images")
BUCKETS = Asset(name="clear_buckets", uri="clear://artifacts/buckets")
EMBEDDINGS = Asset(name="clear_embeddings", uri="clear://artifacts/features")
DATASET = Asset(name="clear_dataset", uri="clear://artifacts/datasets")
MOCO = Asset(name="clear_moco_checkpoint", uri="clear://artifacts/models/moco")

ROOT_ARGUMENTS = ["--artifact-root", "{{ params.artifact_root }}"]


def metadata_to_download():
    """sync-metadata -> plan-shards -> download (one task per shard); returns the three."""
    sync_metadata = stage_task(
        "sync-metadata", ROOT_ARGUMENTS + ["--source", "{{ params.metadata_source }}"],
        outlets=[METADATA],
    )
    plan_shards = stage_task(
        "plan-shards",
        ROOT_ARGUMENTS + ["--shard-size", "{{ params.shard_size }}",
                          "--licenses", "{{ params.licenses | join(',') }}",
                          "--years", "{{ params.years }}"],
    )
    shard_arguments = arguments_per_item.override(task_id="shard_arguments")(
        plan_shards.output, key="shards", flag="--shard")
    download = mapped_stage_task(
        "download",
        ROOT_ARGUMENTS + ["--mirror-base-url", "{{ params.mirror_base_url }}",
                          "--concurrency", "{{ params.download_concurrency }}",
                          "--max-requests-per-second", "{{ params.download_rate_limit }}"],
        expand=shard_arguments,
        max_active_tis_per_dag=4,
        outlets=[IMAGES],
    )
    sync_metadata >> plan_shards
    return sync_metadata, plan_shards, download
