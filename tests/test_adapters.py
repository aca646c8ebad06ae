"""Target presets, per-module ranks and the adapter algorithms: each setting changes what is trained."""

import re

import pytest
import torch
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.oft import OFTLayer

from trainer_core import flow, lora
from trainer_core.config import LoraConfig, TrainConfig
from trainer_core.errors import TrainerInputError
from trainer_core.models.tiny import build_tiny_transformer
from trainer_core.train import TrainingSession

DOUBLE_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
CONTEXT_ATTN = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
DOUBLE_FF = ["ff.net.0.proj", "ff.net.2"]
CONTEXT_FF = ["ff_context.net.0.proj", "ff_context.net.2"]
SINGLE_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v"]


def _names(double=(), single=(), mod=False):
    out = {f"transformer_blocks.{i}.{n}" for i in range(2) for n in double}
    out |= {f"single_transformer_blocks.{i}.{n}" for i in range(2) for n in single}
    if mod:
        out |= {f"transformer_blocks.{i}.{n}.linear" for i in range(2) for n in ("norm1", "norm1_context")}
        out |= {f"single_transformer_blocks.{i}.norm.linear" for i in range(2)}
    return out


PRESETS = {
    "attention": _names(DOUBLE_ATTN + CONTEXT_ATTN, SINGLE_ATTN),
    "attention+ffs": _names(DOUBLE_ATTN + CONTEXT_ATTN + DOUBLE_FF + CONTEXT_FF, SINGLE_ATTN + ["proj_mlp", "proj_out"]),
    "mmdit": _names(DOUBLE_ATTN + CONTEXT_ATTN),
    "all": _names(DOUBLE_ATTN + CONTEXT_ATTN, SINGLE_ATTN + ["proj_out"], mod=True),
    "all+ffs": _names(DOUBLE_ATTN + CONTEXT_ATTN + DOUBLE_FF + CONTEXT_FF, SINGLE_ATTN + ["proj_mlp", "proj_out"],
                      mod=True),
    "context": _names(CONTEXT_ATTN),
    "context+ffs": _names(CONTEXT_ATTN + CONTEXT_FF),
    "tiny": {"single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"},
    "nano": {"single_transformer_blocks.0.proj_out"},
}


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_targets_exactly_its_layers(preset):
    assert set(lora.add_lora(build_tiny_transformer(seed=0), LoraConfig(targets=preset))) == PRESETS[preset]


def test_tiny_and_nano_pick_single_blocks_7_and_20_of_flux1():
    assert set(re.findall(r"\\\.(\d+)\\\.", lora.resolve_targets("tiny"))) == {"7", "20"}
    assert re.fullmatch(lora.resolve_targets("nano"), "single_transformer_blocks.7.proj_out")


def test_rank_and_alpha_patterns_set_per_layer_ranks_in_the_file():
    model = build_tiny_transformer(seed=0)
    lora.add_lora(model, LoraConfig(rank=8, alpha=8, rank_pattern="proj_mlp=2, attn\\.to_q=4", alpha_pattern="to_q=1"))
    with torch.no_grad():  # lora_B starts at zero: give it values so its scale shows
        for p in lora.lora_parameters(model):
            p.normal_(std=0.1)
    state = lora.lora_state_dict(model)
    assert state["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"].shape[0] == 2
    assert state["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"].shape[0] == 4
    # each layer's own scale (alpha 1 / rank 4 here, 8 / 8 beside it) is folded into its lora_B; alpha reads as rank
    layers = lora.adapter_layers(model)
    trained_b = {name: layers[f"transformer_blocks.1.attn.{name}"].lora_B[lora.ADAPTER].weight.detach()
                 for name in ("to_q", "to_k")}
    assert float(state["transformer.transformer_blocks.1.attn.to_q.alpha"]) == 4.0
    assert torch.equal(state["transformer.transformer_blocks.1.attn.to_q.lora_B.weight"], trained_b["to_q"] * 0.25)
    assert state["transformer.transformer_blocks.1.attn.to_k.lora_A.weight"].shape[0] == 8
    assert float(state["transformer.transformer_blocks.1.attn.to_k.alpha"]) == 8.0
    assert torch.equal(state["transformer.transformer_blocks.1.attn.to_k.lora_B.weight"], trained_b["to_k"])
    with pytest.raises(TrainerInputError, match="lora.rank_pattern"):
        lora.add_lora(build_tiny_transformer(seed=0), LoraConfig(rank_pattern="proj_mlp"))


