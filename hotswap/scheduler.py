"""The replica's scheduler: one thread owns the model and batches at the iteration level.

The batch has ``max_batch_size`` rows. A request waits in a bounded admission queue, joins a
free row before the next step and leaves it when it finishes (or its caller cancels it), so a
short request never waits for a long one. Each step is one of the two compiled shapes:

- a **prefill** chunk ``(max_batch_size, prefill_chunk_tokens)`` while any row is still reading its
  prompt (a prompt is left-padded to a multiple of the chunk so its last token ends a chunk and
  gives the first token's logits). The rows that are generating ride along: each puts its one
  token in the chunk's last column, whose logits every row gets back, so a prefill step is also a
  decode step for them (on this machine it cost 2.4x a decode step: alternating the two kinds, as
  this scheduler did before, paid for a decode step more per join and gave generating rows a token
  every other step while anyone joined);
- a **decode** step ``(max_batch_size, 1)`` when every row is generating.

Columns (and rows) that carry no token compute padding that writes to the cache's scratch slots
(:class:`~hotswap.generation.RowCache`), so no row's state is touched.

**Adapter slots.** The model carries ``adapter_slots`` (1 or 2) LoRA adapters, all active in one
compiled graph; each has two per-row tensors ``(max_batch_size, 1, 1)`` shared by all its layers
(:class:`SlotSelector`): a gate on the LoRA input (in place of PEFT's identity dropout) and the
scaling on its output. Before a step the scheduler writes, for every row, 1 and the slot's
scaling into the slot the row reads and 0 and 0 into the other, so each row reads exactly one
slot, and a slot a row does not read contributes an exact 0 whatever its weights (its input is
0, so even weights that would overflow cannot turn into NaN through 0 x inf).
A row keeps the slot it joined on to its last token; a request that does not name a slot joins
the *active* one. The engine (:mod:`hotswap.engine`) loads a new version into the slot no row
reads, checks it there with a request pinned to it, then makes it active: no drain, and no
answer ever mixes two versions.

Events go to each request's ``on_event`` callback from the scheduler thread: :class:`Started`
(the version it runs on), one :class:`~hotswap.generation.TokenEvent` per token (its text may
be empty while held back), :class:`Logits` (if asked),
then :class:`Finished` or :class:`Failed`. Callbacks must be quick and must not block.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hotswap.errors import HotswapError, OverloadedError, RequestError, SwapError
from hotswap.generation import (
    Completion,
    IncrementalText,
    RequestChecker,
    RowCache,
    SamplingParams,
    TokenEvent,
    choose_tokens,
)
from hotswap.versions import BASE, AdapterVersion

__all__ = ["Failed", "Finished", "Logits", "Scheduler", "SlotSelector", "SlotState", "Started", "StepStats", "Ticket"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    version: AdapterVersion
    slot: int


@dataclass(frozen=True)
class Logits:
    logits: torch.Tensor  # float32, CPU: the next-token logits after the prompt


@dataclass(frozen=True)
class Finished:
    completion: Completion


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass(frozen=True)
class StepStats:
    """Where the scheduler thread's time went since it started; two snapshots' difference (``b - a``) covers a window.

    Per step: ``step_s`` is the wall time inside steps and ``step_cpu_s`` the thread's CPU time in them;
    ``forward_s`` / ``forward_cpu_s`` the same for the model's forward alone (on CUDA the forward returns once
    its kernels are queued: the wait for the GPU falls in the rest of the step). Failed steps count in
    ``failed_steps`` and their time too. ``tokens`` are the tokens the steps decided, ``rows`` and ``queued`` the
    rows that ran in each step (a held row sits it out) and the requests waiting for one, summed over the steps.

    For the whole thread, steps or not (Linux ``/proc/<pid>/task/<tid>/schedstat``; None elsewhere):
    ``thread_cpu_s`` its time on a CPU and ``runqueue_s`` its time runnable but waiting for one. Over a window
    of ``at_s`` (a monotonic clock), what is neither was the thread blocked: on the GIL, a lock, or waiting
    for work (:meth:`per_step` says ``blocked_ms``).
    """

    prefill_steps: int = 0
    decode_steps: int = 0
    failed_steps: int = 0
    tokens: int = 0
    rows: int = 0
    queued: int = 0
    step_s: float = 0.0
    step_cpu_s: float = 0.0
    forward_s: float = 0.0
    forward_cpu_s: float = 0.0
    thread_cpu_s: float | None = None
    runqueue_s: float | None = None
    at_s: float = 0.0  # time.monotonic() of the snapshot

    @property
    def steps(self) -> int:
        return self.prefill_steps + self.decode_steps

    def __sub__(self, other: StepStats) -> StepStats:
        def minus(a, b):
            return None if a is None or b is None else a - b
        return StepStats(**{f: minus(getattr(self, f), getattr(other, f)) for f in self.__dataclass_fields__})

    def per_step(self) -> dict:
        """A window's averages per step (ms, or counts), for a report; empty without steps. ``loop_ms`` is the
        window's wall time per step, which ``thread_cpu_ms + runqueue_ms + blocked_ms`` add up to."""
        n = self.steps
        if not n:
            return {}

        def ms(value: float | None) -> float | None:
            return None if value is None else value * 1e3 / n

        out = {"steps": n, "failed_steps": self.failed_steps, "prefill_share": self.prefill_steps / n,
               "loop_ms": ms(self.at_s), "step_ms": ms(self.step_s), "step_cpu_ms": ms(self.step_cpu_s),
               "forward_ms": ms(self.forward_s), "forward_cpu_ms": ms(self.forward_cpu_s),
               "thread_cpu_ms": ms(self.thread_cpu_s), "runqueue_ms": ms(self.runqueue_s), "blocked_ms": None,
               "tokens": self.tokens / n, "rows": self.rows / n, "queued": self.queued / n}
        if self.thread_cpu_s is not None and self.runqueue_s is not None:
            out["blocked_ms"] = ms(self.at_s - self.thread_cpu_s - self.runqueue_s)
        return out

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _schedstat(tid: int | None, *, root: str = "/proc/self/task") -> tuple[float, float] | tuple[None, None]:
    """A thread's seconds on a CPU and runnable but waiting for one, from Linux's ``schedstat`` (nanoseconds: time
    on the CPU, time on a run queue, time slices); ``(None, None)`` where that is not available."""
    if tid is None:
        return None, None
    try:
        with open(f"{root}/{tid}/schedstat") as f:
            on_cpu, waiting = f.read().split()[:2]
        return int(on_cpu) / 1e9, int(waiting) / 1e9
    except (OSError, ValueError):
        return None, None


