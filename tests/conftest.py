"""Fixtures shared by every test tier: a tiny base model, adapters built in code, a real S3 server on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import hypothesis.internal.observability  # noqa: F401 - see below
import pytest

from benchmarks._cluster import free_port  # noqa: F401 - tests import it from here
from hotswap.builtin import materialize_builtin_model, write_random_adapter
from hotswap.settings import HotswapSettings

# hypothesis's pytest plugin imports hypothesis.internal.observability in the terminal summary when no test used
# hypothesis; pytest's assertion rewriter then compiles it, and on CPython 3.11.7 that compile can die with
# "SystemError: AST constructor recursion depth mismatch" after the asyncio tests (a run of test_controller.py alone
# passed its 13 tests and exited 1 that way). Imported here, at collection, it is never compiled that late.


@pytest.fixture(scope="session")
def hotswap_home(tmp_path_factory) -> Path:
    """A private cache dir for the whole session (built-in model, blobs, local store)."""
    return tmp_path_factory.mktemp("hotswap-home")


@pytest.fixture(scope="session")
def tiny_base(hotswap_home) -> Path:
    """The built-in tiny Llama, generated through the real code path into the session cache."""
    return materialize_builtin_model("tiny-llama", cache_dir=hotswap_home)


@pytest.fixture(scope="session")
def store_root(hotswap_home) -> Path:
    root = hotswap_home / "store"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def make_adapter(tiny_base, store_root):
    """``make_adapter(name, r=..., lora_alpha=..., target_modules=..., seed=...)`` -> folder under the store root.

    Adapters are written once per name and reused across tests.
    """

    def make(name: str, *, r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=0, **kwargs) -> Path:
        out = store_root / name
        if not (out / "adapter_model.safetensors").exists():
            write_random_adapter(tiny_base, out, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                 seed=seed, **kwargs)
        return out

    return make


@pytest.fixture(scope="session")
def base_settings(hotswap_home, store_root) -> HotswapSettings:
    """Settings small enough to compile in seconds on 2 CPU cores."""
    return HotswapSettings(
        cache_dir=hotswap_home,
        local_store_root=store_root,
        max_rank=16,
        max_batch_size=4,
        prefill_chunk_tokens=8,
        max_seq_len=64,
        device="cpu",
        s3_connect_timeout_s=2,
        s3_read_timeout_s=2,
        s3_max_attempts=3,
        s3_retry_backoff_s=0.01,
    )


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1; sets the standard AWS_* variables for boto3."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; yields (client, bucket name)."""
    from hotswap.store import make_s3_client

    client = make_s3_client(connect_timeout_s=2, read_timeout_s=2)
    name = "b-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture(scope="session")
def compiled_engine(base_settings, tiny_base):
    """One torch.compile'd, hotswap-prepared engine for the whole session (compiling costs seconds)."""
    from hotswap.engine import SwapEngine

    return SwapEngine.build(base_settings)


@pytest.fixture(scope="session")
def spec(base_settings, tiny_base):
    """The tiny base model's layout (``ModelSpec``) that adapters are validated and staged against."""
    from hotswap.adapters import model_spec_for

    return model_spec_for(base_settings)


@pytest.fixture(scope="session")
def stage(base_settings, spec):
    """``stage(folder_or_uri)`` -> StagedAdapter for the session's settings (float32)."""
    import torch

    from hotswap.adapters import prepare_adapter
    from hotswap.store import AdapterFetcher

    fetcher = AdapterFetcher.from_settings(base_settings)

    def run(uri) -> object:
        return prepare_adapter(str(uri), settings=base_settings, spec=spec, dtype=torch.float32, fetcher=fetcher)

    return run


@pytest.fixture(scope="session")
def eager_reference(tiny_base):
    """``eager_reference(folder)`` -> an eager PeftModel loaded by PEFT itself from the adapter folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cache = {}

    def load(folder):
        key = str(folder)
        if key not in cache:
            base = AutoModelForCausalLM.from_pretrained(tiny_base)
            cache[key] = PeftModel.from_pretrained(base, key).eval()
        return cache[key]

    return load


class ReliabilityLog:
    """What the reliability scenarios tried and what held, for RELIABILITY.md (``python -m tests.reliability``).

    Tests call :meth:`record` with real counts; the session writes them as JSON to
    ``$HOTSWAP_RELIABILITY_JSON`` when that variable is set.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record(self, scenario: str, *, held: str, requests: int = 0, failed: int = 0, inputs: int = 0,
               in_flight: int = 0) -> None:
        """``in_flight``: client requests in flight when the fault struck."""
        self.rows.append({"scenario": scenario, "held": held, "requests": requests, "failed": failed,
                          "inputs": inputs, "in_flight": in_flight})


@pytest.fixture(scope="session")
def reliability():
    log = ReliabilityLog()
    yield log
    target = os.environ.get("HOTSWAP_RELIABILITY_JSON")
    if target:
        import json

        Path(target).write_text(json.dumps(log.rows, indent=2))
