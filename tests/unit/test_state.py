"""The controller's desired state survives a round trip through both stores (a local file, an S3 object on
127.0.0.1), and both stores are fenced: a second controller's write makes the first one's next save fail."""

from __future__ import annotations

import pytest

from hotswap.errors import StateConflictError
from hotswap.messages import OpKind, Phase
from hotswap.state import DesiredState, FileStateStore, Operation, S3StateStore, SaveOutcomeUnknown, state_store_for
from hotswap.versions import BASE, AdapterVersion


def _sample(note: str = "") -> DesiredState:
    v1, v2 = AdapterVersion("s3://b/v1", "a" * 64, "c" * 64), AdapterVersion("s3://b/v2", "b" * 64, "d" * 64)
    return DesiredState(
        stable=v1, previous_stable=[BASE], canary=v2, canary_percent=34.0, canary_replicas=["r1"],
        operation=Operation(id="x1", kind=OpKind.PROMOTE, version=v2, targets=["r2"], previous={"r2": v1},
                            everyone=True, phase=Phase.REVERT, moving=["r2"], started=1.5, deadline=9.0,
                            events=["r1: moved"]),
        history=[{"kind": "canary", "uri": v2.uri, "note": note}], rejected={v2.key: {"problems": ["DoRA"]}},
        validated={v1.key: {"uri": v1.uri, "rank": 8}}, initial_adapter="s3://b/v1",
    )


def _same(a: DesiredState, b: DesiredState) -> bool:
    return a.to_json() == b.to_json()


def test_file_store_round_trip(tmp_path):
    store = FileStateStore(tmp_path / "state" / "app.json")
    assert store.load() is None
    state = _sample()
    store.save(state)
    assert _same(store.load(), state)
    assert not list((tmp_path / "state").glob(".app.json.*"))  # the temporary file was renamed into place


def test_s3_store_round_trip(s3_bucket):
    client, bucket = s3_bucket
    store = S3StateStore(f"s3://{bucket}/hotswap/state.json", client)
    assert store.load() is None
    state = _sample()
    store.save(state)
    store.save(state)  # its own writes never fence it
    assert _same(store.load(), state)


def test_a_second_file_store_fences_the_first(tmp_path):
    path = tmp_path / "state.json"
    first, second = FileStateStore(path), FileStateStore(path)
    first.load()
    first.save(_sample())
    second.load()
    second.save(_sample(note="claimed"))  # the new controller claims the state
    with pytest.raises(StateConflictError, match="another controller"):
        first.save(_sample())
    assert FileStateStore(path).load().generation == 2  # the stale write did not land


def test_a_second_s3_store_fences_the_first(s3_bucket):
    client, bucket = s3_bucket
    uri = f"s3://{bucket}/fenced/state.json"
    first, second = S3StateStore(uri, client), S3StateStore(uri, client)
    first.load()
    first.save(_sample())
    second.load()
    second.save(_sample(note="claimed"))
    with pytest.raises(StateConflictError, match="conditional write refused"):
        first.save(_sample())
    assert S3StateStore(uri, client).load().generation == 2


def test_two_first_writers_on_s3_one_wins(s3_bucket):
    """Both saw no object: If-None-Match lets exactly one create it."""
    client, bucket = s3_bucket
    uri = f"s3://{bucket}/race/state.json"
    first, second = S3StateStore(uri, client), S3StateStore(uri, client)
    first.load()
    second.load()
    first.save(_sample())
    with pytest.raises(StateConflictError):
        second.save(_sample(note="second"))


def test_default_location_is_per_app(base_settings):
    store = state_store_for(base_settings, "myapp")
    assert store.describe() == str(base_settings.cache_dir / "state" / "myapp.json")
    s3 = state_store_for(base_settings.model_copy(update={"state_uri": "s3://bkt/k.json"}), "myapp")
    assert s3.describe() == "s3://bkt/k.json"


def test_an_s3_write_whose_answer_was_lost_is_recognised_not_fenced(s3_bucket):
    """Review: a PUT that landed but whose response was lost left memory != stored and fenced the controller."""
    client, bucket = s3_bucket
    uri = f"s3://{bucket}/lost/state.json"
    store = S3StateStore(uri, client)
    store.load()
    store.save(_sample())

    class LosesTheAnswer:
        def __init__(self, real):
            self.real = real

        def put_object(self, **kwargs):
            self.real.put_object(**kwargs)  # lands ...
            raise TimeoutError("injected: the response was lost")  # ... but the caller never hears

        def __getattr__(self, name):
            return getattr(self.real, name)

    store.client = LosesTheAnswer(client)
    state = _sample(note="second")
    store.save(state)  # recognised as landed: no error
    store.client = client
    store.save(_sample(note="third"))  # and not fenced afterwards
    assert S3StateStore(uri, client).load().history[0]["note"] == "third"


class _Flaky:
    """A real S3 client whose next PUT lands but loses its answer, and whose next ``gets`` GETs fail."""

    def __init__(self, real, *, gets: int) -> None:
        self.real, self.lose_put, self.gets = real, True, gets

    def put_object(self, **kwargs):
        response = self.real.put_object(**kwargs)
        if self.lose_put:
            self.lose_put = False
            raise TimeoutError("injected: the response was lost")
        return response

    def get_object(self, **kwargs):
        if self.gets > 0:
            self.gets -= 1
            raise TimeoutError("injected: the check could not read either")
        return self.real.get_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def _after_an_unclear_write(client, uri: str) -> S3StateStore:
    """A store that saved once, then saved again: that write landed, but nobody could tell."""
    store = S3StateStore(uri, client)
    store.load()
    store.save(_sample(note="first"))
    store.client = _Flaky(client, gets=1)
    with pytest.raises(SaveOutcomeUnknown, match="injected: the response was lost"):
        store.save(_sample(note="lost"))
    store.client = client
    return store


