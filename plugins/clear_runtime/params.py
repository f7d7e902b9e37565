"""Trigger-form parameters of the pipeline DAGs, with JSON-schema validation.

Defaults run the embedded sample: the bundled 600 real YFCC100M lines, downloads from
the local sample mirror, the tiny CLIP model with weights written by `make setup`.
With the `docker` or `kubernetes` runtime the same files come from inside the task
images (`/opt/clear/...`) and the artifact root is the shared mount. Environment
variables `CLEAR_ARTIFACT_ROOT`, `CLEAR_METADATA_SOURCE`, `CLEAR_MIRROR_BASE_URL`,
`CLEAR_CLIP_CHECKPOINT` and `CLEAR_CONCEPT_CONFIG` override the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from airflow.sdk import Param

from clear_runtime.settings import RuntimeSettings

REPOSITORY = Path(__file__).resolve().parents[2]
# Paths of the embedded sample's files inside the images built from images/tasks-*.
IMAGE_FILES = {
    "metadata_source": "/opt/clear/sample/yfcc100m_dataset_sample.tsv",
    "clip_checkpoint": "/opt/clear/models/clear-tiny.pt",
    "concept_config": "/opt/clear/configs/sample_concepts.json",
}
REPOSITORY_FILES = {
    "metadata_source": str(REPOSITORY / "tests" / "data" / "yfcc100m_dataset_sample.tsv"),
    "clip_checkpoint": str(REPOSITORY / ".cache/models/clear-tiny.pt"),
    "concept_config": str(REPOSITORY / "tasks" / "configs" / "sample_concepts.json"),
}


def _default(name: str, fallback: str) -> str:
    return os.environ.get(name, fallback)


def _sample_file(settings: RuntimeSettings, param: str, variable: str) -> str:
    """Return the path of an embedded sample file for the runtime: repository or image."""
    files = REPOSITORY_FILES if settings.runtime == "local" else IMAGE_FILES
    return _default(variable, files[param])


def _artifact_root(settings: RuntimeSettings) -> str:
    fallback = (str(REPOSITORY / "artifacts") if settings.runtime == "local"
                else settings.artifact_mount)
    return _default("CLEAR_ARTIFACT_ROOT", fallback)


def metadata_params(settings: RuntimeSettings | None = None) -> dict[str, Param]:
    """Parameters of the stages up to and including download."""
    settings = settings or RuntimeSettings.load()
    return {
        "artifact_root": Param(
            _artifact_root(settings), type="string",
            minLength=1, title="Artifact root",
            description="Local folder, file:// or s3://bucket/prefix for every output.",
        ),
        "metadata_source": Param(
            _sample_file(settings, "metadata_source", "CLEAR_METADATA_SOURCE"),
            type="string", minLength=1, title="Metadata source",
            description="yfcc100m_dataset file (25 columns): path or s3:// URI, plain, "
            ".bz2 or .gz.",
        ),
        "shard_size": Param(200, type="integer", minimum=1, title="Shard size",
                            description="Photos per download shard (CLEAR used 50000)."),
        "licenses": Param([], type="array", items={"type": "string"}, title="Licenses",
                          description="License names to keep; empty keeps all."),
        "years": Param("", type="string", pattern=r"^(\d{4}-\d{4})?$", title="Upload years",
                       description="FIRST-LAST upload years to keep, e.g. 2004-2014; "
                       "empty keeps all."),
        "mirror_base_url": Param(
            _default("CLEAR_MIRROR_BASE_URL", ""), type="string",
            pattern=r"^(https?://\S+)?$", title="Mirror base URL",
            description="Download from BASE/<flickr host>/<path> instead of Flickr; empty "
            "uses the original URLs.",
        ),
        "download_concurrency": Param(64, type="integer", minimum=1, maximum=1024,
                                      title="Concurrent downloads per shard"),
        "download_rate_limit": Param(0, type="number", minimum=0,
                                     title="Requests per second per shard",
                                     description="0 means no limit; up to 4 shards download "
                                     "at once."),
    }


def pipeline_params(settings: RuntimeSettings | None = None) -> dict[str, Param]:
    """Parameters of the whole pipeline DAG."""
    settings = settings or RuntimeSettings.load()
    return {
        **metadata_params(settings),
        "split": Param("default", type="string", pattern=r"^[A-Za-z0-9_.-]+$",
                       title="Split name", description="Bucketing name under buckets/."),
        "split_mode": Param("equal", type="string", enum=["year", "equal", "ranges"],
                            title="Split mode"),
        "buckets": Param(5, type="integer", minimum=1, title="Buckets (equal mode)"),
        "split_years": Param("2004-2014", type="string", pattern=r"^\d{4}-\d{4}$",
                             title="Years (year mode)"),
        "ranges_file": Param("", type="string", title="Time-range file (ranges mode)",
                             description="CLEAR's JSON list of {start, end}; path or s3://."),
        "clip_model": Param("clear-tiny", type="string", minLength=1, title="CLIP model",
                            description="open_clip name or CLEAR name (RN50, ViT-B/32, ...)."),
        "clip_pretrained": Param("", type="string", title="CLIP pretrained tag",
                                 description="open_clip pretrained tag, e.g. openai."),
        "clip_checkpoint": Param(
            _sample_file(settings, "clip_checkpoint", "CLEAR_CLIP_CHECKPOINT"),
            type="string", title="CLIP checkpoint path",
            description="Local weights file; used when no pretrained tag is given.",
        ),
        "concept_config": Param(
            _sample_file(settings, "concept_config", "CLEAR_CONCEPT_CONFIG"),
            type="string", minLength=1, title="Concept config",
            description="CLEAR curation JSON (NAME, GROUP, NUM_OF_IMAGES_PER_CLASS_PER_BUCKET...).",
        ),
        "moco_bucket": Param("0", type="string", pattern=r"^\d+$", title="MoCo bucket"),
        "moco_arch": Param("resnet18", type="string",
                           enum=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
                           title="MoCo backbone"),
        "moco_epochs": Param(1, type="integer", minimum=1, title="MoCo epochs"),
        "moco_batch_size": Param(32, type="integer", minimum=2, title="MoCo global batch size"),
        "moco_image_size": Param(64, type="integer", minimum=16, title="MoCo image size (px)"),
        "moco_queue_size": Param(256, type="integer", minimum=1, title="MoCo queue size K"),
        "test_ratio": Param(0.3, type="number", exclusiveMinimum=0, exclusiveMaximum=1,
                            title="Test ratio"),
    }
