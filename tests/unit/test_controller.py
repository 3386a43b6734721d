"""The controller actor's own logic, driven directly with asyncio (no Ray cluster): start-up that is retried,
failed saves that fail an operation cleanly, a re-pushed config that is a new version, one controller per
settings generation, and the catalog's bounded, single-flight, retried staging.

``ray.put`` is replaced by the identity here (staged adapters stay in this process); everything else is real:
the local adapter store, validation, staging and the file state store.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest

from hotswap.controller import HotswapController, controller_name
from hotswap.errors import AdapterValidationError, ConfigError, ControllerUnavailableError, RolloutConflictError
from hotswap.messages import ReplicaReport
from hotswap.settings import HotswapSettings
from hotswap.versions import BASE


@pytest.fixture(autouse=True)
def _local_put(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "put", lambda value: value)


def _settings(base_settings, tmp_path, **update) -> HotswapSettings:
    return base_settings.model_copy(update={"state_uri": str(tmp_path / "state.json"), **update})


def _report(controller: HotswapController, rid: str, running=BASE) -> ReplicaReport:
    return ReplicaReport(rid, running, settings_fingerprint=controller.settings.fingerprint)


async def _until(predicate, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def _replica(controller: HotswapController, rid: str, stop: asyncio.Event) -> None:
    """A replica that applies whatever it is assigned at once (no model), as the real one reports it."""
    assignment = await controller.register(_report(controller, rid))
    running = assignment.version
    await controller.heartbeat(_report(controller, rid, running))
    while not stop.is_set():
        assignment = await controller.watch(_report(controller, rid, running))
        if assignment is not None:
            running = assignment.version
            await controller.heartbeat(_report(controller, rid, running))


def test_a_missing_initial_adapter_is_waited_for_not_cached_as_failed(base_settings, tmp_path, make_adapter,
                                                                     store_root):
    """Defect 1: deploying before uploading initial_adapter poisoned the controller for good."""
    uri = f"late-{tmp_path.name}/v1"
    settings = _settings(base_settings, tmp_path, initial_adapter=uri, watch_timeout_s=0.5,
                         replica_liveness_s=2)

    async def scenario():
        controller = HotswapController(settings, "late")
        await _until(lambda: _waiting(controller, uri))
        with pytest.raises(ControllerUnavailableError, match=uri):
            await controller.register(_report(controller, "r0"))
        shutil.copytree(make_adapter("late-src"), store_root / uri)  # the upload, after the deploy
        await _until(lambda: _ready(controller), timeout_s=60)
        assignment = await controller.register(_report(controller, "r0"))
        assert assignment.version.uri == uri and assignment.staged[0] is not None

    asyncio.run(scenario())


async def _waiting(controller, uri) -> bool:
    status = await controller.status()
    return not status["ready"] and uri in status["waiting_for"]


async def _ready(controller) -> bool:
    return (await controller.status())["ready"]


def test_a_failed_state_save_fails_the_roll_and_leaves_nothing_in_progress(base_settings, tmp_path, make_adapter):
    """Defect 2: a save error left state.rollout set, and every later operation was 'in progress'."""
    settings = _settings(base_settings, tmp_path, watch_timeout_s=0.3, replica_liveness_s=2)
    v1 = str(make_adapter("ctl-v1", seed=1))

    async def scenario():
        controller = HotswapController(settings, "saves")
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(_replica(controller, f"r{i}", stop)) for i in range(2)]
        await _until(lambda: _live(controller, 2))
        save = controller.store.save

        def broken(state):
            raise OSError("injected: state store unreachable")

        controller.store.save = broken
        with pytest.raises(RolloutConflictError, match="could not save its state"):
            await controller.roll(v1)
        controller.store.save = save
        status = await controller.status()
        assert status["rollout"] is None and status["stable"]["uri"] == "base"
        result = await controller.roll(v1)  # not "a rollout is in progress"
        assert sorted(result["swapped"]) == ["r0", "r1"]
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_a_save_that_landed_unseen_is_overwritten_by_the_controllers_state_and_does_not_fence(
        base_settings, tmp_path, make_adapter, s3_bucket):
    """An outside review: the roll's save landed on S3 with its answer lost, and the check read failed too. The
    caller was told "not started", yet the stored state held the operation (a restarted controller would have
    resumed it), and the next save was refused: the controller fenced itself for good. Now the store settles the
    unclear write and the controller saves what it holds at its next tick: the stored state has no operation,
    and the next roll runs."""
    from tests.unit.test_state import _Flaky

    client, bucket = s3_bucket
    settings = _settings(base_settings, tmp_path, watch_timeout_s=0.3, replica_liveness_s=2,
                         state_uri=f"s3://{bucket}/ctl/state.json")
    v1 = str(make_adapter("ctl-unclear-v1", seed=3))

    def stored():
        from hotswap.state import S3StateStore

        return S3StateStore(settings.state_uri, client).load()

    async def scenario():
        controller = HotswapController(settings, "unclear")
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(_replica(controller, f"r{i}", stop)) for i in range(2)]
        await _until(lambda: _live(controller, 2))
        controller.store.client = _Flaky(client, gets=1)
        with pytest.raises(ControllerUnavailableError, match="did not confirm the save .* 'hotswap status'"):
            await controller.roll(v1)  # whether it started is not known: it says so
        assert stored().operation is not None  # it landed: what a restarted controller would resume

        async def overwritten():
            return stored().operation is None

        await _until(overwritten, timeout_s=10)  # the next tick saved the controller's own state over it
        status = await controller.status()
        assert status["rollout"] is None and status["stable"]["uri"] == "base"
        result = await controller.roll(v1)  # neither fenced nor "in progress"
        assert sorted(result["swapped"]) == ["r0", "r1"] and stored().stable.uri == v1
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_a_caller_whose_operation_a_newer_controller_took_over_is_told_it_continues(base_settings, tmp_path,
                                                                                   make_adapter):
    """An outside review: a redeploy's controller claimed the state while a roll ran; the old one, fenced, answered
    its waiting caller with the fencing error (exit 1, "refused"), yet the new controller resumes the roll. The
    caller is now told the controller was replaced and the operation goes on there (exit 3, as for a controller
    that died mid-call), naming ``hotswap status``."""
    from hotswap.errors import EXIT_UNAVAILABLE

    settings = _settings(base_settings, tmp_path, watch_timeout_s=0.3, replica_liveness_s=4, swap_timeout_s=120)
    v1 = str(make_adapter("ctl-takeover-v1", seed=4))

    async def stuck(controller, stop):  # alive, never applies what it is handed: the roll stays in progress
        await controller.register(_report(controller, "r0"))
        while not stop.is_set():
            await controller.heartbeat(_report(controller, "r0"))
            await asyncio.sleep(0.2)

    async def in_progress(controller):
        return (await controller.status())["rollout"] is not None

    async def scenario():
        old = HotswapController(settings, "takeover-old")
        stop_old, stop_new = asyncio.Event(), asyncio.Event()
        replica = asyncio.ensure_future(stuck(old, stop_old))
        await _until(lambda: _live(old, 1))
        roll = asyncio.ensure_future(old.roll(v1))
        await _until(lambda: in_progress(old))
        new = HotswapController(settings, "takeover-new")  # a redeploy: claims the same state
        await new._ready(30)
        stop_old.set()  # the replica now reports to the new one; the old one, at its next save, is refused
        await replica
        replica = asyncio.ensure_future(stuck(new, stop_new))
        with pytest.raises(ControllerUnavailableError) as info:
            await asyncio.wait_for(roll, 30)
        assert await in_progress(new)  # the roll goes on under the new controller
        stop_new.set()
        await replica
        return info.value

    error = asyncio.run(scenario())
    assert error.exit_code == EXIT_UNAVAILABLE
    assert "another controller" in str(error) and "hotswap status" in str(error), error


def test_the_controller_records_what_it_hands_out_and_the_report_the_call_carried(base_settings, tmp_path,
                                                                                  make_adapter):
    """register and watch record the version they answer with and the number of the report the call carried: until
    a newer report is heard, the replica may be about to apply it (the revert waits for that)."""
    settings = _settings(base_settings, tmp_path, watch_timeout_s=0.3, replica_liveness_s=2)
    v1 = str(make_adapter("ctl-handed", seed=3))

    def numbered(running, n: int) -> ReplicaReport:
        return ReplicaReport("r0", running, settings_fingerprint=settings.fingerprint, seq=(7, n))

    async def scenario():
        controller = HotswapController(settings, "handed")
        assignment = await controller.register(numbered(BASE, 1))
        registry = controller.sm.registry  # the machine exists once the controller is ready
        assert registry.in_flight("r0") == assignment.version == BASE
        await controller.heartbeat(numbered(BASE, 2))
        assert registry.in_flight("r0") is None
        rolling = asyncio.ensure_future(controller.roll(v1))
        n, assignment = 3, None
        while assignment is None:  # a watch times out until the roll has fetched, validated and started
            assignment = await controller.watch(numbered(BASE, n))
            n += 1
        assert assignment.version.uri == v1 and registry.in_flight("r0") == assignment.version
        await controller.heartbeat(numbered(BASE, 2))  # a late report, older than the watch's: it says nothing new
        assert registry.in_flight("r0") == assignment.version
        await controller.heartbeat(numbered(assignment.version, n + 1))
        assert registry.in_flight("r0") is None
        assert (await rolling)["swapped"] == ["r0"]

    asyncio.run(scenario())


_PRIORITY_PROBE = """
import json, os, sys, threading
from hotswap.controller import lower_priority