@dataclass
class SlotState:
    """One adapter slot as the scheduler sees it (the engine owns its buffer and fills it)."""

    index: int
    version: AdapterVersion | None = BASE  # None: emptied after a failed load; nothing may join it
    scale: float = 1.0
    rows: int = 0  # rows in flight on this slot
    pinned_waiting: int = 0  # queued requests pinned to this slot
    swaps: int = 0
    claimed: bool = False  # a swap waits for its rows to finish: no new request may be pinned to it meanwhile
    loading: bool = False  # being written: nothing may join it
    checking: bool = False  # loaded, not yet checked: only the check's own requests (probes) may join it
    checked: bool = False  # its version passed a swap's check since it was loaded
    check_failed: bool = False  # its version failed a swap's check since it was loaded: nothing may be pinned to it


class SlotSelector:
    """Per slot, the ``(batch, 1, 1)`` input gates and output scalings shared by every LoRA layer of the slot."""

    def __init__(self, scales: list[torch.Tensor], gates: list[torch.Tensor]) -> None:
        self.scales, self.gates = scales, gates
        self._rows = scales[0].shape[0]
        self._dtype = scales[0].dtype

    def write(self, row_slots: list[int | None], scales: list[float]) -> None:
        """Row ``b`` reads slot ``row_slots[b]`` (gate 1, that slot's scale) and every other slot at gate 0, scale 0."""
        # built as Python lists and converted once: it runs whenever rows change, and per-element tensor writes
        # cost more than the conversion
        host = [[[0.0] * self._rows for _ in self.scales] for _ in range(2)]
        for b, s in enumerate(row_slots):
            if s is not None:
                host[0][s][b] = scales[s]
                host[1][s][b] = 1.0
        values = torch.tensor(host, dtype=self._dtype)
        for k in range(len(self.scales)):
            self.scales[k].view(-1).copy_(values[0, k])
            self.gates[k].view(-1).copy_(values[1, k])


