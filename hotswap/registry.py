"""The replica registry: who is out there, what each one last said, and whether it is still alive.

Pure bookkeeping with an injected clock (``now`` in seconds): no Ray, no I/O. It is not
persisted: replicas long-poll their controller, so a restarted controller hears from every
live replica within one watch timeout. Until it has run for ``settle_s`` (a little more than
that timeout) it therefore treats nobody it has not heard from as gone (:meth:`settled`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hotswap.messages import ReplicaPhase, ReplicaReport
from hotswap.versions import AdapterVersion

__all__ = ["ReplicaRegistry", "ReplicaSeen"]


@dataclass
class ReplicaSeen:
    report: ReplicaReport
    last_seen: float
    first_seen: float
    # the last assignment handed to it, and the seq of the report its watch (or register) carried: until a newer
    # report comes, the replica may be about to apply it, whatever its reports say
    handed: tuple[AdapterVersion, tuple[int, int]] | None = None


class ReplicaRegistry:
    """Replicas by id, with their last report; ``liveness_s`` without a report makes one gone."""

    def __init__(self, *, liveness_s: float, forget_after_s: float, settle_s: float, started: float) -> None:
        self.liveness_s = liveness_s
        self.settle_s = min(settle_s, liveness_s)
        self.forget_after_s = forget_after_s  # a gone replica is dropped from status this long after it went
        self.started = started
        self._seen: dict[str, ReplicaSeen] = {}

    def heard(self, report: ReplicaReport, now: float) -> bool:
        """Record a report; True when the replica was not known before. A report older (``seq``) than the last one
        heard from the replica arrived late and is ignored: it was sent before the one already heard, so it says
        nothing newer, not even that the replica is still alive (a late report from a replica that died since must
        not bring it back)."""
        seen = self._seen.get(report.replica_id)
        if seen is None:
            self._seen[report.replica_id] = ReplicaSeen(report, now, now)
            return True
        if report.seq >= seen.report.seq:
            seen.report, seen.last_seen = report, now
        return False

    def hand(self, replica_id: str, version: AdapterVersion, seq: tuple[int, int]) -> None:
        """The controller answered a watch (or register) that carried the report numbered ``seq`` with ``version``."""
        seen = self._seen.get(replica_id)
        if seen is not None:
            seen.handed = (version, seq)

    def in_flight(self, replica_id: str) -> AdapterVersion | None:
        """The version last handed to ``replica_id`` if no report sent after it received it has been heard yet (it
        may still be on its way to the replica, or about to be applied); else ``None``. A replica that numbers no
        reports (seq (0, 0), an older release) is never judged to have one in flight."""
        seen = self._seen.get(replica_id)
        if seen is None or seen.handed is None:
            return None
        version, seq = seen.handed
        if seq == (0, 0) or seen.report.seq > seq:
            return None
        return version

    def grace(self, now: float) -> None:
        """Judge nobody gone for a while from ``now``: the controller itself was not listening (a stall)."""
        self.started = now

    def settled(self, now: float) -> bool:
        """Whether liveness can be judged: every live replica has had time to report since start."""
        return now - self.started > self.settle_s

    def is_live(self, replica_id: str, now: float) -> bool:
        seen = self._seen.get(replica_id)
        return seen is not None and now - max(seen.last_seen, self.started) <= self.liveness_s

    def is_gone(self, replica_id: str, now: float) -> bool:
        """Not heard from for ``liveness_s`` (or never, once the registry has settled)."""
        seen = self._seen.get(replica_id)
        if seen is None:
            return self.settled(now)
        return now - max(seen.last_seen, self.started) > self.liveness_s

    def report(self, replica_id: str) -> ReplicaReport | None:
        seen = self._seen.get(replica_id)
        return seen.report if seen else None

    def live(self, now: float) -> list[str]:
        """Live replicas in the stable rolling order (sorted ids), failed ones included."""
        return sorted(r for r in self._seen if self.is_live(r, now))

    def serving(self, now: float) -> list[str]:
        """Live replicas that are not marked failed."""
        return [r for r in self.live(now) if self._seen[r].report.phase != ReplicaPhase.FAILED]

    def known(self) -> list[str]:
        return sorted(self._seen)

    def prune(self, now: float) -> list[str]:
        """Forget replicas gone for longer than ``forget_after_s`` past their liveness; return their ids."""
        horizon = self.liveness_s + self.forget_after_s
        dead = [r for r, s in self._seen.items() if now - max(s.last_seen, self.started) > horizon]
        for r in dead:
            del self._seen[r]
        return dead

    def seen(self, replica_id: str) -> ReplicaSeen | None:
        return self._seen.get(replica_id)