def nices():
    seen = set()
    for t in os.listdir("/proc/self/task"):
        try:
            seen.add(os.getpriority(os.PRIO_PROCESS, int(t)))
        except ProcessLookupError:  # a thread that ended after the listing: a joined thread's task lingers a moment
            pass
    return sorted(seen)

started, stop = threading.Event(), threading.Event()
# a daemon: should the probe fail, the process still ends (with a traceback), not wait on it forever
early = threading.Thread(target=lambda: (started.set(), stop.wait()), daemon=True)
early.start()
started.wait()
target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)
if sys.argv[1] == "process-call":  # the naive way: on Linux it sets the calling thread only
    os.setpriority(os.PRIO_PROCESS, 0, target)
    changed = 1
else:
    changed = lower_priority(target)
later = []
thread = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0)))
thread.start()
thread.join()
result = {"target": target, "changed": changed, "nices": nices(), "later": later}
result["again"] = lower_priority(max(0, target - 3))  # never raised back (only a privileged process may)
result["after"] = nices()
stop.set()
early.join()
print(json.dumps(result))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread priorities are Linux's")
@pytest.mark.skipif(os.name == "posix" and os.getpriority(os.PRIO_PROCESS, 0) >= 15,
                    reason="the suite runs at nice 15 or more: no room to lower the priority by 5")
