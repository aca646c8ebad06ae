"""The dry run's machinery (``python -m bench dryrun``) on a small config: it applies the preset as training does,
its simulated peak agrees with the estimator, and a block of the wrong shape is found by name."""

from __future__ import annotations

import pytest
import torch

from bench.dryrun import DryRunError, simulate
from trainer_core.config import MemoryConfig
from trainer_core.memory.estimate import estimate_vram, estimate_host_ram
from trainer_core.models.flux import flux_config

# Full-size heads (128) and depth-wise structure, narrow (4 heads), so the whole suite stays fast.
SMALL = dict(flux_config("flux1-dev"), num_layers=3, num_single_layers=6, num_attention_heads=4,
             joint_attention_dim=256, pooled_projection_dim=64)
SMALL.pop("_class_name")
RES, TEXT = 512, 128


def _estimate(mem, **kwargs):
    return estimate_vram(SMALL, mem, resolution=RES, text_tokens=TEXT, device_type="cpu", **kwargs)


@pytest.mark.parametrize("mem, compute_dtype", [
    (MemoryConfig(base_precision="fp8", gradient_checkpointing=True, blocks_to_swap=4), "bf16"),
    (MemoryConfig(base_precision="bf16", gradient_checkpointing=True, uncheckpointed_blocks=3), "bf16"),
    (MemoryConfig(base_precision="fp8", gradient_checkpointing=False), "bf16"),
    (MemoryConfig(gradient_checkpointing=True, uncheckpointed_blocks=3), "fp32"),  # activations at 4 bytes a value
])
def test_simulated_peak_matches_the_estimate(mem, compute_dtype):
    sim = simulate(SMALL, mem, resolution=RES, text_tokens=TEXT, compute_dtype=compute_dtype)
    est = _estimate(mem, compute_dtype=compute_dtype)
    assert 0.9 < est.total / sim.peak < 1.1, (est.total, sim.peak)
    # the swap ring's packed blocks are host memory, not accelerator memory
    host = estimate_host_ram(estimate_vram(SMALL, mem, resolution=RES, text_tokens=TEXT), SMALL, mem)
    assert sim.host_peak == pytest.approx(host.pinned_blocks, rel=0.01)
    assert (sim.host_peak > 0) == bool(mem.blocks_to_swap)


def test_attention_without_a_fused_kernel_is_counted():
    mem = MemoryConfig(gradient_checkpointing=False)
    fused = simulate(SMALL, mem, resolution=RES, text_tokens=TEXT)
    plain = simulate(SMALL, mem, resolution=RES, text_tokens=TEXT, fused_attention=False)
    est = _estimate(mem, fused_attention=False)
    assert plain.peak > 1.3 * fused.peak  # the attention probabilities are a large share at these sizes
    assert 0.9 < est.total / plain.peak < 1.1, (est.total, plain.peak)


def test_a_mis_shaped_block_is_found_by_name():
    def break_block(model):  # a single block whose MLP projection is narrower than the checkpoint's layout
        block = model.single_transformer_blocks[4]
        block.proj_mlp = torch.nn.Linear(block.proj_mlp.in_features, block.proj_mlp.out_features // 2)

    with pytest.raises(DryRunError, match=r"single_transformer_blocks\.4"):
        simulate(SMALL, MemoryConfig(gradient_checkpointing=True), resolution=256, text_tokens=64,
                 alter_model=break_block)
