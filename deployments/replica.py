"""The model replica: one compiled, hotswap-prepared engine per Ray Serve replica.

The constructor builds and warms up the engine, registers with the application's
controller and applies the adapter the controller assigns (from the staged tensors in the
object store, never from S3), smoke-checks it and acks, all before Serve routes traffic to
it: a replica that starts late (crash, autoscaling) never serves a stale version. Then a
background task long-polls the controller and applies each new assignment: drain (the
engine's lock), swap, smoke check, ack; a failed smoke check restores the previous adapter.

Non-streaming requests are batched with ``@serve.batch``; a streaming request runs alone,
holding the engine's request lock from its first token to its last, like any batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve

from hotswap.errors import RequestError
from hotswap.generation import SamplingParams
from hotswap.settings import HotswapSettings

__all__ = ["ModelReplica", "ReplicaMetrics"]

logger = logging.getLogger(__name__)

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
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self.engine = await asyncio.to_thread(SwapEngine.build, settings)
        self.metrics = ReplicaMetrics()
        self._batched.set_max_batch_size(settings.max_batch_size)
        self.controller = get_or_create_controller(settings, self.app_name)
        dtype = str(self.engine.dtype).removeprefix("torch.")
        assignment = await self.controller.register.remote(self.replica_id, dtype, self.engine.spec.fingerprint,
                                                           self.stats())
        await self._apply(assignment)
        if self.engine.identity.sha256 != assignment["sha256"]:
            raise RuntimeError(f"replica {self.replica_id} could not start on its assigned adapter "
                               f"{assignment['uri']}; see the log above")
        self._watcher = asyncio.get_running_loop().create_task(self._watch(dtype))
        logger.info(
            "replica %s ready in %.1f s on %s (sha256 %s), %d compiled graphs",
            self.replica_id, time.perf_counter() - started, self.engine.identity.uri,
            self.engine.identity.sha256[:12], self.engine.compiled_graphs,
        )

    async def _watch(self, dtype: str) -> None:
        """Long-poll the controller for a new assignment; survive controller restarts."""
        while True:
            try:
                assignment = await self.controller.watch.remote(self.replica_id, dtype, self.stats())
                if assignment is not None:
                    await self._apply(assignment)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # controller restarting or unreachable: keep serving, retry
                logger.warning("replica %s cannot reach the controller (%s); retrying", self.replica_id,
                               type(e).__name__)
                await asyncio.sleep(0.5)

    async def _apply(self, assignment: dict) -> None:
        """Swap to the assigned version (if not already on it), smoke-check, and ack to the controller."""
        from hotswap.controller import describe_error

        version = {"uri": assignment["uri"], "sha256": assignment["sha256"]}
        ok, message = True, "already running it"
        if (self.engine.identity.uri, self.engine.identity.sha256) != (version["uri"], version["sha256"]):
            try:
                ref = assignment["staged"][0]
                staged = await ref if ref is not None else None
                swap_ms = await asyncio.to_thread(self._swap_and_check, staged)
                message = f"swapped in {swap_ms:.2f} ms"
            except Exception as e:
                ok, message = False, describe_error(e)
                logger.error("replica %s could not apply %s: %s", self.replica_id, version["uri"], message)
        await self.controller.ack.remote(self.replica_id, version, ok, message, self.stats())

    def _swap_and_check(self, staged) -> float:
        """Drain, swap, smoke-check; on a failed check put the previous adapter back and raise."""
        from hotswap.errors import SwapError

        previous = self.engine.current
        timeout_s = self.settings.swap_timeout_s
        started = time.perf_counter()
        if staged is None:
            self.engine.reset_to_base(timeout_s=timeout_s)
        else:
            self.engine.apply(staged, timeout_s=timeout_s)
        swapped = time.perf_counter()
        # the wait for the batch in flight: the apply's time minus the copy it measured itself
        self.last_drain_ms = max(0.0, (swapped - started) * 1e3 - (self.engine.last_swap_ms or 0.0))
        try:
            self._smoke_check()
            self.last_smoke_ms = (time.perf_counter() - swapped) * 1e3
        except Exception as e:
            if previous is None:
                self.engine.reset_to_base(timeout_s=timeout_s)
            else:
                self.engine.apply(previous, timeout_s=timeout_s)
            raise SwapError(f"smoke check failed on replica {self.replica_id}: {e}; previous adapter restored") from e
        return (time.perf_counter() - started) * 1e3

    def _smoke_check(self) -> None:
        """A short greedy generation with finite logits (a seam: tests override it to inject a failure)."""
        self.engine.smoke_check()

    def _prepare(self, request: dict) -> _Job:
        params = _params(request)
        ids = self.engine.generator.encode(request["prompt"])
        self.engine.generator.check(len(ids), params)
        return _Job(ids, params, time.perf_counter())

    async def complete(self, request: dict) -> dict:
        """One completion: ``{"text", "finish_reason", "prompt_tokens", "completion_tokens", adapter...}`` or
        ``{"error": ..., "status": 4xx}``."""
        try:
            job = self._prepare(request)
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
            logger.exception("batch of %d failed", len(jobs))
            for _ in jobs:
                self.metrics.error(self.engine.identity, "internal")
            return [_error(f"generation failed: {e}", 500) for _ in jobs]
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
            job = self._prepare(request)
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
                    yield _error(f"generation failed: {item}", 500)
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
            "compiled_graphs": s.compiled_graphs,
            "pid": os.getpid(),
        }

    def ping(self) -> str:
        return self.replica_id

    def check_health(self) -> None:
        if self._watcher.done() and not self._watcher.cancelled():
            raise RuntimeError(f"the controller watch task stopped: {self._watcher.exception()!r}")
