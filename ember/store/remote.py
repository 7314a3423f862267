"""The remote tier: ember checkpoints in any S3-compatible object store, through boto3.

Owns: parsing `s3://bucket/prefix` URLs, uploading a checkpoint directory (partition files
first, `index.json` last, so a half-finished upload is never a checkpoint anyone would load),
and reading byte ranges of objects with retries and exponential backoff. One checkpoint is one
prefix: `prefix/index.json`, `prefix/rank0-part0000.bin`, ..., plus the tokenizer and config
files.

Retries: connection errors, timeouts, 5xx and throttling are retried `max_attempts` times with
backoff `backoff_s * 2**attempt` (capped at `max_backoff_s`); a missing object or bucket is not
retried. A range that comes back shorter than asked is retried too (a connection cut mid-body).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ember.errors import CheckpointNotFoundError, ConfigError, RemoteStoreError
from ember.store.format import INDEX_FILE

logger = logging.getLogger(__name__)

T = TypeVar("T")

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """How to reach the object store. None fields fall back to boto3's usual sources
    (AWS_* environment variables, ~/.aws); `endpoint_url` selects any S3-compatible server."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_attempts: int = 5
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_connections: int = 16

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"RemoteConfig.max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ConfigError("RemoteConfig.backoff_s and max_backoff_s must be >= 0")


@dataclass(frozen=True, slots=True)
class S3Url:
    bucket: str
    prefix: str  # no leading or trailing slash; may be ""

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def is_s3_url(source: str) -> bool:
    return source.startswith("s3://")


def parse_s3_url(url: str) -> S3Url:
    if not is_s3_url(url):
        raise ConfigError(f"not an s3:// URL: {url!r}")
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"s3 URL {url!r} names no bucket")
    return S3Url(bucket, prefix.strip("/"))


class RemoteStore:
    """A boto3 S3 client with ember's retry rules. Thread-safe (boto3 clients are)."""

    def __init__(self, config: RemoteConfig | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.config = cfg = config or RemoteConfig()
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            region_name=cfg.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            config=Config(
                retries={"max_attempts": 1, "mode": "standard"},  # ember retries itself
                connect_timeout=cfg.connect_timeout_s,
                read_timeout=cfg.read_timeout_s,
                max_pool_connections=cfg.max_connections,
            ),
        )
        self._lock = threading.Lock()
        self.retries = 0  # retried attempts so far (tests and logs read it)

    # --- reads -----------------------------------------------------------------------------

    def get_bytes(self, url: S3Url, name: str) -> bytes:
        """A whole (small) object."""
        key = url.key(name)

        def once() -> bytes:
            return bytes(self._client.get_object(Bucket=url.bucket, Key=key)["Body"].read())

        return self._retry(once, url, key)

    def open_range(self, url: S3Url, name: str, start: int, nbytes: int) -> RangeReader:
        """A reader over bytes [start, start + nbytes) of `name`: one GET streamed in pieces
        (`read_exact`), reopened from where it stopped if the connection breaks midway."""
        return RangeReader(self, url, name, start, nbytes)

    def _open_body(self, url: S3Url, key: str, start: int, end: int) -> Any:
        def once() -> Any:
            rng = f"bytes={start}-{end - 1}"
            return self._client.get_object(Bucket=url.bucket, Key=key, Range=rng)["Body"]

        return self._retry(once, url, key)

    def list_names(self, url: S3Url) -> dict[str, int]:
        """Object names directly under the prefix -> sizes."""
        prefix = url.key("")

        def once() -> dict[str, int]:
            out: dict[str, int] = {}
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=url.bucket, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix) :]
                    if name and "/" not in name:
                        out[name] = int(obj["Size"])
            return out

        return self._retry(once, url, prefix)

    # --- writes ----------------------------------------------------------------------------

    def upload_checkpoint(self, directory: str | Path, url: S3Url) -> int:
        """Upload every file of a checkpoint directory; `index.json` goes last. Returns bytes."""
        from boto3.s3.transfer import TransferConfig

        src = Path(directory)
        if not (src / INDEX_FILE).is_file():
            raise CheckpointNotFoundError(src, f"no {INDEX_FILE}: not an ember checkpoint")
        files = sorted(p for p in src.iterdir() if p.is_file() and p.name != INDEX_FILE)
        transfer = TransferConfig(
            multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4
        )
        total = 0
        for f in [*files, src / INDEX_FILE]:
            key = url.key(f.name)
            self._retry(
                lambda f=f, key=key: self._client.upload_file(  # type: ignore[misc]
                    str(f), url.bucket, key, Config=transfer
                ),
                url,
                key,
            )
            total += f.stat().st_size
            logger.debug("uploaded key=%s bytes=%d", key, f.stat().st_size)
        logger.info("pushed url=%s files=%d bytes=%d", url, len(files) + 1, total)
        return total

    def ensure_bucket(self, bucket: str) -> None:
        """Create `bucket` if it does not exist (tests and `ember push --create-bucket`)."""
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=bucket)
        except ClientError:
            self._client.create_bucket(Bucket=bucket)

    # --- retries ---------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], T], url: S3Url, key: str) -> T:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        cfg = self.config
        last: BaseException | None = None
        for attempt in range(cfg.max_attempts):
            try:
                return fn()
            except S3UploadFailedError as e:  # boto3's upload wraps the service's error
                text = str(e)
                if "NoSuchBucket" in text:
                    raise RemoteStoreError(
                        f"s3://{url.bucket}/{key}",
                        f"no bucket {url.bucket!r} (create it, or `ember push --create-bucket`)",
                    ) from None
                if any(c in text for c in ("AccessDenied", "InvalidAccessKeyId", "Signature")):
                    raise RemoteStoreError(
                        f"s3://{url.bucket}/{key}", f"access denied: {_one_line(e)}"
                    ) from None
                last = e
            except NoCredentialsError:  # not transient: trying again cannot help
                raise RemoteStoreError(
                    f"s3://{url.bucket}/{key}",
                    "no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                    "~/.aws/credentials, where ember serve runs)",
                ) from None
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code in _NOT_FOUND:
                    raise CheckpointNotFoundError(
                        f"s3://{url.bucket}/{key}", f"no such object ({code})"
                    ) from None
                last = e
            except (BotoCoreError, OSError, _ShortRead) as e:
                last = e
            if attempt + 1 < cfg.max_attempts:
                with self._lock:
                    self.retries += 1
                delay = min(cfg.max_backoff_s, cfg.backoff_s * 2**attempt)
                logger.warning(
                    "s3 retry key=%s attempt=%d delay_s=%.2f error=%s",
                    key, attempt + 1, delay, _one_line(last),
                )  # fmt: skip
                time.sleep(delay)
        raise RemoteStoreError(
            f"s3://{url.bucket}/{key}",
            f"failed after {cfg.max_attempts} attempts: {_one_line(last)}",
        )


