"""The controller's desired state, persisted before it is acted on, and the fenced stores that keep it.

:class:`DesiredState` is everything a controller needs to derive every replica's assignment:
the stable and canary versions, the canary's share, and the operation in progress (with its
phase and per-replica progress). Nothing about replicas' liveness is stored: that is
observed again after a restart.

Stores are *fenced*: a save succeeds only if nobody else wrote since this store last read or
wrote the object (S3: ``If-Match`` on the ETag / ``If-None-Match: *`` for the first write;
file: a generation counter checked under an exclusive lock). A stale controller's save
raises :class:`~hotswap.errors.StateConflictError` and that controller stops serving
operations, so two controllers on one state object never overwrite each other silently.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from hotswap.errors import StateConflictError
from hotswap.messages import OpKind, Phase
from hotswap.versions import BASE, AdapterVersion

logger = logging.getLogger(__name__)


class SaveOutcomeUnknown(OSError):
    """A write of the state may or may not have landed: its answer was lost and the object could not be read to
    tell. The store settles it before its next write; until then what is stored may be that write."""

__all__ = ["DesiredState", "FileStateStore", "Operation", "S3StateStore", "StateStore", "state_store_for"]

_HISTORY_KEPT = 200
_REJECTED_KEPT = 50
_VALIDATED_KEPT = 64


@dataclass
class Operation:
    """An operation in progress: ``targets`` move to ``version`` in order, ``batch`` at a time.

    ``moving`` are assigned ``version`` and not yet heard running it; ``done`` reported running it;
    ``dropped`` went away while targeted. In the REVERT phase every target that was moving or done
    is assigned its ``previous`` version again.
    """

    id: str
    kind: OpKind
    version: AdapterVersion
    targets: list[str]
    previous: dict[str, AdapterVersion]
    everyone: bool  # replicas that appear mid-operation join it (roll, promote, rollback to previous stable)
    phase: Phase = Phase.FORWARD
    moving: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reverted: list[str] = field(default_factory=list)
    reason: str | None = None
    started: float = 0.0
    deadline: float = 0.0  # the current step (or the revert) fails after this time
    percent: float | None = None  # for a canary
    deaths: int = 0  # targets that went away while swapping to ``version`` (and have not reported since)
    died: list[str] = field(default_factory=list)  # which ones: one that reports again was a stall, not a death
    events: list[str] = field(default_factory=list)

    def copy(self) -> Operation:
        """A full copy: every field is immutable except the lists and the dict, which are copied."""
        return replace(self, targets=list(self.targets), previous=dict(self.previous), moving=list(self.moving),
                       done=list(self.done), dropped=list(self.dropped), reverted=list(self.reverted),
                       died=list(self.died), events=list(self.events))

    def touched(self) -> list[str]:
        return [r for r in self.targets if r in self.moving or r in self.done]

    def to_dict(self) -> dict:
        return {
            "id": self.id, "kind": self.kind.value, "version": self.version.to_dict(), "targets": self.targets,
            "previous": {k: v.to_dict() for k, v in self.previous.items()}, "everyone": self.everyone,
            "phase": self.phase.value, "moving": self.moving, "done": self.done, "dropped": self.dropped,
            "reverted": self.reverted, "reason": self.reason, "started": self.started, "deadline": self.deadline,
            "percent": self.percent, "deaths": self.deaths, "died": self.died, "events": self.events[-100:],
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> Operation | None:
        if d is None:
            return None
        return cls(
            id=d["id"], kind=OpKind(d["kind"]), version=AdapterVersion.of(d["version"]), targets=list(d["targets"]),
            previous={k: AdapterVersion.of(v) for k, v in d["previous"].items()}, everyone=d["everyone"],
            phase=Phase(d["phase"]), moving=list(d["moving"]), done=list(d["done"]), dropped=list(d["dropped"]),
            reverted=list(d.get("reverted", [])), reason=d.get("reason"), started=d["started"],
            deadline=d["deadline"], percent=d.get("percent"), deaths=d.get("deaths", 0), died=_died(d),
            events=list(d.get("events", [])),
        )


def _died(d: dict) -> list[str]:
    """``Operation.died``; a state saved before it existed names no one, unless every dropped target was a death
    (then it is exactly them); otherwise the deaths stay counted (a stall among them then cannot be taken back)."""
    if "died" in d:
        return list(d["died"])
    deaths, dropped = d.get("deaths", 0), list(d.get("dropped", []))
    return dropped if deaths and deaths == len(dropped) else []


@dataclass
class DesiredState:
    """What every replica should run, and the operation that is changing it."""

    stable: AdapterVersion = BASE
    previous_stable: list[AdapterVersion] = field(default_factory=list)  # for rollback, most recent last
    canary: AdapterVersion | None = None
    canary_percent: float | None = None
    canary_replicas: list[str] = field(default_factory=list)
    operation: Operation | None = None
    history: list[dict] = field(default_factory=list)
    rejected: dict[str, dict] = field(default_factory=dict)  # AdapterVersion.key -> {uri, sha256, problems, time}
    validated: dict[str, dict] = field(default_factory=dict)  # AdapterVersion.key -> ValidatedAdapter.record()
    initial_adapter: str | None = None  # the URI the first stable version came from
    rebalance_blocked: str | None = None  # canary key whose rebalance failed: not retried replica after replica
    generation: int = 0  # bumped by every save; the file store fences on it
    cluster: str | None = None  # the Ray cluster (session name) of the controller that last claimed it

    def copy(self) -> DesiredState:
        """A copy that a transition may change: new containers, a deep copy of the operation, and the records in the
        tables (history entries, rejections, validation records) shared, since they are only ever added or removed
        whole, never changed in place. So a copy costs a pointer per record, not a deep copy of up to
        ``_HISTORY_KEPT`` history entries (the controller copies the state for every report it hears)."""
        return replace(self, previous_stable=list(self.previous_stable), canary_replicas=list(self.canary_replicas),
                       operation=self.operation.copy() if self.operation else None,
                       history=list(self.history),
                       rejected=dict(self.rejected), validated=dict(self.validated))

    def trim(self) -> None:
        """Keep the persisted record bounded: the newest history, rejections and validation records; never the
        validation record of a version in use (stable, canary, previous stables, the operation's)."""
        del self.history[:-_HISTORY_KEPT]
        in_use = {v.key for v in (self.stable, self.canary, *self.previous_stable) if v is not None}
        if self.operation is not None:
            in_use |= {self.operation.version.key, *(v.key for v in self.operation.previous.values())}
        for table, kept, protected in ((self.rejected, _REJECTED_KEPT, set()),
                                       (self.validated, _VALIDATED_KEPT, in_use)):
            evictable = [k for k in table if k not in protected]
            for key in evictable[: max(0, len(table) - kept)]:
                del table[key]

    def same_as(self, other: DesiredState) -> bool:
        """Whether ``other`` holds the same state as this one: what :meth:`to_json` writes, compared as values
        without serializing (records shared by :meth:`copy` compare by identity first, so a report that changed
        nothing costs a comparison per record, not two JSON documents)."""
        return self._fields() == other._fields()

    def to_json(self) -> str:
        """Compact: an indent makes ``json`` use its pure-Python encoder, 5.8x slower for a full state (200 history
        entries, 64 validation records: 5.3 vs 0.9 ms), and every transition saves the state (``jq .`` shows it)."""
        return json.dumps(self._fields(), sort_keys=True, separators=(",", ":"))

    def _fields(self) -> dict:
        return {
            "stable": self.stable.to_dict(),
            "previous_stable": [v.to_dict() for v in self.previous_stable],
            "canary": self.canary.to_dict() if self.canary else None,
            "canary_percent": self.canary_percent,
            "canary_replicas": self.canary_replicas,
            "operation": self.operation.to_dict() if self.operation else None,
            "history": self.history,
            "rejected": self.rejected,
            "validated": self.validated,
            "initial_adapter": self.initial_adapter,
            "rebalance_blocked": self.rebalance_blocked,
            "generation": self.generation,
            "cluster": self.cluster,
        }

    @classmethod
    def from_json(cls, raw: str) -> DesiredState:
        d = json.loads(raw)
        return cls(
            stable=AdapterVersion.of(d["stable"]),
            previous_stable=[AdapterVersion.of(v) for v in d.get("previous_stable", [])],
            canary=AdapterVersion.of(d.get("canary")),
            canary_percent=d.get("canary_percent"),
            canary_replicas=list(d.get("canary_replicas", [])),
            operation=Operation.from_dict(d.get("operation")),
            history=list(d.get("history", [])),
            rejected=dict(d.get("rejected", {})),
            validated=dict(d.get("validated", {})),
            initial_adapter=d.get("initial_adapter"),
            rebalance_blocked=d.get("rebalance_blocked"),
            generation=int(d.get("generation", 0)),
            cluster=d.get("cluster"),
        )


class StateStore(Protocol):
    """Where the desired state lives. ``save`` raises :class:`StateConflictError` when fenced out."""

    def load(self) -> DesiredState | None: ...

    def save(self, state: DesiredState) -> None: ...

    def describe(self) -> str: ...


class FileStateStore:
    """State in a local JSON file, replaced atomically; fenced by a generation counter under ``flock``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._generation: int | None = None  # what this store last read or wrote; None: never looked

    def load(self) -> DesiredState | None:
        state = self._read()
        self._generation = state.generation if state else 0
        return state

    def _read(self) -> DesiredState | None:
        try:
            return DesiredState.from_json(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: DesiredState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._read()
            found = current.generation if current else 0
            if self._generation is None:
                self._generation = found
            if found != self._generation:
                raise StateConflictError(
                    f"state file {self.path} was written by another controller (generation {found}, this controller "
                    f"last saw {self._generation}); this controller stops serving operations"
                )
            state.generation = self._generation + 1
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "w") as f:
                f.write(state.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._generation = state.generation

    def describe(self) -> str:
        return str(self.path)


class S3StateStore:
    """State in one S3 object (``s3://bucket/key``), written with conditional PUTs on its ETag."""

    def __init__(self, uri: str, client: Any) -> None:
        parsed = urlparse(uri)
        self.uri, self.bucket, self.key, self.client = uri, parsed.netloc, parsed.path.lstrip("/"), client
        self._etag: str | None = None  # the ETag this store last read or wrote
        self._generation = 0  # ... and the generation in it
        self._looked = False
        self._unclear: bytes | None = None  # a write that may have landed: nobody could tell (settled first)

    def load(self) -> DesiredState | None:
        from botocore.exceptions import ClientError

        self._looked = True
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                self._etag, self._generation = None, 0
                return None
            raise
        self._etag = response["ETag"]
        state = DesiredState.from_json(response["Body"].read().decode())
        self._generation = state.generation
        return state

    def save(self, state: DesiredState) -> None:
        from botocore.exceptions import ClientError

        if not self._looked:
            self.load()
        if self._unclear is not None:
            self._settle()
        # always a new generation, so the body (and its ETag) differs from every earlier write
        state.generation = self._generation + 1
        condition = {"IfMatch": self._etag} if self._etag else {"IfNoneMatch": "*"}
        body = state.to_json().encode()
        try:
            response = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)
        except Exception as e:  # noqa: BLE001 - refused, or unknown whether it landed: look at the object
            landed = self._landed(body)
            if landed:  # the PUT landed and only its answer was lost (or retried into a 412)
                return
            if landed is None and not (isinstance(e, ClientError) and _refused(e)):
                self._unclear = body  # the next save looks first: otherwise its conditional PUT is refused
                logger.warning("state object %s: could not tell whether a write landed (%s); the next save "
                               "settles it", self.uri, e)
                raise SaveOutcomeUnknown(f"state object {self.uri}: {type(e).__name__}: {e}") from e
            if isinstance(e, ClientError) and _refused(e):
                raise StateConflictError(
                    f"state object {self.uri} was written by another controller since this one last read it "
                    f"(conditional write refused); this controller stops serving operations"
                ) from e
            raise
        self._etag, self._generation = response["ETag"], state.generation

    @property
    def unclear(self) -> bool:
        """A write may have landed and nobody could tell: the persisted state may differ from the last one saved
        (the controller saves its state again as soon as it can, which settles it)."""
        return self._unclear is not None

    def _settle(self) -> None:
        """Before the next write: if the unclear write did land, adopt its ETag (raises while S3 cannot tell)."""
        from botocore.exceptions import ClientError

        try:
            landed = self._landed(self._unclear, quiet=False)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise
            landed = False  # no object: the unclear write (a first one, or one after a deletion) did not land
        if landed:
            logger.info("state object %s: the unclear write had landed; its ETag adopted", self.uri)
        self._unclear = None  # not landed: the ETag from before is still ours (a refusal is a real conflict)

    def _landed(self, body: bytes, *, quiet: bool = True) -> bool | None:
        """Whether the object now holds exactly ``body`` (then adopt its ETag as ours); None when it cannot be read
        (``quiet``; else the read's error is raised)."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
            if response["Body"].read() != body:
                return False
        except Exception as e:  # noqa: BLE001 - cannot tell, unless there is no object at all
            if not quiet:
                raise
            if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return False  # nothing there: the write did not land
            return None
        self._etag = response["ETag"]
        self._generation = DesiredState.from_json(body.decode()).generation
        return True

    def describe(self) -> str:
        return self.uri


def _refused(error) -> bool:
    code = error.response.get("Error", {}).get("Code")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def state_store_for(settings, app_name: str) -> StateStore:
    """``settings.state_uri`` (``s3://bucket/key`` or a path), else ``<cache_dir>/state/<app>.json``."""
    uri = settings.state_uri
    if uri and uri.startswith("s3://"):
        from hotswap.store import make_s3_client

        client = make_s3_client(connect_timeout_s=settings.s3_connect_timeout_s,
                                read_timeout_s=settings.s3_read_timeout_s, endpoint_url=settings.s3_endpoint_url)
        return S3StateStore(uri, client)
    path = Path(uri.removeprefix("file://")) if uri else settings.cache_dir / "state" / f"{app_name}.json"
    return FileStateStore(path)

