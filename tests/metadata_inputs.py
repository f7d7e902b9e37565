"""Builders of the older 23-column yfcc100m_dataset layout and its side files for tests.

Everything derives from the 600-line sample in the 25-column layout. The dataset files
drop its line number and hash columns (the first and third), which `yfcc100m_lines`
and `yfcc100m_hash` keep. `yfcc100m_autotags` is synthesized from a fixed list of
concepts, seeded by the photo id. Files are bz2-compressed like the originals.
"""

from __future__ import annotations

import bz2
import random
from pathlib import Path

CONCEPTS = ["outdoor", "indoor", "people", "sky", "tree", "water", "building", "vehicle",
            "dog", "food", "beach", "mountain", "night", "portrait", "text", "flower"]


def synthetic_autotags(photo_id: str) -> list[tuple[str, float]]:
    """Return 0 to 5 (concept, score) pairs, highest score first; 0 for about one in six ids."""
    rng = random.Random(int(photo_id))
    count = rng.choice([0, 1, 2, 3, 4, 5])
    pairs = [(concept, round(rng.uniform(0.2, 1.0), 3)) for concept in rng.sample(CONCEPTS, count)]
    return sorted(pairs, key=lambda pair: -pair[1])


def format_autotags(pairs: list[tuple[str, float]]) -> str:
    return ",".join(f"{concept}:{score:.3f}" for concept, score in pairs)


def write_lines(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(bz2.compress(data) if path.suffix == ".bz2" else data)
    return path


def write_old_layout(sample: Path, folder: Path, files: int = 3) -> dict:
    """Write the sample as `files` 23-column dataset files plus lines, hash and autotags files.

    Returns the paths ("sources" is a list in line order) and the synthesized autotags
    by photo id.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = [line.split("\t") for line in sample.read_text().splitlines()]
    per_file = -(-len(rows) // files)
    sources = []
    for index in range(files):
        chunk = rows[index * per_file:(index + 1) * per_file]
        sources.append(write_lines(folder / f"yfcc100m_dataset-{index}.bz2",
                                   ["\t".join([fields[1], *fields[3:]]) for fields in chunk]))
    autotags = {int(fields[1]): synthetic_autotags(fields[1]) for fields in rows}
    return {
        "sources": sources,
        "lines": write_lines(folder / "yfcc100m_lines.bz2",
                             [f"{fields[0]}\t{fields[1]}" for fields in rows]),
        "hash": write_lines(folder / "yfcc100m_hash.bz2",
                            [f"{fields[1]}\t{fields[2]}" for fields in rows]),
        "autotags": write_lines(folder / "yfcc100m_autotags.bz2",
                                [f"{fields[1]}\t{format_autotags(autotags[int(fields[1])])}"
                                 for fields in rows]),
        "expected_autotags": autotags,
    }
