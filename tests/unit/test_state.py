"""The controller's state survives a round trip through both stores (a local file, an S3 object on 127.0.0.1)."""

from __future__ import annotations

from hotswap.state import ControllerState, FileStateStore, Rollout, S3StateStore, Version, state_store_for


def _sample() -> ControllerState:
    v1, v2 = Version("s3://b/v1", "a" * 64), Version("s3://b/v2", "b" * 64)
    return ControllerState(
        stable=v1, previous_stable=[Version("base", "")], canary=v2, canary_replicas=["r1"],
        assignments={"r1": v2, "r2": v1},
        rollout=Rollout(id="x1", kind="promote", version=v2, targets=["r2"], previous={"r2": v1}, done=[], started=1.5,
                        events=["r1: moved"]),
        history=[{"kind": "canary", "uri": v2.uri}], rejected={"s3://b/bad": {"problems": ["DoRA"]}},
        validated={v1.sha256: {"uri": v1.uri, "rank": 8}}, initial_adapter="s3://b/v1",
    )


def test_file_store_round_trip(tmp_path):
    store = FileStateStore(tmp_path / "state" / "app.json")
    assert store.load() is None
    store.save(_sample())
    assert store.load() == _sample()
    assert not list((tmp_path / "state").glob(".app.json.*"))  # the temporary file was renamed into place


def test_s3_store_round_trip(s3_bucket):
    client, bucket = s3_bucket
    store = S3StateStore(f"s3://{bucket}/hotswap/state.json", client)
    assert store.load() is None
    store.save(_sample())
    assert store.load() == _sample()


def test_default_location_is_per_app(base_settings):
    store = state_store_for(base_settings, "myapp")
    assert store.describe() == str(base_settings.cache_dir / "state" / "myapp.json")
    s3 = state_store_for(base_settings.model_copy(update={"state_uri": "s3://bkt/k.json"}), "myapp")
    assert s3.describe() == "s3://bkt/k.json"
