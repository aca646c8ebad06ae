"""The LoRA file: portable keys with alpha, reloads through diffusers to identical outputs, never clobbers."""

import json

import pytest
import torch

from trainer_core import flow, lora
from trainer_core.config import LoraConfig
from trainer_core.errors import TrainerInputError
from trainer_core.models.tiny import build_tiny_transformer


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 32, generator=g))


def _trained_like(model, cfg):
    lora.add_lora(model, cfg)
    with torch.no_grad():  # lora_B starts at zero; give it values so the adapter changes the output
        for p in lora.lora_parameters(model):
            p.normal_(std=0.05)
    return model


def _velocity(model):
    x, s, h, p = _inputs()
    with torch.no_grad():
        return flow.predict_velocity(model, x, s, h, p, guidance=1.0)


def test_saved_file_reloads_through_diffusers_to_identical_outputs(tmp_path):
    model = _trained_like(build_tiny_transformer(seed=0), LoraConfig(rank=4, alpha=1.5))  # alpha ≠ rank
    path = lora.save_lora(tmp_path / "a.safetensors", model, {"base_model": "tiny"}, dtype=None)

    reloaded = build_tiny_transformer(seed=0)
    state, _ = lora.read_lora_file(path)
    weights, alphas = lora.split_alphas(state)
    reloaded.load_lora_adapter(weights, prefix="transformer", network_alphas=alphas)
    assert torch.equal(_velocity(model), _velocity(reloaded))

    # the file's own diffusers metadata carries rank and alpha too
    from_file = build_tiny_transformer(seed=0)
    from_file.load_lora_adapter(str(tmp_path), weight_name="a.safetensors", prefix="transformer")
    assert torch.equal(_velocity(model), _velocity(from_file))
    assert not torch.allclose(_velocity(model), _velocity(build_tiny_transformer(seed=0)))


def test_every_key_is_prefixed_diffusers_module_with_alpha(tmp_path):
    model = _trained_like(build_tiny_transformer(seed=0), LoraConfig(rank=4, alpha=8.0))
    path = lora.save_lora(tmp_path / "b.safetensors", model, {"trigger_word": "sks"})
    state, meta = lora.read_lora_file(path)
    modules = dict(build_tiny_transformer(seed=0).named_modules())
    stems = set()
    for key in state:
        assert key.startswith("transformer.")
        for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):
            if key.endswith(suffix):
                stems.add(key[len("transformer."):-len(suffix)])
                break
        else:
            pytest.fail(f"unexpected key {key}")
    assert stems and all(isinstance(modules[s], torch.nn.Linear) for s in stems)
    for s in stems:
        assert state[f"transformer.{s}.alpha"].item() == 8.0
        assert state[f"transformer.{s}.lora_A.weight"].shape[0] == 4
    assert meta["trigger_word"] == "sks"
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 8.0


def test_default_targets_cover_attention_and_feed_forward_of_every_block():
    model = build_tiny_transformer(seed=0)
    targets = set(lora.add_lora(model, LoraConfig()))
    n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    for i in range(n_double):
        for name in ("attn.to_q", "attn.add_k_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj",
                     "ff.net.2", "ff_context.net.2"):
            assert f"transformer_blocks.{i}.{name}" in targets
    for i in range(n_single):
        for name in ("attn.to_q", "attn.to_v", "proj_mlp", "proj_out"):
            assert f"single_transformer_blocks.{i}.{name}" in targets
    assert "proj_out" not in targets  # the final output projection is not a block layer
    assert not any(".norm" in t for t in targets)


def test_preset_and_regex_targets():
    model = build_tiny_transformer(seed=0)
    assert all(t.startswith("transformer_blocks.") for t in lora.add_lora(model, LoraConfig(targets="mmdit")))
    model = build_tiny_transformer(seed=0)
    assert lora.add_lora(model, LoraConfig(targets=r"transformer_blocks\.0\.attn\.to_q")) == [
        "transformer_blocks.0.attn.to_q"]
    with pytest.raises(TrainerInputError, match="matches no linear layer"):
        lora.add_lora(build_tiny_transformer(seed=0), LoraConfig(targets="nothing_like_this"))
    with pytest.raises(TrainerInputError, match="regex"):
        lora.add_lora(build_tiny_transformer(seed=0), LoraConfig(targets="(unclosed"))


@pytest.mark.parametrize("field,value,message", [("rank", 0, "lora.rank"), ("rank", -3, "lora.rank"),
                                                 ("alpha", 0.0, "lora.alpha")])
def test_bad_rank_or_alpha_is_refused(field, value, message):
    with pytest.raises(TrainerInputError, match=message):
        lora.add_lora(build_tiny_transformer(seed=0), LoraConfig(**{field: value}))


def test_existing_lora_is_never_clobbered(tmp_path):
    model = _trained_like(build_tiny_transformer(seed=0), LoraConfig(rank=2, alpha=2))
    first = lora.save_lora(tmp_path / "x.safetensors", model, {})
    before = first.read_bytes()
    second = lora.save_lora(tmp_path / "x.safetensors", model, {})
    assert second != first and second.name == "x_001.safetensors"
    assert first.read_bytes() == before
    assert lora.save_lora(tmp_path / "x.safetensors", model, {}, overwrite=True) == first


def test_damaged_lora_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TrainerInputError, match="bad.safetensors"):
        lora.read_lora_file(bad)
    with pytest.raises(TrainerInputError, match="does not exist"):
        lora.read_lora_file(tmp_path / "missing.safetensors")
