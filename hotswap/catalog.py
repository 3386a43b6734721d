"""The version catalog: the one fetch -> (pin, signature) -> validate -> stage pipeline, with bounded caches.

The controller resolves a URI here once per operation. The fetch always runs (the content at a
URI may have changed; its digests say so); validation runs once per version (URI + weights
sha256 + config sha256) and model layout, its record kept in the persisted state (a record vouches only for the
layout and limits it was checked against, ``checked_for``: after a redeploy with another ``max_rank``,
``target_modules``, base model or size cap the version is validated again); staging runs once per
(version, dtype), shared by concurrent callers and retried after a failure, never cached as
failed. Only what is in use (stable, canary, the operation's versions) plus the few most recent
versions stay staged; validated tensors are dropped as soon as they are staged; blobs in the
download cache are evicted least-recently-used past ``adapter_cache_max_bytes``.

The work of that pipeline (downloads, hashing, validation, casting and packing) runs in a few threads
of the controller at a lower CPU priority (``nice`` +10 on Linux): on a node it shares with replicas,
preparing a version yields the CPU to the requests being served rather than slowing them.

The CLI's ``hotswap validate`` runs the same :func:`~hotswap.adapters.validate_fetched`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hotswap.errors import AdapterValidationError
from hotswap.versions import BASE, AdapterVersion

__all__ = ["VersionCatalog"]

logger = logging.getLogger(__name__)

_STAGED_EXTRA = 2  # staged versions kept beyond those in use
PREPARE_NICE = 10  # how much lower than the controller's own the CPU priority of the preparing threads is


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux schedules threads as tasks: ``setpriority`` on the thread id)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + PREPARE_NICE))
    except (AttributeError, OSError) as e:  # not Linux, or not allowed: prepare at the usual priority
        logger.debug("could not lower the priority of the preparing thread: %s", e)


_PREPARE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hotswap-prepare", initializer=_lower_priority)


async def _background(fn, /, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a preparing thread (lower CPU priority), awaited."""
    return await asyncio.get_running_loop().run_in_executor(_PREPARE, functools.partial(fn, *args, **kwargs))


