"""FLUX.2 memory plans: the estimator counts klein-4B, klein-9B and dev through the family (tokens, FLOPs, blocks),
each model has its own tiers that fit their cards, the host-RAM plan (streamed or shared with ComfyUI) counts what
is really made, and FLUX.2 files stream to their final precision."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trainer_core import memory
from trainer_core.config import MemoryConfig
from trainer_core.errors import TrainerInputError
from trainer_core.memory.estimate import GiB, block_bytes, estimate_host_ram, estimate_vram, flux_forward_flops
from trainer_core.memory.presets import TIERS_LARGEST_FIRST, Workload, fits, resolve_preset
from trainer_core.models import flux2
from trainer_core.models.flux import flux_config

MODELS = ("flux2-klein-4b", "flux2-klein-9b", "flux2-dev")
HEADLINE = {"flux2-klein-4b": "8gb", "flux2-klein-9b": "12gb", "flux2-dev": "24gb"}  # issue 11's promises


def _meta_model(name: str, **changes):
    from diffusers import Flux2Transformer2DModel

    config = dict(flux2.flux2_config(name), **changes)
    with torch.device("meta"):
        return Flux2Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})


def test_flux2_forward_flops_match_torch_flop_counter():
    """The time floor's FLOP model, checked against torch's own counter on klein-4B's full-width blocks."""
    from torch.utils.flop_counter import FlopCounterMode

    depth = dict(num_layers=2, num_single_layers=3)  # every block of a kind counts the same
    model = _meta_model("flux2-klein-4b", **depth).to(torch.bfloat16)
    image, text = 256, 64  # 256² pixels → 16 × 16 latent cells, one token each
    meta = lambda *s, dtype=torch.bfloat16: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(hidden_states=meta(1, image, 128), encoder_hidden_states=meta(1, text, 7680), timestep=meta(1),
              img_ids=meta(image, 4, dtype=torch.long), txt_ids=meta(text, 4, dtype=torch.long), guidance=None,
              return_dict=False)
    assert flux_forward_flops(dict(flux2.flux2_config("flux2-klein-4b"), **depth), resolution=256,
                              text_tokens=text) == counter.get_total_flops()


@pytest.mark.parametrize("resolution, tokens", [(512, 32 * 32), (1024, 64 * 64), ((768, 1024), 48 * 64)])
def test_flux2_tokens_are_one_per_16_pixels_plus_the_text(resolution, tokens):
    est = estimate_vram(flux2.flux2_config("flux2-klein-4b"), MemoryConfig(gradient_checkpointing=True),
                        resolution=resolution)
    assert est.tokens == tokens + 512 and est.blocks_total == 25


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tier", TIERS_LARGEST_FIRST)
def test_each_flux2_model_has_its_own_tiers_and_they_fit_their_cards(name, tier):
    config = flux2.flux2_config(name)
    mem = resolve_preset(tier, workload=Workload(config))
    for knob, value in flux2.MEMORY_PRESETS[name][tier].items():
        assert getattr(mem, knob) == value, knob
    card = (int(tier.removesuffix("gb")) - 1) * GiB  # 1 GiB left for the CUDA context and what the card keeps
    at = lambda res: Workload(config, res, batch_size=mem.batch_size).estimate(mem)  # noqa: E731
    if (name, tier) == ("flux2-dev", "8gb"):  # the most frugal plan there is: 512² fits, 1024² just misses
        assert fits(at(512), card) and not fits(at(1024), card)
    else:
        assert fits(at(1024), card)


def test_the_headline_plans_and_what_tells_the_families_apart():
    plans = {name: resolve_preset(HEADLINE[name], workload=Workload(flux2.flux2_config(name))) for name in MODELS}
    assert plans["flux2-klein-4b"].blocks_to_swap == 0  # klein-4B needs no swapping even in 8 GB
    dev = plans["flux2-dev"]
    assert dev.base_precision in ("fp8", "nf4") and dev.blocks_to_swap > 0  # dev in 24 GB: fp8/nf4 + swap
    # the same name, another plan: FLUX.1-dev's 24gb tier keeps every block on the GPU
    assert resolve_preset("24gb").blocks_to_swap == 0
    # a FLUX.2 of another size (tiny, pruned) takes the tiers of the largest shipped model no wider than it
    tiny = flux2.tiny_flux2_config("dev")
    assert resolve_preset("24gb", workload=Workload(tiny)).base_precision == \
        flux2.MEMORY_PRESETS["flux2-klein-4b"]["24gb"]["base_precision"]
    pruned = dict(flux2.flux2_config("flux2-dev"), num_single_layers=30)
    assert resolve_preset("24gb", workload=Workload(pruned)).blocks_to_swap == dev.blocks_to_swap


@pytest.mark.parametrize("name, free_gib, tier", [("flux2-klein-4b", 7, "8gb"), ("flux2-klein-9b", 11, "12gb"),
                                                   ("flux2-dev", 23, "24gb"), ("flux2-dev", 15, "16gb")])
def test_auto_takes_the_largest_flux2_tier_that_fits(name, free_gib, tier):
    chosen = resolve_preset("auto", free_bytes=free_gib * GiB, workload=Workload(flux2.flux2_config(name)))
    assert chosen.preset == tier


