"""Exact CLIP retrieval of concept images within one bucket, with CLEAR's selection rules.

Scores are inner products of L2-normalized image and prompt embeddings (cosine
similarity), computed one feature chunk at a time, so memory grows with the candidate
lists (concepts x query size), not with the bucket. Each chunk is scored in float32 first
(one BLAS matrix product). Only rows whose float32 score is within the float32 rounding
bound of entering a list are rescored in float64 (`exact_scores`), so the lists are the
ones that float64 scores of every row would give.

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


def _rounding_bound(dim: int, row_norm: float, text_norm: float) -> float:
    """Bound the error of a float32 dot product of two vectors given in float64.

    Rounding both inputs to float32 and summing `dim` products in any order errs by at
    most (dim + 2) * u / (1 - dim * u) * |x| * |y|, with u = 2**-24: the standard
    forward error bound of a dot product, plus one rounding per input. Using
    eps = 2 * u in its place doubles that bound for headroom.
    """
    eps = float(np.finfo(np.float32).eps)
    return (dim + 2) * eps / (1 - dim * eps) * row_norm * text_norm


def exact_scores(embeddings: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Return the float64 inner products of each row of `embeddings` with `text`.

    A row-wise sum depends only on the row, unlike a BLAS product whose blocking depends
    on the batch, so equal embeddings always get equal scores and tie on row order.
    """
    return (np.asarray(embeddings, dtype=np.float64) * text).sum(axis=1)


def _candidate_indices(keys: np.ndarray, size: int, bound: float | None,
                       margin: float) -> np.ndarray:
    """Return the indices whose exact key may rank in the best `size` (highest keys).

    `keys` are float32 estimates within `margin / 2` of the exact keys. `bound` is the
    exact key of the last row of a full ranked list, or None while it has room.
    """
    if bound is None:
        picked = np.arange(len(keys))
    else:
        picked = np.flatnonzero(keys >= bound - margin)
    if len(picked) > size:
        # Rows more than `margin` below the size-th best estimate have at least `size`
        # rows scoring strictly higher, whatever the rounding.
        kth = np.partition(keys[picked], len(picked) - size)[len(picked) - size]
        picked = picked[keys[picked] >= kth - margin]
    return picked


class CandidateCollector:
    """Keep each concept's `top_size` highest and `bottom_size` lowest scoring rows.

    Rescored rows wait in a per-concept buffer and are merged into the ranked list once
    `size` of them have gathered, or when `top` or `bottom` is read. Filtering against
    the list's last score before a merge admits more rows than needed, never fewer.
    """

    def __init__(self, text_embeddings: np.ndarray, top_size: int, bottom_size: int):
        self.text = np.asarray(text_embeddings, dtype=np.float64)
        self.text32 = self.text.astype(np.float32)
        self.text_norms = np.linalg.norm(self.text, axis=1)
        self.top_size = top_size
        self.bottom_size = bottom_size
        self._top = [_PendingList(top_size, lowest=False) for _ in range(len(self.text))]
        self._bottom = [_PendingList(bottom_size, lowest=True) for _ in range(len(self.text))]
        self.samples = 0

    @property
    def top(self) -> list[RankedList]:
        return [pending.flush() for pending in self._top]

    @property
    def bottom(self) -> list[RankedList]:
        return [pending.flush() for pending in self._bottom]

    def add(self, rows: np.ndarray, embeddings: np.ndarray) -> None:
        """Score one chunk: `rows` (n) are bucket row indices of `embeddings` (n x dim)."""
        if len(rows) == 0:
            return
        rows = np.asarray(rows, dtype=np.int64)
        embeddings = np.asarray(embeddings)
        embeddings32 = embeddings.astype(np.float32, copy=False)
        estimates = embeddings32 @ self.text32.T  # (n, concepts)
        # 1% on top of the largest row norm covers the rounding of the norm itself.
        row_norm = float(np.sqrt(np.einsum("ij,ij->i", embeddings32, embeddings32).max())) * 1.01
        for concept in range(len(self.text)):
            margin = 2 * _rounding_bound(self.text.shape[1], row_norm, self.text_norms[concept])
            column = estimates[:, concept]
            self._update(self._top[concept], rows, embeddings, concept, column, margin)
            if self.bottom_size:
                self._update(self._bottom[concept], rows, embeddings, concept, -column, margin)
        self.samples += len(rows)

    def _update(self, pending: _PendingList, rows: np.ndarray, embeddings: np.ndarray,
                concept: int, keys: np.ndarray, margin: float) -> None:
        if pending.size == 0:
            return
        picked = _candidate_indices(keys, pending.size, pending.bound(), margin)
        if len(picked):
            pending.append(rows[picked], exact_scores(embeddings[picked], self.text[concept]))


