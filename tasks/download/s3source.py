"""Fetching images from an S3 copy of YFCC100M in the `multimedia-commons` layout.

The public bucket `multimedia-commons` keys each image by the YFCC100M hash column
(the MD5 of the download URL) as `data/images/<h[:3]>/<h[3:6]>/<h>.jpg`. The endpoint
and credentials come from the environment as boto3 reads them (`AWS_ENDPOINT_URL`,
...), and requests are unsigned when no credentials are configured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from tasks.download.fetch import FetchResult
from tasks.storage import make_s3_client, split_s3_uri

logger = logging.getLogger(__name__)

DEFAULT_S3_MIRROR = "s3://multimedia-commons"
MISSING_KEY_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def mirror_key(prefix: str, photo_hash: str) -> str:
    key = f"data/images/{photo_hash[:3]}/{photo_hash[3:6]}/{photo_hash}.jpg"
    return f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key


class S3MirrorFetcher:
    """GETs images from the S3 mirror in a thread pool, since boto3 blocks."""

    def __init__(self, mirror_uri: str, concurrency: int, max_bytes: int):
        self.bucket, self.prefix = split_s3_uri(mirror_uri)
        self.max_bytes = max_bytes
        self.client = make_s3_client()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="s3-mirror")

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def url(self, photo_hash: str) -> str:
        return f"s3://{self.bucket}/{mirror_key(self.prefix, photo_hash)}"

    async def fetch(self, photo_hash: str) -> FetchResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._get, photo_hash)

    def _get(self, photo_hash: str) -> FetchResult:
        from botocore.exceptions import BotoCoreError, ClientError

        url = self.url(photo_hash)
        if not photo_hash:
            return FetchResult(url, status="invalid_url", attempts=1,
                               error="the shard has no hash for this photo")
        key = mirror_key(self.prefix, photo_hash)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            size = response.get("ContentLength") or 0
            if size > self.max_bytes:
                response["Body"].close()
                return FetchResult(url, status="too_large", attempts=1,
                                   error=f"object of {size} bytes exceeds --max-bytes "
                                   f"{self.max_bytes}")
            body = response["Body"].read()
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            http_status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in MISSING_KEY_CODES:
                http_status = 404
            return FetchResult(url, http_status=http_status, status="http_error", attempts=1,
                               error=f"S3 {code or 'error'}: {error}")
        except BotoCoreError as error:
            # botocore already retried with its standard retry mode.
            return FetchResult(url, status="connection_error", attempts=1,
                               error=f"{type(error).__name__}: {error}")
        return FetchResult(url, final_url=url, http_status=200, body=body, attempts=1)
