"""The model replica: one compiled, hotswap-prepared engine per Ray Serve replica.

The constructor builds and warms up the engine, registers with the application's
controller and applies the adapter the controller assigns (from the staged tensors in the
object store, never from S3), smoke-checks it and acks, all before Serve routes traffic to
it: a replica that starts late (crash, autoscaling) never serves a stale version. Then a
background task long-polls the controller (each poll is also its heartbeat) and applies each
new assignment: load, smoke check, then activate (no request runs on an unchecked adapter),
heartbeating meanwhile, then report. A failed smoke check restores
the previous adapter; a failed restore takes the replica out of rotation (its health check
fails, so Serve replaces it and the replacement starts on its assignment).

Requests, streaming or not, go to the engine's scheduler (:mod:`hotswap.scheduler`): each joins a
free row of the running batch at the next step and leaves it when done, so a short request
never waits for a long one; a client that goes away frees its row at the next step. When the
admission queue (``max_queued_requests``) is full the answer is a 429 with ``Retry-After``.
A swap loads the slot no request reads (``adapter_slots: 2``), checks it with requests pinned
to it, then admits new requests to it: nothing drains (``last_drain_ms`` is 0).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve

from hotswap.errors import RequestError, SwapError
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
            description="Completions that failed, by adapter version and kind (invalid, overloaded, internal).",
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
class _Job:  # a tokenized, checked request
    token_ids: list[int]
    params: SamplingParams
    received: float


def _params(request: dict) -> SamplingParams:
    """The request's sampling fields as they came (the engine's checker refuses wrong types, naming the field)."""
    stop = request.get("stop") or ()
    if not isinstance(stop, (str, list, tuple)):
        raise RequestError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}")
    return SamplingParams(
        max_tokens=request.get("max_tokens", 16),
        temperature=request.get("temperature", 1.0),
        top_p=request.get("top_p", 1.0),
        seed=request.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        ignore_eos=request.get("ignore_eos", False),
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
        self._mailbox = None  # scheduler events to this replica's event loop (built on it, at the first request)
        self._reports = (time.time_ns(), itertools.count(1))  # numbers this replica's reports (ReplicaReport.seq)
        self._failed: tuple[AdapterVersion, str, str, float] | None = None  # version, token, why, when
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self.engine = await asyncio.to_thread(SwapEngine.build, settings)
        self.dtype = str(self.engine.dtype).removeprefix("torch.")
        self.metrics = ReplicaMetrics()
        # a GCS look-up that blocks: off the event loop, which is Serve's own (deployments.app SERVE_FAST_PATH_ENV)
        self.controller = await asyncio.to_thread(get_or_create_controller, settings, self.app_name)
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
            seq=(self._reports[0], next(self._reports[1])),
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
        """Load the idle slot, smoke-check it there, then admit new requests to it; rows in flight finish on the
        slot they started on. A failed check leaves the active slot serving."""
        timings = self.engine.swap_checked(staged, check=self._smoke_check, timeout_s=self.settings.swap_timeout_s)
        self.last_drain_ms, self.last_smoke_ms = timings.drain_ms, timings.smoke_ms
        return timings.drain_ms + timings.swap_ms + timings.smoke_ms

    def _smoke_check(self, slot: int, *, timeout_s: float | None = None) -> None:
        """A short greedy generation with finite logits on ``slot``, before any request joins it, within what is
        left of ``swap_timeout_s`` (a seam: tests override it to inject a failure)."""
        self.engine.smoke_check(slot, timeout_s=timeout_s)

    def _prepare(self, request: dict) -> _Job:
        params = _params(request)
        ids = self.engine.encode(request["prompt"])
        self.engine.check(len(ids), params)
        return _Job(ids, params, time.perf_counter())

    async def _submit(self, request: dict, queue, *, tokens: bool = True):
        """Tokenize off the event loop and queue the request; events arrive on ``queue`` (an ``asyncio.Queue`` or a
        stream's :class:`~hotswap.streaming.Inbox`; without the token events if not ``tokens``). Returns the
        ticket, or the error dict to answer with."""
        from hotswap.errors import OverloadedError
        from hotswap.generation import TokenEvent
        from hotswap.streaming import LoopMailbox

        try:
            job = await asyncio.to_thread(self._prepare, request)  # a 1 MB prompt tokenizes for ~1 s: not here
        except (RequestError, TypeError, ValueError, KeyError, AttributeError) as e:  # a direct call: any JSON
            self.metrics.error(self.engine.identity, "invalid")
            return None, _error(str(e))
        loop = asyncio.get_running_loop()
        mailbox = self._mailbox
        if mailbox is None or mailbox.loop is not loop:
            self._mailbox = mailbox = LoopMailbox(loop)
        on_event = mailbox.sender(queue, keep=None if tokens else lambda e: not isinstance(e, TokenEvent))
        try:
            ticket = self.engine.submit(job.token_ids, job.params, on_event=on_event)
        except OverloadedError as e:
            self.metrics.error(self.engine.identity, "overloaded")
            return None, {**_error(str(e), 429), "retry_after_s": e.retry_after_s}
        except RequestError as e:
            self.metrics.error(self.engine.identity, "invalid")
            return None, _error(str(e))
        except SwapError as e:  # the engine stopped: the health check takes this replica out
            self.metrics.error(self.engine.identity, "internal")
            return None, _error(f"this replica cannot serve: {e}", 503)
        return (ticket, job), None

    def _internal_error(self, version, error: BaseException) -> dict:
        incident = uuid.uuid4().hex[:8]
        logger.error("request failed (incident %s): %r", incident, error)
        self.metrics.error(version or self.engine.identity, "internal")
        return _internal(incident)

    def _record(self, job: _Job, completion) -> None:
        self.metrics.record(completion.version, tokens=completion.completion_tokens,
                            latency_ms=(time.perf_counter() - job.received) * 1e3)

    async def complete(self, request: dict) -> dict:
        """One completion: ``{"text", "finish_reason", "prompt_tokens", "completion_tokens", adapter...}`` or
        ``{"error": ..., "status": 4xx}``. It joins the replica's running batch at the next step."""
        from hotswap.scheduler import Failed, Finished, Started

        queue: asyncio.Queue = asyncio.Queue()
        submitted, refusal = await self._submit(request, queue, tokens=False)
        if refusal is not None:
            return refusal
        ticket, job = submitted
        version = None
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Started):
                    version = event.version
                elif isinstance(event, Failed):
                    return self._internal_error(version, event.error)
                elif isinstance(event, Finished):
                    c = event.completion
                    self._record(job, c)
                    return {
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                        "prompt_tokens": c.prompt_tokens,
                        "completion_tokens": c.completion_tokens,
                        **c.version.as_dict(),
                        "replica_id": self.replica_id,
                    }
        finally:
            ticket.cancel()  # the caller went away (or it finished): its row is freed at the next step

    async def stream(self, request: dict) -> AsyncIterator[dict]:
        """Yield the adapter identity (and ``replica_id``) when the request joins a row, with the first text when it
        comes within ``stream_interval_ms`` (``delta``, ``finish_reason``), then ``{"delta", "finish_reason"}`` items
        (the tokens of up to ``stream_interval_ms`` each); or one error item. The stream shares the running batch
        with every other request; a client that goes away frees its row."""
        from hotswap.generation import TokenEvent
        from hotswap.scheduler import Failed, Finished, Started
        from hotswap.streaming import Inbox, WithText, coalesced

        inbox = Inbox()
        submitted, refusal = await self._submit(request, inbox)
        if refusal is not None:
            yield refusal
            return
        ticket, job = submitted
        version = None
        events = coalesced(inbox, self.settings.stream_interval_ms / 1e3, opening=(Started,))
        try:
            async for event in events:
                if isinstance(event, WithText):  # the version and the first text, one item
                    version, text = event.event.version, event.text
                    item = {**version.as_dict(), "replica_id": self.replica_id}
                elif isinstance(event, Started):  # no text within the interval: the headers go out now
                    version = event.version
                    yield {**version.as_dict(), "replica_id": self.replica_id}
                    continue
                elif isinstance(event, TokenEvent):
                    text, item = event, {}
                elif isinstance(event, Failed):
                    yield self._internal_error(version, event.error)
                    return
                elif isinstance(event, Finished):  # the last text takes it first (below): only a safeguard
                    self._record(job, event.completion)
                    return
                else:  # no other event reaches a stream (it asks for no logits)
                    continue
                item.update(delta=text.delta, finish_reason=text.finish_reason)
                if text.finish_reason is not None:
                    # the scheduler delivers Finished with the last token: it is counted before the last item goes,
                    # so the ingress can end the response on that item without waiting for this generator's end
                    finished = await anext(events)
                    if isinstance(finished, Finished):
                        self._record(job, finished.completion)
                    else:  # the scheduler broke its order: say so rather than lose the request's metrics quietly
                        logger.error("stream: %r came after the last token instead of Finished; this request is "
                                     "not in the replica's metrics", finished)
                    yield item
                    return
                yield item
        finally:
            ticket.cancel()
            await events.aclose()

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
            "slots": list(s.slots),
            "rows_in_flight": self.engine.scheduler.in_flight(),
            "queued": self.engine.scheduler.queued(),
            "step_stats": self.engine.scheduler.step_stats().as_dict(),  # cumulative; a window is two readings apart
            "pid": os.getpid(),
        }

    def ping(self) -> str:
        return self.replica_id

    def check_health(self) -> None:
        if self.phase == ReplicaPhase.FAILED:  # out of rotation: Serve replaces it, the new one converges
            raise RuntimeError(f"replica {self.replica_id} could not restore its adapter after a failed swap: "
                               f"{self._failed and self._failed[2]}")
        if not self.engine.scheduler.alive:
            raise RuntimeError(f"the replica's scheduler stopped: {self.engine.scheduler.dead!r}")
        if self._watcher.done() and not self._watcher.cancelled():
            raise RuntimeError(f"the controller watch task stopped: {self._watcher.exception()!r}")
