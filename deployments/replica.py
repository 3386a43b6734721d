"""The model replica: one compiled, hotswap-prepared engine per Ray Serve replica.

The constructor builds and warms up the engine, registers with the application's
controller and applies the adapter the controller assigns (from the staged tensors in the
object store, never from S3), smoke-checks it and acks, all before Serve routes traffic to
it: a replica that starts late (crash, autoscaling) never serves a stale version. Then a
background task long-polls the controller (each poll is also its heartbeat) and applies each
new assignment: drain, swap and smoke check under one hold of the engine's swap lock (no request
runs on an unchecked adapter), heartbeating meanwhile, then report. A failed smoke check restores
the previous adapter; a failed restore takes the replica out of rotation (its health check
fails, so Serve replaces it and the replacement starts on its assignment).

Non-streaming requests are batched with ``@serve.batch``; a streaming request runs alone,
holding the engine's request lock from its first token to its last, like any batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve

from hotswap.errors import RequestError
from hotswap.generation import SamplingParams
from hotswap.messages import Assignment, ReplicaPhase, ReplicaReport
from hotswap.settings import HotswapSettings
from hotswap.versions import AdapterVersion

__all__ = ["ModelReplica", "ReplicaMetrics"]

logger = logging.getLogger(__name__)

_RETRY_S = 10.0  # a replica asks again for a steady-state assignment it failed to apply, this long after
_LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]


class ReplicaMetrics:
    """Per adapter version: requests, errors, generated tokens, latency (Ray's Prometheus endpoint adds ``ray_``)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        tags = ("adapter_uri", "adapter_sha256")
        self.requests = metrics.Counter(
            "hotswap_requests_total", description="Completions served, by adapter version.", tag_keys=tags
        )
        self.errors = metrics.Counter(
            "hotswap_request_errors_total",
            description="Completions that failed, by adapter version and kind (invalid, internal).",
            tag_keys=(*tags, "kind"),
        )
        self.tokens = metrics.Counter(
            "hotswap_generated_tokens_total", description="Completion tokens generated, by adapter version.",
            tag_keys=tags,
        )
        self.latency_ms = metrics.Histogram(
            "hotswap_request_latency_ms",
            description="Time from a request reaching the replica to its last token, by adapter version.",
            boundaries=_LATENCY_BOUNDARIES_MS,
            tag_keys=tags,
        )

    def record(self, identity, *, tokens: int, latency_ms: float) -> None:
        tags = {"adapter_uri": identity.uri, "adapter_sha256": identity.sha256[:12]}
        self.requests.inc(tags=tags)
        if tokens:
            self.tokens.inc(tokens, tags=tags)
        self.latency_ms.observe(latency_ms, tags=tags)

    def error(self, identity, kind: str) -> None:
        self.errors.inc(tags={"adapter_uri": identity.uri, "adapter_sha256": identity.sha256[:12], "kind": kind})


@dataclass(frozen=True)
class _Job:
    token_ids: list[int]
    params: SamplingParams
    received: float


def _params(request: dict) -> SamplingParams:
    stop = request.get("stop") or ()
    return SamplingParams(
        max_tokens=request.get("max_tokens", 16),
        temperature=request.get("temperature", 1.0),
        top_p=request.get("top_p", 1.0),
        seed=request.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )


def _internal(incident: str) -> dict:
    """A 500 body: no exception text for an unauthenticated client; the replica's log has it under ``incident``."""
    return _error(f"internal error while generating (incident {incident}; the replica's log has the details); "
                  "retry", 500)


def _error(message: str, status: int = 400) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"},
            "status": status}


