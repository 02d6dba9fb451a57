"""S3 data source: mirror an S3 prefix into a local directory, incrementally.

Why a mirror: training reads images many times; a persistent local copy keyed by
(key, size, ETag, sha256) lets repeated runs download only what changed, and the
sha256 of every file is recorded for data lineage. Works with AWS S3 and with
S3-compatible servers (MinIO, SeaweedFS) through the standard AWS settings.

Every failure leaves these functions as one-line `SourceError`s; botocore and
s3transfer exceptions never escape.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectionError as BotoConnectionError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)
from boto3.exceptions import Boto3Error
from s3transfer.exceptions import (
    CancelledError,
    RetriesExceededError,
    S3DownloadFailedError,
    S3UploadFailedError,
)
from s3transfer.subscribers import BaseSubscriber
from tqdm import tqdm

from xray.entity.config_entity import S3Config
from xray.errors import SourceError

logger = logging.getLogger(__name__)

INDEX_NAME = ".xray-s3-index.json"
LOCK_NAME = ".xray-s3-lock"
TMP_DIR_NAME = ".xray-s3-tmp"
_RESERVED_PREFIX = ".xray-s3"
_INDEX_VERSION = 1
_INDEX_FLUSH_INTERVAL_S = 1.0
_READ_TIMEOUT_S = 60.0
# Fail-fast probe: an unreachable endpoint must not cost max_attempts * connect_timeout.
_PROBE_MAX_ATTEMPTS = 2
_ACCESS_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AllAccessDisabled",
        "AccountProblem",
    }
)
_HASH_CHUNK = 1 << 20
_TRANSFER_ERRORS = (
    BotoCoreError,
    Boto3Error,
    RetriesExceededError,
    S3UploadFailedError,
    S3DownloadFailedError,
    CancelledError,
)
# Starts and ends with a letter or digit (so never '.' or '..'), as S3 and its look-alikes require.
_BUCKET_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,253}[A-Za-z0-9])?")


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3. None values fall back to the standard AWS variables/profiles.

    endpoint_url None lets boto3 read AWS_ENDPOINT_URL (or the profile), so the same
    code talks to AWS, MinIO and SeaweedFS.
    """

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    max_concurrency: int = 8
    max_attempts: int = 5  # botocore "standard" retries: backoff on transient errors
    connect_timeout_s: float = 5.0

    @classmethod
    def from_config(cls, s3: S3Config) -> S3Settings:
        """The pipeline's ``ingestion.s3`` section, used alike for ingestion and the pusher's upload."""
        return cls(
            endpoint_url=s3.endpoint_url, region=s3.region, profile=s3.profile,
            max_concurrency=s3.max_concurrency, max_attempts=s3.max_attempts,
        )


@dataclass(frozen=True)
class S3ObjectRecord:
    """One mirrored object: what S3 said (size, ETag) and what we hold (sha256, path)."""

    key: str
    size: int
    etag: str
    sha256: str
    relative_path: str  # path under the mirror dir (key with the prefix stripped)


@dataclass(frozen=True)
class _Listed:
    key: str
    size: int
    etag: str  # as S3 returns it, quotes stripped
    relative_path: str


# --------------------------------------------------------------------------- URIs