def checks_fingerprint(settings, spec) -> str:
    """What a validation record vouches for: the model layout (LoRA layers, ``max_rank``) and the limits of the
    checks it passed. A record made under another one is not trusted."""
    payload = {"spec": spec.fingerprint, "max_adapter_bytes": settings.max_adapter_bytes,
               "max_header_bytes": settings.max_header_bytes, "dtype": settings.dtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class VersionCatalog:
    """Fetch, check, validate and stage adapter versions for one application's settings."""

    def __init__(self, settings, spec, *, fetcher=None) -> None:
        from hotswap.store import AdapterFetcher

        self.settings = settings
        self.spec = spec
        self.fetcher = fetcher if fetcher is not None else AdapterFetcher.from_settings(settings)
        self._staged: OrderedDict[tuple[str, str], asyncio.Future] = OrderedDict()  # (key, dtype) -> ref
        self._in_use: set[str] = set()  # weights sha256 of the versions in use: never evicted from the blob cache
        self.checks = checks_fingerprint(settings, spec)
        self._revalidated: dict[str, Any] = {}  # version key -> the record for these settings, or the refusal

    async def resolve(self, uri: str, *, known: dict[str, dict],
                      expected_sha256: str | None = None) -> tuple[AdapterVersion, dict]:
        """Fetch ``uri`` and return its version and validation record (validating only if not ``known``).

        Raises the store's errors, or :class:`AdapterValidationError` for a pin mismatch, a bad signature
        or a failed validation: in every case nothing was staged and no replica touched.
        """
        from hotswap.adapters import resolve_adapter_uri, validate_fetched

        # a model.sig is only ever checked against trusted keys (or required): without either it is not read
        signatures = bool(self.settings.trusted_public_keys) or self.settings.signature_required
        fetched = await _background(self.fetcher.fetch, resolve_adapter_uri(uri, self.settings),
                                    signature=signatures)
        version = AdapterVersion.of_fetched(fetched)
        if expected_sha256 is not None and expected_sha256.lower() != version.sha256:
            raise _with_version(version, AdapterValidationError(uri, [
                f"the weights' sha256 is {version.sha256}, but the roll pinned {expected_sha256.lower()}; "
                "check the URI, or pin the digest 'hotswap validate URI' prints"]))
        try:
            signer = await _background(self._check_signature, fetched)
        except AdapterValidationError as e:
            _with_version(version, e)
            raise
        await _background(self._evict_blobs, {version.sha256})
        record = known.get(version.key)
        if record is not None and record.get("checked_for") == self.checks:
            return version, {**record, **({"signer": signer} if signer else {})}
        try:
            validated = await _background(validate_fetched, fetched, settings=self.settings, spec=self.spec)
        except AdapterValidationError as e:
            _with_version(version, e)  # the identity that was rejected: the controller records it
            raise
        return version, {**validated.record(), "checked_for": self.checks, **({"signer": signer} if signer else {})}

    def _check_signature(self, fetched) -> str | None:
        try:
            from hotswap.signing import check_signature
        except ImportError:  # signing support not installed in this build
            return None
        result = check_signature(fetched, getattr(fetched, "signature", None), self.settings)
        return None if result is None else result.key_id

    async def staged_ref(self, version: AdapterVersion, dtype: str, record: dict | None) -> Any:
        """The object-store ref of ``version`` staged for ``dtype`` (``None`` for the base model)."""
        if version == BASE:
            return None
        key = (version.key, dtype)
        future = self._staged.get(key)
        if future is None:
            future = self._staged[key] = asyncio.ensure_future(self._stage(version, dtype, record))
        self._staged.move_to_end(key)
        try:
            return await asyncio.shield(future)
        except Exception:
            if self._staged.get(key) is future:  # a failed staging is retried by the next caller
                del self._staged[key]
            raise

    async def _stage(self, version: AdapterVersion, dtype: str, record: dict | None):
        import ray
        import torch

        from hotswap.staging import stage_adapter
        from hotswap.validation import load_validated

        if record is None:
            raise AdapterValidationError(version.uri, [f"version {version.short()} was never validated by this "
                                                       "controller; roll it again"])
        if record.get("checked_for") != self.checks:  # validated under another layout (or an older release)
            record, validated = await self._validate_again(version, record)
            if validated is not None:  # just validated: staged from its tensors (later calls load the blob)
                staged = await _background(stage_adapter, validated, self.spec, dtype=getattr(torch, dtype),
                                           pin_memory=False)
                return ray.put(staged)
        path = self.fetcher.cache.path_for(version.sha256)
        for attempt in (1, 2):  # the second: after load_validated removed a damaged blob, downloaded again
            if not path.exists():
                path = (await _background(self.fetcher.fetch, version.uri, signature=False)).weights_path  # weights
            try:
                validated = await _background(load_validated, path, record, self.spec)
                break
            except (AdapterValidationError, FileNotFoundError):  # the latter: removed by a concurrent reader
                if attempt == 2 or path.exists():  # not a damaged blob (those are removed): the bytes changed
                    raise
        staged = await _background(stage_adapter, validated, self.spec, dtype=getattr(torch, dtype),
                                         pin_memory=False)
        if staged.identity != version:  # the record must describe exactly this version
            raise AdapterValidationError(version.uri, [f"the cached record names {staged.identity.short()}, not "
                                                       f"{version.short()}; roll the version again"])
        return ray.put(staged)

    async def _validate_again(self, version: AdapterVersion, record: dict) -> tuple[dict, Any]:
        """Validate ``version`` under this catalog's layout and limits (its record was made under others, or before
        records said which): the weights from the cache (downloaded again only when evicted), the LoRA settings
        from the record (the config's own checks passed when it was made, and its bytes are not cached). Returns
        the record for these settings and the validated adapter (None when an earlier call validated it). The
        outcome, a record or the refusal, is kept for this controller's life (not the tensors): replicas that
        retry are not checked again."""
        import dataclasses

        from hotswap.adapters import validate_fetched
        from hotswap.store import FetchedAdapter
        from hotswap.validation import cached_blob_intact

        if version.key in self._revalidated:
            result = self._revalidated[version.key]
            if isinstance(result, AdapterValidationError):
                raise result
            return result, None
        path = self.fetcher.cache.path_for(version.sha256)
        if not path.exists() or not await _background(cached_blob_intact, path, version.sha256):
            # evicted, or damaged (then removed): the URI must still hold this version (the fetch names what it holds)
            fetched = await _background(self.fetcher.fetch, version.uri, signature=False)
            if fetched.sha256 != version.sha256:
                raise AdapterValidationError(version.uri, [
                    f"{version.uri} now holds weights {fetched.sha256[:12]}, not {version.short()}, which is no "
                    "longer cached and must be validated again for these settings; roll the version you want again"])
            path = fetched.weights_path
        config = {"peft_type": "LORA", "r": record["rank"], "lora_alpha": record["lora_alpha"],
                  "use_rslora": record["use_rslora"], "lora_dropout": record["lora_dropout"],
                  "target_modules": list(record["target_modules"])}
        fetched = FetchedAdapter(uri=version.uri, sha256=version.sha256, weights_path=path,
                                 config_bytes=json.dumps(config).encode(), size_bytes=path.stat().st_size)
        logger.info("validating %s again: its record was made under another model layout or other limits",
                    version.short())
        try:
            validated = await _background(validate_fetched, fetched, settings=self.settings, spec=self.spec)
        except AdapterValidationError as e:
            error = _with_version(version, AdapterValidationError(version.uri, [
                *e.problems, f"{version.short()} passed validation under other settings (another max_rank, "
                "target_modules, base model or size cap) but does not fit these: roll a version that fits, or "
                "deploy settings it fits"]))
            self._revalidated[version.key] = error
            raise error from None
        # the identity is the original config's (whose checks passed when the record was made)
        validated = dataclasses.replace(validated, config_sha256=record.get("config_sha256", ""))
        fresh = {**record, **validated.record(), "checked_for": self.checks}  # the signer, if any, kept
        self._revalidated[version.key] = fresh
        return fresh, validated

    def keep(self, in_use: set[AdapterVersion]) -> None:
        """Drop staged versions not in use, beyond the ``_STAGED_EXTRA`` most recently used."""
        keys = {v.key for v in in_use}
        self._in_use = {v.sha256 for v in in_use}
        extra = [k for k in self._staged if k[0] not in keys]
        for k in extra[: max(0, len(extra) - _STAGED_EXTRA)]:
            del self._staged[k]

    def staged_versions(self) -> list[str]:
        return [k for k, _ in self._staged]

    def _evict_blobs(self, keep_shas: set[str]) -> None:
        """Delete the least recently used blobs until the cache is under ``adapter_cache_max_bytes``."""
        limit = self.settings.adapter_cache_max_bytes
        blobs = self.fetcher.cache.root / "blobs"
        if not blobs.is_dir():
            return
        files = sorted((p.stat().st_mtime, p) for p in blobs.glob("*.safetensors"))
        total = sum(p.stat().st_size for _, p in files)
        for _, path in files:
            if total <= limit:
                break
            if path.stem in keep_shas or path.stem in self._in_use:
                continue
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            total -= size
            logger.info("evicted %s from the adapter cache (%d bytes; cap %d)", path.name, size, limit)


def _with_version(version: AdapterVersion, error: AdapterValidationError) -> AdapterValidationError:
    error.version = version
    return error