@dataclass
class Ticket:
    """A submitted request; :meth:`cancel` frees its row at the next step (or drops it from the queue)."""

    token_ids: list[int]
    params: SamplingParams
    on_event: Callable[[object], None]
    slot: int | None = None  # None: the active slot when it joins
    want_logits: bool = False
    probe: bool = False  # a swap's own check: it may join a slot that is being checked
    cancelled: bool = False
    held: bool = False  # its row sits out steps until Scheduler.release
    submitted: float = field(default_factory=time.perf_counter)
    _wake: Callable[[], None] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._wake is not None:
                self._wake()


@dataclass
class _Row:
    ticket: Ticket
    slot: int
    version: AdapterVersion
    text: IncrementalText
    generator: torch.Generator | None
    padded: int  # prompt length rounded up to the chunk
    prefilled: int = 0  # prompt columns (of ``padded``) written so far
    last_token: int | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.ticket.token_ids)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.padded


class Scheduler:
    """Owns the model's forward calls in one thread; thread-safe ``submit``.

    Args:
        forward: the causal LM (compiled or eager), called with the two fixed shapes only.
        config: the model config (for the cache).
        tokenizer: a ``transformers`` tokenizer.
        selector: the slots' per-row scaling tensors.
        slots: the slots' states (the engine fills their buffers).
        max_queued: requests that may wait for a row; one more is refused with :class:`OverloadedError`.
    """

    def __init__(self, forward: Callable, *, config, tokenizer, selector: SlotSelector, slots: list[SlotState],
                 batch_size: int, chunk: int, max_seq_len: int, max_queued: int, device, dtype) -> None:
        self.forward = forward
        self.tokenizer = tokenizer
        self.checker = RequestChecker(tokenizer, max_seq_len=max_seq_len,
                                      vocab_size=config.get_text_config().vocab_size)
        self.selector = selector
        self.slots = slots
        self.active = 0
        self.batch_size = batch_size
        self.chunk = chunk
        self.max_queued = max_queued
        self.device = device
        self.dtype = dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.kv = RowCache(config, batch_size=batch_size, chunk=chunk, max_seq_len=max_seq_len, device=device,
                           dtype=dtype)
        self._slot_ids = torch.arange(self.kv.cache_len, device=device)
        self._min = torch.finfo(dtype).min
        self.rows: list[_Row | None] = [None] * batch_size
        self.queue: deque[Ticket] = deque()
        self.hold_unpinned = False  # a one-slot swap: unpinned requests wait (the drain)
        self.cond = threading.Condition()
        self.steps = {"prefill": 0, "decode": 0}
        self._stats = StepStats()  # replaced (not mutated) by the scheduler thread: a reader gets a consistent one
        self._tid: int | None = None
        self._selector_dirty = True
        self._paused = 0
        self._dirty_rows: set[int] = set()
        self.dead: BaseException | None = None
        self._idle = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hotswap-scheduler", daemon=True)
        self._thread.start()

    # -- the caller's side ---------------------------------------------------------------------------------

    def submit(self, token_ids: list[int], params: SamplingParams, *, on_event: Callable[[object], None],
               slot: int | None = None, version: AdapterVersion | None = None, want_logits: bool = False,
               held: bool = False, probe: bool = False) -> Ticket:
        """Queue a request; raise :class:`OverloadedError` when the queue is full, :class:`RequestError` if invalid.

        ``version``: pin it to the slot that serves that version, found under the same lock that queues it (so no
        swap can load another version into the slot in between); a :class:`RequestError` if no slot serves it.
        ``held``: it joins a row as usual but sits out every step until :meth:`release` (tests and fault
        seams use it to keep a request in flight). ``probe``: a swap's check, which alone may join a slot
        that is loaded but not yet checked.
        """
        if slot is not None and version is not None:
            raise ValueError("pin a request to a slot or to a version, not both")
        self.checker.check(len(token_ids), params)
        if version is not None and not isinstance(version, AdapterVersion):
            raise RequestError(f"version must be an AdapterVersion (a slot's identity, e.g. StagedAdapter.identity), "
                               f"not {type(version).__name__} {version!r}")
        ticket = Ticket(list(token_ids), params, on_event, slot=slot, want_logits=want_logits, held=held,
                        probe=probe, _wake=self.wake)
        with self.cond:
            if self._stopping or self.dead is not None:
                what = f"stopped serving ({self.dead})" if self.dead is not None else "is shut down"
                raise SwapError(f"the engine {what}; the replica must be restarted")
            if slot is not None:  # a swap's smoke check (or a test): the next free row, ahead of the queue
                if not 0 <= slot < len(self.slots) or self.slots[slot].version is None:
                    raise RequestError(f"adapter slot {slot} holds no version")
                self.slots[slot].pinned_waiting += 1
                self.queue.appendleft(ticket)
                self.cond.notify_all()
                return ticket
            if len(self.queue) - sum(r is None for r in self.rows) >= self.max_queued:  # free rows take some
                raise OverloadedError(
                    f"the replica's admission queue is full ({self.max_queued} requests wait for one of "
                    f"{self.batch_size} rows); retry shortly, or raise max_queued_requests / add replicas"
                )
            if version is not None:  # traffic pinned to a version (request-level A/B): in turn, like any request
                ticket.slot = self.slot_serving(version)
                if ticket.slot is None:
                    held_now = ", ".join(s.version.short() if s.version is not None else "nothing"
                                         for s in self.slots)
                    raise RequestError(f"no adapter slot serves {version.short()} now (the slots hold {held_now}; "
                                       "one being swapped serves nothing new); load it into a slot first, or send "
                                       "the request without a version")
                self.slots[ticket.slot].pinned_waiting += 1
            self.queue.append(ticket)
            self.cond.notify_all()
        return ticket

    def slot_serving(self, version: AdapterVersion) -> int | None:
        """Under :attr:`cond`: the slot that serves ``version`` (checked, or loaded without a check), to pin requests
        to; None if no slot holds it, or the one that does is claimed by a swap, being written, not yet checked, or
        failed its check."""
        for state in self.slots:
            if state.version == version and not (state.claimed or state.loading or state.checking
                                                 or state.check_failed):
                return state.index
        return None

    def queued(self) -> int:
        with self.cond:
            return len(self.queue)

    def step_stats(self) -> StepStats:
        """Where the scheduler thread's time went since it started (see :class:`StepStats`)."""
        at = time.monotonic()
        on_cpu, waiting = _schedstat(self._tid)
        return StepStats(**{**self._stats.as_dict(), "thread_cpu_s": on_cpu, "runqueue_s": waiting, "at_s": at})

    def in_flight(self) -> int:
        with self.cond:
            return sum(r is not None for r in self.rows)

    def pause(self, timeout_s: float | None = None) -> None:
        """Stop stepping after the current step (for exclusive access to the model); :meth:`resume` undoes it."""
        with self.cond:
            self._paused += 1
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: self._idle.is_set(), timeout=timeout_s):
                self._paused -= 1
                raise SwapError(f"the scheduler did not pause within {timeout_s} s")

    def resume(self) -> None:
        with self.cond:
            self._paused -= 1
            self._selector_dirty = True
            self.cond.notify_all()

    def release(self, ticket: Ticket) -> None:
        """Let a held ticket's row run."""
        with self.cond:
            ticket.held = False
            self.cond.notify_all()

    def stop_serving(self, error: BaseException) -> None:
        """The model is in an unknown state: fail every request queued or in flight and refuse new ones."""
        with self.cond:
            self.dead = error
            self.cond.notify_all()

    def wake(self) -> None:
        """Look at the rows again (after a ticket's ``held`` was cleared)."""
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        self._thread.join(timeout=30)

    # -- the scheduler thread ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the loop has stopped (closed, or crashed: see :attr:`dead`)."""
        return self._thread.is_alive() and self.dead is None

    def _run(self) -> None:
        try:
            if torch.device(self.device).type == "cuda":
                try:
                    _cuda_graph_thread_state()
                except Exception:  # a torch whose internals moved: the workaround is skipped, the engine still serves
                    logger.warning("could not set up CUDA graph state for the scheduler thread", exc_info=True)
            self._loop()
        except BaseException as e:  # a bug in the loop itself: fail everything, refuse new work, say why
            logger.exception("the scheduler loop stopped")
            with self.cond:
                self.dead = e
                self._fail_all(SwapError(f"the replica's scheduler stopped ({e!r}); the replica must be restarted"))

    def _loop(self) -> None:
        self._tid = threading.get_native_id()
        while True:
            with self.cond:
                while True:
                    if self._stopping or self.dead is not None:
                        why = f"stopped serving ({self.dead})" if self.dead is not None else "shut down"
                        self._fail_all(SwapError(f"the engine {why} before this request finished"))
                        return
                    events = self._admit()
                    work = self._paused == 0 and any(r is not None and not r.ticket.held for r in self.rows)
                    if events or work:
                        break
                    self._idle.set()
                    self.cond.notify_all()
                    self.cond.wait()
                self._idle.clear()
                if work:
                    prefill = self._pick_step()
                    selector = self._selector_args() if self._selector_dirty else None
                    self._selector_dirty = False
            self._deliver(events)
            if not work:
                continue
            try:
                self._step(prefill, selector, rows=sum(r is not None and not r.ticket.held for r in self.rows),
                           queued=len(self.queue))
            except Exception as e:  # the step failed as a whole: every row in it fails, the loop goes on
                logger.exception("a %s step failed; failing its rows", "prefill" if prefill else "decode")
                with self.cond:
                    failed = [(r, i) for i, r in enumerate(self.rows) if r is not None]
                    for _, i in failed:
                        self._free(i)
                    self._dirty_rows.update(range(self.batch_size))  # the cache may hold anything now
                    self._selector_dirty = True
                self._deliver([(row.ticket, Failed(e)) for row, _ in failed])

    @torch.no_grad()
    def _scrub(self, rows: set[int]) -> None:
        """Zero the cache rows of requests that left (one fill per layer for all of them)."""
        index = torch.tensor(sorted(rows), device=self.device)
        for layer in self.kv.cache.layers:
            layer.keys.index_fill_(0, index, 0)
            layer.values.index_fill_(0, index, 0)
        rows.clear()

    def _admit(self) -> list:
        """Under the lock: drop cancelled requests, move queued ones into free rows; return Started events."""
        events = []
        for i, row in enumerate(self.rows):
            if row is not None and row.ticket.cancelled:
                self._free(i)
        kept: deque[Ticket] = deque()
        while self.queue:
            ticket = self.queue.popleft()
            if ticket.cancelled:
                self._unpin(ticket)
                continue
            free = next((i for i, r in enumerate(self.rows) if r is None), None)
            slot = ticket.slot if ticket.slot is not None else self.active
            state = self.slots[slot]
            if (free is None or state.loading or (state.checking and not ticket.probe)
                    or (ticket.slot is None and self.hold_unpinned)):
                kept.append(ticket)
                continue
            self._unpin(ticket)
            if state.version is None:
                events.append((ticket, Failed(SwapError(f"adapter slot {slot} was emptied before the request "
                                                        "joined it"))))
                continue
            if (state.check_failed and ticket.slot is not None and ticket.slot != self.active
                    and not ticket.probe):  # queued before a swap's check of its (idle) slot failed
                events.append((ticket, Failed(RequestError(
                    f"adapter slot {slot} ({state.version.short()}) failed a smoke check before the request joined "
                    "it; nothing runs on it until a version passes a check there: send the request again"))))
                continue
            try:  # nothing about one request may stop the loop: it fails alone
                params = ticket.params
                generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
                padded = math.ceil(len(ticket.token_ids) / self.chunk) * self.chunk
                row = _Row(ticket, slot, state.version, IncrementalText(self.tokenizer, params.stop), generator,
                           padded)
            except Exception as e:  # noqa: BLE001 - answered to its caller
                logger.exception("a request could not join the batch")
                events.append((ticket, Failed(RequestError(f"the request could not join the batch: {e}"))))
                continue
            state.rows += 1
            self.rows[free] = row
            self._selector_dirty = True
            events.append((ticket, Started(state.version, slot)))
        self.queue = kept
        return events

    def _unpin(self, ticket: Ticket) -> None:
        if ticket.slot is not None:
            self.slots[ticket.slot].pinned_waiting -= 1

    def _free(self, i: int) -> None:
        """Under the lock, in the scheduler thread: the row is free, and its cache is zeroed before the next step
        (whatever the request left there, e.g. NaN from a version that overflowed on padding or a prefill chunk
        before it was cancelled, must not reach the next request: NaN + mask = NaN)."""
        row = self.rows[i]
        self.rows[i] = None
        self.slots[row.slot].rows -= 1
        self._dirty_rows.add(i)
        self._selector_dirty = True
        self.cond.notify_all()

    def _fail_all(self, error: BaseException) -> None:
        events = [(r.ticket, Failed(error)) for r in self.rows if r is not None]
        events += [(t, Failed(error)) for t in self.queue]
        for i, r in enumerate(self.rows):
            if r is not None:
                self._free(i)
        for t in self.queue:
            self._unpin(t)
        self.queue.clear()
        self._deliver(events)

    def _pick_step(self) -> bool:
        """A prefill step while any row reads its prompt (the generating rows ride along), else a decode step."""
        return any(r is not None and not r.ticket.held and r.prefilling for r in self.rows)

    def _selector_args(self) -> tuple[list[int | None], list[float]]:
        return [r.slot if r is not None else None for r in self.rows], [s.scale for s in self.slots]

    @staticmethod
    def _deliver(events: list) -> None:
        for ticket, event in events:
            try:
                ticket.on_event(event)
            except Exception:  # a broken callback must not stop the loop
                logger.exception("an event callback failed")

    def _step(self, prefill: bool, selector: tuple | None, *, rows: int, queued: int) -> None:
        """One step (the cache rows freed since the last one scrubbed, ``selector`` written if the rows changed),
        accounted in :class:`StepStats` whether or not it fails; its events go out after that."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        timing = [0.0, 0.0]  # the forward's wall and CPU seconds
        events: list = []
        tokens = None
        try:
            if self._dirty_rows:
                self._scrub(self._dirty_rows)
            if selector is not None:
                self.selector.write(*selector)
            tokens = self._run_step(prefill, timing, events)
        finally:
            s, ran = self._stats, tokens is not None
            self._stats = StepStats(
                s.prefill_steps + (ran and prefill), s.decode_steps + (ran and not prefill), s.failed_steps + (not ran),
                s.tokens + (tokens or 0), s.rows + rows, s.queued + queued,
                s.step_s + time.perf_counter() - started, s.step_cpu_s + time.thread_time() - started_cpu,
                s.forward_s + timing[0], s.forward_cpu_s + timing[1])
            if tokens is not None:
                self.steps["prefill" if prefill else "decode"] += 1
        self._deliver(events)

    @torch.no_grad()
    def _run_step(self, prefill: bool, timing: list[float], events: list) -> int:
        """Build the step's inputs, run the forward, choose the tokens; returns how many rows took one (their
        events are added to ``events``)."""
        b, q = self.batch_size, (self.chunk if prefill else 1)
        # built as Python lists and converted once: per-element tensor writes cost more than the tiny model's step
        scratch = list(range(self.kv.scratch, self.kv.scratch + q))  # sitting out: scratch slots
        ids = [[self.pad_id] * q for _ in range(b)]
        positions = [[0] * q for _ in range(b)]
        write = [list(scratch) for _ in range(b)]
        real = [[False] * q for _ in range(b)]
        taking = []  # rows whose logits this step decides a token for
        for i, row in enumerate(self.rows):
            if row is None or row.ticket.held:
                continue
            if prefill and row.prefilling:
                offset = row.padded - row.prompt_len  # left padding of the first chunk
                first = row.prefilled - offset  # prompt index of column 0 (negative: padding)
                start = max(0, -first)
                tokens = row.ticket.token_ids[first + start:first + q]
                span = range(first + start, first + start + len(tokens))
                ids[i][start:] = tokens
                positions[i][start:] = span
                write[i][start:] = span
                real[i][start:] = [True] * len(tokens)
                row.prefilled += q
                if not row.prefilling:
                    taking.append(i)
            elif not row.prefilling:  # generating: its one token, in the last column (a prefill step's too)
                p = row.prompt_len + len(row.text.tokens) - 1
                ids[i][-1], positions[i][-1], write[i][-1], real[i][-1] = row.last_token, p, p, True
                taking.append(i)
        ids, positions, write = (torch.tensor(t, dtype=torch.long) for t in (ids, positions, write))
        real = torch.tensor(real, dtype=torch.bool)
        (self.kv.prefill_index if prefill else self.kv.decode_index).copy_(write)
        ids, positions, write, real = (t.to(self.device) for t in (ids, positions, write, real))
        # a real query at position p attends to slots 0..p of its row (exactly its tokens); a padding
        # query attends to its own scratch slot only (otherwise it would have no key and give NaN)
        slots = self._slot_ids[None, None, :]
        allowed = ((slots <= positions[:, :, None]) & real[:, :, None]) | (slots == write[:, :, None])
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, self._min)
        forward, forward_cpu = time.perf_counter(), time.thread_time()
        try:
            out = self.forward(
                input_ids=ids,
                attention_mask=mask[:, None, :, :],
                position_ids=positions,
                past_key_values=self.kv.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:  # a forward that raises is timed too
            timing[0], timing[1] = time.perf_counter() - forward, time.thread_time() - forward_cpu
        return self._take(out.logits[:, -1, :].float(), taking, events) if taking else 0

    def _take(self, logits: torch.Tensor, taking: list[int], events: list) -> int:
        """Choose the next token of each row in ``taking``; returns how many took one (a row whose logits are not
        finite fails instead). Its events are added to ``events``, for the caller to deliver."""
        rows = self.rows
        done = []
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        for i in [i for i in taking if not finite[i]]:  # this request's version overflowed: fail it alone
            row = rows[i]
            events.append((row.ticket, Failed(SwapError(
                f"adapter {row.version.uri} (sha256 {row.version.sha256[:12]}) produced non-finite logits for this "
                "request; the adapter's weights are too large for this prompt (roll back or retrain it)"))))
            done.append(i)
        taking = [i for i in taking if finite[i]]
        params: list[SamplingParams | None] = [None] * self.batch_size
        generators: list[torch.Generator | None] = [None] * self.batch_size
        for i in taking:
            params[i], generators[i] = rows[i].ticket.params, rows[i].generator
        chosen = choose_tokens(logits if all(finite) else logits.nan_to_num(), params, generators)
        for i in taking:
            row = rows[i]
            mark = len(events)
            try:  # nothing about one request (its text, stop strings, length) may fail the rows beside it
                if row.ticket.want_logits and not row.text.tokens:
                    events.append((row.ticket, Logits(logits[i].cpu())))
                finish = self._advance(i, row, chosen[i], events)
            except Exception as e:  # noqa: BLE001 - answered to its caller
                logger.exception("a request failed while its token was handled; the batch goes on")
                del events[mark:]  # what it half-said this step goes nowhere: its answer is the failure
                events.append((row.ticket, Failed(HotswapError(
                    f"the request failed while its token was handled ({type(e).__name__}: {e}); the replica "
                    "serves on; send the request again, and report it if it fails the same way"))))
                finish = "error"
            if finish is not None:
                done.append(i)
        with self.cond:
            for i in done:
                self._free(i)
        return len(taking)

    def _advance(self, i: int, row: _Row, token: int, events: list) -> str | None:
        p = row.ticket.params
        if token in self.eos_ids and not p.ignore_eos:
            return self._finish(i, row, "stop", events)
        delta, stopped = row.text.add(token)
        row.last_token = token
        if stopped:
            return self._finish(i, row, "stop", events, delta)
        if len(row.text.tokens) >= p.max_tokens:
            return self._finish(i, row, "length", events, delta)
        events.append((row.ticket, TokenEvent(i, delta)))  # one per token, the text possibly held back
        return None

    def _finish(self, i: int, row: _Row, reason: str, events: list, delta: str = "") -> str:
        delta += row.text.finish()
        if row.text.stopped:  # the last token's text, decoded only now, held a stop string: that ended it
            reason = "stop"
        tokens = row.text.tokens
        events.append((row.ticket, TokenEvent(i, delta, reason)))
        events.append((row.ticket, Finished(Completion(row.text.text, list(tokens), reason, row.prompt_len,
                                                       row.version))))
        return reason


def _cuda_graph_thread_state() -> None:
    """Give this thread the CUDA-graph-trees state that torch < 2.13 sets up only in the thread that imported it.

    With ``compile_mode: reduce-overhead`` every step runs in the scheduler's thread; torch 2.11 and 2.12 keep
    the graph trees in thread-local state created at import, and assert in any other Python thread
    (pytorch/pytorch#123177: a second engine in one process, or the first one when inductor was imported
    elsewhere). torch 2.13 creates that state on first use (``_initialize_tls``): nothing to do there.
    """
    try:
        from torch._inductor import cudagraph_trees as trees
    except ImportError:
        return
    if hasattr(trees, "_initialize_tls") or not hasattr(trees, "local"):
        return
    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    from collections import defaultdict

    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)