def _split_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SourceError(f"not an S3 URI (expected s3://bucket/prefix): {uri!r}")
    if parsed.query or parsed.fragment:
        raise SourceError(f"S3 URI must not have a query or fragment: {uri!r}")
    bucket = parsed.netloc
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise SourceError(f"invalid S3 bucket name {bucket!r} in {uri!r}")
    prefix = parsed.path.lstrip("/")
    if any(ch in prefix for ch in "\x00\\") or any(part in (".", "..") for part in prefix.split("/")):
        raise SourceError(f"S3 prefix must not hold '.' or '..' segments, backslashes or NUL bytes: {uri!r}")
    return bucket, prefix


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split s3://bucket/prefix into ("bucket", "prefix/").

    The prefix is treated as a folder (a trailing "/" is added) so that s3://b/data
    does not also match s3://b/database/...; the bucket root gives "".
    """
    bucket, prefix = _split_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def mirror_dir_for(root: Path, uri: str, settings: S3Settings) -> Path:
    """Where ``uri`` is mirrored under ``root``: keyed by the endpoint too, so the same bucket name
    on two servers (AWS and a local MinIO, say) never shares a mirror."""
    bucket, prefix = parse_s3_uri(uri)
    endpoint = _endpoint(_make_client(settings))
    key = hashlib.sha256(f"{endpoint}\n{bucket}\n{prefix}".encode()).hexdigest()[:16]
    return root / bucket / key


def _relative_path(key: str, prefix: str) -> str:
    """The mirror path of a key; refuse keys that would escape or clash with bookkeeping."""
    rel = key[len(prefix) :]
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\x00" in rel
        or any(part in ("", ".", "..") for part in parts)
        or parts[0].startswith(_RESERVED_PREFIX)
    ):
        raise SourceError(f"refusing S3 key {key!r}: it would escape or clash with the mirror dir")
    return str(PurePosixPath(*parts))


# --------------------------------------------------------------------------- clients


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _endpoint_configured(core: botocore.session.Session, settings: S3Settings) -> bool:
    """A custom endpoint (settings, env or profile) means an S3-compatible server."""
    if settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return True
    scoped = core.get_scoped_config()
    return bool(scoped.get("endpoint_url"))


def _make_client(settings: S3Settings, max_attempts: int | None = None) -> Any:
    """A boto3 S3 client from settings + standard AWS env/profile; bounded retries."""
    try:
        core = botocore.session.Session(profile=settings.profile)
        session = boto3.session.Session(botocore_session=core)
        custom_endpoint = _endpoint_configured(core, settings)
        s3_options: dict[str, str] = {}
        if custom_endpoint:
            s3_options["addressing_style"] = "path"  # MinIO/SeaweedFS: no virtual hosts
        region = settings.region or session.region_name
        if region is None and custom_endpoint:
            region = "us-east-1"  # SigV4 needs some region; S3-compatibles accept this one
        config = Config(
            retries={"total_max_attempts": max(1, max_attempts or settings.max_attempts), "mode": "standard"},
            connect_timeout=settings.connect_timeout_s,
            read_timeout=_READ_TIMEOUT_S,
            max_pool_connections=max(10, settings.max_concurrency + 2),
            s3=s3_options or None,
        )
        return session.client("s3", endpoint_url=settings.endpoint_url, region_name=region, config=config)
    except ProfileNotFound as exc:
        raise SourceError(f"AWS profile not found: {_one_line(exc)}") from None
    except (BotoCoreError, ValueError) as exc:
        raise SourceError(f"cannot configure S3 client: {_one_line(exc)}") from None


def _endpoint(client: Any) -> str:
    return str(getattr(client.meta, "endpoint_url", None) or "<default AWS endpoint>")


def _translate(exc: BaseException, client: Any, bucket: str, key: str | None = None) -> SourceError:
    """Map a botocore/s3transfer failure to one actionable line."""
    endpoint = _endpoint(client)
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        return _translate(exc.last_exception, client, bucket, key)
    cause = exc.__cause__
    if isinstance(exc, (Boto3Error, S3UploadFailedError, S3DownloadFailedError)) and isinstance(
        cause, (BotoCoreError, ClientError)
    ):
        return _translate(cause, client, bucket, key)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return SourceError(
            f"no usable AWS credentials for S3 endpoint {endpoint} ({_one_line(exc)}): set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    if isinstance(exc, BotoConnectionError):
        return SourceError(f"cannot reach S3 endpoint {endpoint}: {_one_line(exc)}")
    if isinstance(exc, (ConnectionClosedError, ReadTimeoutError)):
        return SourceError(f"lost connection to S3 endpoint {endpoint} while reading {where}: {_one_line(exc)}")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        message = _one_line(error.get("Message", "") or exc)
        if code == "NoSuchBucket" or (code == "404" and key is None):
            return SourceError(f"S3 bucket '{bucket}' does not exist at {endpoint}")
        if code in _ACCESS_CODES:
            return SourceError(
                f"S3 access denied to {where} at {endpoint} ({code}: {message}); check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE) and the bucket permissions"
            )
        if code in ("NoSuchKey", "404"):
            return SourceError(f"S3 object {where} disappeared during the transfer; run again")
        if code in ("PreconditionFailed", "412"):
            return SourceError(f"S3 object {where} changed during the transfer; run again")
        return SourceError(f"S3 request for {where} at {endpoint} failed ({code}): {message}")
    if isinstance(exc, _TRANSFER_ERRORS):
        return SourceError(f"S3 transfer of {where} at {endpoint} failed: {_one_line(exc)}")
    if isinstance(exc, OSError):
        return SourceError(f"local I/O error while transferring {where}: {_one_line(exc)}")
    return SourceError(f"S3 transfer of {where} at {endpoint} failed: {type(exc).__name__}: {_one_line(exc)}")


@contextmanager
def _s3_errors(client: Any, bucket: str, key: str | None = None) -> Iterator[None]:
    try:
        yield
    except SourceError:
        raise
    except (*_TRANSFER_ERRORS, ClientError, OSError) as exc:
        raise _translate(exc, client, bucket, key) from None


def _transfer_config(settings: S3Settings) -> TransferConfig:
    return TransferConfig(
        max_concurrency=max(1, settings.max_concurrency),
        use_threads=True,
        preferred_transfer_client="classic",  # same behaviour on every machine (no CRT)
    )


def _probe_bucket(settings: S3Settings, bucket: str) -> None:
    """HeadBucket with few attempts, so bad endpoints/credentials/buckets fail fast."""
    probe = _make_client(settings, max_attempts=min(settings.max_attempts, _PROBE_MAX_ATTEMPTS))
    with _s3_errors(probe, bucket):
        probe.head_bucket(Bucket=bucket)


# --------------------------------------------------------------------------- index


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _MirrorIndex:
    """key -> S3ObjectRecord of the objects fully present in the mirror.

    Written atomically (tmp + os.replace); "complete" is true only after a full sync,
    so an interrupted sync never looks complete and resumes from what it finished.
    """

    def __init__(self, mirror_dir: Path, source: str) -> None:
        self.path = mirror_dir / INDEX_NAME
        self.source = source
        self.records: dict[str, S3ObjectRecord] = {}
        self._last_flush = 0.0

    def load(self) -> None:
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable mirror index %s (%s): re-downloading", self.path, exc)
            return
        if not isinstance(payload, dict) or payload.get("version") != _INDEX_VERSION:
            logger.warning("ignoring mirror index %s with unknown format: re-downloading", self.path)
            return
        if payload.get("source") != self.source:
            raise SourceError(
                f"mirror dir {self.path.parent} holds a mirror of {payload.get('source')}, "
                f"not {self.source}: use another directory"
            )
        for key, entry in dict(payload.get("objects", {})).items():
            try:
                record = S3ObjectRecord(
                    key=key,
                    size=int(entry["size"]),
                    etag=str(entry["etag"]),
                    sha256=str(entry["sha256"]),
                    relative_path=str(entry["relative_path"]),
                )
                _relative_path(record.relative_path, "")  # never trust a path that escapes
            except (KeyError, TypeError, ValueError, SourceError):
                logger.warning("ignoring malformed index entry for %r", key)
                continue
            self.records[key] = record

    def flush(self, complete: bool = False, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < _INDEX_FLUSH_INTERVAL_S:
            return
        payload = {
            "version": _INDEX_VERSION,
            "source": self.source,
            "complete": complete,
            "objects": {
                key: {k: v for k, v in asdict(rec).items() if k != "key"}
                for key, rec in sorted(self.records.items())
            },
        }
        _atomic_write_json(self.path, payload)
        self._last_flush = now


def _verified(record: S3ObjectRecord | None, listed: _Listed, mirror_dir: Path) -> bool:
    """True when the local copy is exactly what S3 lists (index match + sha256 on disk)."""
    if record is None or record.size != listed.size or record.etag != listed.etag:
        return False
    if record.relative_path != listed.relative_path:
        return False
    path = mirror_dir / listed.relative_path
    try:
        return path.is_file() and path.stat().st_size == listed.size and _sha256(path) == record.sha256
    except OSError:
        return False


def _remove_file(mirror_dir: Path, relative_path: str) -> None:
    path = mirror_dir / relative_path
    path.unlink(missing_ok=True)
    parent = path.parent
    while parent != mirror_dir and mirror_dir in parent.parents:
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            break
        parent = parent.parent


# --------------------------------------------------------------------------- sync


class _KnownObject(BaseSubscriber):
    """Hands s3transfer the listed size/ETag: no HeadObject per file, and ranged GETs of
    large objects carry If-Match so a concurrently replaced object fails instead of mixing."""

    def __init__(self, size: int, etag: str, done: queue.Queue[str], key: str) -> None:
        self._size = size
        self._etag = etag
        self._done = done
        self._key = key

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)
        future.meta.provide_object_etag(f'"{self._etag}"')

    def on_done(self, future: Any, **kwargs: Any) -> None:
        self._done.put(self._key)


def _list_objects(client: Any, bucket: str, prefix: str) -> list[_Listed]:
    listed: list[_Listed] = []
    with _s3_errors(client, bucket):
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = str(obj["Key"])
                if key.endswith("/"):
                    continue  # folder marker
                listed.append(
                    _Listed(
                        key=key,
                        size=int(obj["Size"]),
                        etag=str(obj.get("ETag", "")).strip('"'),
                        relative_path=_relative_path(key, prefix),
                    )
                )
    listed.sort(key=lambda item: item.key)
    seen: dict[str, str] = {}
    for item in listed:
        folded = item.relative_path
        if folded in seen:
            raise SourceError(f"S3 keys {seen[folded]!r} and {item.key!r} map to the same mirror path")
        seen[folded] = item.key
    return listed


def _progress(total_bytes: int, count: int, uri: str) -> tqdm:
    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"s3 sync {uri} ({count} files)",
        disable=not sys.stderr.isatty(),
        leave=False,
    )


def link_into(mirror_dir: Path, target: Path, records: tuple[S3ObjectRecord, ...]) -> None:
    """Hard-link the mirrored objects into ``target`` (copies across file systems), so a later sync of the
    mirror cannot change a run's snapshot under it."""
    for record in records:
        dest = target / record.relative_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(mirror_dir / record.relative_path, dest)
        except OSError:
            shutil.copy2(mirror_dir / record.relative_path, dest)