@serve.deployment(
    name="ModelReplica",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
    health_check_period_s=10,
    health_check_timeout_s=60,
)
class ModelReplica:
    """Serves completions from one engine; exposes what it runs for the controller and for tests."""

    async def __init__(self, settings: HotswapSettings) -> None:
        from hotswap.controller import get_or_create_controller
        from hotswap.engine import SwapEngine

        started = time.perf_counter()
        self.settings = settings
        self.last_drain_ms: float | None = None  # the last swap's wait for the batch in flight
        self.last_smoke_ms: float | None = None  # ... and its smoke check
        self.phase = ReplicaPhase.IDLE
        self._failed: tuple[AdapterVersion, str, str, float] | None = None  # version, token, why, when
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self.engine = await asyncio.to_thread(SwapEngine.build, settings)
        self.dtype = str(self.engine.dtype).removeprefix("torch.")
        self.metrics = ReplicaMetrics()
        self._batched.set_max_batch_size(settings.max_batch_size)
        self.controller = get_or_create_controller(settings, self.app_name)
        assignment = await self._register()
        await self._apply(assignment)
        if self.engine.identity != assignment.version:
            raise RuntimeError(f"replica {self.replica_id} could not start on its assigned adapter "
                               f"{assignment.version.short()}: {self._failed and self._failed[2]}")
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        logger.info(
            "replica %s ready in %.1f s on %s (sha256 %s), %d compiled graphs",
            self.replica_id, time.perf_counter() - started, self.engine.identity.uri,
            self.engine.identity.sha256[:12], self.engine.compiled_graphs,
        )

    async def _register(self) -> Assignment:
        """Register with the controller; while it is not ready (its initial adapter missing, S3 down) wait and
        retry, saying what it waits for: the replica starts once the controller can answer."""
        from hotswap.errors import unwrap

        while True:
            try:
                return await self.controller.register.remote(self._report())
            except Exception as e:  # noqa: BLE001 - retried; the log says why
                logger.warning("replica %s waits for its controller: %s", self.replica_id, unwrap(e))
                await asyncio.sleep(1.0)

    def _report(self) -> ReplicaReport:
        failed = self._failed
        if failed is not None and not failed[1] and time.monotonic() - failed[3] > _RETRY_S:
            self._failed = failed = None  # a failed steady-state assignment is asked for again after a while
        return ReplicaReport(
            self.replica_id, self.engine.identity, self.phase,
            failed=failed[0] if failed else None, failure=failed[2] if failed else None,
            failed_token=failed[1] if failed else "", dtype=self.dtype,
            settings_fingerprint=self.settings.fingerprint, stats=self.stats(),
        )

    async def _watch(self) -> None:
        """Long-poll the controller for a new assignment; survive controller restarts."""
        from hotswap.errors import unwrap

        while True:
            try:
                assignment = await self.controller.watch.remote(self._report())
                if assignment is not None:
                    await self._apply(assignment)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # controller restarting or unreachable: keep serving, retry
                logger.warning("replica %s cannot reach the controller (%s); retrying", self.replica_id,
                               type(unwrap(e)).__name__)
                await asyncio.sleep(0.5)

    async def _apply(self, assignment: Assignment) -> None:
        """Swap to the assigned version (if not already on it) with the smoke check, heartbeating meanwhile;
        then report what it runs."""
        from hotswap.controller import describe_error
        from hotswap.engine import RestoreError

        version = assignment.version
        if self.engine.identity != version:
            self.phase = ReplicaPhase.SWAPPING
            beats = asyncio.get_running_loop().create_task(self._heartbeat_while_busy())
            try:
                ref = assignment.staged[0] if assignment.staged else None
                staged = await ref if ref is not None else None
                await asyncio.to_thread(self._swap_and_check, staged)
                self._failed = None
                self.phase = ReplicaPhase.IDLE
            except Exception as e:  # noqa: BLE001 - reported to the controller, which reverts the rollout
                message = describe_error(e)
                self._failed = (version, assignment.token, message, time.monotonic())
                self.phase = ReplicaPhase.FAILED if isinstance(e, RestoreError) else ReplicaPhase.IDLE
                logger.error("replica %s could not apply %s: %s", self.replica_id, version.short(), message)
            finally:
                beats.cancel()
        try:
            await self.controller.heartbeat.remote(self._report())
        except Exception as e:  # noqa: BLE001 - the next watch reports it again
            logger.warning("replica %s could not report to the controller: %s", self.replica_id, e)

    async def _heartbeat_while_busy(self) -> None:
        """While draining and swapping, tell the controller this replica is alive (and busy)."""
        while True:  # at once (the poll that brought the assignment may be a watch timeout ago), then regularly
            try:
                await self.controller.heartbeat.remote(self._report())
            except Exception:  # noqa: BLE001 - best effort
                pass
            await asyncio.sleep(self.settings.watch_timeout_s / 2)

    def _swap_and_check(self, staged) -> float:
        """Drain, swap and smoke-check under one hold of the swap lock; a failed check restores the previous
        adapter before any request runs on the new one."""
        timings = self.engine.swap_checked(staged, check=self._smoke_check, timeout_s=self.settings.swap_timeout_s)
        self.last_drain_ms, self.last_smoke_ms = timings.drain_ms, timings.smoke_ms
        return timings.drain_ms + timings.swap_ms + timings.smoke_ms

    def _smoke_check(self) -> None:
        """A short greedy generation with finite logits, run with the swap lock held (a seam: tests override
        it to inject a failure)."""
        self.engine.smoke_check_unlocked()

    def _prepare(self, request: dict) -> _Job:
        params = _params(request)
        ids = self.engine.generator.encode(request["prompt"])
        self.engine.generator.check(len(ids), params)
        return _Job(ids, params, time.perf_counter())

    async def complete(self, request: dict) -> dict:
        """One completion: ``{"text", "finish_reason", "prompt_tokens", "completion_tokens", adapter...}`` or
        ``{"error": ..., "status": 4xx}``."""
        try:
            job = await asyncio.to_thread(self._prepare, request)  # a 1 MB prompt tokenizes for ~1 s: not here
        except RequestError as e:
            self.metrics.error(self.engine.identity, "invalid")
            return _error(str(e))
        return await self._batched(job)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def _batched(self, jobs: list[_Job]) -> list[dict]:
        try:
            completions, identity = await asyncio.to_thread(
                self.engine.generate, [j.token_ids for j in jobs], [j.params for j in jobs]
            )
        except Exception as e:  # the batch failed as a whole: answer every request in it
            incident = uuid.uuid4().hex[:8]
            logger.exception("batch of %d failed (incident %s): %s", len(jobs), incident, e)
            for _ in jobs:
                self.metrics.error(self.engine.identity, "internal")
            return [_internal(incident) for _ in jobs]
        done = time.perf_counter()
        out = []
        for job, c in zip(jobs, completions):
            self.metrics.record(identity, tokens=c.completion_tokens, latency_ms=(done - job.received) * 1e3)
            out.append({
                "text": c.text,
                "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                **identity.as_dict(),
                "replica_id": self.replica_id,
            })
        return out

    async def stream(self, request: dict) -> AsyncIterator[dict]:
        """Yield the adapter identity first, then ``{"delta", "finish_reason"}`` items; or one error item."""
        try:
            job = await asyncio.to_thread(self._prepare, request)
        except RequestError as e:
            self.metrics.error(self.engine.identity, "invalid")
            yield _error(str(e))
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                with self.engine.stream([job.token_ids], [job.params]) as (events, identity):
                    loop.call_soon_threadsafe(queue.put_nowait, ("identity", identity))
                    tokens = 0
                    for event in events:
                        tokens += 1
                        loop.call_soon_threadsafe(queue.put_nowait, ("event", event))
                        if cancelled.is_set():
                            break
                    self.metrics.record(identity, tokens=tokens, latency_ms=(time.perf_counter() - job.received) * 1e3)
            except Exception as e:  # surfaced to the client as an error item
                logger.exception("stream failed")
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

        worker = threading.Thread(target=produce, name="hotswap-stream", daemon=True)
        worker.start()
        try:
            while True:
                kind, item = await queue.get()
                if kind == "identity":
                    yield {**item.as_dict(), "replica_id": self.replica_id}
                elif kind == "event":
                    yield {"delta": item.delta, "finish_reason": item.finish_reason}
                elif kind == "error":
                    incident = uuid.uuid4().hex[:8]
                    logger.error("stream failed (incident %s): %s", incident, item)
                    yield _internal(incident)
                else:
                    return
        finally:
            cancelled.set()  # the client went away: stop decoding and release the lock

    def stats(self) -> dict:
        """What this replica runs: the fields of ``hotswap status`` for one replica."""
        s = self.engine.stats()
        return {
            "id": self.replica_id,
            **s.adapter.as_dict(),
            "swaps": s.swaps,
            "last_swap_ms": s.last_swap_ms,
            "last_drain_ms": self.last_drain_ms,
            "last_smoke_ms": self.last_smoke_ms,
            "phase": self.phase.value,
            "compiled_graphs": s.compiled_graphs,
            "pid": os.getpid(),
        }

    def ping(self) -> str:
        return self.replica_id

    def check_health(self) -> None:
        if self.phase == ReplicaPhase.FAILED:  # out of rotation: Serve replaces it, the new one converges
            raise RuntimeError(f"replica {self.replica_id} could not restore its adapter after a failed swap: "
                               f"{self._failed and self._failed[2]}")
        if self._watcher.done() and not self._watcher.cancelled():
            raise RuntimeError(f"the controller watch task stopped: {self._watcher.exception()!r}")
