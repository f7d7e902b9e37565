"""HTTP fetching for the download stage: one aiohttp session, bounded retries, timeouts.

A fetch never raises for a network or HTTP failure. It returns a FetchResult whose
`status` names the failure (http_error, timeout, connection_error, truncated,
too_large, invalid_url), so the caller records it as a row of the shard manifest.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

logger = logging.getLogger(__name__)

# HTTP statuses worth another attempt: rate limiting and transient server errors.
RETRYABLE_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRYABLE_STATUSES = frozenset({"timeout", "connection_error", "truncated"})
# Upper bound on one wait between attempts, whatever Retry-After or the backoff requests.
MAX_RETRY_WAIT_SECONDS = 60.0
MAX_REDIRECTS = 5
USER_AGENT = "clear-pipeline/0.1 (YFCC100M benchmark builder; aiohttp)"
DNS_CACHE_SECONDS = 300


@dataclass(frozen=True)
class FetchSettings:
    concurrency: int
    per_host: int
    timeout: float
    retries: int
    backoff_base: float
    max_bytes: int
    # Request starts per second across the whole shard; None means no limit.
    max_requests_per_second: float | None = None


class RateLimiter:
    """Space request starts at least `1 / rate` seconds apart across all tasks of a shard."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


@dataclass
class FetchResult:
    """The outcome of fetching one URL: a body, or a failure status and error."""

    url: str
    final_url: str | None = None
    http_status: int | None = None
    body: bytes | None = None
    status: str | None = None
    error: str | None = None
    attempts: int = 0
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        if self.status == "http_error":
            return self.http_status in RETRYABLE_HTTP_STATUSES
        return self.status in RETRYABLE_STATUSES


class BodyTooLarge(Exception):
    pass


def rewrite_for_mirror(url: str, mirror_base_url: str) -> str:
    """Map `http://host/path?query` to `<mirror_base_url>/host/path?query`."""
    parts = urlsplit(url)
    rewritten = f"{mirror_base_url.rstrip('/')}/{parts.netloc}{parts.path}"
    if parts.query:
        rewritten += f"?{parts.query}"
    return rewritten


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, base: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: half fixed, half random, capped.

    `attempt` is the number of the attempt that just failed, starting at 1.
    """
    ceiling = min(MAX_RETRY_WAIT_SECONDS, base * 2 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class Fetcher:
    """An aiohttp session with connection limits, DNS caching and retrying GETs.

    Use as `async with Fetcher(settings) as fetcher: await fetcher.fetch(url)`.
    """

    def __init__(self, settings: FetchSettings, rng: random.Random | None = None):
        self.settings = settings
        self.rng = rng or random.Random()
        self.session: aiohttp.ClientSession | None = None
        rate = settings.max_requests_per_second
        self.rate_limiter = RateLimiter(rate) if rate else None

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(
            limit=self.settings.concurrency,
            limit_per_host=self.settings.per_host,
            use_dns_cache=True,
            ttl_dns_cache=DNS_CACHE_SECONDS,
        )
        # No total limit: a large image on a slow link may take long, but every
        # connect and every read between chunks must finish within the timeout.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.settings.timeout, sock_read=self.settings.timeout,
        )
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers={"User-Agent": USER_AGENT},
        )
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(self, url: str) -> FetchResult:
        """GET `url`, retrying transient failures up to `settings.retries` times."""
        attempt = 0
        while True:
            attempt += 1
            result = await self._attempt(url)
            result.attempts = attempt
            if not result.retryable or attempt > self.settings.retries:
                return result

            if result.retry_after is not None:
                delay = min(result.retry_after, MAX_RETRY_WAIT_SECONDS)
            else:
                delay = backoff_delay(attempt, self.settings.backoff_base, self.rng)
            logger.debug("retrying %s in %.2f s after attempt %d failed: %s",
                         url, delay, attempt, result.error)
            await asyncio.sleep(delay)

    async def _attempt(self, url: str) -> FetchResult:
        assert self.session is not None, "use Fetcher as an async context manager"
        if self.rate_limiter is not None:
            await self.rate_limiter.wait()
        try:
            async with self.session.get(url, allow_redirects=True,
                                        max_redirects=MAX_REDIRECTS) as response:
                final_url = str(response.url)
                if response.status >= 400:
                    return FetchResult(
                        url, final_url, response.status, status="http_error",
                        error=f"HTTP {response.status} {response.reason or ''}".strip(),
                        retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    )
                body = await self._read_body(response)
                return FetchResult(url, final_url, response.status, body=body)
        except TimeoutError as error:
            return FetchResult(url, status="timeout",
                               error=f"timed out after {self.settings.timeout:g} s "
                               f"({type(error).__name__})")
        except BodyTooLarge as error:
            return FetchResult(url, status="too_large", error=str(error))
        except aiohttp.ClientPayloadError as error:
            return FetchResult(url, status="truncated",
                               error=f"response body incomplete: {error}")
        except aiohttp.TooManyRedirects as error:
            return FetchResult(url, status="http_error", http_status=error.status or None,
                               error=f"more than {MAX_REDIRECTS} redirects")
        except aiohttp.InvalidURL as error:
            return FetchResult(url, status="invalid_url", error=f"invalid URL: {error}")
        except (aiohttp.ClientError, OSError) as error:
            return FetchResult(url, status="connection_error",
                               error=f"{type(error).__name__}: {error}")

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.settings.max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise BodyTooLarge(f"Content-Length {declared} exceeds --max-bytes {limit}")
        chunks = []
        size = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"body exceeds --max-bytes {limit}")
            chunks.append(chunk)
        return b"".join(chunks)
