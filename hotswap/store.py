"""Adapter stores: S3 and local folders behind one small interface, with a content-addressed cache.

An adapter version is a folder in PEFT's ``save_pretrained`` layout (``adapter_config.json``
and ``adapter_model.safetensors``). Fetching it copies the weights into
``<cache_dir>/blobs/<sha256>.safetensors`` through a temporary file, hashing on the way, and
renames atomically, so a cached blob is always complete and immutable. Concurrent fetches
of the same URI share one download.

S3 objects are checked against what S3 says about them (:func:`_expected_digests`): the
full-object ``ChecksumSHA256`` that ``push`` uploads with, and the ETag as MD5 only where S3
makes it one (single-part, unencrypted or SSE-S3). SSE-KMS, DSSE-KMS and SSE-C ETags and
multipart checksums are not digests of the object and are not compared; the sha256 the cache
computes is kept either way.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlparse

from hotswap.errors import (
    AdapterFetchError,
    AdapterNotFoundError,
    AdapterValidationError,
    ConfigError,
    UnsafePathError,
)

__all__ = [
    "AdapterFetcher",
    "AdapterStore",
    "CONFIG_NAME",
    "FetchedAdapter",
    "LocalStore",
    "S3Store",
    "SIGNATURE_NAME",
    "WEIGHTS_NAME",
    "make_s3_client",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# an OpenSSF model-signing bundle over the two files above (see hotswap.signing); optional
SIGNATURE_NAME = "model.sig"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
_MAX_CONFIG_BYTES = 1 << 20
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FetchedAdapter:
    """An adapter version copied into the local cache, not yet validated.

    ``weights_path`` is an immutable content-addressed file whose sha256 is ``sha256``.
    ``signature`` holds the bytes of ``model.sig`` beside the adapter, None when there is none
    (not yet checked: :func:`hotswap.signing.check_signature` does that).
    """

    uri: str
    sha256: str
    weights_path: Path
    config_bytes: bytes
    size_bytes: int
    signature: bytes | None = None


class AdapterStore(Protocol):
    """Where adapter versions live. Implementations: :class:`S3Store`, :class:`LocalStore`."""

    def fetch(self, uri: str, *, cache: _BlobCache, signature: bool = True) -> FetchedAdapter:
        """Copy the adapter at ``uri`` into ``cache`` (and read its ``model.sig`` if ``signature``); raise
        ``AdapterNotFoundError`` if absent."""
        ...

    def push(self, local_dir: Path, uri: str) -> None:
        """Upload the adapter folder ``local_dir`` to ``uri``."""
        ...


class _IntegrityError(Exception):
    """Bytes arrived but are not the object's bytes (short read, checksum mismatch); retryable."""