class _PendingList:
    """A ranked list of at most `size` rows plus rescored rows not merged into it yet."""

    def __init__(self, size: int, lowest: bool):
        self.size = size
        self.lowest = lowest
        self.ranked = RankedList.empty()
        self.rows: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.waiting = 0

    def bound(self) -> float | None:
        """Return the last key (score, negated when lowest) of a full list, else None."""
        if len(self.ranked.rows) < self.size:
            return None
        last = float(self.ranked.scores[-1])
        return -last if self.lowest else last

    def append(self, rows: np.ndarray, scores: np.ndarray) -> None:
        self.rows.append(rows)
        self.scores.append(scores)
        self.waiting += len(rows)
        if self.waiting >= self.size:
            self.flush()

    def flush(self) -> RankedList:
        if self.waiting:
            self.ranked = _merge(self.ranked, np.concatenate(self.rows),
                                 np.concatenate(self.scores), self.size, self.lowest)
            self.rows, self.scores, self.waiting = [], [], 0
        return self.ranked


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


def _lists_hold_whole_bucket(lists: list[RankedList], bucket_size: int | None) -> bool:
    """Return whether every candidate list already holds all `bucket_size` images."""
    return bucket_size is not None and all(len(ranked.rows) >= bucket_size for ranked in lists)


def select_positives(top: list[RankedList], class_size: int, allow_overlap: bool,
                     class_names: list[str], bucket: str, allow_small: bool = False,
                     bucket_size: int | None = None) -> list[list[Pick]]:
    """Select each concept's images from its top candidates; one list per concept.

    `bucket_size`, the number of embedded images in the bucket, lets the error for a
    small class say whether retrieving more candidates could help.
    """
    if allow_overlap:
        selected = [[Pick(int(r), float(s), concept) for r, s in
                     zip(ranked.rows[:class_size], ranked.scores[:class_size], strict=True)]
                    for concept, ranked in enumerate(top)]
    else:
        assigned = _assign_to_best(top, lowest=False)
        selected = [assigned[concept][:class_size] for concept in range(len(top))]
    # With overlap, each concept keeps its own best class_size images, so a small class
    # means a small bucket. Without overlap, retrieving more candidates helps only while
    # the candidate lists leave some of the bucket's images out.
    if allow_overlap or _lists_hold_whole_bucket(top, bucket_size):
        hint = "lower NUM_OF_IMAGES_PER_CLASS_PER_BUCKET"
        if bucket_size is not None:
            hint = f"the bucket has only {bucket_size} embedded images, so {hint}"
    else:
        hint = ("lower NUM_OF_IMAGES_PER_CLASS_PER_BUCKET or raise "
                "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY")
    for concept, picks in enumerate(selected):
        _check_size(picks, class_size, bucket, class_names[concept], allow_small, hint)
    return selected


def select_background(bottom: list[RankedList], positives: list[list[Pick]], class_size: int,
                      per_concept: int, class_names: list[str], bucket: str,
                      allow_small: bool = False, bucket_size: int | None = None) -> list[Pick]:
    """Select the BACKGROUND class, most dissimilar first.

    `bucket_size` is the number of embedded images in the bucket, as in select_positives.
    """
    used_rows = {pick.row for picks in positives for pick in picks}
    assigned = _assign_to_best(bottom, lowest=True)
    if _lists_hold_whole_bucket(bottom, bucket_size):
        hint = f"the bucket has only {bucket_size} embedded images, so lower NEGATIVE_RATIO"
    else:
        hint = "lower NEGATIVE_RATIO or raise NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY"
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
                    allow_small, hint)
        background.extend(added)
    background.sort(key=lambda p: (p.score, p.row))
    return background
