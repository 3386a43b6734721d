"""The v2 controller on a real Ray Serve (2 compiled replicas) with adapters and the state object on a real S3
server on 127.0.0.1, reached through a fault-injecting proxy (:mod:`tests.faultproxy`):

- start-up that waits: the initial adapter is uploaded only after the service started; the controller says
  what it waits for, then the replicas that waited in their constructors come up on it, nobody restarted;
- a version is URI + weights sha256 + config sha256: the same weights re-pushed with another
  ``adapter_config.json`` at the same URI roll as a new version and change the answers;
- a state store whose writes fail during a roll: the roll fails clearly or completes after the machine's
  retries, and memory equals the persisted object afterwards;
- fencing: a second controller that claims the same S3 state object fences the first, whose write never lands;
- a redeploy with another ``swap_timeout_s``: a new controller generation takes over the state, retires the old
  one, and runs with the new setting.

The tests share one service and run in file order; each needs only "the service is live on some stable
version", so any one of them also runs alone (``-k``). The fencing test leaves the app's controller fenced on
purpose; the redeploy test, last, starts the generation that takes the state back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from hotswap.client import HotswapClient
from hotswap.controller import CONTROLLER_NAMESPACE, controller_name, get_or_create_controller
from hotswap.errors import HotswapError, RolloutConflictError, RolloutError, StateConflictError
from hotswap.settings import HotswapSettings
from tests.faultproxy import Fault, FaultProxy
from tests.integration.conftest import upload_adapter, wait_for_condition
from tests.integration.faulty import FaultyReplica

pytestmark = [pytest.mark.slow, pytest.mark.integration]

APP = "ctlv2"
BUCKET = "ctlv2"  # adapters
STATE_BUCKET = "ctlv2-state"
STATE_KEY = "ctlv2/state.json"
STATE_URI = f"s3://{STATE_BUCKET}/{STATE_KEY}"
STATE_PUT = f"PUT /{STATE_BUCKET}/{STATE_KEY}".encode()  # the start of a state write, as the proxy sees it
FIRST = f"s3://{BUCKET}/first"  # the initial adapter: absent when the service starts
REPLICAS = 2
ADAPTERS = {  # name -> write_random_adapter parameters; all but "first" are uploaded before the service starts
    "first": dict(r=8, lora_alpha=16, seed=91),
    "repush": dict(r=8, lora_alpha=16, seed=92),
    "v3": dict(r=4, lora_alpha=8, seed=93),
    "v4": dict(r=8, lora_alpha=4, seed=94),
    "v5": dict(r=2, lora_alpha=8, seed=95),
    "v6": dict(r=8, lora_alpha=12, seed=96),
}
PROMPTS = ("the quick brown", "hello world", "once upon a time")


def _s3():
    """A client straight to the S3 server (not through the proxy): what the tests read and upload."""
    from hotswap.store import make_s3_client

    return make_s3_client(connect_timeout_s=2, read_timeout_s=5)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Service:
    base: str  # http://host:port/<app>
    args: dict
    marks: Path  # FaultyReplica's marker folder
    folders: dict[str, Path]
    proxy: FaultProxy

    def uri(self, name: str) -> str:
        return f"s3://{BUCKET}/{name}"

    def sha(self, name: str) -> str:
        return _sha256(self.folders[name] / "adapter_model.safetensors")


def _make(args: dict):
    from deployments.app import make_app

    return make_app(args, replica_class=FaultyReplica,
                    replica_options={"num_replicas": REPLICAS, "ray_actor_options": {"num_cpus": 0.3}},
                    ingress_options={"ray_actor_options": {"num_cpus": 0.1}})


def _app_controllers() -> list[str]:
    prefix = f"hotswap-controller-{APP}@"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == CONTROLLER_NAMESPACE and a["name"].startswith(prefix))


@pytest.fixture(scope="module")
def service(serve_cluster, s3_server, make_adapter, tiny_base, tmp_path_factory):
    """The app, started without waiting for its replicas (they wait in their constructors for the controller,
    which waits for ``FIRST``, not uploaded yet); it reaches S3 through a fault proxy."""
    proxy = FaultProxy("127.0.0.1", int(s3_server.rsplit(":", 1)[1]))
    folders = {name: make_adapter(f"ctlv2-{name}", **params) for name, params in ADAPTERS.items()}
    s3 = _s3()
    for bucket in (BUCKET, STATE_BUCKET):
        s3.create_bucket(Bucket=bucket)
    for name, folder in folders.items():
        if name != "first":
            upload_adapter(folder, BUCKET, name)
    cache = tmp_path_factory.mktemp("ctlv2-cache")
    (cache / "fault-marks").mkdir()
    args = {
        "base_model": str(tiny_base),
        "initial_adapter": FIRST,
        "cache_dir": str(cache),
        "state_uri": STATE_URI,
        "max_rank": 16,
        "max_batch_size": 2,
        "prefill_chunk_tokens": 8,
        "max_seq_len": 64,
        "device": "cpu",
        "swap_timeout_s": 60,
        "replica_liveness_s": 8,
        "s3_endpoint_url": proxy.url,  # adapters and the state object, both through the proxy
        "s3_connect_timeout_s": 1,
        "s3_read_timeout_s": 2,
        "s3_max_attempts": 3,
        "s3_retry_backoff_s": 0.05,
    }
    # serve.run waits for the app to be RUNNING, which it cannot be before FIRST exists: _run(_blocking=False)
    # returns once the deployments are created
    serve._run(_make(args), _blocking=False, name=APP, route_prefix=f"/{APP}")
    yield Service(f"{serve_cluster}/{APP}", args, cache / "fault-marks", folders, proxy)
    serve.delete(APP)
    for name in _app_controllers():
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=CONTROLLER_NAMESPACE))
    proxy.close()


def _live(client: HotswapClient) -> dict[str, dict]:
    return {r["id"]: r for r in client.status()["replicas"] if r["live"]}


def _all_on(sha: str, count: int = REPLICAS):
    """A predicate: ``count`` live replicas, each running ``sha``, no operation in progress."""

    def check():
        client = HotswapClient(APP)
        status = client.status()
        live = [r for r in status["replicas"] if r["live"]]
        return (status["ready"] and status["rollout"] is None and len(live) == count
                and all(r["adapter_sha256"] == sha for r in live))

    return check


@pytest.fixture
def live(service) -> Service:
    """The service with ``FIRST`` uploaded (if the first test has not) and every replica live."""
    try:
        _s3().head_object(Bucket=BUCKET, Key="first/adapter_model.safetensors")
    except Exception:  # noqa: BLE001 - not uploaded yet: this test runs without the first one
        upload_adapter(service.folders["first"], BUCKET, "first")

    def ready():
        status = HotswapClient(APP).status()
        return status["ready"] and status["rollout"] is None and sum(r["live"] for r in status["replicas"]) == REPLICAS

    wait_for_condition(ready, timeout_s=300, message=f"{REPLICAS} live replicas")
    return service


def _persisted() -> dict:
    return json.loads(_s3().get_object(Bucket=STATE_BUCKET, Key=STATE_KEY)["Body"].read())


def _assert_memory_is_persisted(client: HotswapClient, *, timeout_s: float = 10.0) -> None:
    """What the controller serves from (``status``) is what the S3 object holds: stable, canary, operation, history.

    Write-ahead: the object is written first and memory commits when the save returns, so a reader can catch the
    object ahead for that moment (a clean-clone CI run did: the roll's operation in S3, not yet in ``status``).
    They must agree within ``timeout_s``. Memory that kept what a failed save did not write stays apart from the
    object until a later save lands; where no save may land, the caller also checks the object's generation."""

    def differences() -> list[str]:
        status, persisted = client.status(), _persisted()
        pairs = {"stable": (status["stable"], persisted["stable"]), "canary": (status["canary"], persisted["canary"]),
                 "operation id": ((status["rollout"] or {}).get("id"), (persisted["operation"] or {}).get("id")),
                 "last history entry": (status["history"][-1], persisted["history"][-1])}
        return [f"{what}: memory {mine!r}, S3 {theirs!r}" for what, (mine, theirs) in pairs.items() if mine != theirs]

    deadline = time.monotonic() + timeout_s
    while (apart := differences()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not apart, apart


@contextlib.contextmanager
def _fault(proxy: FaultProxy, fault: Fault):
    """Inject ``fault`` for the block; a spent fault is removed (the proxy stops at the first one that matches)."""
    proxy.add(fault)
    try:
        yield fault
    finally:
        fault.times = 0
        with proxy._lock:
            proxy.faults.remove(fault)


@contextlib.contextmanager
def _held(marks: Path, replica_ids):
    """Each replica in ``replica_ids`` waits before its next swap while the block runs."""
    paths = [marks / f"hold-{rid}" for rid in replica_ids]
    for p in paths:
        p.touch()
    try:
        yield
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def _greedy(base: str) -> list[tuple[str, str]]:
    """(text, x-adapter-sha256) of a short greedy completion per prompt."""
    out = []
    for prompt in PROMPTS:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        out.append((r.json()["choices"][0]["text"], r.headers["x-adapter-sha256"]))
    return out


def _replica_actor_ids() -> set[str]:
    prefix = f"SERVE_REPLICA::{APP}#ModelReplica#"
    return {a["name"].removeprefix(prefix) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def _other_target(service: Service, client: HotswapClient, names=("v3", "v4", "v5", "v6")) -> str:
    stable = client.status()["stable"]["sha256"]
    return next(n for n in names if service.sha(n) != stable)


# --- 1. start-up that waits for the initial adapter ----------------------------------------------------------


def test_initial_adapter_uploaded_after_the_service_started(service):
    """Control for "no restart": the controller's start time and the replicas' ids are the same before and after."""
    def waiting():
        status = HotswapClient(APP).status()  # ControllerNotFoundError until a replica created it: polled
        return status if not status["ready"] and FIRST in status["waiting_for"] and "retrying" in status[
            "waiting_for"] else None

    status = wait_for_condition(waiting, timeout_s=300, message=f"the controller waiting for {FIRST}")
    assert status["replicas"] == [] and status["stable"] is None
    assert "adapter not found" in status["waiting_for"]  # the store's own error, naming the missing object
    client = HotswapClient(APP)
    started = ray.get(client.actor.whoami.remote())["started"]
    wait_for_condition(lambda: len(_replica_actor_ids()) == REPLICAS, timeout_s=60, message="the replica actors")
    waiting_replicas = _replica_actor_ids()
    assert serve.status().applications[APP].status == "DEPLOYING"  # the replicas are still in their constructors
    assert not HotswapClient(APP).status()["ready"]  # still waiting: nothing was uploaded

    upload_adapter(service.folders["first"], BUCKET, "first")
    sha = service.sha("first")
    wait_for_condition(_all_on(sha), timeout_s=180, message=f"{REPLICAS} replicas live on the initial adapter")

    status = HotswapClient(APP).status()
    assert status["stable"] == {"uri": FIRST, "sha256": sha,
                                "config_sha256": _sha256(service.folders["first"] / "adapter_config.json")}
    assert {r["id"] for r in status["replicas"] if r["live"]} == waiting_replicas  # the replicas that waited
    assert _app_controllers() == [status["controller"]]  # one controller, never replaced
    assert ray.get(HotswapClient(APP).actor.whoami.remote())["started"] == started  # the same controller
    wait_for_condition(lambda: serve.status().applications[APP].status == "RUNNING", timeout_s=60,
                       message="the app RUNNING")
    assert {header for _, header in _greedy(service.base)} == {sha}


# --- 2. the config is part of a version ----------------------------------------------------------------------


def test_same_weights_with_a_new_config_at_the_same_uri_roll_as_a_new_version(live):
    service = live
    folder = service.folders["repush"]
    uri, sha = upload_adapter(folder, BUCKET, "repush")
    client = HotswapClient(APP)
    replicas = sorted(_live(client))
    assert sorted(client.roll(uri)["swapped"]) == replicas
    before = _greedy(service.base)
    assert {h for _, h in before} == {sha}
    # control: the URI again, unchanged: the same version, nobody swaps, the answers stay as they were
    assert client.roll(uri)["swapped"] == []
    assert _greedy(service.base) == before

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 16
    config["lora_alpha"] = 64  # 4x the LoRA scale, same weights file
    raw = json.dumps(config, indent=2).encode()
    _s3().put_object(Bucket=BUCKET, Key="repush/adapter_config.json", Body=raw)
    result = client.roll(uri)
    assert sorted(result["swapped"]) == replicas
    assert result["version"] == {"uri": uri, "sha256": sha, "config_sha256": hashlib.sha256(raw).hexdigest()}
    status = client.status()
    assert status["stable"] == result["version"]
    assert {(r["adapter_sha256"], r["adapter_config_sha256"]) for r in status["replicas"] if r["live"]} == {
        (sha, hashlib.sha256(raw).hexdigest())}
    after = _greedy(service.base)
    assert {h for _, h in after} == {sha}  # the same weights ...
    assert [t for t, _ in after] != [t for t, _ in before]  # ... answering differently
    answer = httpx.post(f"{service.base}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=60)
    assert answer.headers["x-adapter-config-sha256"] == hashlib.sha256(raw).hexdigest()  # ... and named
    _assert_memory_is_persisted(client)


# --- 4. state writes failing during a roll -------------------------------------------------------------------


def test_a_state_write_failing_when_a_roll_starts_fails_it_clearly_and_the_next_roll_works(live):
    service = live
    client = HotswapClient(APP)
    target = _other_target(service, client)
    before = client.status()
    running = {rid: r["adapter_sha256"] for rid, r in _live(client).items()}
    injected = service.proxy.injected
    generation = _persisted()["generation"]
    with _fault(service.proxy, Fault("status500", match=STATE_PUT, times=1)):
        with pytest.raises(RolloutConflictError, match="could not save its state.*nothing moved"):
            client.roll(service.uri(target))
    assert service.proxy.injected - injected == 1
    # nothing was written since: a controller that had kept the refused roll in memory would have saved it by now
    assert _persisted()["generation"] == generation
    status = client.status()
    assert status["stable"] == before["stable"] and status["rollout"] is None
    assert {rid: r["adapter_sha256"] for rid, r in _live(client).items()} == running
    _assert_memory_is_persisted(client)
    result = client.roll(service.uri(target))  # the store answers again: the same roll works
    assert sorted(result["swapped"]) == sorted(running)
    wait_for_condition(_all_on(service.sha(target)), timeout_s=60, message=f"every replica on {target}")
    _assert_memory_is_persisted(client)


def test_state_writes_failing_mid_roll_are_retried_and_the_roll_completes(live):
    """The operation is persisted; then the replicas' progress cannot be saved three times: the machine proposes it
    again on the next tick, and the roll ends once a save lands."""
    service = live
    client = HotswapClient(APP)
    target = _other_target(service, client)
    replicas = sorted(_live(client))
    injected = service.proxy.injected
    with _held(service.marks, replicas):
        rolling = client.actor.roll.remote(service.uri(target))
        wait_for_condition(lambda: (_persisted()["operation"] or {}).get("moving"), timeout_s=60,
                           message="the roll persisted with a replica moving")
        _assert_memory_is_persisted(client)
        fault = Fault("status500", match=STATE_PUT, times=3)
        with _fault(service.proxy, fault):
            service.marks.joinpath(f"hold-{replicas[0]}").unlink()
            service.marks.joinpath(f"hold-{replicas[1]}").unlink()
            wait_for_condition(lambda: fault.times == 0, timeout_s=60, message="three failed state writes")
            result = HotswapClient._get(rolling)
    assert service.proxy.injected - injected == 3
    assert result["outcome"] == "ok" and sorted(result["swapped"]) == replicas
    wait_for_condition(_all_on(service.sha(target)), timeout_s=60, message=f"every replica on {target}")
    _assert_memory_is_persisted(client)
    persisted = _persisted()
    assert persisted["operation"] is None and persisted["stable"]["sha256"] == service.sha(target)
    assert persisted["history"][-1]["result"] == "ok" and persisted["history"][-1]["id"] == result["id"]
    assert sorted(client.roll(service.uri(_other_target(service, client)))["swapped"]) == replicas  # a next roll


def _restart_controller_if_inconsistent() -> None:
    """Put the app back in a known state after a test that may leave memory and the S3 object apart."""
    client = HotswapClient(APP)
    status = client.status()
    persisted = _persisted()
    if status.get("fenced") or (status["rollout"] or {}).get("id") != (persisted["operation"] or {}).get("id"):
        ray.kill(client.actor, no_restart=False)  # restarts, reloads the persisted state, resumes what it says
        wait_for_condition(lambda: HotswapClient(APP).status()["ready"], timeout_s=120, message="restarted")
    wait_for_condition(lambda: (s := HotswapClient(APP).status())["rollout"] is None and sum(
        r["live"] for r in s["replicas"]) == REPLICAS, timeout_s=180, message="no operation, replicas live")


def test_a_state_write_that_lands_but_whose_answer_is_lost_leaves_memory_equal_to_persisted(live):
    """Ambiguous write: the proxy forwards the roll's first state PUT to S3 and drops the answer. Whatever the roll
    returns (done or a clear error), memory must equal the S3 object afterwards and the next roll must work.

    Control: on the code before 9c16242 (no read-back of a lost write) this fails: memory kept the old state while
    S3 held the operation the caller was told "was not started", and the next save was refused with a 412, the
    controller fenced by its own write."""
    service = live
    client = HotswapClient(APP)
    target = _other_target(service, client)
    uri = service.uri(target)
    injected = service.proxy.injected
    try:
        # the first state body naming the target is the roll's: S3 stores it, the answer never comes back (the state
        # is compact JSON, DesiredState.to_json)
        with _fault(service.proxy, Fault("truncate", match=f'"uri":"{uri}"'.encode(), after=0, times=1)):
            try:
                outcome = client.roll(uri)
            except HotswapError as e:
                outcome = e
        assert service.proxy.injected - injected == 1
        if isinstance(outcome, dict):  # the write was recognised as landed: the roll went on
            assert outcome["outcome"] == "ok" and client.status()["stable"]["sha256"] == service.sha(target)
        else:
            assert "could not save its state" in str(outcome), outcome  # or it failed, saying why
        _assert_memory_is_persisted(client)
        assert client.status()["rollout"] is None and _persisted()["operation"] is None
        next_target = _other_target(service, client, names=tuple(n for n in ("v3", "v4", "v5", "v6") if n != target))
        assert sorted(client.roll(service.uri(next_target))["swapped"]) == sorted(_live(client))
    finally:
        _restart_controller_if_inconsistent()


# --- 5. fencing: two controllers on one state object ---------------------------------------------------------


def test_a_second_controller_on_the_same_state_object_fences_the_first(live):
    """Another controller (another app name, the same ``state_uri``) claims the state; the app's controller's next
    operation is refused as fenced and its write never reaches S3. Control: the app's controller rolled fine just
    before."""
    service = live
    client = HotswapClient(APP)
    target = _other_target(service, client)
    assert sorted(client.roll(service.uri(target))["swapped"]) == sorted(_live(client))  # control: not fenced yet
    etag_before = _s3().head_object(Bucket=STATE_BUCKET, Key=STATE_KEY)["ETag"]
    generation_before = _persisted()["generation"]
    intruder = get_or_create_controller(HotswapSettings.from_args(service.args), f"{APP}-intruder")
    try:
        wait_for_condition(lambda: ray.get(intruder.status.remote())["ready"], timeout_s=120,
                           message="the second controller ready")
        claimed = _s3().head_object(Bucket=STATE_BUCKET, Key=STATE_KEY)["ETag"]
        at_claim = _persisted()
        assert claimed != etag_before and at_claim["generation"] == generation_before + 1  # its claim landed
        assert ray.get(intruder.status.remote())["stable"] == client.status()["stable"]  # it took the state over

        other = _other_target(service, client)
        with pytest.raises(StateConflictError, match=f"state object {STATE_URI} was written by another controller"):
            client.roll(service.uri(other))
        with pytest.raises(StateConflictError, match="another controller"):  # and every operation after it
            client.rollback()
        assert _s3().head_object(Bucket=STATE_BUCKET, Key=STATE_KEY)["ETag"] == claimed  # its write never landed
        assert _persisted() == at_claim and at_claim["operation"] is None
        status = client.status()
        assert "another controller" in status["fenced"]
        assert {r["adapter_sha256"] for r in status["replicas"] if r["live"]} == {service.sha(target)}  # untouched
    finally:
        ray.kill(intruder)


# --- 3. a redeploy with other settings -----------------------------------------------------------------------


def test_a_redeploy_with_another_swap_timeout_starts_a_controller_that_takes_over(live):
    """Last: it recovers the app whatever the tests before left (the fencing test leaves its controller fenced)."""
    service = live
    old = HotswapClient(APP)
    before = old.status()
    old_name = before["controller"]
    new_args = {**service.args, "swap_timeout_s": 6}
    new_name = controller_name(APP, HotswapSettings.from_args(new_args))
    assert new_name != old_name
    serve.run(_make(new_args), name=APP, route_prefix=f"/{APP}")  # blocks until the new replicas are up
    new = wait_for_condition(lambda: (c := HotswapClient(APP)).status()["controller"] == new_name and c,
                             timeout_s=120, message="the new generation's controller")
    status = new.status()
    assert status["ready"] and status["stable"] == before["stable"]  # the state taken over
    stable_sha = before["stable"]["sha256"]
    wait_for_condition(_all_on(stable_sha), timeout_s=180, message="the new replicas on the stable version")
    assert not set(_live(new)) & {r["id"] for r in before["replicas"]}  # new replicas, on the taken-over stable

    retired = ray.get_actor(old_name, namespace=CONTROLLER_NAMESPACE)
    wait_for_condition(lambda: ray.get(retired.whoami.remote())["retired"], timeout_s=60, message="old retired")
    with pytest.raises(RolloutConflictError, match=f"{old_name} is retired: superseded by {new_name}"):
        HotswapClient._get(retired.roll.remote(service.uri("v3")))

    # the new swap_timeout_s is the one in effect: a held swap is given up after 6 s (the old generation: 60 s)
    target = _other_target(service, new)
    replicas = sorted(_live(new))
    with _held(service.marks, replicas):
        started = time.monotonic()
        with pytest.raises(RolloutError, match="no answer within swap_timeout_s=6"):
            new.roll(service.uri(target))
        assert time.monotonic() - started < 40
    wait_for_condition(_all_on(stable_sha), timeout_s=120, message="every replica back on stable")
    assert new.status()["stable"] == before["stable"]
    _assert_memory_is_persisted(new)


def test_a_claim_marks_the_cluster_in_its_gcs(live):
    """A controller claiming a state marks this cluster in its GCS (so a controller created anew here later waits for
    the replicas the first one may have left serving, even after another cluster claimed the state: the unit test
    tests/unit/test_controller.py feeds the mark to the machine). The app's controller marked its state object; in an
    actor a state object never claimed here is not marked until it is; outside an actor (a driver, the unit tests
    after these) the functions neither read nor write the GCS."""
    import uuid

    from ray.experimental.internal_kv import _internal_kv_exists

    from hotswap.controller import _CLAIMED_KEY, _claimed_here_before, _mark_claimed

    assert _internal_kv_exists(_CLAIMED_KEY + STATE_URI, namespace="hotswap")

    @ray.remote(num_cpus=0)
    class Probe:
        def claim(self, store: str) -> tuple[bool, bool]:
            before = _claimed_here_before(store)
            _mark_claimed(store)
            return before, _claimed_here_before(store)

    fresh = f"s3://{STATE_BUCKET}/never-claimed-{uuid.uuid4().hex}.json"
    probe = Probe.remote()
    try:
        assert ray.get(probe.claim.remote(fresh), timeout=60) == (False, True)
    finally:
        ray.kill(probe)
    assert _internal_kv_exists(_CLAIMED_KEY + fresh, namespace="hotswap")
    assert not _claimed_here_before(fresh)  # a driver: no GCS read
    outside = fresh + "-driver"
    _mark_claimed(outside)  # ... and no write
    assert not _internal_kv_exists(_CLAIMED_KEY + outside, namespace="hotswap")


def test_the_controller_runs_at_controller_nice(live):
    """The controller's process, every thread, at ``controller_nice`` (10 by default) or a lower priority: the control
    plane yields the CPU to the replicas when both want it (BENCHMARKS.md section 2)."""
    def nices(_self) -> list[int]:
        import os

        return sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")})

    import os

    found = ray.get(HotswapClient(APP).actor.__ray_call__.remote(nices), timeout=30)
    # none runs at a higher priority (some of Ray's own threads already run lower); a suite started at a nice value
    # above 10 leaves it there: the controller never raises a priority
    assert found[0] == max(10, os.getpriority(os.PRIO_PROCESS, 0)), found