def sync_prefix(uri: str, mirror_dir: Path, settings: S3Settings) -> tuple[S3ObjectRecord, ...]:
    """Make `mirror_dir` an exact copy of everything under `uri`; return records by key.

    Objects whose size and ETag match the index and whose local sha256 still matches
    are reused; the rest are downloaded concurrently (boto3 transfer manager) to temp
    files and renamed into place. Files of keys gone from S3 are removed.
    """
    bucket, prefix = parse_s3_uri(uri)
    source = f"s3://{bucket}/{prefix}"
    mirror_dir = Path(mirror_dir).resolve()
    try:
        mirror_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(f"cannot create mirror dir {mirror_dir}: {_one_line(exc)}") from None
    with _mirror_lock(mirror_dir):
        return _sync_locked(bucket, prefix, source, mirror_dir, settings)


@contextmanager
def _mirror_lock(mirror_dir: Path) -> Iterator[None]:
    """One sync per mirror dir at a time (two runs would fight over files and index)."""
    with (mirror_dir / LOCK_NAME).open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SourceError(f"another sync is already running on mirror dir {mirror_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _sync_locked(
    bucket: str, prefix: str, source: str, mirror_dir: Path, settings: S3Settings
) -> tuple[S3ObjectRecord, ...]:
    shutil.rmtree(mirror_dir / TMP_DIR_NAME, ignore_errors=True)  # leftovers of an interrupted sync
    index = _MirrorIndex(mirror_dir, source)
    index.load()

    _probe_bucket(settings, bucket)
    client = _make_client(settings)
    listed = _list_objects(client, bucket, prefix)
    if not listed:
        raise SourceError(f"no objects under {source} at {_endpoint(client)}")

    # Drop files of keys no longer in S3 (or whose mirror path moved).
    wanted = {item.key: item for item in listed}
    removed = 0
    for key, record in list(index.records.items()):
        item = wanted.get(key)
        if item is None or item.relative_path != record.relative_path:
            _remove_file(mirror_dir, record.relative_path)
            del index.records[key]
            if item is None:
                removed += 1

    with ThreadPoolExecutor(max_workers=max(1, settings.max_concurrency)) as pool:
        ok = list(pool.map(lambda it: _verified(index.records.get(it.key), it, mirror_dir), listed))
    todo = [item for item, good in zip(listed, ok) if not good]
    for item in todo:
        index.records.pop(item.key, None)
    index.flush(complete=False)
    reused = len(listed) - len(todo)

    if todo:
        _download_all(client, bucket, todo, mirror_dir, index, settings, source)
    index.flush(complete=True)
    logger.info(
        "synced %s into %s: reused %d, downloaded %d, removed %d",
        source,
        mirror_dir,
        reused,
        len(todo),
        removed,
    )
    return tuple(index.records[item.key] for item in listed)


