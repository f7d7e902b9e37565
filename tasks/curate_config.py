"""The concept config of the curate stage, in CLEAR's JSON keys.

Keys (as in CLEAR's `clear_10_config.json`):

- `NAME`: dataset folder name under `datasets/`.
- `PREFIX`: text put before every concept to form its prompt (CLEAR: prompt = PREFIX + concept).
- `ALLOW_OVERLAP`: 0 or 1; with 1 an image may be kept by several concepts.
- `CLIP_MODEL`: CLIP model name, e.g. `RN101` or `ViT-B/32`.
- `NUM_OF_IMAGES_PER_CLASS_PER_BUCKET`: images each concept keeps per bucket.
- `NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY`: nearest neighbours retrieved per concept
  before each image goes to the concept it scores highest on.
- `BACKGROUND`: 0 or 1; adds a `BACKGROUND` class of images far from every prompt.
- `NEGATIVE_RATIO`: fraction of the per-class count each concept adds to BACKGROUND.
- `GROUP`: concepts, either a list or a dict of group name -> list of concepts.
- `LABEL_MAP` (optional): concept -> class name, for long prompts with short names.
- `PROMPT_TEMPLATES` (optional): strings with `{}`, averaged as a prompt ensemble.

Keys of CLEAR's own scripts that this pipeline replaces (`BUCKET_DICT_PATH`, `SAVE_PATH`,
...) are accepted and ignored with a log line.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from tasks.errors import ConfigError

logger = logging.getLogger(__name__)

BACKGROUND = "BACKGROUND"
REQUIRED_KEYS = ("NAME", "ALLOW_OVERLAP", "CLIP_MODEL", "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET",
                 "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY", "BACKGROUND", "GROUP")
OPTIONAL_KEYS = ("PREFIX", "NEGATIVE_RATIO", "LABEL_MAP", "PROMPT_TEMPLATES")
# Names become folder and file names in CLEAR's layout, and filelist lines separate the
# image path from the label with whitespace, so names contain none.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Concept:
    """One class to retrieve: its prompt text and its class (folder) name."""

    text: str
    class_name: str
    group: str


@dataclass(frozen=True)
class ConceptConfig:
    name: str
    prefix: str
    allow_overlap: bool
    clip_model: str
    class_size: int
    query_size: int
    background: bool
    negative_ratio: float
    concepts: tuple[Concept, ...]
    templates: tuple[str, ...] | None
    raw: dict

    @property
    def prompts(self) -> list[str]:
        return [self.prefix + concept.text for concept in self.concepts]

    @property
    def class_names(self) -> list[str]:
        """Class names sorted; the line number in class_names.txt is the class index."""
        names = [concept.class_name for concept in self.concepts]
        if self.background:
            names.append(BACKGROUND)
        return sorted(names)

    @property
    def background_per_concept(self) -> int:
        """BACKGROUND images each concept contributes, as CLEAR computes it."""
        return int(self.class_size * self.negative_ratio) if self.background else 0


def _flag(raw: dict, key: str) -> bool:
    value = raw[key]
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ConfigError(f"config key {key} must be 0 or 1, got {value!r}")


def _positive_int(raw: dict, key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config key {key} must be a positive integer, got {value!r}")
    return value


def _concepts(raw: dict) -> tuple[Concept, ...]:
    group = raw["GROUP"]
    if isinstance(group, list):
        groups = {raw["NAME"]: group}
    elif isinstance(group, dict):
        groups = group
    else:
        raise ConfigError(f"config key GROUP must be a list of concepts or a dict of group "
                          f"name -> list of concepts, got {type(group).__name__}")
    label_map = raw.get("LABEL_MAP") or {}
    if not isinstance(label_map, dict):
        raise ConfigError(f"config key LABEL_MAP must be a dict of concept -> class name, "
                          f"got {label_map!r}")
    unknown = sorted(set(label_map) - {c for members in groups.values()
                                       if isinstance(members, list) for c in members})
    if unknown:
        raise ConfigError(f"LABEL_MAP names concepts that are not in GROUP: {unknown}")

    concepts, seen_texts, seen_names = [], set(), set()
    for group_name, members in groups.items():
        if not isinstance(members, list) or not members:
            raise ConfigError(f"GROUP {group_name!r} must be a non-empty list of concept "
                              f"prompts, got {members!r}")
        for text in members:
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"GROUP {group_name!r} contains an invalid concept {text!r}")
            class_name = label_map.get(text, text)
            if text in seen_texts:
                raise ConfigError(f"concept {text!r} appears twice in GROUP")
            if class_name in seen_names or class_name == BACKGROUND:
                raise ConfigError(f"class name {class_name!r} (concept {text!r}) is used twice "
                                  f"or is reserved; give it another name in LABEL_MAP")
            if not SAFE_NAME.match(class_name):
                raise ConfigError(f"class name {class_name!r} cannot be a folder name; map the "
                                  "concept to a name of letters, digits and _.- in "
                                  "LABEL_MAP")
            seen_texts.add(text)
            seen_names.add(class_name)
            concepts.append(Concept(text=text, class_name=class_name, group=group_name))
    return tuple(concepts)


def _templates(raw: dict) -> tuple[str, ...] | None:
    templates = raw.get("PROMPT_TEMPLATES")
    if templates is None:
        return None
    if not isinstance(templates, list) or not templates or not all(
            isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ConfigError(f"config key PROMPT_TEMPLATES must be a non-empty list of strings "
                          f"that each contain one {{}}, got {templates!r}")
    return tuple(templates)


def parse_concept_config(raw: dict, source: str = "config") -> ConceptConfig:
    """Validate a CLEAR concept config dict; errors name the key and the value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must contain a JSON object, got {type(raw).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ConfigError(f"{source} is missing the key(s) {', '.join(missing)}")
    ignored = sorted(set(raw) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if ignored:
        logger.info("%s: ignoring keys this pipeline does not use: %s", source,
                    ", ".join(ignored))

    name = raw["NAME"]
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise ConfigError(f"config key NAME must be a folder name of letters, digits and "
                          f"_.-, got {name!r}")
    prefix = raw.get("PREFIX", "")
    if not isinstance(prefix, str):
        raise ConfigError(f"config key PREFIX must be a string, got {prefix!r}")
    if not isinstance(raw["CLIP_MODEL"], str):
        raise ConfigError(f"config key CLIP_MODEL must be a string, got {raw['CLIP_MODEL']!r}")

    class_size = _positive_int(raw, "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET")
    query_size = _positive_int(raw, "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY")
    if query_size < class_size:
        raise ConfigError(f"NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY ({query_size}) must be "
                          f"at least NUM_OF_IMAGES_PER_CLASS_PER_BUCKET ({class_size})")

    background = _flag(raw, "BACKGROUND")
    ratio = raw.get("NEGATIVE_RATIO", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise ConfigError(f"config key NEGATIVE_RATIO must be a number, got {ratio!r}")
    if background:
        if not 0 < ratio <= 1:
            raise ConfigError(f"config key NEGATIVE_RATIO must be a number in (0, 1] when "
                              f"BACKGROUND is 1, got {ratio!r}")
        if int(class_size * ratio) < 1:
            raise ConfigError(f"NEGATIVE_RATIO {ratio} x NUM_OF_IMAGES_PER_CLASS_PER_BUCKET "
                              f"{class_size} rounds down to 0 background images per concept; "
                              "raise NEGATIVE_RATIO or set BACKGROUND to 0")

    return ConceptConfig(
        name=name, prefix=prefix, allow_overlap=_flag(raw, "ALLOW_OVERLAP"),
        clip_model=raw["CLIP_MODEL"], class_size=class_size, query_size=query_size,
        background=background, negative_ratio=float(ratio), concepts=_concepts(raw),
        templates=_templates(raw), raw=raw,
    )


def load_concept_config(path: str) -> ConceptConfig:
    from tasks.errors import StageError
    from tasks.storage import open_input

    try:
        with open_input(path) as local:
            text = local.read_text(encoding="utf-8")
    except StageError as error:
        raise ConfigError(f"cannot read concept config: {error}") from error
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"concept config {path} is not valid JSON: {error}") from error
    return parse_concept_config(raw, source=f"concept config {path}")
