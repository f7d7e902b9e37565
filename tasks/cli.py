"""The one entrypoint of every stage: `python -m tasks <stage> [options]`.

Each stage module provides:

- `add_arguments(parser)`: its options, with units and defaults in the help text;
- `Config.from_args(args)`: a frozen, validated config, raising ConfigError;
- `run(config) -> dict`: the work; returns a small JSON-serialisable summary.

The summary is printed as the last line of stdout, so Airflow operators can push it
to XCom (the subprocess and Docker runtimes read the last line), and written to
`$CLEAR_SUMMARY_FILE` when that is set (the Kubernetes runtime's XCom sidecar reads
`/airflow/xcom/return.json`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from tasks.errors import StageError
from tasks.log import configure_logging

logger = logging.getLogger("tasks")

# Stage name -> (module, one-line description). Modules are imported only when used,
# so `--help` of a CPU stage never imports torch.
STAGES: dict[str, tuple[str, str]] = {
    "sync-metadata": ("tasks.metadata", "convert YFCC100M metadata into typed Parquet parts"),
    "plan-shards": ("tasks.shards", "filter the metadata and plan download shards"),
    "download": ("tasks.download", "download the images of one shard into a tar"),
    "segment": ("tasks.segment", "split downloaded samples into time buckets"),
    "extract-clip": ("tasks.clip", "embed the images of one bucket with an open_clip model"),
    "curate": ("tasks.curate", "retrieve labeled concepts per bucket into CLEAR's layout"),
    "train-moco": ("tasks.moco", "pre-train MoCo v2 on one bucket"),
    "extract-features": ("tasks.features", "apply a backbone to the curated labeled images"),
    "split": ("tasks.split", "write per-bucket train/test splits"),
}

DEFAULT_ARTIFACT_ROOT = "artifacts"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--artifact-root",
        default=os.environ.get("CLEAR_ARTIFACT_ROOT", DEFAULT_ARTIFACT_ROOT),
        help="where every output goes: a local folder, file:// or s3://bucket/prefix "
        "(default: $CLEAR_ARTIFACT_ROOT or ./artifacts)",
    )
    parser.add_argument(
        "--log-level", default=os.environ.get("CLEAR_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default: INFO)",
    )


def build_stage_parser(stage: str) -> argparse.ArgumentParser:
    """Build the parser of one stage; only that stage's module is imported."""
    module_name, summary = STAGES[stage]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"python -m tasks {stage}", description=(module.__doc__ or summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    module.add_arguments(parser)
    parser.set_defaults(module=module, stage=stage)
    return parser


def usage() -> str:
    lines = ["usage: python -m tasks <stage> [options]", "", "Run one stage of the CLEAR "
             "benchmark pipeline. `python -m tasks <stage> --help` lists its options.", "",
             "stages:"]
    lines += [f"  {name:<18}{summary}" for name, (_, summary) in STAGES.items()]
    return "\n".join(lines) + "\n"


# Packages of the model stages; the CPU task image does not have them.
MODEL_PACKAGES = {"torch", "torchvision", "open_clip"}


def write_summary(summary: dict) -> None:
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    line = json.dumps(summary, sort_keys=True, default=str)
    target = os.environ.get("CLEAR_SUMMARY_FILE")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(line)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    if argv[0] not in STAGES:
        sys.stderr.write(f"error: unknown stage {argv[0]!r}; valid stages: "
                         f"{', '.join(STAGES)}\n")
        return 2
    args = build_stage_parser(argv[0]).parse_args(argv[1:])
    configure_logging(args.log_level)
    try:
        config = args.module.Config.from_args(args)
        logger.info("stage %s starting with artifact root %s", args.stage, args.artifact_root)
        summary = args.module.run(config)
    except StageError as error:
        sys.stderr.write(f"error: stage {args.stage} failed: {error}\n")
        return 2
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in MODEL_PACKAGES:
            raise
        sys.stderr.write(f"error: stage {args.stage} needs {error.name}, which is not "
                         "installed here; run it in the clear-pipeline/tasks-torch image or "
                         "install requirements/torch-lock.txt\n")
        return 2
    write_summary({"stage": args.stage, **summary})
    return 0
