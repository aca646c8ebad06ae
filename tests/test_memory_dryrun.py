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


# FLUX.2: klein-shaped and dev-shaped (guidance embedding, deeper single stack), narrow as above. Rank 4: at width
# 512 a rank-16 LoRA and its optimizer state would weigh as much as the activations, which at full width (3072–6144)
# they never do, and the one simulated step has no optimizer state yet during its backward pass.
def _flux2_small(variant: str) -> dict:
    from trainer_core.models.flux2 import flux2_config

    deep = variant == "dev"
    config = dict(flux2_config("flux2-dev" if deep else "flux2-klein-4b"), num_layers=2,
                  num_single_layers=6 if deep else 4, num_attention_heads=4, joint_attention_dim=192)
    config.pop("_class_name")
    return config


@pytest.mark.parametrize("variant, mem, compute_dtype", [
    ("klein", MemoryConfig(base_precision="fp8", gradient_checkpointing=True, blocks_to_swap=3), "bf16"),
    ("klein", MemoryConfig(base_precision="bf16", gradient_checkpointing=True, uncheckpointed_blocks=2), "bf16"),
    ("klein", MemoryConfig(gradient_checkpointing=True, offload_activations=True, blocks_to_swap=2), "bf16"),
    ("dev", MemoryConfig(base_precision="fp8", gradient_checkpointing=False), "bf16"),
    ("dev", MemoryConfig(gradient_checkpointing=True, uncheckpointed_blocks=2), "fp32"),
])
def test_flux2_simulated_peak_matches_the_estimate(variant, mem, compute_dtype):
    config = _flux2_small(variant)
    sim = simulate(config, mem, resolution=RES, text_tokens=TEXT, compute_dtype=compute_dtype, rank=4)
    est = estimate_vram(config, mem, resolution=RES, text_tokens=TEXT, device_type="cpu", rank=4,
                        compute_dtype=compute_dtype)
    # offloaded block inputs are host memory in the simulation; the estimate keeps 3 u of them in flight (CUDA)
    in_flight = 3 * ((RES // 16) ** 2 + TEXT) * 512 * 2 if mem.offload_activations else 0
    assert 0.9 < est.total / (sim.peak + in_flight) < 1.1, (est.total, sim.peak)
    host = estimate_host_ram(estimate_vram(config, mem, resolution=RES, text_tokens=TEXT, rank=4), config, mem)
    if mem.offload_activations:  # the swap ring's packs, and the offloaded inputs on top
        assert sim.host_peak > host.pinned_blocks > 0
    else:
        assert sim.host_peak == pytest.approx(host.pinned_blocks, rel=0.01)
    assert (host.pinned_blocks > 0) == bool(mem.blocks_to_swap)


def test_a_mis_shaped_flux2_block_is_found_by_name():
    def break_block(model):  # a single block whose fused q/k/v + MLP projection is narrower than FLUX.2's layout
        attn = model.single_transformer_blocks[3].attn
        attn.to_qkv_mlp_proj = torch.nn.Linear(attn.to_qkv_mlp_proj.in_features,
                                               attn.to_qkv_mlp_proj.out_features - 128, bias=False)

    with pytest.raises(DryRunError, match=r"single_transformer_blocks\.3"):
        simulate(_flux2_small("klein"), MemoryConfig(gradient_checkpointing=True), resolution=256, text_tokens=64,
                 alter_model=break_block)


def test_an_nf4_base_is_simulated_with_bitsandbytes_layout():
    """nf4 (FLUX.2 dev's 8gb tier) runs through a meta stand-in of bitsandbytes' layout: its weights weigh what the
    estimator says nf4 weighs, and the peak agrees with the estimate."""
    config = _flux2_small("dev")
    mem = MemoryConfig(base_precision="nf4", gradient_checkpointing=True, blocks_to_swap=4)
    sim = simulate(config, mem, resolution=RES, text_tokens=TEXT, rank=4)
    est = estimate_vram(config, mem, resolution=RES, text_tokens=TEXT, device_type="cpu", rank=4)
    bf16 = estimate_vram(config, MemoryConfig(gradient_checkpointing=True, blocks_to_swap=4), resolution=RES,
                         text_tokens=TEXT, device_type="cpu", rank=4)
    assert est.weights < 0.6 * bf16.weights
    assert 0.9 < est.total / sim.peak < 1.1, (est.total, sim.peak)
    host = estimate_host_ram(estimate_vram(config, mem, resolution=RES, text_tokens=TEXT, rank=4), config, mem)
    assert sim.host_peak == pytest.approx(host.pinned_blocks, rel=0.02)