ALGORITHMS = {
    "lora": (LoraLayer, {"lora_A.weight", "lora_B.weight", "alpha"}),
    "lokr": (LoKrLayer, {"lokr_w1", "lokr_w2"}),  # unfactorised at these sizes: scale folded into w1, no alpha
    "loha": (LoHaLayer, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    "oft": (OFTLayer, {"diff"}),
}


def _velocity(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 32, generator=g))
    with torch.no_grad():
        return flow.predict_velocity(model, *args, guidance=1.0, dtype=dtype)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_trains_its_own_adapter_and_saves_its_tensors(sample_cache, algorithm):
    layer_cls, suffixes = ALGORITHMS[algorithm]
    cfg = LoraConfig(rank=4, alpha=4, targets="mmdit", algorithm=algorithm)
    session = TrainingSession(build_tiny_transformer(seed=0), sample_cache, cfg,
                              TrainConfig(steps=3, learning_rate=1e-2, compute_dtype="bf16"), device="cpu")
    layers = lora.adapter_layers(session.transformer)
    assert len(layers) == 16 and all(isinstance(layer, layer_cls) for layer in layers.values())
    assert all(p.dtype == torch.float32 for p in session.params)  # fp32 masters under bf16 compute
    before = _velocity(session.transformer, torch.bfloat16)
    for _ in range(3):
        session.step()
    assert not torch.allclose(_velocity(session.transformer, torch.bfloat16), before)
    state = lora.lora_state_dict(session.transformer)
    found = {k.split(".to_q.")[1] for k in state if k.startswith("transformer.transformer_blocks.0.attn.to_q.")}
    assert found == suffixes


def test_dora_trains_a_magnitude_per_output_row(sample_cache):
    session = TrainingSession(build_tiny_transformer(seed=0), sample_cache,
                              LoraConfig(rank=4, alpha=4, targets="mmdit", use_dora=True),
                              TrainConfig(steps=2, learning_rate=1e-2, compute_dtype="fp32"), device="cpu")
    magnitudes = {k: p.detach().clone() for k, p in lora.adapter_parameters(session.transformer).items()
                  if "magnitude" in k}
    assert len(magnitudes) == 16
    session.step()
    session.step()
    now = lora.adapter_parameters(session.transformer)
    assert all(not torch.equal(now[k], v) for k, v in magnitudes.items())
    assert "transformer.transformer_blocks.0.attn.to_q.dora_scale" in lora.lora_state_dict(session.transformer)


def test_algorithm_settings_reach_peft():
    lokr = lora.peft_config(LoraConfig(rank=8, alpha=4, algorithm="lokr", lokr_factor=4, dropout=0.1), "x")
    assert (lokr.r, lokr.alpha, lokr.decompose_factor, lokr.rank_dropout) == (8, 4, 4, 0.1)
    loha = lora.peft_config(LoraConfig(rank=8, alpha=4, algorithm="loha", dropout=0.2), "x")
    assert (loha.r, loha.alpha, loha.rank_dropout) == (8, 4, 0.2)
    oft = lora.peft_config(LoraConfig(rank=16, algorithm="oft", dropout=0.05), "x")
    assert (oft.oft_block_size, oft.module_dropout) == (16, 0.05)
    dora = lora.peft_config(LoraConfig(rank=4, alpha=2, use_dora=True, dropout=0.1), "x")
    assert dora.use_dora and dora.lora_dropout == 0.1
    model = build_tiny_transformer(seed=0)
    lora.add_lora(model, LoraConfig(rank=4, targets="mmdit", algorithm="oft"))
    assert all(layer.oft_block_size["default"] == 4 for layer in lora.adapter_layers(model).values())


@pytest.mark.parametrize("cfg,message", [
    (dict(algorithm="lokr", use_dora=True), "lora.use_dora"),
    (dict(algorithm="oft", rank_pattern="proj_mlp=2"), "OFT has one block size"),
    (dict(algorithm="boft"), "lora.algorithm"),
    (dict(lokr_factor=0), "lora.lokr_factor"),
    (dict(export_formats=["safetensors"]), "lora.export_formats"),
    (dict(text_encoders="clip"), "lora.text_encoders"),
])
def test_bad_adapter_settings_name_the_field(cfg, message):
    with pytest.raises(TrainerInputError, match=message):
        lora.add_lora(build_tiny_transformer(seed=0), LoraConfig(**cfg))