class _ShortRead(Exception):
    pass


class RangeReader:
    """Sequential reads of one byte range of one object; a broken body is reopened at the
    current position (up to `max_attempts` times, with backoff) so no byte is read twice."""

    def __init__(self, store: RemoteStore, url: S3Url, name: str, start: int, nbytes: int) -> None:
        self._store, self._url, self._key = store, url, url.key(name)
        self._pos, self._end = start, start + nbytes
        self._body: Any = None

    def read_exact(self, out: memoryview) -> None:
        """Fill `out` with the next len(out) bytes of the range."""
        cfg = self._store.config
        got, failures = 0, 0
        while got < len(out):
            try:
                if self._body is None:
                    self._body = self._store._open_body(self._url, self._key, self._pos, self._end)
                piece = self._body.read(min(8 << 20, len(out) - got))
                if not piece:
                    raise _ShortRead(f"{self._key}: body ended at byte {self._pos}")
            except (RemoteStoreError, CheckpointNotFoundError):
                raise  # opening failed after its own retries, or the object is gone
            except Exception as e:  # a cut connection, a timeout, an early end of body
                self.close()
                failures += 1
                if failures >= cfg.max_attempts:
                    raise RemoteStoreError(
                        f"s3://{self._url.bucket}/{self._key}",
                        f"read broke {failures} times at byte {self._pos}: {_one_line(e)}",
                    ) from None
                with self._store._lock:
                    self._store.retries += 1
                delay = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (failures - 1))
                logger.warning(
                    "s3 reopen key=%s at=%d attempt=%d delay_s=%.2f error=%s",
                    self._key, self._pos, failures, delay, _one_line(e),
                )  # fmt: skip
                time.sleep(delay)
                continue
            out[got : got + len(piece)] = piece
            got += len(piece)
            self._pos += len(piece)

    def close(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # already broken
                pass
            self._body = None


def _one_line(e: BaseException | None) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0] if e else "unknown error"


def side_files_dir(source: str, cache_dir: str | Path | None = None) -> str:
    """`source` itself, or for an s3:// checkpoint a local directory holding its small files
    (config, tokenizer, index), downloaded once: what the API process needs to tokenize for a
    model whose weights it never reads. Endpoint from EMBER_S3_ENDPOINT_URL."""
    if not is_s3_url(source):
        return source
    import hashlib

    url = parse_s3_url(source)
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "ember" / "s3-side-files"
    dest = root / hashlib.sha256(str(url).encode()).hexdigest()[:16]
    if (dest / INDEX_FILE).is_file():
        return str(dest)
    store = RemoteStore(RemoteConfig(endpoint_url=os.environ.get("EMBER_S3_ENDPOINT_URL")))
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.mkdir(parents=True, exist_ok=True)
    names = [n for n in store.list_names(url) if not n.endswith(".bin")]
    for name in sorted(names, key=lambda n: n == INDEX_FILE):  # index last
        (tmp / name).write_bytes(store.get_bytes(url, name))
    try:
        os.rename(tmp, dest)
    except OSError:  # another thread or process got there first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
