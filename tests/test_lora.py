"""The LoRA file: portable keys with alpha, reloads through diffusers to identical outputs, never clobbers."""

import pytest
import torch

from trainer_core import flow, lora
from trainer_core.config import LoraConfig
from trainer_core.errors import TrainerInputError
from trainer_core.models.tiny import build_tiny_text_encoder, build_tiny_transformer

# how diffusers users load a LoRA (the load_with_diffusers fixture)
DIFFUSERS_ROUTES = ("load_lora_weights", "load_lora_adapter", "lora_state_dict")


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


def _assert_same_output(got: torch.Tensor, want: torch.Tensor):
    """Equal up to fp32 rounding (the file's lora_B carries the scale that peft applies after B@A)."""
    assert (got - want).norm() <= 1e-5 * want.norm(), ((got - want).norm() / want.norm()).item()


def test_saved_file_reloads_through_diffusers_to_identical_outputs(tmp_path):
    model = _trained_like(build_tiny_transformer(seed=0), LoraConfig(rank=4, alpha=1.5))  # alpha ≠ rank
    path = lora.save_lora(tmp_path / "a.safetensors", model, {"base_model": "tiny"}, dtype=None)

    reloaded = build_tiny_transformer(seed=0)
    state, _ = lora.read_lora_file(path)
    weights, alphas = lora.split_alphas(state)
    reloaded.load_lora_adapter(weights, prefix="transformer", network_alphas=alphas)
    _assert_same_output(_velocity(reloaded), _velocity(model))

    # the file alone, without its alphas, gives the same model: a loader that ignores alpha still gets it right
    from_file = build_tiny_transformer(seed=0)
    from_file.load_lora_adapter(str(tmp_path), weight_name="a.safetensors", prefix="transformer")
    _assert_same_output(_velocity(from_file), _velocity(model))
    assert not torch.allclose(_velocity(model), _velocity(build_tiny_transformer(seed=0)))


@pytest.mark.parametrize("route", DIFFUSERS_ROUTES)
def test_default_file_loads_through_every_diffusers_route(tmp_path, route, load_with_diffusers):
    """FluxPipeline.load_lora_weights (which refused a file with alpha both as tensors and in its header),
    load_lora_adapter and lora_state_dict + load_lora_into_transformer all give the trainer's own model: alpha ≠ rank
    and per-module ranks and alphas, so any scale that is lost or applied twice shows."""
    cfg = LoraConfig(rank=4, alpha=1.5, rank_pattern="proj_mlp=2", alpha_pattern="to_k=7")
    model = _trained_like(build_tiny_transformer(seed=0), cfg)
    path = lora.save_lora(tmp_path / "a.safetensors", model, {}, dtype=None)
    want, base = _velocity(model), _velocity(build_tiny_transformer(seed=0))
    assert (want - base).norm() > 1e-3 * want.norm()  # the LoRA's share of the output is far above the tolerance

    loaded = build_tiny_transformer(seed=0)
    load_with_diffusers(route, path, loaded)
    _assert_same_output(_velocity(loaded), want)


def test_text_encoder_lora_loads_through_the_pipeline(tmp_path, load_with_diffusers):
    """The CLIP-L part of the file (text_encoder.…) loads with FluxPipeline.load_lora_weights to the trained CLIP."""
    model = _trained_like(build_tiny_transformer(seed=0), LoraConfig(rank=4, alpha=4))
    encoders = build_tiny_text_encoder(seed=0)
    adapted = lora.add_text_encoder_lora(encoders, LoraConfig(text_encoders="clip_l", text_encoder_rank=4,
                                                              text_encoder_alpha=1.5))
    with torch.no_grad():
        for p in lora.adapter_parameters(adapted[lora.CLIP_PREFIX]).values():
            p.normal_(std=0.1)
    path = lora.save_lora(tmp_path / "a.safetensors", model, {}, dtype=None, text_encoders=adapted)
    ids = encoders.clip_tokenizer(["a photo of sks"], padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids

    clip = build_tiny_text_encoder(seed=0).clip_model
    with torch.no_grad():
        want, base = encoders.clip_model(ids).pooler_output, clip(ids).pooler_output
    assert (want - base).norm() > 1e-3 * want.norm()
    load_with_diffusers("load_lora_weights", path, build_tiny_transformer(seed=0), clip)
    with torch.no_grad():
        _assert_same_output(clip(ids).pooler_output, want)


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
    layers = lora.adapter_layers(model)
    for s in stems:
        # the trained scale alpha / rank = 2 is in lora_B, so alpha reads as the rank to every loader
        assert state[f"transformer.{s}.alpha"].item() == 4.0
        assert state[f"transformer.{s}.lora_A.weight"].shape[0] == 4
        trained_b = layers[s].lora_B[lora.ADAPTER].weight.detach()
        assert torch.equal(state[f"transformer.{s}.lora_B.weight"], (trained_b * 2).to(torch.bfloat16))
    assert meta["trigger_word"] == "sks"
    assert "lora_adapter_metadata" not in meta  # diffusers' load_lora_weights refuses alpha there and in tensors


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
