"""The GPU tier's engine: bfloat16, CUDA graphs (``compile_mode: reduce-overhead``), built once per session.

``HOTSWAP_TEST_DEVICE=cpu`` runs the same tests on the CPU (float32, inductor's default mode) to try
them out on a machine without a GPU; the checks that only CUDA graphs can fail are skipped there.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("HOTSWAP_TEST_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise pytest.UsageError(f"HOTSWAP_TEST_DEVICE={DEVICE!r}: use cuda (the default) or cpu")
ON_GPU = DEVICE == "cuda"
needs_device = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="session")
def gpu_settings(base_settings):
    update = ({"device": "cuda", "dtype": "bfloat16", "compile_mode": "reduce-overhead"} if ON_GPU else
              {"device": "cpu", "dtype": "float32"})
    return base_settings.model_copy(update=update)


def cudagraph_skips() -> int:
    """Graphs inductor ran without their CUDA graph, so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def cudagraph_partitions() -> int:
    """Pieces of graphs that inductor's graph partition split up (counted only for a graph split in two or more,
    e.g. around a CPU op, which then runs outside the CUDA graph), so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_partitions"]


@pytest.fixture(scope="session")
def gpu_engine(gpu_settings, tiny_base):
    """The engine, built and warmed up; ``engine.skips_before_build`` is :func:`cudagraph_skips` before that, so
    that a test can check that neither the warm-up nor anything since ran a graph without CUDA graphs, and
    ``engine.partitions_before_build`` likewise :func:`cudagraph_partitions` (part of a step outside its graph)."""
    from hotswap.engine import SwapEngine

    before, partitions = cudagraph_skips(), cudagraph_partitions()
    engine = SwapEngine.build(gpu_settings)
    engine.skips_before_build, engine.partitions_before_build = before, partitions
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def gpu_stage(gpu_engine):
    """``gpu_stage(folder)`` -> a StagedAdapter in the GPU engine's dtype."""
    from hotswap.adapters import model_spec_for, prepare_adapter

    spec = model_spec_for(gpu_engine.settings)
    return lambda folder: prepare_adapter(str(folder), settings=gpu_engine.settings, spec=spec,
                                          dtype=gpu_engine.dtype)