def test_dev_refused_on_a_too_small_card_names_the_fix():
    workload = Workload(flux2.flux2_config("flux2-dev"))
    with pytest.raises(TrainerInputError, match=r'preset = "16gb"'):
        memory.plan_memory(MemoryConfig(preset="24gb"), workload, free_bytes=15 * GiB)


def test_swapping_plans_move_their_blocks_each_step():
    """dev's 24gb plan: the swapped fp8 blocks cross PCIe twice a step (forward, recomputation) but for the ones
    the ring still holds at the turns, and the offloaded block inputs come back once."""
    config = flux2.flux2_config("flux2-dev")
    mem = resolve_preset("24gb", workload=Workload(config))
    est = Workload(config, 1024).estimate(mem)
    model = _meta_model("flux2-dev")
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    swapped = memory.spread(mem.blocks_to_swap, len(blocks))
    one_way = sum(block_bytes(blocks[i], "fp8", 2) for i in swapped)
    assert one_way < est.h2d_bytes < 2.1 * one_way
    assert "host→device" in est.summary() and est.bound in est.summary()


def test_flux2_host_ram_streamed_and_shared():
    config = flux2.flux2_config("flux2-klein-9b")
    mem = resolve_preset("8gb", workload=Workload(config))
    vram = Workload(config).estimate(mem)
    model = _meta_model("flux2-klein-9b")
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    fp8_blocks = sum(block_bytes(b, "fp8", 2) for b in blocks)
    outside = sum(p.numel() for n, p in model.named_parameters() if "blocks." not in n) * 2
    largest_bf16 = max(block_bytes(b, "bf16", 2) for b in blocks)
    # the CLI: the file streams to fp8, so the peak is the fp8 model plus one block in bf16, never the bf16 model
    cli = estimate_host_ram(vram, config, mem)
    assert cli.load_peak == outside + fp8_blocks + largest_bf16
    assert 0 < cli.pinned_blocks < fp8_blocks and cli.pinned_activations > 0
    # the node: ComfyUI's bf16 MODEL is the base; the fp8 conversion and the pinned blocks are all that is new
    shared = estimate_host_ram(vram, config, mem, shared_base=True)
    assert shared.load_peak == fp8_blocks and shared.base == shared.pinned_blocks == cli.pinned_blocks
    assert shared.total < cli.total and "shared with ComfyUI's MODEL" in shared.summary()
    # weights the node must copy (here: all of them, as for an fp8 MODEL) replace their share of the conversion
    copied = outside + sum(block_bytes(b, "bf16", 2) for b in blocks)
    assert estimate_host_ram(vram, config, mem, shared_base=True, copied_base_bytes=copied).load_peak == copied
    # refused: for a shared base the knob is the conversion, not a smaller precision
    with pytest.raises(TrainerInputError, match='base_precision = "auto"'):
        memory.check_host_ram(shared, mem, available=shared.total // 2)
    # with a bf16 plan nothing is converted: the base costs nothing at all
    bf16 = MemoryConfig(base_precision="bf16", gradient_checkpointing=True)
    none = estimate_host_ram(Workload(config).estimate(bf16), config, bf16, shared_base=True)
    assert none.total == 0 and "no copy" in none.summary()


@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_flux2_files_stream_to_their_precision(precision, tmp_path):
    """A FLUX.2 BFL file (or state dict) loaded straight to fp8/nf4 holds the same weights as one loaded in bf16 and
    converted afterwards, and the file's config is known before anything is loaded."""
    from trainer_core.models.family import FLUX2, load_transformer

    sd = flux2.build_tiny_flux2_transformer("klein", seed=1).to(torch.bfloat16).state_dict()
    path = tmp_path / "klein.safetensors"
    save_file(flux2.diffusers_to_bfl(sd), str(path))
    assert {k: v for k, v in FLUX2.file_config(path).items() if k != "_class_name"} == \
        {k: v for k, v in flux2.tiny_flux2_config("klein").items()}
    streamed = load_transformer(path, dtype=torch.bfloat16, base_precision=precision)
    later = load_transformer(path, dtype=torch.bfloat16)
    memory.prepare_base(later, MemoryConfig(base_precision=precision), torch.bfloat16)
    if precision == "fp8":
        memory.precision.apply_storage_casts(later, "fp8", torch.bfloat16)
    fused = streamed.single_transformer_blocks[0].attn.to_qkv_mlp_proj
    assert fused.weight.dtype == torch.float8_e4m3fn if precision == "fp8" else type(fused).__name__ == "Linear4bit"
    a, b = streamed.state_dict(), later.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        as_bytes = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
        assert torch.equal(as_bytes(a[key]), as_bytes(b[key])), key


def test_flux1_plans_are_unchanged_by_the_family_seam():
    """FLUX.1-dev's tiers and coefficients are still its own (the default workload is FLUX.1-dev)."""
    assert resolve_preset("8gb", workload=Workload(flux_config("flux1-dev"))) == resolve_preset("8gb")
    est = estimate_vram(None, resolve_preset("8gb"))
    assert est.tokens == 4096 + 512 and est.blocks_total == 57
