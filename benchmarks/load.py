"""Closed-loop HTTP load for the benchmarks and the reliability tests: N clients, each sends its next request
as soon as the previous one answers, and every answer is recorded (times, status, adapter, replica, text).
With ``stream=True`` each request asks for server-sent events (``"stream": true``) and the client reads every
chunk as it arrives; the sample also records when the first text came and how many chunks did. A streaming
client stops reading at ``data: [DONE]`` as openai-python's synchronous client (3.60) does, and httpx then
closes the connection (the end of the chunked body was not read yet): every stream opens a new one (its
``AsyncStream`` reads the rest and keeps the connection). With ``read_to_end=True`` it
reads each response to its end, so its connection is used again as a whole answer's is.

Bounded by count and time: :meth:`ClosedLoop.stop` ends it, and every client also stops after
``max_requests`` requests or ``max_seconds``, whichever comes first.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Sample:
    client: int
    started: float  # time.monotonic() when the request was sent
    finished: float  # ... and when its answer (or error) came back
    status: int  # HTTP status, or 0 when no answer came (connection error, timeout)
    prompt: str = ""
    adapter_sha256: str = ""
    replica_id: str = ""
    text: str = ""
    completion_tokens: int = 0  # from the answer's usage; streamed answers carry none (0)
    error: str = ""
    first_text: float | None = None  # streamed: time.monotonic() of the first chunk with text
    chunks: int = 0  # streamed: data chunks received (not counting [DONE])

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.started) * 1e3


class ClosedLoop:
    """``with ClosedLoop(url, clients=4, body=...) as load: ...; load.samples`` -- ``body(client, k)`` builds the
    JSON of client ``client``'s ``k``-th request (a ``prompt`` key is recorded with the sample)."""

    def __init__(self, url: str, *, clients: int, body: Callable[[int, int], dict], timeout_s: float = 120,
                 max_requests: int = 100_000, max_seconds: float = 900, stream: bool = False,
                 read_to_end: bool = False) -> None:
        self.url = url
        self.body = body
        self.stream = stream
        self.read_to_end = read_to_end
        self.timeout_s = timeout_s
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
                         for i in range(clients)]

    def __enter__(self) -> ClosedLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Sample]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)
        return self.samples

    def count(self) -> int:
        with self._lock:
            return len(self.samples)

    def wait_for(self, n: int, *, timeout_s: float = 120) -> None:
        """Block until ``n`` answers have been recorded in total (or raise after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while self.count() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.count()} of {n} requests answered in {timeout_s} s")
            time.sleep(0.02)

    def _client(self, i: int) -> None:
        started_all = time.monotonic()
        with httpx.Client(timeout=self.timeout_s) as http:
            for k in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() - started_all > self.max_seconds:
                    return
                body = self.body(i, k)
                t0 = time.monotonic()
                try:
                    if self.stream:
                        sample = _streamed(http, self.url, i, t0, {**body, "stream": True},
                                           read_to_end=self.read_to_end)
                    else:
                        r = http.post(self.url, json=body)
                        sample = _sample(i, t0, time.monotonic(), r, body)
                except httpx.HTTPError as e:
                    sample = Sample(i, t0, time.monotonic(), 0, prompt=str(body.get("prompt", "")),
                                    error=f"{type(e).__name__}: {e}")
                with self._lock:
                    self.samples.append(sample)


def _sample(client: int, t0: float, t1: float, r: httpx.Response, body: dict) -> Sample:
    prompt = str(body.get("prompt", ""))
    if r.status_code != 200:
        return Sample(client, t0, t1, r.status_code, prompt=prompt, error=r.text[:500])
    payload = r.json()
    return Sample(client, t0, t1, 200, prompt=prompt, adapter_sha256=r.headers.get("x-adapter-sha256", ""),
                  replica_id=r.headers.get("x-replica-id", ""), text=payload["choices"][0]["text"],
                  completion_tokens=payload.get("usage", {}).get("completion_tokens", 0))


def _streamed(http: httpx.Client, url: str, client: int, t0: float, body: dict, *, read_to_end: bool = False
              ) -> Sample:
    """One streamed completion, read chunk by chunk as the server sends it; at ``data: [DONE]`` the response is
    closed (so is its connection), or with ``read_to_end`` read to its end (the connection is used again)."""
    import json

    prompt = str(body.get("prompt", ""))
    with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            return Sample(client, t0, time.monotonic(), r.status_code, prompt=prompt, error=r.text[:500])
        text, chunks, first, error, done = [], 0, None, "", False
        for line in r.iter_lines():
            if done or not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                if not read_to_end:
                    break
                done = True
                continue
            chunks += 1
            chunk = json.loads(data)
            if "error" in chunk:
                error = str(chunk["error"])[:500]
                continue
            delta = chunk["choices"][0].get("text") or ""
            if delta and first is None:
                first = time.monotonic()
            text.append(delta)
        return Sample(client, t0, time.monotonic(), 200 if not error else 500, prompt=prompt,
                      adapter_sha256=r.headers.get("x-adapter-sha256", ""), replica_id="", text="".join(text),
                      error=error, first_text=first, chunks=chunks)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def latency_summary(samples: list[Sample]) -> dict:
    ok = [s.latency_ms for s in samples if s.ok]
    return {
        "requests": len(samples),
        "failed": sum(not s.ok for s in samples),
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "mean_ms": statistics.fmean(ok) if ok else None,
    }
