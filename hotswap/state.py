"""The controller's persisted state, and where it is kept (a local file by default, an S3 object if configured).

The state is the single source of truth for which adapter each replica should run. It is
written (atomically) after every change, before the change is acted on, so a restarted
controller resumes a rollout without swapping any replica twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

__all__ = ["ControllerState", "FileStateStore", "Rollout", "S3StateStore", "StateStore", "Version", "state_store_for"]


@dataclass(frozen=True)
class Version:
    """An adapter version: its URI and the sha256 of its weights (``base`` with no sha: LoRA all zero)."""

    uri: str
    sha256: str

    @classmethod
    def of(cls, data: dict | None) -> Version | None:
        return None if data is None else cls(data["uri"], data["sha256"])

    def short(self) -> str:
        return f"{self.uri} ({self.sha256[:12]})" if self.sha256 else self.uri


BASE = Version("base", "")


@dataclass
class Rollout:
    """A rollout in progress: ``targets`` move to ``version`` in order; ``done`` have acked it."""

    id: str
    kind: str  # roll | canary | promote | rollback
    version: Version
    targets: list[str]
    previous: dict[str, Version]
    done: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    events: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = asdict(self.version)
        d["previous"] = {k: asdict(v) for k, v in self.previous.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> Rollout | None:
        if d is None:
            return None
        return cls(
            id=d["id"], kind=d["kind"], version=Version.of(d["version"]), targets=list(d["targets"]),
            previous={k: Version.of(v) for k, v in d["previous"].items()}, done=list(d["done"]),
            started=d["started"], events=list(d.get("events", [])),
        )


@dataclass
class ControllerState:
    stable: Version = BASE
    previous_stable: list[Version] = field(default_factory=list)  # for rollback, most recent last
    canary: Version | None = None
    canary_replicas: list[str] = field(default_factory=list)
    assignments: dict[str, Version] = field(default_factory=dict)
    rollout: Rollout | None = None
    history: list[dict] = field(default_factory=list)
    rejected: dict[str, dict] = field(default_factory=dict)  # sha256 or uri -> {uri, problems, time}
    validated: dict[str, dict] = field(default_factory=dict)  # "<sha256>@<uri>" -> {uri, rank, ...}
    initial_adapter: str | None = None  # what the stable version was first taken from

    def to_json(self) -> str:
        return json.dumps(
            {
                "stable": asdict(self.stable),
                "previous_stable": [asdict(v) for v in self.previous_stable],
                "canary": asdict(self.canary) if self.canary else None,
                "canary_replicas": self.canary_replicas,
                "assignments": {k: asdict(v) for k, v in self.assignments.items()},
                "rollout": self.rollout.to_dict() if self.rollout else None,
                "history": self.history[-200:],
                "rejected": self.rejected,
                "validated": self.validated,
                "initial_adapter": self.initial_adapter,
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str) -> ControllerState:
        d = json.loads(raw)
        return cls(
            stable=Version.of(d["stable"]),
            previous_stable=[Version.of(v) for v in d.get("previous_stable", [])],
            canary=Version.of(d.get("canary")),
            canary_replicas=list(d.get("canary_replicas", [])),
            assignments={k: Version.of(v) for k, v in d.get("assignments", {}).items()},
            rollout=Rollout.from_dict(d.get("rollout")),
            history=list(d.get("history", [])),
            rejected=dict(d.get("rejected", {})),
            validated=dict(d.get("validated", {})),
            initial_adapter=d.get("initial_adapter"),
        )


class StateStore(Protocol):
    def load(self) -> ControllerState | None: ...

    def save(self, state: ControllerState) -> None: ...

    def describe(self) -> str: ...


class FileStateStore:
    """State in a local JSON file, replaced atomically on every save."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> ControllerState | None:
        try:
            return ControllerState.from_json(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: ControllerState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def describe(self) -> str:
        return str(self.path)


class S3StateStore:
    """State in one S3 object (``s3://bucket/key``); S3 PUTs are atomic per object."""

    def __init__(self, uri: str, client: Any) -> None:
        parsed = urlparse(uri)
        self.uri, self.bucket, self.key, self.client = uri, parsed.netloc, parsed.path.lstrip("/"), client

    def load(self) -> ControllerState | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return ControllerState.from_json(body.decode())

    def save(self, state: ControllerState) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key, Body=state.to_json().encode())

    def describe(self) -> str:
        return self.uri


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
