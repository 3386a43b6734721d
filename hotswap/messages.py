"""The typed messages between a replica and its controller, and the enums of the rollout state machine.

They cross process boundaries (Ray pickles them), so they are small frozen dataclasses of
plain values: a replica sends a :class:`ReplicaReport` when it registers, on every watch
(its heartbeat) and after every apply; the controller answers with an :class:`Assignment`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from hotswap.versions import AdapterVersion

__all__ = ["Assignment", "OpKind", "Outcome", "Phase", "ReplicaPhase", "ReplicaReport"]


class OpKind(str, enum.Enum):
    """What an operation does (its value is the word users see in ``status`` and ``history``)."""

    ROLL = "roll"  # every replica moves to a new version; it becomes stable
    CANARY = "canary"  # a share of the replicas moves to a new version
    PROMOTE = "promote"  # every replica moves to the canary; it becomes stable
    ROLLBACK = "rollback"  # canary replicas back to stable, or everyone back to the previous stable
    REBALANCE = "rebalance"  # upkeep: restore the canary's share after replicas came or went


class Phase(str, enum.Enum):
    FORWARD = "forward"  # moving targets to the operation's version, a batch at a time
    REVERT = "revert"  # putting every target it touched back on its previous version


class Outcome(str, enum.Enum):
    OK = "ok"
    REVERTED = "reverted"  # a replica failed; the replicas moved went back
    REJECTED = "rejected"  # the version failed validation (or its pin or signature); nothing moved
    PREEMPTED = "preempted"  # an upkeep rebalance stopped for a user's operation
    ABORTED = "aborted"  # the operation could not be saved or was superseded; nothing moved


class ReplicaPhase(str, enum.Enum):
    IDLE = "idle"
    SWAPPING = "swapping"  # draining / copying / smoke-checking: still alive, heartbeating
    FAILED = "failed"  # could not restore its previous adapter: out of rotation until it converges


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica says about itself: the version it runs, what it is doing, its stats for ``status``."""

    replica_id: str
    running: AdapterVersion
    phase: ReplicaPhase = ReplicaPhase.IDLE
    failed: AdapterVersion | None = None  # the last version it could not apply ...
    failure: str | None = None  # ... and why
    failed_token: str = ""  # the token of the assignment that failed (see Assignment.token)
    dtype: str = "float32"
    settings_fingerprint: str = ""
    stats: dict[str, Any] = field(default_factory=dict, compare=False)
    # orders one replica's reports: Ray may run an async actor's calls out of order, even calls from one caller (a
    # heartbeat sent while swapping can land after the ack that followed it); a report older than the last one heard
    # is ignored. (replica start in ns, count): Serve gives a restarted replica a new id anyway
    seq: tuple[int, int] = field(default=(0, 0), compare=False)


@dataclass(frozen=True)
class Assignment:
    """The version a replica must run, and where its staged tensors are (``None`` for the base model).

    ``staged`` holds the object-store ref inside a list so that Ray passes the ref itself rather than
    resolving it: the replica fetches the tensors only if it has to swap.
    """

    version: AdapterVersion
    staged: list[Any] | None = None
    token: str = ""  # echoed back in a failure report, so that it is matched to this assignment
