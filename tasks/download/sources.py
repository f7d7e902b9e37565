"""The sources tried for one sample, and the manifest row built from what they return."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING

from tasks.download.fetch import Fetcher, FetchResult, rewrite_for_mirror
from tasks.download.s3source import S3MirrorFetcher
from tasks.download.validate import Limits, check_image

if TYPE_CHECKING:
    from tasks.download import Config

# Statuses that mean a source failed to deliver the photo, so the next source is tried.
FALLBACK_STATUSES = frozenset({"http_error", "timeout", "connection_error", "truncated",
                               "invalid_url", "unavailable", "empty", "not_image",
                               "invalid_image"})


class Sources:
    """The fetches to try for one sample, in order, as chosen by --source."""

    def __init__(self, config: Config, fetcher: Fetcher, s3_fetcher: S3MirrorFetcher | None):
        self.config = config
        self.fetcher = fetcher
        self.s3_fetcher = s3_fetcher

    def for_sample(self, sample: dict) -> list:
        fetches = []
        if self.config.source in ("http", "http-then-s3-mirror"):
            url = sample["download_url"]
            if self.config.mirror_base_url:
                url = rewrite_for_mirror(url, self.config.mirror_base_url)
            fetches.append(lambda: self.fetcher.fetch(url))
        if self.s3_fetcher is not None:
            fetches.append(lambda: self.s3_fetcher.fetch(sample.get("hash") or ""))
        return fetches


class Checker:
    """Runs the Pillow checks in a thread pool, off the event loop."""

    def __init__(self, limits: Limits, executor: concurrent.futures.Executor):
        self.limits = limits
        self.executor = executor

    async def row_for(self, photo_id: int, result: FetchResult) -> tuple[dict, bytes | None]:
        """Build the manifest row of one fetch result; return it and, when ok, the bytes."""
        row = {"photo_id": photo_id, "url": result.url, "status": result.status,
               "error": result.error, "http_status": result.http_status, "bytes": 0,
               "width": None, "height": None, "sha256": None, "member": None,
               "offset": None, "orientation": None, "format": None,
               "attempts": result.attempts}
        if result.status is not None:
            return row, None

        body = result.body
        loop = asyncio.get_running_loop()
        check = await loop.run_in_executor(self.executor, check_image, body,
                                           result.final_url, self.limits)
        row.update(status=check.status, error=check.error, bytes=len(body),
                   width=check.width, height=check.height, sha256=check.sha256,
                   orientation=check.orientation, format=check.format)
        if check.status != "ok":
            return row, None
        row["member"] = f"{photo_id}.{check.extension}"
        return row, body


async def fetch_sample(sample: dict, sources: Sources,
                       checker: Checker) -> tuple[dict, bytes | None]:
    """Fetch and check one sample, trying the next source after a failed one.

    Returns the manifest row of the last source tried, with the attempts of all of
    them, and the bytes when the sample is ok.
    """
    attempts = 0
    for fetch in sources.for_sample(sample):
        result = await fetch()
        attempts += result.attempts
        row, data = await checker.row_for(sample["photo_id"], result)
        row["attempts"] = attempts
        if row["status"] not in FALLBACK_STATUSES:
            break
    return row, data
