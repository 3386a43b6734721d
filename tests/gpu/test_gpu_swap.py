"""GPU tier: bf16, CUDA graphs (mode reduce-overhead). Skipped without CUDA.

Checks what only a GPU can show: swaps keep every LoRA data_ptr (CUDA graphs replay the
captured addresses), no cudagraph is skipped, nothing recompiles, and outputs follow the
swapped adapter (compared with an eager bf16 PEFT model).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.conftest import cudagraph_skips, needs_device

pytestmark = [pytest.mark.gpu, pytest.mark.slow, needs_device]


def test_cuda_graph_swaps_keep_addresses_and_never_recompile(gpu_engine, make_adapter, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hotswap.adapters import model_spec_for, prepare_adapter

    engine = gpu_engine
    spec = model_spec_for(engine.settings)
    lora = [p for n, p in engine.peft_model.named_parameters() if "lora_" in n]
    ptrs = [p.data_ptr() for p in lora]
    graphs = engine.compiled_graphs
    adapters = [make_adapter("gpu-a", r=8, seed=61),
                make_adapter("gpu-b", r=16, lora_alpha=4, target_modules=("o_proj", "down_proj"), seed=62)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for folder in adapters * 2:
            staged = prepare_adapter(str(folder), settings=engine.settings, spec=spec, dtype=engine.dtype)
            engine.apply(staged)
            got = engine.last_logits(["Hello GPU", "a longer prompt that spans two prefill chunks"])
            ref = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_base, dtype=engine.dtype), str(folder)
            ).to(engine.device).eval()
            tok = engine.tokenizer
            want = torch.stack([ref(**tok(p, return_tensors="pt").to(engine.device)).logits[0, -1].float().cpu()
                                for p in ["Hello GPU", "a longer prompt that spans two prefill chunks"]])
            assert (got - want).abs().max().item() < 0.1  # bf16
    assert [p.data_ptr() for p in lora] == ptrs
    assert engine.compiled_graphs == graphs
    assert cudagraph_skips() == engine.skips_before_build