def _download_all(
    client: Any,
    bucket: str,
    todo: list[_Listed],
    mirror_dir: Path,
    index: _MirrorIndex,
    settings: S3Settings,
    source: str,
) -> None:
    """Download `todo` concurrently; finalize each (hash, rename, index) as it completes."""
    tmp_dir = mirror_dir / TMP_DIR_NAME
    tmp_dir.mkdir(exist_ok=True)
    done: queue.Queue[str] = queue.Queue()
    pending: dict[str, tuple[_Listed, Path, Any]] = {}
    try:
        with (
            _progress(sum(i.size for i in todo), len(todo), source) as bar,
            _s3_errors(client, bucket),
            create_transfer_manager(client, _transfer_config(settings)) as manager,
        ):
            for item in todo:
                tmp_path = tmp_dir / f"{uuid.uuid4().hex}.part"
                future = manager.download(
                    bucket,
                    item.key,
                    str(tmp_path),
                    subscribers=[_KnownObject(item.size, item.etag, done, item.key)],
                )
                pending[item.key] = (item, tmp_path, future)
            while pending:
                for key in _next_done(done, pending):
                    if key not in pending:
                        continue  # already handled by the polling fallback
                    item, tmp_path, future = pending.pop(key)
                    with _s3_errors(client, bucket, key):
                        future.result()  # raises the transfer's error
                    _finalize(item, tmp_path, mirror_dir, index)
                    bar.update(item.size)
    finally:
        index.flush(complete=False)
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _next_done(done: queue.Queue[str], pending: dict[str, tuple[_Listed, Path, Any]]) -> list[str]:
    """Keys whose transfer finished: from on_done, with a poll of the futures as a safety net."""
    try:
        return [done.get(timeout=1.0)]
    except queue.Empty:
        return [key for key, (_, _, future) in pending.items() if future.done()]