def test_an_s3_write_that_landed_unseen_is_settled_by_the_next_save_not_fenced(s3_bucket):
    """An outside review: a PUT that landed with its answer lost, and the check read after it failed too, left
    the store with the ETag from before; the next save's conditional PUT was refused, and the controller fenced
    itself for good (every later operation refused until the actor was killed). The store now remembers the
    write it could not settle and settles it first: landed, it adopts its ETag; the next save goes through."""
    client, bucket = s3_bucket
    uri = f"s3://{bucket}/unclear/state.json"
    store = _after_an_unclear_write(client, uri)
    store.save(_sample(note="third"))  # not StateConflictError
    assert S3StateStore(uri, client).load().history[0]["note"] == "third"


def test_control_another_writer_after_an_unclear_write_still_fences(s3_bucket):
    """The settling must not swallow a real conflict: when another controller wrote meanwhile, it is one."""
    client, bucket = s3_bucket
    uri = f"s3://{bucket}/unclear-other/state.json"
    store = _after_an_unclear_write(client, uri)
    other = S3StateStore(uri, client)
    other.load()
    other.save(_sample(note="the other controller"))
    with pytest.raises(StateConflictError):
        store.save(_sample(note="third"))


def test_a_copy_shares_no_container_with_its_original():
    """A transition changes its copy of the state; the committed original must not see any of it (the records in the
    tables are shared, the containers and the operation are not)."""
    original = _sample()
    before = original.to_json()
    c = original.copy()
    c.previous_stable.append(AdapterVersion("s3://b/v9", "9" * 64, "9" * 64))
    c.canary_replicas.append("r9")
    c.history.append({"kind": "roll"})
    c.rejected["k"] = {"problems": []}
    c.validated["k"] = {"rank": 4}
    for name in ("targets", "moving", "done", "dropped", "reverted", "events"):
        getattr(c.operation, name).append("r9")
    c.operation.previous["r9"] = BASE
    c.operation.deaths += 1
    c.trim()
    del c.history[:]
    assert original.to_json() == before
    assert not c.same_as(original)


def test_same_as_agrees_with_the_json_a_save_writes():
    a = _sample()
    assert a.same_as(a.copy())
    assert a.same_as(DesiredState.from_json(a.to_json()))  # records equal by value, not shared
    for change in (lambda s: s.history.append({"kind": "roll"}), lambda s: s.operation.events.append("r2: moved"),
                   lambda s: setattr(s, "canary_percent", 50.0), lambda s: s.validated.pop(next(iter(s.validated))),
                   lambda s: setattr(s, "generation", s.generation + 1)):
        b = a.copy()
        change(b)
        assert not b.same_as(a) and b.to_json() != a.to_json()


def test_a_report_that_changes_nothing_serializes_and_deep_copies_nothing(monkeypatch):
    """The controller hears every heartbeat and watch of every replica. Deciding that one changed nothing must not cost
    a JSON document of the whole state (up to 200 history entries and 64 validation records) or a deep copy of it:
    before, it cost both, twice, and a roll of 2 replicas spent about a third of the controller's CPU there."""
    import copy

    from hotswap.messages import ReplicaReport
    from hotswap.rollout import RolloutMachine

    v1 = AdapterVersion("s3://b/v1", "a" * 64, "c" * 64)
    state = DesiredState(stable=v1, generation=5,
                         history=[{"kind": "roll", "uri": f"s3://b/v{i}", "replicas": ["r1"]} for i in range(200)],
                         validated={f"k{i}": {"uri": f"s3://b/v{i}", "rank": 8} for i in range(64)})
    sm = RolloutMachine(state, batch_size=1, swap_timeout_s=20, liveness_s=8, forget_after_s=60, settle_s=0,
                        now=0.0, new_id=lambda: "x")
    assert sm.heard(ReplicaReport("r1", v1), 1.0) is None  # a replica on stable: nothing to do

    def forbidden(*args, **kwargs):
        raise AssertionError("serialized or deep-copied the state for a report that changed nothing")

    monkeypatch.setattr(DesiredState, "to_json", forbidden)
    monkeypatch.setattr(copy, "deepcopy", forbidden)
    for t in (2.0, 3.0, 4.0):
        assert sm.heard(ReplicaReport("r1", v1), t) is None
        assert sm.tick(t + 0.5) is None
    assert sm.state is state


def test_a_first_write_that_failed_where_no_object_exists_is_not_unclear(s3_bucket):
    """A review: a first write (no object yet) that failed, its check read finding no object at all, was reported as
    of unknown outcome; nothing is there, so it did not land: the plain failure, and nothing to settle."""
    client, bucket = s3_bucket

    class Refuses:
        def put_object(self, **kwargs):
            raise TimeoutError("injected: never sent")

        def __getattr__(self, name):
            return getattr(client, name)

    store = S3StateStore(f"s3://{bucket}/first/state.json", Refuses())
    store.load()
    with pytest.raises(TimeoutError):
        store.save(_sample(note="first"))
    assert not store.unclear