@pytest.mark.parametrize("how", ["lower_priority", "process-call"])
def test_the_controller_priority_reaches_every_thread_and_is_never_raised(how):
    """controller_nice: every thread of the controller's process, those started before as well as after, runs at
    the nice value; a lower value later changes nothing. Control: ``os.setpriority`` on the process, the obvious
    call, leaves a thread started before it at the old priority on Linux."""
    # the probe takes about 0.5 s; the limit only bounds a probe that hangs
    done = subprocess.run([sys.executable, "-c", _PRIORITY_PROBE, how], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the probe failed:\n{done.stderr}"
    result = json.loads(done.stdout)
    target = result["target"]
    if how == "process-call":
        assert len(result["nices"]) == 2 and target in result["nices"]  # the early thread kept its priority
        return
    assert result["nices"] == [target] and result["later"] == [target] and result["changed"] >= 2
    assert result["again"] == 0 and result["after"] == [target]


async def _live(controller, n) -> bool:
    status = await controller.status()
    return status["ready"] and sum(r["live"] for r in status["replicas"]) == n


def test_a_repushed_config_is_a_new_version_and_is_validated(base_settings, tmp_path, make_adapter, store_root):
    """Defect 3: identity was URI + weights sha256, so a new adapter_config.json (even use_dora) was ignored."""
    settings = _settings(base_settings, tmp_path, watch_timeout_s=0.3, replica_liveness_s=2)
    folder = store_root / f"repush-{tmp_path.name}"
    shutil.copytree(make_adapter("repush-src", seed=5), folder)
    config_path = folder / "adapter_config.json"

    async def scenario():
        controller = HotswapController(settings, "repush")
        stop = asyncio.Event()
        task = asyncio.ensure_future(_replica(controller, "r0", stop))
        await _until(lambda: _live(controller, 1))
        first = await controller.roll(str(folder))
        config = json.loads(config_path.read_text())
        config["lora_alpha"] = 64
        config_path.write_text(json.dumps(config))
        second = await controller.roll(str(folder))
        assert second["swapped"] == ["r0"]  # a new version: the replica swapped
        assert second["version"]["sha256"] == first["version"]["sha256"]
        assert second["version"]["config_sha256"] != first["version"]["config_sha256"]
        config["use_dora"] = True
        config_path.write_text(json.dumps(config))
        with pytest.raises(AdapterValidationError, match="DoRA"):
            await controller.roll(str(folder))
        status = await controller.status()
        assert status["stable"] == second["version"]
        assert any(r["uri"] == str(folder) for r in status["rejected"].values())
        stop.set()
        await task

    asyncio.run(scenario())


def test_each_settings_generation_has_its_own_controller(base_settings):
    """Defect 5: a redeploy with changed settings met the old detached controller."""
    changed = base_settings.model_copy(update={"swap_timeout_s": 7.0})
    assert controller_name("app", base_settings) != controller_name("app", changed)
    assert controller_name("app", base_settings) == controller_name("app", base_settings.model_copy())


def test_a_liveness_shorter_than_the_watch_is_refused():
    """Defect 6: replica_liveness_s <= the watch timeout made idle replicas look dead."""
    with pytest.raises(ConfigError, match="replica_liveness_s .* watch_timeout_s"):
        HotswapSettings.from_args({"replica_liveness_s": 5, "watch_timeout_s": 5})
    HotswapSettings.from_args({"replica_liveness_s": 8, "watch_timeout_s": 5})


def test_staging_is_single_flight_retried_after_a_failure_and_bounded(base_settings, tmp_path, make_adapter,
                                                                      monkeypatch):
    """Defects 10 and 13: two replicas asking for one version staged it twice; a staging failure made every
    later call raise; staged versions were never evicted."""
    from hotswap import staging
    from hotswap.catalog import VersionCatalog

    settings = _settings(base_settings, tmp_path)
    catalog = VersionCatalog(settings, _spec(settings))
    calls = {"n": 0, "fail": True}
    real = staging.stage_adapter

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["fail"]:
            calls["fail"] = False
            raise RuntimeError("injected staging failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(staging, "stage_adapter", counting)

    async def scenario():
        versions = []
        for i in range(5):
            versions.append(await catalog.resolve(str(make_adapter(f"stage-{i}", seed=20 + i)), known={}))
        version, record = versions[0]
        with pytest.raises(RuntimeError, match="injected"):
            await catalog.staged_ref(version, "float32", record)
        refs = await asyncio.gather(*(catalog.staged_ref(version, "float32", record) for _ in range(4)))
        assert calls["n"] == 2 and all(r is refs[0] for r in refs)  # retried once, then shared by all four
        for v, rec in versions[1:]:
            await catalog.staged_ref(v, "float32", rec)
        catalog.keep({version})
        kept = catalog.staged_versions()
        assert version.key in kept and len(kept) == 1 + 2  # in use, plus the two most recent

    asyncio.run(scenario())


def test_staging_replaces_a_damaged_cached_blob_instead_of_failing_for_ever(base_settings, tmp_path, make_adapter):
    """A version already validated is staged again from its cached blob (a revert, a restarted controller). If that
    blob was damaged (a flipped byte), staging used to fail the same way on every try, so the stable version could not
    be handed to a replica until someone rolled its URI again. The damaged blob is removed and downloaded again once;
    a blob that is intact but holds other bytes than the record (the URI re-pushed) still fails, clearly."""
    from hotswap.catalog import VersionCatalog

    settings = _settings(base_settings, tmp_path, cache_dir=tmp_path / "cache")  # its own blobs, damaged below
    catalog = VersionCatalog(settings, _spec(settings))
    folder = make_adapter("damaged-blob", seed=31)

    async def scenario():
        version, record = await catalog.resolve(str(folder), known={})
        blob = catalog.fetcher.cache.path_for(version.sha256)
        raw = bytearray(blob.read_bytes())
        raw[-1] ^= 0xFF
        blob.write_bytes(bytes(raw))
        staged = await catalog.staged_ref(version, "float32", record)
        assert staged.identity == version
        assert catalog.fetcher.cache.path_for(version.sha256).read_bytes() == (
            folder / "adapter_model.safetensors").read_bytes()  # repaired
        other, other_record = await catalog.resolve(str(make_adapter("damaged-blob-other", seed=32)), known={})
        with pytest.raises(AdapterValidationError, match="no longer match"):  # intact bytes, not the record's
            await catalog.staged_ref(other, "float32", {**other_record, "sha256": version.sha256})

    asyncio.run(scenario())


def _spec(settings):
    from hotswap.adapters import model_spec_for

    return model_spec_for(settings)


@pytest.mark.parametrize("change", [{"max_rank": 8}, {"target_modules": ["q_proj"]}], ids=["max_rank", "modules"])
def test_a_validation_record_from_another_model_layout_is_not_trusted(base_settings, tmp_path, make_adapter,
                                                                     change):
    """An outside review: the state's validation records were keyed by the version alone, so after a redeploy
    with a smaller max_rank (or fewer target modules) the stable version was staged from its old record without
    a check: an r=16 adapter was handed to replicas prepared for r=8 (they failed with a tensor size error), and
    with fewer modules its other tensors were silently dropped. A record is trusted only for the checks it
    passed; under another layout the version is validated again, and refused naming why."""
    from hotswap.catalog import VersionCatalog

    before = _settings(base_settings, tmp_path)
    after = _settings(base_settings, tmp_path, **change)
    folder = make_adapter("layout-r16", r=16, target_modules=("q_proj", "v_proj"), seed=41)

    async def scenario():
        version, record = await VersionCatalog(before, _spec(before)).resolve(str(folder), known={})
        known = {version.key: record}
        same = VersionCatalog(before, _spec(before))
        assert (await same.resolve(str(folder), known=known))[1] == record  # the same layout: trusted
        assert await same.staged_ref(version, "float32", record) is not None
        catalog = VersionCatalog(after, _spec(after))
        with pytest.raises(AdapterValidationError) as resolved:
            await catalog.resolve(str(folder), known=known)
        with pytest.raises(AdapterValidationError) as staged:
            await catalog.staged_ref(version, "float32", record)
        return str(resolved.value), str(staged.value)

    resolved, staged = asyncio.run(scenario())
    what = "rank" if "max_rank" in change else "v_proj"
    assert what in resolved and what in staged, (resolved, staged)


def test_a_record_from_before_checked_for_stages_from_the_cache_though_its_uri_moved_on(base_settings, tmp_path,
                                                                                      make_adapter, store_root):
    """An outside review of the test above's fix: a record without ``checked_for`` (every record saved by an earlier
    release) was validated again from its URI, so a stable version whose URI had since been overwritten (a
    ``.../latest``) could no longer be staged, though its weights sat in the cache under their sha256. It is checked
    again from the cache now; the URI is read only when the weights were evicted."""
    import shutil

    from hotswap.catalog import VersionCatalog

    settings = _settings(base_settings, tmp_path)
    folder = store_root / "latest-moved"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(make_adapter("latest-a", seed=51), folder)

    async def scenario():
        version, record = await VersionCatalog(settings, _spec(settings)).resolve(str(folder), known={})
        old = {k: v for k, v in record.items() if k != "checked_for"}  # as an earlier release saved it
        shutil.rmtree(folder)
        shutil.copytree(make_adapter("latest-b", seed=52), folder)  # the URI now holds another version
        catalog = VersionCatalog(settings, _spec(settings))
        staged = await catalog.staged_ref(version, "float32", old)
        assert staged.identity == version
        other = await catalog.staged_ref(version, "bfloat16", old)  # validated once: this one loads the cached blob
        assert other.identity == version and other is not staged
        blob = catalog.fetcher.cache.path_for(version.sha256)
        raw = bytearray(blob.read_bytes())
        raw[-1] ^= 1  # damaged in the cache (a flipped low bit of the last weight: still finite, still "valid")
        blob.write_bytes(bytes(raw))
        with pytest.raises(AdapterValidationError, match="no longer cached"):  # not staged from the damaged copy
            await VersionCatalog(settings, _spec(settings)).staged_ref(version, "float32", old)
        assert not blob.exists()  # removed, as the trusted path removes a damaged blob

    asyncio.run(scenario())


def test_the_blob_cache_is_capped_lru_but_keeps_what_is_in_use(base_settings, tmp_path, make_adapter):
    from hotswap.catalog import VersionCatalog

    settings = _settings(base_settings, tmp_path, cache_dir=tmp_path / "cache", adapter_cache_max_bytes=1)
    catalog = VersionCatalog(settings, _spec(settings))

    async def scenario():
        first, _ = await catalog.resolve(str(make_adapter("blob-a", seed=31)), known={})
        catalog.keep({first})
        second, _ = await catalog.resolve(str(make_adapter("blob-b", seed=32)), known={})
        third, _ = await catalog.resolve(str(make_adapter("blob-c", seed=33)), known={})
        blobs = {p.stem for p in (tmp_path / "cache" / "blobs").glob("*.safetensors")}
        assert first.sha256 in blobs and third.sha256 in blobs and second.sha256 not in blobs

    asyncio.run(scenario())


def test_ray_errors_are_unwrapped_in_one_place():
    """Defect 13: a RayActorError on the admin path was a bare 500; a controller death printed a traceback."""
    from ray.exceptions import RayActorError

    from hotswap.errors import EXIT_UNAVAILABLE, unwrap

    error = unwrap(RayActorError())
    assert isinstance(error, ControllerUnavailableError) and error.http_status == 503
    assert error.exit_code == EXIT_UNAVAILABLE and "hotswap status" in str(error)
    assert AdapterValidationError("u", ["x"]).http_status == 422 and RolloutConflictError("x").http_status == 409


def test_the_controller_verifies_signatures_and_pins_before_anything_moves(base_settings, tmp_path, make_adapter,
                                                                         store_root):
    """Issue 'trust': unsigned (when required), tampered or wrongly pinned versions are rejected with the reason and
    no replica is touched; a signed version's key id is recorded in history."""
    from hotswap.signing import sign_adapter_dir
    from tests.unit.test_signing import Key

    alice = Key(tmp_path, "alice")
    settings = _settings(base_settings, tmp_path, watch_timeout_s=0.3, replica_liveness_s=2,
                         signature_required=True, trusted_public_keys=(str(alice.public),))
    signed, unsigned, tampered = (store_root / f"trust-{tmp_path.name}-{n}" for n in ("signed", "unsigned", "tampered"))
    for folder, seed in ((signed, 61), (unsigned, 62), (tampered, 63)):
        shutil.copytree(make_adapter(f"trust-src-{seed}", seed=seed), folder)
    sign_adapter_dir(signed, alice.private)
    sign_adapter_dir(tampered, alice.private)
    config = json.loads((tampered / "adapter_config.json").read_text())
    config["lora_alpha"] = 99
    (tampered / "adapter_config.json").write_text(json.dumps(config))

    async def scenario():
        controller = HotswapController(settings, "trust")
        stop = asyncio.Event()
        task = asyncio.ensure_future(_replica(controller, "r0", stop))
        await _until(lambda: _live(controller, 1))
        with pytest.raises(AdapterValidationError, match="unsigned"):
            await controller.roll(str(unsigned))
        with pytest.raises(AdapterValidationError, match="tampered"):
            await controller.roll(str(tampered))
        with pytest.raises(AdapterValidationError, match="pinned"):
            await controller.roll(str(signed), expected_sha256="0" * 64)
        status = await controller.status()
        assert status["stable"]["uri"] == "base" and status["replicas"][0]["swaps"] is None  # nothing moved
        result = await controller.roll(str(signed))
        assert result["signer"] == alice.key_id and result["swapped"] == ["r0"]
        status = await controller.status()
        assert status["history"][-1]["signer"] == alice.key_id and status["stable"]["uri"] == str(signed)
        stop.set()
        await task

    asyncio.run(scenario())


async def _claim_in(monkeypatch, settings, cluster: str, name: str) -> HotswapController:
    """A controller of app ``name`` started (and claiming the state) as if in Ray cluster ``cluster``."""
    import hotswap.controller as module

    monkeypatch.setattr(module, "_cluster_name", lambda: cluster)
    controller = HotswapController(settings, name)
    await _until(lambda: _ready(controller), timeout_s=60)
    return controller


@pytest.mark.parametrize("marked", [True, False])
def test_a_new_controller_where_the_state_was_claimed_before_waits_the_settle_time(base_settings, tmp_path,
                                                                                   monkeypatch, marked):
    """Not restarted by Ray, but a controller of this state claimed it in this cluster before (killed, created anew),
    and another cluster claimed it since: replicas here may serve from the first one's assignments, unheard, so the
    new controller waits the settle time. Every claim marks the cluster first (a GCS key; tests/integration reads the
    real one). The control: without the mark it does not wait."""
    import hotswap.controller as module

    settings = _settings(base_settings, tmp_path, watch_timeout_s=0.5, replica_liveness_s=2)
    marks: list[str] = []
    monkeypatch.setattr(module, "_mark_claimed", marks.append)
    monkeypatch.setattr(module, "_restarted", lambda: False)

    def claim(cluster: str, name: str):
        return _claim_in(monkeypatch, settings, cluster, name)

    async def scenario():
        await claim("cluster-b", "first")  # the state is claimed in cluster B (after cluster A, in the story)
        monkeypatch.setattr(module, "_claimed_here_before", lambda store: marked)
        controller = await claim("cluster-a", "second")  # a new controller back in cluster A
        assert (controller.sm.registry.settle_s > 0) == marked, controller.sm.registry.settle_s
        assert marks == [controller.store.describe()] * 2  # each claim marked its cluster

    asyncio.run(scenario())


def test_a_start_retried_after_a_failed_claim_does_not_find_its_own_mark(base_settings, tmp_path, monkeypatch):
    """Whether a controller of this state ran here before is asked once, before this controller marks the cluster:
    a first claim that fails (the state store unreachable a moment) is retried, and the retry must not take the mark
    the same controller wrote for a predecessor's (which would make a new cluster wait the settle time)."""
    import hotswap.controller as module

    settings = _settings(base_settings, tmp_path, watch_timeout_s=0.5, replica_liveness_s=2)
    cluster = ["cluster-b"]
    marks: set[tuple[str, str]] = set()  # (cluster, state object): each cluster's GCS, as the real key is
    monkeypatch.setattr(module, "_mark_claimed", lambda store: marks.add((cluster[0], store)))
    monkeypatch.setattr(module, "_claimed_here_before", lambda store: (cluster[0], store) in marks)
    monkeypatch.setattr(module, "_restarted", lambda: False)
    monkeypatch.setattr(module, "_START_BACKOFF_S", (0.05, 0.05))

    async def scenario():
        await _claim_in(monkeypatch, settings, "cluster-b", "first")  # claimed in cluster B
        cluster[0] = "cluster-a"
        monkeypatch.setattr(module, "_cluster_name", lambda: "cluster-a")
        controller = HotswapController(settings, "second")  # new in cluster A, never claimed there
        save, failed = controller.store.save, []

        def once(state):
            if not failed:
                failed.append(state)
                raise OSError("injected: state store unreachable")
            return save(state)

        controller.store.save = once
        await _until(lambda: _ready(controller), timeout_s=60)
        assert failed and ("cluster-a", controller.store.describe()) in marks  # it failed once, and marked A
        assert controller.sm.registry.settle_s == 0  # nobody ran here before it: no wait

    asyncio.run(scenario())


@pytest.mark.parametrize("restarted", [True, False])
def test_the_controller_tells_the_machine_whether_ray_restarted_it(base_settings, tmp_path, monkeypatch, restarted):
    """The settle wait's last rule is the machine's (tests/unit/test_rollout_cases.py); this checks the controller feeds
    it: a state last claimed in another cluster is waited for only by a controller Ray restarted (the control: a new
    one does not wait)."""
    import hotswap.controller as module

    settings = _settings(base_settings, tmp_path, watch_timeout_s=0.5, replica_liveness_s=2)

    def claim(cluster: str, name: str):
        return _claim_in(monkeypatch, settings, cluster, name)

    async def scenario():
        await claim("cluster-a", "first")  # the state is claimed in cluster A
        monkeypatch.setattr(module, "_restarted", lambda: restarted)
        controller = await claim("cluster-b", "second")  # ... then by a controller in cluster B
        settle = controller.sm.registry.settle_s
        expected_wait = restarted
        assert (settle > 0) == expected_wait, settle

    asyncio.run(scenario())