def _finalize(item: _Listed, tmp_path: Path, mirror_dir: Path, index: _MirrorIndex) -> None:
    if tmp_path.stat().st_size != item.size:
        raise SourceError(
            f"S3 object {item.key!r} arrived with {tmp_path.stat().st_size} bytes, expected {item.size}"
        )
    sha = _sha256(tmp_path)
    target = mirror_dir / item.relative_path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, target)
    except OSError as exc:
        raise SourceError(f"cannot place {item.key!r} at {target}: {_one_line(exc)}") from None
    index.records[item.key] = S3ObjectRecord(
        key=item.key, size=item.size, etag=item.etag, sha256=sha, relative_path=item.relative_path
    )
    index.flush(complete=False, force=False)
    logger.debug("downloaded %s -> %s", item.key, target)


# --------------------------------------------------------------------------- upload


def _local_files(local_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in local_dir.rglob("*")
        if p.is_file() and not any(part.startswith(_RESERVED_PREFIX) for part in p.relative_to(local_dir).parts)
    )


def upload_dir(local_dir: Path, uri: str, settings: S3Settings) -> int:
    """Upload every file under `local_dir` to s3://bucket/prefix/<relative path>; return the count.

    Mirror bookkeeping files (.xray-s3-*) are skipped so a mirror can be re-uploaded.
    """
    bucket, prefix = parse_s3_uri(uri)
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise SourceError(f"cannot upload {local_dir}: not a directory")
    files = _local_files(local_dir)
    if not files:
        logger.warning("nothing to upload: %s has no files", local_dir)
        return 0
    client = _make_client(settings)
    sizes = {p: p.stat().st_size for p in files}
    total = sum(sizes.values())
    futures: list[tuple[str, int, Any]] = []
    with _progress(total, len(files), f"-> s3://{bucket}/{prefix}") as bar:
        with _s3_errors(client, bucket), create_transfer_manager(client, _transfer_config(settings)) as manager:
            for path in files:
                key = prefix + path.relative_to(local_dir).as_posix()
                futures.append((key, sizes[path], manager.upload(str(path), bucket, key)))
            for key, size, future in futures:
                with _s3_errors(client, bucket, key):
                    future.result()
                bar.update(size)
    logger.info("uploaded %d files (%d bytes) from %s to s3://%s/%s", len(files), total, local_dir, bucket, prefix)
    return len(files)


def upload_file(local_path: Path, uri: str, settings: S3Settings) -> str:
    """Upload one file; a URI ending in "/" (or a bare bucket) gets the file's name appended.

    Returns the s3:// URI of the stored object (recorded by the model pusher).
    """
    local_path = Path(local_path)
    if not local_path.is_file():
        raise SourceError(f"cannot upload {local_path}: no such file")
    bucket, key = _split_uri(uri)
    if not key or key.endswith("/"):
        key += local_path.name
    client = _make_client(settings)
    with _s3_errors(client, bucket, key), create_transfer_manager(client, _transfer_config(settings)) as manager:
        manager.upload(str(local_path), bucket, key).result()
    target = f"s3://{bucket}/{key}"
    logger.info("uploaded %s to %s", local_path, target)
    return target
