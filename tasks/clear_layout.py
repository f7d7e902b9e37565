"""Reading a curated dataset in CLEAR's folder layout, for the stages that come after curate.

A dataset lives under `datasets/<NAME>/` in the artifact root. The pieces read here:

- `class_names.txt`: one class name per line; the line number is the class index;
- `filelists/<bucket>.txt`: one labeled sample per line, `<path> <class index>`, where
  the path is relative to the dataset folder, `labeled_images/<bucket>/<class>/<id>.<ext>`;
- `labeled_metadata.json`: written at the end of a curate run, so it marks the dataset
  finished; its keys are the buckets to read.

The file name's stem is the sample's photo id, which is how CLEAR keys features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore

DATASET_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DATASET_INDEX = "labeled_metadata.json"


@dataclass(frozen=True)
class LabeledSample:
    path: str  # relative to the dataset folder
    label: int
    class_name: str
    photo_id: str


def validate_dataset_name(name: str) -> str:
    if not DATASET_NAME_PATTERN.match(name):
        raise ConfigError(f"--dataset {name!r} is not a valid dataset name; use letters, "
                          "digits, '.', '_' and '-'")
    return name


def dataset_prefix(name: str) -> str:
    return f"datasets/{name}"


def read_class_names(store: ArtifactStore, prefix: str) -> list[str]:
    """Read `class_names.txt`; a trailing newline does not add a class."""
    names = store.read_text(f"{prefix}/class_names.txt").splitlines()
    while names and not names[-1].strip():
        names.pop()
    if not names:
        raise StageError(f"{store.url(prefix + '/class_names.txt')} lists no classes; "
                         "re-run the curate stage")
    return names


def bucket_sort_key(bucket: str) -> tuple[int, int | str]:
    return (0, int(bucket)) if bucket.isdigit() else (1, bucket)


def list_buckets(store: ArtifactStore, prefix: str) -> list[str]:
    """List the buckets of a finished dataset, in numeric order, from its index.

    The index is written when a curate run ends. A bucket that a killed curate run
    finished after that has a filelist but is not listed, and is not read.
    """
    index_key = f"{prefix}/{DATASET_INDEX}"
    name = prefix.rsplit("/", 1)[-1]
    if not store.exists(index_key):
        raise StageError(f"dataset {name} is not finished: {store.url(index_key)} is missing; "
                         f"run curate with the concept config whose NAME is {name} until it "
                         "succeeds first")
    index = store.read_json(index_key)
    if not isinstance(index, dict) or not index:
        raise StageError(f"{store.url(index_key)} lists no buckets; run curate with the "
                         f"concept config whose NAME is {name} again")
    buckets = sorted(index, key=bucket_sort_key)
    missing = [bucket for bucket in buckets if not store.exists(filelist_key(prefix, bucket))]
    if missing:
        raise StageError(f"dataset {name} lists bucket(s) {', '.join(missing)} in "
                         f"{store.url(index_key)} but has no file list for them; run curate "
                         f"with the concept config whose NAME is {name} again")
    return buckets


def filelist_key(prefix: str, bucket: str) -> str:
    return f"{prefix}/filelists/{bucket}.txt"


def read_filelist(store: ArtifactStore, prefix: str, bucket: str,
                  class_names: list[str]) -> list[LabeledSample]:
    """Read the labeled samples of one bucket, in file order."""
    key = filelist_key(prefix, bucket)
    samples = []
    for number, line in enumerate(store.read_text(key).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) >= len(class_names):
            raise StageError(f"{store.url(key)} line {number} is invalid: {line!r}; expected "
                             f"'<path> <class index below {len(class_names)}>'")
        path, label = fields[0], int(fields[1])
        samples.append(LabeledSample(path, label, class_names[label], PurePosixPath(path).stem))
    return samples
