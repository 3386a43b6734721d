"""The controller's desired state survives a round trip through both stores (a local file, an S3 object on
127.0.0.1), and both stores are fenced: a second controller's write makes the first one's next save fail."""

from __future__ import annotations

import pytest

from hotswap.errors import StateConflictError
from hotswap.messages import OpKind, Phase
from hotswap.state import DesiredState, FileStateStore, Operation, S3StateStore, state_store_for
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