class _BlobCache:
    """Content-addressed files under ``<root>/blobs``; writes are atomic."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        return self.root / "blobs" / f"{sha256}.safetensors"

    @contextlib.contextmanager
    def writer(self) -> Iterator[_BlobWriter]:
        """Yield a writer for a new blob; on clean exit it is renamed into place by its sha256."""
        blobs = self.root / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".incoming-")
        writer = _BlobWriter(os.fdopen(fd, "wb"))
        try:
            yield writer
            writer.file.flush()
            os.fsync(writer.file.fileno())
            writer.file.close()
            writer.path = self.path_for(writer.sha256.hexdigest())
            os.replace(tmp, writer.path)
        finally:
            if not writer.file.closed:
                writer.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class _BlobWriter:
    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0
        self.path: Path | None = None

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.sha256.update(chunk)
        self.md5.update(chunk)
        self.size += len(chunk)

    def reset(self) -> None:
        """Start over (a retry after a broken read)."""
        self.file.seek(0)
        self.file.truncate()
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0


def _pickle_only(uri: str, name: str) -> AdapterValidationError:
    return AdapterValidationError(
        uri,
        [
            f"only pickle weights ({name}) were found and pickles are never loaded; re-save the adapter with "
            f"save_pretrained(..., safe_serialization=True) so that it holds {WEIGHTS_NAME}"
        ],
    )


def _too_large(uri: str, size: int, limit: int) -> AdapterValidationError:
    return AdapterValidationError(
        uri,
        [f"{WEIGHTS_NAME} is {size} bytes, over max_adapter_bytes={limit}; raise max_adapter_bytes if intended"],
    )


def _config_too_large(uri: str, name: str = CONFIG_NAME) -> AdapterValidationError:
    return AdapterValidationError(uri, [f"{name} is larger than {_MAX_CONFIG_BYTES} bytes"])


class LocalStore:
    """Adapters in folders under ``root``. URIs: a path relative to ``root``, an absolute path or ``file://``.

    A URI whose path, after following symlinks, leaves ``root`` is refused
    (:class:`UnsafePathError`), as is any ``..`` component.
    """

    def __init__(self, root: Path, *, max_adapter_bytes: int) -> None:
        self.root = Path(root).expanduser()
        self.max_adapter_bytes = max_adapter_bytes

    def resolve(self, uri: str) -> Path:
        """Return the real folder for ``uri``, checked to lie inside ``root``."""
        raw = uri[len("file://") :] if uri.startswith("file://") else uri
        if not raw:
            raise ConfigError("empty adapter path; give a folder under the local store root or an s3:// URI")
        if ".." in Path(raw).parts:
            raise UnsafePathError(
                f"adapter path {uri!r} contains '..'; name the folder directly under {self.root}", uri=uri
            )
        path = Path(raw) if Path(raw).is_absolute() else self.root / raw
        root_real = self.root.resolve()
        real = path.resolve()
        if not real.is_relative_to(root_real):
            raise UnsafePathError(
                f"adapter path {uri!r} resolves to {real}, outside the local store root {root_real}; "
                "copy the adapter under the root (hotswap push) or set local_store_root",
                uri=uri,
            )
        return real

    def _member(self, folder: Path, name: str, uri: str) -> Path:
        path = folder / name
        real = path.resolve()
        if path.is_symlink() and not real.is_relative_to(self.root.resolve()):
            raise UnsafePathError(
                f"{name} of adapter {uri!r} is a symlink to {real}, outside the local store root "
                f"{self.root.resolve()}; store a real file there",
                uri=uri,
            )
        return real

    def fetch(self, uri: str, *, cache: _BlobCache, signature: bool = True) -> FetchedAdapter:
        folder = self.resolve(uri)
        weights = self._member(folder, WEIGHTS_NAME, uri)
        config = self._member(folder, CONFIG_NAME, uri)
        if not weights.is_file():
            for name in _PICKLE_NAMES:
                if (folder / name).is_file():
                    raise _pickle_only(uri, name)
            raise AdapterNotFoundError(
                f"adapter not found: no {WEIGHTS_NAME} in {folder} (URI {uri!r}); "
                "check the path or upload the adapter with 'hotswap push'",
                uri=uri,
            )
        if not config.is_file():
            raise AdapterNotFoundError(f"adapter {uri!r} has no {CONFIG_NAME} in {folder}", uri=uri)
        size = weights.stat().st_size
        if size > self.max_adapter_bytes:
            raise _too_large(uri, size, self.max_adapter_bytes)
        config_bytes = _read_capped(config, uri)
        sig = None
        if signature:
            signature_path = self._member(folder, SIGNATURE_NAME, uri)
            sig = _read_capped(signature_path, uri, SIGNATURE_NAME) if signature_path.is_file() else None
        with cache.writer() as out, open(weights, "rb") as src:
            while chunk := src.read(_CHUNK_BYTES):
                out.write(chunk)
        return FetchedAdapter(uri, out.sha256.hexdigest(), out.path, config_bytes, out.size, sig)

    def push(self, local_dir: Path, uri: str) -> None:
        """Copy the adapter into ``uri``, replacing what is there; see :meth:`_check_push_target` for what may be."""
        target = self.resolve(uri)
        self._check_push_target(target, uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".push-") as tmp:
            staging = Path(tmp) / "adapter"
            staging.mkdir()
            for name in _names_to_push(Path(local_dir)):
                shutil.copyfile(Path(local_dir) / name, staging / name)
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)


    def _check_push_target(self, target: Path, uri: str) -> None:
        """Refuse a target that is not absent, empty or one adapter version: a push replaces the whole folder.

        One adapter version is a folder with ``adapter_config.json`` and no subfolders; anything
        else (the store root, a parent such as ``demo`` above ``demo/v1``, a folder of other files)
        would be deleted by the push.
        """
        root = self.root.resolve()
        if target == root:
            raise ConfigError(
                f"refusing to push to {uri!r}: it is the local store root {root} itself, and a push replaces the "
                "whole target folder; name a folder for this version under the root, e.g. 'my-adapter/v1'"
            )
        if not target.exists():
            return
        if not target.is_dir():
            raise ConfigError(
                f"refusing to push to {uri!r}: {target} is a file, not an adapter folder; remove it or push to "
                "another folder"
            )
        entries = sorted(target.iterdir())
        folders = [e.name for e in entries if e.is_dir()]
        if not entries or (not folders and (target / CONFIG_NAME).is_file()):
            return
        found = (
            f"the subfolders {', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''}"
            if folders
            else f"{', '.join(e.name for e in entries[:5])} but no {CONFIG_NAME}"
        )
        raise ConfigError(
            f"refusing to push to {uri!r}: {target} holds {found}, which the push would delete (a push replaces "
            f"the whole target folder); push each version into its own folder, e.g. '{uri.rstrip('/')}/v2', or "
            "remove the folder yourself if it is really meant to go"
        )


def _read_capped(path: Path, uri: str, name: str = CONFIG_NAME) -> bytes:
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise _config_too_large(uri, name)
    return path.read_bytes()


def _names_to_push(local_dir: Path) -> tuple[str, ...]:
    """Weights first, then the config, then the signature when the folder has one."""
    signed = (local_dir / SIGNATURE_NAME).is_file()
    return (WEIGHTS_NAME, CONFIG_NAME, SIGNATURE_NAME) if signed else (WEIGHTS_NAME, CONFIG_NAME)


def make_s3_client(*, connect_timeout_s: float, read_timeout_s: float, endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client on the standard credential chain; ``endpoint_url`` or else boto3's own endpoint
    settings (``AWS_ENDPOINT_URL_S3``).

    botocore's own retries are off: :class:`S3Store` retries whole reads itself, body included.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    return boto3.session.Session().client("s3", config=config, endpoint_url=endpoint_url)


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if parsed.scheme != "s3" or not bucket or not prefix:
        raise ConfigError(f"bad S3 URI {uri!r}; expected s3://bucket/prefix (the folder holding {WEIGHTS_NAME})")
    return bucket, prefix


# ServerSideEncryption values under which S3 still makes a single-part ETag the MD5 of the body
_MD5_ETAG_ENCRYPTION = (None, "AES256")


@dataclass(frozen=True)
class _ExpectedDigests:
    """What S3 says an object's bytes hash to; None where S3 gave nothing that is the object's own digest."""

    sha256_b64: str | None
    md5_hex: str | None

    def mismatch(self, sha256: Any, md5: Any) -> str | None:
        """A sentence naming the first digest that differs, or None when the bytes match."""
        if self.sha256_b64 is not None:
            got = base64.b64encode(sha256.digest()).decode()
            if got != self.sha256_b64:
                return f"sha256 {got} does not match S3's ChecksumSHA256 {self.sha256_b64}"
        if self.md5_hex is not None and md5.hexdigest() != self.md5_hex:
            return f"MD5 {md5.hexdigest()} does not match ETag {self.md5_hex}"
        return None


def _expected_digests(head: dict, response: dict) -> _ExpectedDigests:
    """The digests one object's bytes must have, from its HEAD and GET responses (GET's fields win).

    ``ChecksumSHA256`` (base64 of the sha256) counts only as a full-object checksum: a multipart
    upload's is a checksum of its parts' checksums ("...-N", ``ChecksumType`` COMPOSITE), and as
    some servers drop the "-N" on HEAD, a multipart ETag alone rules it out unless ``ChecksumType``
    says FULL_OBJECT. The ETag is the MD5 only for a single-part object that is unencrypted or
    SSE-S3; under SSE-KMS, DSSE-KMS (``aws:kms``, ``aws:kms:dsse``) and SSE-C it is not.
    """

    def field(name: str) -> Any:
        return response.get(name) or head.get(name)

    etag = str(field("ETag") or "").strip('"')
    checksum, kind = field("ChecksumSHA256"), field("ChecksumType")
    composite = kind == "COMPOSITE" or re.search(r"-\d+$", checksum or "") or ("-" in etag and kind != "FULL_OBJECT")
    encrypted = field("ServerSideEncryption") not in _MD5_ETAG_ENCRYPTION or field("SSECustomerAlgorithm")
    return _ExpectedDigests(
        sha256_b64=checksum if checksum and not composite else None,
        md5_hex=etag.lower() if re.fullmatch(r"[0-9a-fA-F]{32}", etag) and not encrypted else None,
    )


def _cached_blob(cache: _BlobCache, sha256_b64: str | None, size: int) -> Path | None:
    """The cached blob whose bytes are the object's, named by the object's full-object sha256; None to download.

    The blob is hashed again (local reads, no network): a damaged file must be replaced by a download, not trusted
    for ever; and its mtime is renewed, since the cache evicts the least recently used."""
    if sha256_b64 is None:
        return None
    try:
        digest = base64.b64decode(sha256_b64, validate=True)
    except ValueError:  # not base64 (binascii.Error is a ValueError): download, and let the GET's check speak
        return None
    if len(digest) != 32:
        return None
    path = cache.path_for(digest.hex())
    try:
        if path.stat().st_size != size:
            return None
        os.utime(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                h.update(chunk)
    except OSError:  # absent, or evicted meanwhile
        return None
    if h.digest() != digest:
        logger.warning("cached blob %s does not hash to its name; downloading it again", path.name)
        return None
    return path


class S3Store:
    """Adapters under ``s3://bucket/prefix``, read with bounded retries that cover the body.

    Each object read is retried on connection errors, 5xx, throttling, stalls (the client's
    read timeout), short bodies and digest mismatches (:func:`_expected_digests`: S3's
    ``ChecksumSHA256``, the ETag's MD5 where it is one), with exponential backoff, at most
    ``max_attempts`` times. Objects encrypted with a customer-provided key (SSE-C) are not
    readable: hotswap holds no such keys, and S3's 400 answer becomes an error that says so.
    """

    def __init__(
        self,
        client: Any,
        *,
        max_adapter_bytes: int,
        max_attempts: int = 4,
        retry_backoff_s: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.max_adapter_bytes = max_adapter_bytes
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self._sleep = sleep

    def fetch(self, uri: str, *, cache: _BlobCache, signature: bool = True) -> FetchedAdapter:
        """HEAD the weights, GET the config (and ``model.sig`` if ``signature``), then GET the weights unless the cache
        already holds exactly these bytes: S3's full-object ``ChecksumSHA256`` on the HEAD names a blob the cache has
        (a roll back to a version seen before downloads no weights; the weights are then HEADed again after the config,
        so a push landing meanwhile is refused, not paired with the wrong config). Three requests either way."""
        bucket, prefix = _split_s3(uri)
        weights_key, config_key = f"{prefix}/{WEIGHTS_NAME}", f"{prefix}/{CONFIG_NAME}"
        head = self._head(bucket, weights_key, uri)
        if head is None:
            for name in _PICKLE_NAMES:
                if self._head(bucket, f"{prefix}/{name}", uri) is not None:
                    raise _pickle_only(uri, name)
            raise AdapterNotFoundError(
                f"adapter not found: s3://{bucket}/{weights_key} does not exist (URI {uri}); "
                "check the URI or upload the adapter with 'hotswap push'",
                uri=uri,
            )
        size = int(head["ContentLength"])
        if size > self.max_adapter_bytes:
            raise _too_large(uri, size, self.max_adapter_bytes)
        config = self._get_small(bucket, config_key, uri, CONFIG_NAME)
        if config is None:
            raise AdapterNotFoundError(f"adapter {uri} has no s3://{bucket}/{config_key}", uri=uri)
        sig = self._get_small(bucket, f"{prefix}/{SIGNATURE_NAME}", uri, SIGNATURE_NAME) if signature else None
        cached = _cached_blob(cache, _expected_digests(head, {}).sha256_b64, size)
        if cached is not None:
            # no weights GET (whose IfMatch would have caught it): a push landing after the first HEAD (weights first,
            # then the config) would pair these weights with a config that never went with them, so HEAD them again
            again = self._head(bucket, weights_key, uri)
            if again is None or _identity(again) != _identity(head):
                raise AdapterFetchError(f"adapter {uri} changed while it was being read ({WEIGHTS_NAME} was replaced "
                                        "after it was first read); roll it again once the upload has finished",
                                        uri=uri)
            logger.info("fetched %s (%d bytes, sha256 %s): the weights were in the cache", uri, size,
                        cached.stem[:12])
            return FetchedAdapter(uri, cached.stem, cached, config, size, sig)
        started = time.perf_counter()
        with cache.writer() as out:
            self._download(bucket, weights_key, head, uri, write=out.write, reset=out.reset,
                           digests=lambda: (out.sha256, out.md5))
        logger.info(
            "fetched %s (%d bytes, sha256 %s) in %.0f ms",
            uri,
            out.size,
            out.sha256.hexdigest()[:12],
            (time.perf_counter() - started) * 1e3,
        )
        return FetchedAdapter(uri, out.sha256.hexdigest(), out.path, config, out.size, sig)

    def _get_small(self, bucket: str, key: str, uri: str, name: str) -> bytes | None:
        """GET a small member (the config, the signature) in one request, without a HEAD first: None when absent;
        over ``_MAX_CONFIG_BYTES`` (as declared, or as read) is refused before more is read."""
        from botocore.exceptions import ClientError

        def attempt() -> bytes | None:
            try:
                response = self.client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            except ClientError as e:
                if _missing(e):
                    return None
                raise
            body = response["Body"]
            try:
                if int(response.get("ContentLength") or 0) > _MAX_CONFIG_BYTES:
                    raise _config_too_large(uri, name)
                data = body.read(_MAX_CONFIG_BYTES + 1)
            finally:
                body.close()
            if len(data) > _MAX_CONFIG_BYTES:
                raise _config_too_large(uri, name)
            expected = response.get("ContentLength")
            if expected is not None and len(data) != int(expected):
                raise _IntegrityError(f"read {len(data)} of {expected} bytes")
            problem = _expected_digests({}, response).mismatch(hashlib.sha256(data),
                                                                hashlib.md5(data, usedforsecurity=False))
            if problem is not None:
                raise _IntegrityError(problem)
            return data

        return self._with_retries(uri, f"GET s3://{bucket}/{key}", attempt, reading=True)

    def push(self, local_dir: Path, uri: str) -> None:
        bucket, prefix = _split_s3(uri)
        names = _names_to_push(Path(local_dir))
        if SIGNATURE_NAME not in names:  # a signature left by an earlier push to this URI would not match
            key = f"{prefix}/{SIGNATURE_NAME}"
            self._with_retries(uri, f"delete {SIGNATURE_NAME}",
                               lambda: self.client.delete_object(Bucket=bucket, Key=key))
        # weights first: a reader that sees the config also sees the weights it describes
        for name in names:
            with open(Path(local_dir) / name, "rb") as f:
                self._with_retries(uri, f"upload {name}", lambda f=f, name=name: self._put(f, bucket, prefix, name))

    def _put(self, f: IO[bytes], bucket: str, prefix: str, name: str) -> None:
        f.seek(0)
        # S3 keeps the sha256 and returns it on reads (ChecksumMode), whatever the encryption does to the ETag
        self.client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=f, ChecksumAlgorithm="SHA256")

    def _head(self, bucket: str, key: str, uri: str) -> dict | None:
        from botocore.exceptions import ClientError

        def head():
            try:
                return self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            except ClientError as e:
                if _missing(e):
                    return None
                raise

        return self._with_retries(uri, f"HEAD s3://{bucket}/{key}", head, reading=True)

    def _download(self, bucket, key, head, uri, *, write, reset, digests=None) -> None:
        """GET ``key`` into ``write`` (after ``reset`` on each attempt), checked by :func:`_expected_digests`.

        ``digests`` returns the (sha256, md5) hash objects that ``write`` itself updates, so a large
        body is hashed once; without it the chunks are hashed here.
        """
        expected = int(head["ContentLength"])
        etag = str(head.get("ETag", "")).strip('"')

        def attempt():
            reset()
            extra = {"IfMatch": head["ETag"]} if etag else {}
            response = self.client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED", **extra)
            own = (hashlib.sha256(), hashlib.md5(usedforsecurity=False)) if digests is None else None
            body = response["Body"]
            got = 0
            try:
                while chunk := body.read(_CHUNK_BYTES):
                    write(chunk)
                    got += len(chunk)
                    if own is not None:
                        own[0].update(chunk)
                        own[1].update(chunk)
            finally:
                body.close()
            if got != expected:
                raise _IntegrityError(f"read {got} of {expected} bytes")
            problem = _expected_digests(head, response).mismatch(*(own if own is not None else digests()))
            if problem is not None:
                raise _IntegrityError(problem)

        self._with_retries(uri, f"GET s3://{bucket}/{key}", attempt, reading=True)

    def _with_retries(self, uri: str, what: str, fn: Callable[[], Any], *, reading: bool = False) -> Any:
        """Call ``fn`` up to ``max_attempts`` times; ``reading``: it reads an object (HEAD or GET)."""
        from botocore.exceptions import BotoCoreError, ClientError

        last: BaseException | None = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except ClientError as e:
                status = _status(e)
                if status == 412:  # the object changed under us (IfMatch): a new version; not our adapter
                    raise AdapterFetchError(
                        f"adapter {uri} changed while it was being read ({what}); roll it again once the upload "
                        "has finished",
                        uri=uri,
                    ) from e
                if status in (401, 403) or _code(e) in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise AdapterFetchError(
                        f"access denied to adapter {uri} ({what}: {_code(e)}); check the AWS credentials and the "
                        "bucket policy",
                        uri=uri,
                    ) from e
                if reading and status == 400:
                    raise AdapterFetchError(_sse_c_hint(uri, what, e), uri=uri) from e
                if status is not None and status < 500 and _code(e) not in ("SlowDown", "RequestTimeout"):
                    raise AdapterFetchError(f"S3 refused {what} for adapter {uri}: {e}", uri=uri) from e
                last = e
            except (BotoCoreError, _IntegrityError, OSError) as e:
                # OSError covers urllib3's protocol errors and socket timeouts raised while reading the body
                last = e
            if attempt < self.max_attempts:
                delay = self.retry_backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                logger.warning("%s failed (attempt %d/%d: %s); retrying in %.2f s", what, attempt,
                               self.max_attempts, last, delay)
                self._sleep(delay)
        raise AdapterFetchError(
            f"could not read adapter {uri}: {what} failed {self.max_attempts} times, last error: "
            f"{type(last).__name__}: {last}; check that S3 is reachable (AWS_ENDPOINT_URL_S3) and retry",
            uri=uri,
        ) from last


def _identity(head: dict) -> tuple:
    """What names one upload of an object in its HEAD: a new upload changes the ETag (and the checksum)."""
    return head.get("ETag"), head.get("ChecksumSHA256"), head.get("ContentLength"), head.get("VersionId")


def _missing(error: Any) -> bool:
    """Whether a ClientError says the object (or its bucket) does not exist."""
    return _status(error) == 404 or _code(error) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def _status(error: Any) -> int | None:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _sse_c_hint(uri: str, what: str, error: Any) -> str:
    """The message for a 400 on HEAD/GET: what S3 answers for an SSE-C object read without its key."""
    message = error.response.get("Error", {}).get("Message", "")
    return (
        f"S3 answered 400 ({_code(error)}: {message}) to {what} for adapter {uri}. S3 answers so when the object "
        "is encrypted with a customer-provided key (SSE-C) and the request carries no key, and hotswap never "
        "sends one (it keeps no customer keys). Re-encrypt the object with SSE-KMS or SSE-S3, e.g. 'aws s3 cp "
        "SRC SRC --sse-c-copy-source AES256 --sse-c-copy-source-key fileb://key.bin --sse aws:kms', or upload "
        "the adapter again with 'hotswap push' (the bucket's default encryption applies)"
    )


class AdapterFetcher:
    """Fetches adapter URIs from the right store into one cache; concurrent fetches of a URI share one download.

    Args:
        cache_dir: where ``blobs/`` lives.
        local: the local store (plain paths and ``file://``).
        s3: the S3 store, or None to refuse ``s3://`` URIs with a clear error.
    """

    def __init__(self, *, cache_dir: Path, local: LocalStore, s3: S3Store | None) -> None:
        self.cache = _BlobCache(Path(cache_dir))
        self.local = local
        self.s3 = s3
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, bool], Future] = {}

    @classmethod
    def from_settings(cls, settings, *, s3_client: Any = None) -> AdapterFetcher:
        """Build from :class:`~hotswap.settings.HotswapSettings`; the S3 client is created lazily if not given."""
        s3 = S3Store(
            s3_client if s3_client is not None else _LazyS3Client(settings),
            max_adapter_bytes=settings.max_adapter_bytes,
            max_attempts=settings.s3_max_attempts,
            retry_backoff_s=settings.s3_retry_backoff_s,
        )
        local = LocalStore(settings.store_root, max_adapter_bytes=settings.max_adapter_bytes)
        return cls(cache_dir=settings.cache_dir, local=local, s3=s3)

    def store_for(self, uri: str) -> AdapterStore:
        scheme = urlparse(uri).scheme
        if scheme == "s3":
            if self.s3 is None:
                raise ConfigError(f"adapter {uri} is on S3 but no S3 store is configured")
            return self.s3
        if scheme in ("", "file"):
            return self.local
        raise ConfigError(f"unsupported adapter URI {uri!r}; use s3://bucket/prefix, file:///path or a local path")

    def fetch(self, uri: str, *, signature: bool = True) -> FetchedAdapter:
        """Fetch ``uri`` into the cache (one download per URI at a time, shared by concurrent callers); with
        ``signature`` False its ``model.sig`` is not read (``FetchedAdapter.signature`` is None)."""
        store = self.store_for(uri)
        key = (uri, signature)
        with self._lock:
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
        if not owner:
            return future.result()
        try:
            result = store.fetch(uri, cache=self.cache, signature=signature)
        except BaseException as e:
            future.set_exception(e)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def push(self, local_dir: Path, uri: str) -> None:
        """Upload an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, and ``model.sig``
        when present) to ``uri``."""
        local_dir = Path(local_dir)
        missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not (local_dir / n).is_file()]
        if missing:
            raise ConfigError(
                f"{local_dir} is not an adapter folder: missing {', '.join(missing)}; save the adapter with "
                "save_pretrained(..., safe_serialization=True)"
            )
        self.store_for(uri).push(local_dir, uri)


class _LazyS3Client:
    """Creates the boto3 client on first use, so that a local-only service never imports boto3's S3 setup."""

    def __init__(self, settings) -> None:
        self._settings = settings
        self._client = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            if self._client is None:
                self._client = make_s3_client(
                    connect_timeout_s=self._settings.s3_connect_timeout_s,
                    read_timeout_s=self._settings.s3_read_timeout_s,
                    endpoint_url=self._settings.s3_endpoint_url,
                )
        return getattr(self._client, name)
