"""Exact CLIP retrieval of concept images within one bucket, with CLEAR's selection rules.

Scores are inner products of L2-normalized image and prompt embeddings (cosine
similarity), computed in float64 one feature chunk at a time, so memory grows with the
candidate lists (concepts x query size), not with the bucket.

Selection follows CLEAR's `prepare_concepts.py`:

- Without overlap, each concept retrieves its `query_size` best images. Every retrieved
  image goes to the concept, among those that retrieved it, on which it scores highest.
  Each concept then keeps its best `class_size` images.
- With overlap, each concept keeps its own best `class_size` images; an image may be in
  several classes.
- BACKGROUND: each concept retrieves its `query_size` lowest-scoring images. Each goes
  to the concept it scores lowest on, and each concept keeps its `class_size` lowest.
  Walking those from the lowest score up, each concept then adds
  `int(class_size * NEGATIVE_RATIO)` images that are not positives and not already taken.

Ties are broken the same way everywhere: between images by bucket row order (the
manifest order, earliest first), and between concepts by config order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from tasks.errors import StageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pick:
    """One selected image: its bucket row, its score, and the concept that chose it."""

    row: int
    score: float
    concept: int


@dataclass
class RankedList:
    """Bucket rows with their scores, in rank order."""

    rows: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> RankedList:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float64))


def _merge(current: RankedList, rows: np.ndarray, scores: np.ndarray, size: int,
           lowest: bool) -> RankedList:
    all_rows = np.concatenate([current.rows, rows])
    all_scores = np.concatenate([current.scores, scores])
    # lexsort sorts by the last key first: score (descending unless lowest), then row.
    order = np.lexsort((all_rows, all_scores if lowest else -all_scores))[:size]
    return RankedList(all_rows[order], all_scores[order])


class CandidateCollector:
    """Keep each concept's `top_size` highest and `bottom_size` lowest scoring rows."""

    def __init__(self, text_embeddings: np.ndarray, top_size: int, bottom_size: int):
        self.text = np.asarray(text_embeddings, dtype=np.float64)
        self.top_size = top_size
        self.bottom_size = bottom_size
        self.top = [RankedList.empty() for _ in range(len(self.text))]
        self.bottom = [RankedList.empty() for _ in range(len(self.text))]
        self.samples = 0

    def add(self, rows: np.ndarray, embeddings: np.ndarray) -> None:
        """Score one chunk: `rows` (n) are bucket row indices of `embeddings` (n x dim)."""
        if len(rows) == 0:
            return
        scores = np.asarray(embeddings, dtype=np.float64) @ self.text.T  # (n, concepts)
        rows = np.asarray(rows, dtype=np.int64)
        for concept in range(len(self.text)):
            self.top[concept] = _merge(self.top[concept], rows, scores[:, concept],
                                       self.top_size, lowest=False)
            if self.bottom_size:
                self.bottom[concept] = _merge(self.bottom[concept], rows, scores[:, concept],
                                              self.bottom_size, lowest=True)
        self.samples += len(rows)


def _check_size(picks: list[Pick], needed: int, bucket: str, class_name: str,
                allow_small: bool, hint: str) -> None:
    if len(picks) >= needed:
        return
    message = (f"bucket {bucket}: class {class_name!r} has {len(picks)} images, "
               f"{needed} needed")
    if not allow_small:
        raise StageError(f"{message}; {hint}, or pass --allow-small-classes to keep "
                         "smaller classes")
    logger.warning("%s; keeping the smaller class because of --allow-small-classes", message)


def _assign_to_best(lists: list[RankedList], lowest: bool) -> dict[int, list[Pick]]:
    """Give each row to the concept with its highest (or lowest) score; ties: first concept."""
    best: dict[int, Pick] = {}
    for concept, ranked in enumerate(lists):
        for row, score in zip(ranked.rows.tolist(), ranked.scores.tolist(), strict=True):
            current = best.get(row)
            better = current is None or (score < current.score if lowest else score > current.score)
            if better:
                best[row] = Pick(row, score, concept)
    by_concept: dict[int, list[Pick]] = {concept: [] for concept in range(len(lists))}
    for pick in best.values():
        by_concept[pick.concept].append(pick)
    for picks in by_concept.values():
        picks.sort(key=lambda p: (p.score if lowest else -p.score, p.row))
    return by_concept


def select_positives(top: list[RankedList], class_size: int, allow_overlap: bool,
                     class_names: list[str], bucket: str,
                     allow_small: bool = False) -> list[list[Pick]]:
    """Select each concept's images from its top candidates; one list per concept."""
    if allow_overlap:
        selected = [[Pick(int(r), float(s), concept) for r, s in
                     zip(ranked.rows[:class_size], ranked.scores[:class_size], strict=True)]
                    for concept, ranked in enumerate(top)]
    else:
        assigned = _assign_to_best(top, lowest=False)
        selected = [assigned[concept][:class_size] for concept in range(len(top))]
    for concept, picks in enumerate(selected):
        _check_size(picks, class_size, bucket, class_names[concept], allow_small,
                    "lower NUM_OF_IMAGES_PER_CLASS_PER_BUCKET or raise "
                    "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY")
    return selected


def select_background(bottom: list[RankedList], positives: list[list[Pick]], class_size: int,
                      per_concept: int, class_names: list[str], bucket: str,
                      allow_small: bool = False) -> list[Pick]:
    """Select the BACKGROUND class, most dissimilar first."""
    used_rows = {pick.row for picks in positives for pick in picks}
    assigned = _assign_to_best(bottom, lowest=True)
    background: list[Pick] = []
    for concept in range(len(bottom)):
        added = []
        for pick in assigned[concept][:class_size]:
            if len(added) == per_concept:
                break
            if pick.row in used_rows:
                continue
            used_rows.add(pick.row)
            added.append(pick)
        _check_size(added, per_concept, bucket, f"BACKGROUND (from {class_names[concept]})",
                    allow_small, "lower NEGATIVE_RATIO or raise "
                    "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY")
        background.extend(added)
    background.sort(key=lambda p: (p.score, p.row))
    return background
