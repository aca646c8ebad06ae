"""Memory engine: every precision trains, block swap and activation offload change nothing but memory, the
VRAM estimate counts what is really there, and presets / auto pick what they promise."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trainer_core import flow, lora, memory
from trainer_core.config import LoraConfig, MemoryConfig, TrainConfig
from trainer_core.errors import TrainerInputError
from trainer_core.memory.estimate import GiB, estimate_vram, flux_forward_flops
from trainer_core.memory.presets import PRESET_TABLE, Workload, plan_memory, resolve_preset, time_estimate
from trainer_core.models.flux import flux_config
from trainer_core.models.tiny import build_tiny_transformer

# nf4 needs linear layers ≥ 64 wide: 4 heads of 16.
WIDE = dict(num_attention_heads=4, num_layers=1, num_single_layers=2)


def _batch(seed=1, batch=1, side=8, text=8, width=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, side, side, generator=g), torch.randn(batch, 16, side, side, generator=g),
            torch.rand(batch, generator=g), torch.randn(batch, text, width, generator=g),
            torch.randn(batch, width, generator=g))


def _prepared(mem: MemoryConfig, dtype=torch.float32, base=None, targets="attention+ffs"):
    model = copy.deepcopy(base) if base is not None else build_tiny_transformer(seed=0, **WIDE)
    memory.prepare_base(model, mem, dtype)
    lora.add_lora(model, LoraConfig(rank=4, alpha=4, targets=targets), seed=0)
    with torch.no_grad():  # non-zero B so gradients reach every LoRA tensor from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    handle = memory.prepare_training(model, mem, "cpu")
    model.train()
    return model, handle


def _loss(model, batch, dtype):
    x0, noise, sigma, hidden, pooled = batch
    return flow.flow_matching_loss(model, x0.to(dtype), noise.to(dtype), sigma, hidden, pooled, 1.0, dtype=dtype)


def _run(mem: MemoryConfig, dtype=torch.float32, steps=2, base=None):
    """Forward+backward twice (grads accumulate), then a no-grad forward; returns outputs, grads, stats."""
    model, handle = _prepared(mem, dtype, base)
    outs = []
    for s in range(steps):
        loss = _loss(model, _batch(seed=s), dtype)
        loss.backward()
        outs.append(loss.detach())
    with torch.no_grad():
        x0, noise, sigma, hidden, pooled = _batch(seed=9)
        outs.append(flow.predict_velocity(model, x0.to(dtype), sigma, hidden, pooled, 1.0, dtype))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = handle.swapper.stats if handle.swapper else None
    offloaded = handle.offloader.bytes_offloaded if handle.offloader else 0
    handle.close()
    return outs, grads, stats, offloaded, model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU it makes every matmul wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wide_base():
    return build_tiny_transformer(seed=0, **WIDE)


@pytest.mark.parametrize("precision", ["bf16", "fp8", "nf4", "int8"])
def test_swapped_and_offloaded_training_matches_unswapped_exactly(precision, wide_base):
    dtype = torch.float32 if precision == "bf16" else torch.bfloat16  # bf16 storage with fp32 compute: casts
    plain = _run(MemoryConfig(base_precision=precision, gradient_checkpointing=True), dtype, base=wide_base)
    swapped = _run(MemoryConfig(base_precision=precision, gradient_checkpointing=True, blocks_to_swap=2,
                                offload_activations=True), dtype, base=wide_base)
    for a, b in zip(plain[0], swapped[0]):
        assert torch.equal(a, b)
    assert plain[1].keys() == swapped[1].keys() and len(plain[1]) > 0
    for name in plain[1]:
        assert torch.equal(plain[1][name], swapped[1][name]), name
    stats, offloaded = swapped[2], swapped[3]
    assert stats.loads > 0 and stats.demand_loads == 0  # every swapped block was prefetched in time
    assert offloaded > 0


def test_swap_ring_streams_every_block_and_restores_the_model_on_close(wide_base):
    ref_outs, ref_grads, *_ = _run(MemoryConfig(gradient_checkpointing=True), base=wide_base)
    # all blocks, a deeper ring, one block (with the two resident ones keeping their activations)
    for swap, prefetch, kept in [(3, 1, 0), (3, 2, 0), (1, 1, 2)]:
        outs, grads, stats, _, model = _run(MemoryConfig(gradient_checkpointing=True, blocks_to_swap=swap,
                                                         prefetch_blocks=prefetch, uncheckpointed_blocks=kept),
                                            base=wide_base)
        assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
        assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
        assert stats.demand_loads == 0
        # after close() the swapped blocks are whole again (host tensors), so the model is usable as is
        assert all(p.numel() > 0 for p in model.parameters())


def test_unloaded_blocks_and_offloaded_inputs_hold_nothing_between_uses(wide_base):
    model, handle = _prepared(MemoryConfig(gradient_checkpointing=True, blocks_to_swap=3, offload_activations=True),
                              base=wide_base)
    try:
        _loss(model, _batch(), torch.float32).backward()
        assert handle.offloader.bytes_offloaded > 0
        assert all(saved.device_copy is None for saved in handle.offloader._saved)  # fetched copies were let go
        blocks = memory.transformer_blocks(model)
        sizes = [sum(p.numel() for p in b.parameters() if not p.requires_grad) for b in blocks]
        # only the ring's slots keep blocks loaded (the one held for the next step's first block)
        assert sum(s > 0 for s in sizes) <= handle.swapper.prefetch + 1
        assert handle.swapper.slot_bytes >= max(
            sum(t.numel() * t.element_size() for t in lay.host) for lay in handle.swapper._layouts.values())
    finally:
        handle.close()


def test_swapping_without_checkpointing_is_refused_with_the_fix():
    with pytest.raises(TrainerInputError, match="gradient_checkpointing"):
        MemoryConfig(blocks_to_swap=10).validate()
    with pytest.raises(TrainerInputError, match="gradient_checkpointing"):
        MemoryConfig(offload_activations=True).validate()


@pytest.mark.parametrize("precision", ["bf16", "fp8", "nf4", "int8"])
def test_every_precision_trains_and_its_lora_loads_like_any_other(precision, wide_base, tmp_path):
    dtype = torch.bfloat16
    mem = MemoryConfig(base_precision=precision, gradient_checkpointing=True, blocks_to_swap=2)
    model, handle = _prepared(mem, dtype, base=wide_base, targets="attention")
    params = lora.lora_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params)  # fp32 masters, whatever the base
    if precision == "fp8":
        linear = model.transformer_blocks[0].ff.net[2]
        assert linear.weight.dtype == torch.float8_e4m3fn
    opt = torch.optim.AdamW(params, lr=1e-2)  # large steps: the learned change must stand out of bf16 rounding
    batch = _batch()
    losses = []
    for _ in range(8):
        loss = _loss(model, batch, dtype)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    path = lora.save_lora(tmp_path / f"{precision}.safetensors", model, {"base": precision})
    handle.close()

    # The file is the portable format (no bitsandbytes / peft internals in the names) and applies to a plain
    # fp32 model the same change it made to the quantized one.
    tensors, _ = lora.read_lora_file(path)
    assert all(k.startswith("transformer.") and k.endswith(("lora_A.weight", "lora_B.weight", ".alpha"))
               for k in tensors)
    assert not any("base_layer" in k for k in tensors)
    fresh = copy.deepcopy(wide_base)
    lora.add_lora(fresh, LoraConfig(rank=4, alpha=4, targets="attention"))
    lora.set_lora_state_dict(fresh, tensors)
    x0, noise, sigma, hidden, pooled = batch
    with torch.no_grad():
        x_t = flow.noisy_latents(x0, noise, sigma)
        loaded = flow.predict_velocity(fresh, x_t, sigma, hidden, pooled, 1.0)
        with lora_disabled(fresh):
            plain = flow.predict_velocity(fresh, x_t, sigma, hidden, pooled, 1.0)
        trained = flow.predict_velocity(model, x_t.to(dtype), sigma, hidden, pooled, 1.0, dtype)
        with lora_disabled(model):
            trained_base = flow.predict_velocity(model, x_t.to(dtype), sigma, hidden, pooled, 1.0, dtype)
    delta_loaded, delta_trained = (loaded - plain).flatten(), (trained - trained_base).flatten()
    assert delta_loaded.norm() > 0
    assert F.cosine_similarity(delta_loaded, delta_trained, dim=0) > 0.9


class lora_disabled:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.disable_adapters()

    def __exit__(self, *exc):
        self.model.enable_adapters()


def test_lora_computes_in_the_compute_dtype_but_learns_in_fp32(wide_base):
    model, handle = _prepared(MemoryConfig(base_precision="bf16"), torch.bfloat16, base=wide_base)
    try:
        layer = model.transformer_blocks[0].attn.to_q
        seen = []
        hook = layer.lora_A["default"].register_forward_hook(lambda m, a, out: seen.append((a[0].dtype, out.dtype)))
        _loss(model, _batch(), torch.bfloat16).backward()
        hook.remove()
        assert seen == [(torch.bfloat16, torch.bfloat16)]  # no fp32 copy of the activations
        assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    finally:
        handle.close()


def test_compile_wraps_only_the_block_forward_and_close_removes_it(wide_base):
    model, handle = _prepared(MemoryConfig(compile_blocks=True), base=wide_base)
    block = model.transformer_blocks[0]
    assert "forward" in block.__dict__  # compiled per block, so the swap hooks stay outside the graph
    handle.close()
    assert "forward" not in block.__dict__


# ----- the estimate -----

def _hand_block_params(d, hd):
    double = 36 * d * d + 30 * d + 4 * hd  # 2 modulations (6d), 8 attention projections, 2 MLPs (4d), qk norms
    single = 15 * d * d + 11 * d + 2 * hd  # modulation (3d), q/k/v, proj_mlp (4d), proj_out (5d → d)
    return double, single


def test_estimator_parameter_bytes_match_hand_computation():
    cfg = flux_config("flux1-dev")
    d, hd = 3072, 128
    double, single = _hand_block_params(d, hd)
    outside = (64 * d + d) + (4096 * d + d) + 2 * (256 * d + d + d * d + d) + (768 * d + d + d * d + d) \
        + (2 * d * d + 2 * d) + (64 * d + 64)
    assert 19 * double + 38 * single + outside == 11_901_408_320  # FLUX.1-dev: 11.9 B parameters

    bf16 = estimate_vram(cfg, MemoryConfig(base_precision="bf16"), rank=16, targets="attention")
    assert bf16.weights == 2 * (19 * double + 38 * single + outside)
    lora_params = 16 * 2 * d * (19 * 8 + 38 * 3)  # attention: 8 projections per double block, 3 per single
    assert bf16.lora == bf16.grads == 4 * lora_params
    assert bf16.optimizer == 8 * lora_params  # AdamW: two fp32 states

    fp8 = estimate_vram(cfg, MemoryConfig(base_precision="fp8"))
    double_w, single_w = 36 * d * d, 15 * d * d  # linear weights: one byte each; biases and norms stay bf16
    fp8_blocks = 19 * (double_w + 2 * (double - double_w)) + 38 * (single_w + 2 * (single - single_w))
    assert fp8.weights == 2 * outside + fp8_blocks

    swap = estimate_vram(cfg, MemoryConfig(base_precision="fp8", gradient_checkpointing=True, blocks_to_swap=57))
    assert swap.weights == 2 * outside
    assert swap.blocks_swapped == 57
    # two slots, each one double block (the largest) laid out in 512-byte aligned pieces
    aligned = lambda n: -(-n // 512) * 512  # noqa: E731
    slot = (8 * aligned(d * d) + 2 * aligned(6 * d * d) + 4 * aligned(4 * d * d)  # weights, fp8
            + 2 * aligned(6 * d * 2) + 8 * aligned(d * 2) + 2 * aligned(4 * d * 2) + 2 * aligned(d * 2)  # biases
            + 4 * aligned(hd * 2))  # q/k norms
    assert swap.swap_slots == 2 * slot

    nf4 = estimate_vram(cfg, MemoryConfig(base_precision="nf4"))
    assert 0.51 < (nf4.weights - 2 * outside) / fp8_blocks < 0.53  # ≈ 4.1 bits per weight

    eight_bit = estimate_vram(cfg, MemoryConfig(), optimizer="adamw8bit")
    assert eight_bit.optimizer < bf16.optimizer / 3


@pytest.mark.parametrize("precision", ["bf16", "fp8", "nf4", "int8"])
def test_estimated_weight_and_slot_bytes_are_what_training_allocates(precision, wide_base):
    """On the CPU every tensor is "on the device": the estimate's resident weights are exactly the frozen
    bytes of the prepared model, and its swap slots exactly what the ring allocates."""
    from trainer_core.memory.swap import frozen_tensor_refs

    config = dict(wide_base.config)
    for swap in (0, 2):
        mem = MemoryConfig(base_precision=precision, gradient_checkpointing=True, blocks_to_swap=swap)
        model, handle = _prepared(mem, torch.bfloat16, base=wide_base)
        try:
            est = estimate_vram(config, mem, rank=4, targets="attention+ffs", compute_dtype="bf16", device_type="cpu")
            if swap:
                assert est.swap_slots == len(handle.swapper.slots) * handle.swapper.slot_bytes
            else:
                seen, frozen = set(), 0
                for ref in frozen_tensor_refs(model):
                    t = ref[0].data if ref[1] == "data" else getattr(*ref)
                    if t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        frozen += t.numel() * t.element_size()
                assert est.weights == frozen
                assert est.lora == sum(p.numel() * 4 for p in lora.lora_parameters(model))
        finally:
            handle.close()


def test_flop_count_matches_torch_flop_counter():
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = flux_config("flux1-dev")
    with torch.device("meta"):
        model = FluxTransformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).to(torch.bfloat16)
    ti, tt = 256, 64
    meta = lambda *s, dtype=torch.bfloat16: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(hidden_states=meta(1, ti, 64), encoder_hidden_states=meta(1, tt, 4096), pooled_projections=meta(1, 768),
              timestep=meta(1), img_ids=meta(ti, 3, dtype=torch.float32), txt_ids=meta(tt, 3, dtype=torch.float32),
              guidance=meta(1), return_dict=False)
    assert flux_forward_flops(cfg, resolution=256, text_tokens=tt) == counter.get_total_flops()


class _LiveBytes(TorchDispatchMode):
    """Bytes of tensors created while active and still alive: what the CUDA allocator would count."""

    def __init__(self, ignore):
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if size == 0 or key in self.ignore:
                    continue
                if key not in self.live:
                    self.live[key] = [size, 0]
                    self.current += size
                    self.peak = max(self.peak, self.current)
                self.live[key][1] += 1
                weakref.finalize(t, self._drop, key)
        return out

    def _drop(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]


@pytest.mark.parametrize("checkpointing, kept", [(False, 0), (True, 0), (True, 3)])
def test_estimated_activation_memory_matches_measured_on_cpu(checkpointing, kept):
    """Narrow full-head-size blocks: the activation coefficients (per token-row of hidden states) hold."""
    config = dict(flux_config("flux1-dev"), num_layers=2, num_single_layers=3, num_attention_heads=4,
                  joint_attention_dim=64, pooled_projection_dim=64)
    config.pop("_class_name", None)
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config)
    mem = MemoryConfig(gradient_checkpointing=checkpointing, uncheckpointed_blocks=kept)
    dtype = torch.bfloat16
    memory.prepare_base(model, mem, dtype)
    lora.add_lora(model, LoraConfig(rank=16, targets="attention"))
    handle = memory.prepare_training(model, mem, "cpu")
    side, text = 32, 64  # latent side → 256 image tokens
    x0, noise = torch.randn(1, 16, side, side), torch.randn(1, 16, side, side)
    hidden, pooled = torch.randn(1, text, 64), torch.randn(1, 64)
    gc.collect()
    with _LiveBytes(list(model.parameters())) as tracker:
        _loss(model, (x0, noise, torch.rand(1), hidden, pooled), dtype).backward()
    handle.close()
    est = estimate_vram(config, mem, resolution=side * 8, text_tokens=text, device_type="cpu")
    predicted = est.activations + est.grads + est.transient
    assert 0.9 < predicted / tracker.peak < 1.1, (predicted, tracker.peak)


def test_estimate_summary_names_the_parts():
    est = estimate_vram(None, resolve_preset("8gb"))
    text = est.summary()
    assert "1024×1024" in text and "45 of 57 blocks" in text and f"{est.total_gib:.2f} GiB" in text


# ----- presets, auto, fit check, time -----

@pytest.mark.parametrize("tier", list(PRESET_TABLE))
def test_presets_pick_what_their_table_says(tier):
    mem = resolve_preset(tier)
    assert mem.preset == tier
    for knob, value in PRESET_TABLE[tier].items():
        assert getattr(mem, knob) == value
    assert mem.lora_dtype == "fp32"
    # and the table's promise: the tier's own estimate at 1024² fits a card of that size with the margin
    size = int(tier.removesuffix("gb")) * GiB
    assert memory.presets.fits(Workload(batch_size=mem.batch_size).estimate(mem), size - GiB // 2)


def test_low_tier_meets_the_memory_goals():
    mem = resolve_preset("8gb")
    assert estimate_vram(None, mem, resolution=1024).total < 6 * GiB
    assert estimate_vram(None, mem, resolution=512).total < 4 * GiB


def test_any_knob_overrides_the_preset():
    mem = resolve_preset("12gb", {"blocks_to_swap": 30, "optimizer": "adamw", "lora_dtype": "bf16"})
    assert (mem.blocks_to_swap, mem.optimizer, mem.lora_dtype, mem.base_precision) == (30, "adamw", "bf16", "fp8")
    with pytest.raises(TrainerInputError, match="gradient_checkpointing"):
        resolve_preset("8gb", {"gradient_checkpointing": False})
    with pytest.raises(TrainerInputError, match="preset"):
        resolve_preset("7gb")


def test_auto_steps_down_as_free_memory_shrinks():
    chosen = [resolve_preset("auto", free_bytes=int(gb * GiB)).preset for gb in (79, 46, 23, 15, 11, 7)]
    assert chosen == ["80gb", "48gb", "24gb", "16gb", "12gb", "8gb"]
    # the workload matters: at 512² a 46 GiB budget already fits the fastest tier
    assert resolve_preset("auto", free_bytes=46 * GiB, workload=Workload(resolution=512)).preset == "80gb"
    # a budget set on the memory config wins over the free VRAM reported
    assert resolve_preset("auto", {"vram_budget_gb": 11.0}, free_bytes=79 * GiB).preset == "12gb"


def test_plan_refuses_what_will_not_fit_and_names_the_fix():
    with pytest.raises(TrainerInputError, match='preset = "12gb"'):
        plan_memory(MemoryConfig(preset="24gb"), free_bytes=11 * GiB)
    with pytest.raises(TrainerInputError, match="lower the resolution"):
        plan_memory(MemoryConfig(preset="auto"), Workload(resolution=2048, batch_size=4), free_bytes=3 * GiB)
    # hand-set knobs (preset none) are checked the same way
    with pytest.raises(TrainerInputError, match="gradient_checkpointing = true"):
        plan_memory(MemoryConfig(), free_bytes=20 * GiB)
    mem, est = plan_memory(MemoryConfig(preset="auto"), free_bytes=15 * GiB)
    assert mem.preset == "16gb" and est.total < 15 * GiB
    # training on the CPU: nothing to fit, auto keeps the plain defaults
    mem, _ = plan_memory(MemoryConfig(preset="auto"), free_bytes=1 * GiB, device="cpu")
    assert mem == MemoryConfig()


def test_plan_keeps_explicit_knobs_over_the_tier():
    mem, _ = plan_memory(MemoryConfig(preset="16gb", blocks_to_swap=20, gradient_checkpointing=True),
                         free_bytes=15 * GiB, explicit={"blocks_to_swap"})
    assert mem.blocks_to_swap == 20 and mem.base_precision == "fp8"
    train = memory.effective_train_config(TrainConfig(batch_size=4, optimizer="adamw"), mem)
    assert (train.batch_size, train.optimizer) == (1, "adamw8bit")


def test_time_estimate_skips_warmup_and_prices_the_run():
    est = time_estimate([9.0, 5.0, 1.0, 1.2, 0.8, 1.0], total_steps=1000, price_per_gpu_hour=2.0)
    assert est.seconds_per_step == 1.0
    assert est.remaining_steps == 994
    assert est.cost == pytest.approx(1000 / 3600 * 2.0)
    assert "0h16m" not in est.summary() and "16m40s" in est.summary()
    assert time_estimate([9.0, 5.0], total_steps=10) is None


def test_real_training_step_is_unchanged_by_swap_and_offload(sample_cache):
    from trainer_core.train import TrainingSession

    def losses(mem):
        session = TrainingSession(build_tiny_transformer(seed=0), sample_cache, LoraConfig(rank=4, alpha=4),
                                  TrainConfig(steps=3, compute_dtype="fp32", learning_rate=1e-3), mem, "cpu")
        try:
            return [session.step() for _ in range(3)], lora.lora_state_dict(session.transformer)
        finally:
            session.close()

    plain = losses(MemoryConfig(base_precision="fp32", gradient_checkpointing=True))
    # an already resolved tier (preset "none": the session must not resolve it again), fp32 to compare exactly
    low = losses(dataclasses.replace(resolve_preset("8gb"), preset="none", base_precision="fp32", optimizer=""))
    assert plain[0] == low[0]
    assert all(torch.equal(plain[1][k], low[1][k]) for k in plain[1])
