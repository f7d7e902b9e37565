"""Reading a curated dataset in CLEAR's folder layout, for the stages that come after curate.

A dataset lives under `datasets/<NAME>/` in the artifact root. The pieces read here:

- `class_names.txt`: one class name per line; the line number is the class index;
- `filelists/<bucket>.txt`: one labeled sample per line, `<path> <class index>`, where
  the path is relative to the dataset folder, `labeled_images/<bucket>/<class>/<id>.<ext>`.

The file name's stem is the sample's photo id, which is how CLEAR keys features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore

DATASET_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    """List the bucket ids that have a `filelists/<bucket>.txt`, in numeric order."""
    buckets = []
    for key in store.list(f"{prefix}/filelists/"):
        name = PurePosixPath(key).name
        if key == f"{prefix}/filelists/{name}" and name.endswith(".txt"):
            buckets.append(name.removesuffix(".txt"))
    if not buckets:
        raise StageError(f"no file lists found under {store.url(prefix + '/filelists/')}; "
                         "run the curate stage for this dataset first")
    return sorted(buckets, key=bucket_sort_key)


def read_filelist(store: ArtifactStore, prefix: str, bucket: str,
                  class_names: list[str]) -> list[LabeledSample]:
    """Read the labeled samples of one bucket, in file order."""
    key = f"{prefix}/filelists/{bucket}.txt"
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
