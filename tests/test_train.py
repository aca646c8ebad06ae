"""The training loop: it learns, touches only the LoRA, resumes exactly, and stops safely."""

import pytest
import torch

from trainer_core import checkpoint as ckpt
from trainer_core import lora
from trainer_core.config import LoraConfig, TrainConfig
from trainer_core.data.cache import LatentCache
from trainer_core.errors import TrainerInputError, TrainingStopped
from trainer_core.models.tiny import build_tiny_transformer
from trainer_core.train import Callbacks, ValidationPrompts, sample_validation, train_lora
from trainer_core.config import SampleConfig


def fast(**overrides) -> TrainConfig:
    settings = dict(steps=12, learning_rate=1e-3, compute_dtype="fp32", checkpoint_every=0,
                    timestep_sampling="sigmoid", seed=7)
    settings.update(overrides)
    return TrainConfig(**settings)


def train(cache, tmp_path, cfg, name="t", **kwargs):
    model = kwargs.pop("model", None) or build_tiny_transformer(seed=0)
    result = train_lora(model, cache, lora_cfg=kwargs.pop("lora_cfg", LoraConfig(rank=8, alpha=8)), train_cfg=cfg,
                        output_dir=tmp_path, output_name=name, device="cpu", **kwargs)
    return model, result


def test_loss_falls_and_only_lora_tensors_change(sample_cache, tmp_path):
    model = build_tiny_transformer(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    _, result = train(sample_cache, tmp_path, fast(steps=150, timestep_sampling="uniform"), model=model)
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)
    after = model.state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in after.items() if ".lora_" not in k}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k]) for k in base)  # the base model is untouched
    lora_b = [v for k, v in after.items() if ".lora_B." in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # every LoRA up-matrix moved from its zero init
    assert result.lora_path.is_file() and result.steps == 150


def test_learning_is_real_lora_reproduces_its_training_image(sample_cache, tmp_path):
    """A subject LoRA: sampled from pure noise with the training caption, the LoRA lands far nearer its training
    latent than the base model does — at least 2× lower MSE (measured ≈ 2.8×: 0.35 vs 0.98)."""
    one = LatentCache(sample_cache.items[:1], sample_cache._latent_files[:1], sample_cache._text_files[:1])
    model, _ = train(one, tmp_path, fast(steps=300, learning_rate=3e-3, timestep_sampling="shift"),
                     lora_cfg=LoraConfig(rank=16, alpha=16))
    prompts = ValidationPrompts([one.text(0)], SampleConfig(steps=20, width=64, height=64, guidance=1.0, seed=1))
    target = one.latent(0)[None].float()
    with_lora = sample_validation(model, prompts, "cpu")
    model.disable_adapters()
    without = sample_validation(model, prompts, "cpu")
    err_lora = ((with_lora - target) ** 2).mean().item()
    err_base = ((without - target) ** 2).mean().item()
    assert err_lora * 2 < err_base, (err_lora, err_base)


@pytest.mark.parametrize("optimizer,accum", [("adamw", 1), ("adamw8bit", 2)])
def test_resume_continues_bit_for_bit(sample_cache, tmp_path, optimizer, accum, stop_at):
    cfg = fast(steps=10, optimizer=optimizer, gradient_accumulation=accum, checkpoint_every=3, scheduler="cosine",
               warmup_steps=2)
    full_model, full = train(sample_cache, tmp_path / "full", cfg)

    with pytest.raises(KeyboardInterrupt):
        train(sample_cache, tmp_path / "split", cfg, callbacks=stop_at(5))
    saved = ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints" / "t")
    assert saved is not None and saved.name == "step_000005.safetensors"
    resumed_model, resumed = train(sample_cache, tmp_path / "split", cfg, resume=True)

    assert resumed.resumed_from == 5
    assert resumed.losses == full.losses  # exact equality: same floats, not approximately
    a, b = lora.lora_state_dict(full_model), lora.lora_state_dict(resumed_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(sample_cache, tmp_path, stop_at):
    """A setting that changes what the run is (loss, rank) is refused, naming exactly the keys that differ in
    a short message."""
    with pytest.raises(KeyboardInterrupt):
        train(sample_cache, tmp_path, fast(), callbacks=stop_at(2))
    with pytest.raises(TrainerInputError, match=r"settings changed: lora\.rank \(8 → 4\), train\.loss_type "
                                                r"\('l2' → 'l1'\)\. Restore") as err:
        train(sample_cache, tmp_path, fast(loss_type="l1", learning_rate=5e-4), resume=True,
              lora_cfg=LoraConfig(rank=4, alpha=8))
    assert len(str(err.value)) < 300 and "learning_rate" not in str(err.value)


def test_resume_may_change_learning_rate_and_schedule(sample_cache, tmp_path, stop_at, caplog):
    """After a stop, a lower learning rate or another schedule continues the run (and the log says what changed):
    the steps already taken stay, the rest follow the new settings."""
    with pytest.raises(KeyboardInterrupt):
        train(sample_cache, tmp_path, fast(steps=6), callbacks=stop_at(3))

    class Rates(Callbacks):
        seen: list = []

        def on_step(self, info):
            self.seen.append(info.lr)

    _, first = train(sample_cache, tmp_path / "same", fast(steps=3))
    caplog.set_level("INFO", logger="trainer_core.train")
    _, resumed = train(sample_cache, tmp_path, fast(steps=6, learning_rate=2e-4, scheduler="linear"), resume=True,
                       callbacks=Rates())
    assert resumed.resumed_from == 3 and resumed.steps == 6 and resumed.losses[:3] == first.losses
    assert Rates.seen == pytest.approx([2e-4 * 2 / 6, 2e-4 * 1 / 6, 0.0])  # linear decay from the new rate
    assert "train.learning_rate: 0.001 → 0.0002" in caplog.text and "train.scheduler: 'constant' → 'linear'" in \
        caplog.text


def test_divergence_never_saves_non_finite_weights(sample_cache, tmp_path):
    """An optimizer step that overflows the weights (as a far too high learning rate does) is caught: no
    checkpoint holds non-finite weights, and the message points at the last finite one."""

    class OverflowAt3(Callbacks):
        def __init__(self):
            self.model = None

        def on_step(self, info):
            if info.step == 3:
                with torch.no_grad():
                    for name, param in self.model.named_parameters():
                        if ".lora_B." in name:
                            param.fill_(float("inf"))

    callbacks = OverflowAt3()
    callbacks.model = build_tiny_transformer(seed=0)
    with pytest.raises(TrainingStopped, match=r"at step 4; non-finite weights are never saved — the last finite "
                                              r"checkpoint is '.*step_000002\.safetensors'\. Lower the learning "
                                              r"rate") as err:
        train(sample_cache, tmp_path, fast(checkpoint_every=2), model=callbacks.model, callbacks=callbacks)
    kept = ckpt.list_checkpoints(tmp_path / "checkpoints" / "t")
    assert err.value.checkpoint == kept[-1] and [p.name for p in kept] == ["step_000002.safetensors"]
    assert all(torch.isfinite(t).all() for t in ckpt.load_checkpoint(kept[-1]).lora.values())


def test_a_full_disk_at_the_end_keeps_the_finished_run(sample_cache, tmp_path, monkeypatch):
    """Writing the LoRA fails only for reasons no check could know (a full disk): the message says so in one
    line, the final checkpoint is kept, and a resume writes the same LoRA an uninterrupted run writes."""
    import errno

    full_model, full = train(sample_cache, tmp_path / "full", fast(steps=4))

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(lora, "save_lora", disk_full)
        with pytest.raises(TrainingStopped, match=r"could not write the LoRA .*\(No space left on device\); the "
                                                  r"finished run is kept in checkpoint") as err:
            train(sample_cache, tmp_path, fast(steps=4))
    assert "\n" not in str(err.value) and ckpt.load_checkpoint(err.value.checkpoint).step == 4
    assert not list(tmp_path.glob("*.safetensors"))
    model, resumed = train(sample_cache, tmp_path, fast(steps=4), resume=True)
    assert resumed.resumed_from == 4 and resumed.lora_path.is_file()
    a, b = lora.lora_state_dict(full_model), lora.lora_state_dict(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_names_fit_every_derived_file_and_longer_ones_are_refused_first(sample_cache, tmp_path):
    """The longest allowed name still fits its numbered, EMA and kohya files and their temporary names; a
    longer one is refused before any step runs."""
    from trainer_core.fileio import MAX_NAME_BYTES

    name = "n" * MAX_NAME_BYTES
    settings = dict(lora_cfg=LoraConfig(rank=4, alpha=4, export_formats=["kohya"]))
    train(sample_cache, tmp_path, fast(steps=1, ema_decay=0.9), name=name, **settings)
    _, again = train(sample_cache, tmp_path, fast(steps=1, ema_decay=0.9), name=name, **settings)
    assert {p.name for p in again.extra_files} == {f"{name}_001_kohya.safetensors", f"{name}_001_ema.safetensors",
                                                  f"{name}_001_ema_kohya.safetensors"}
    for length in (MAX_NAME_BYTES + 1, 240, 300):
        with pytest.raises(TrainerInputError, match=f"output_name: the name is {length} bytes long"):
            train(sample_cache, tmp_path / "long", fast(steps=1), name="x" * length)
    assert not (tmp_path / "long" / "checkpoints").exists()


def test_resume_can_extend_a_finished_run(sample_cache, tmp_path):
    _, first = train(sample_cache, tmp_path, fast(steps=4))
    _, more = train(sample_cache, tmp_path, fast(steps=8), resume=True)
    assert more.resumed_from == 4 and more.steps == 8 and len(more.losses) == 8
    assert more.losses[:4] == first.losses
    assert more.lora_path.name == "t_001.safetensors" and first.lora_path.is_file()


class PoisonedCache(LatentCache):
    """Returns NaN latents once ``poisoned`` is set: a corrupt input or a diverging run."""

    poisoned = False

    def latent(self, index):
        latent = super().latent(index)
        return latent * float("nan") if self.poisoned else latent


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(sample_cache, tmp_path):
    cache = PoisonedCache(sample_cache.items, sample_cache._latent_files, sample_cache._text_files)

    class PoisonAfter(Callbacks):
        def on_step(self, info):
            cache.poisoned = info.step == 3

    with pytest.raises(TrainingStopped, match="loss became nan at step 4.*resumable checkpoint") as err:
        train(cache, tmp_path, fast(), callbacks=PoisonAfter())
    state = ckpt.load_checkpoint(err.value.checkpoint)
    assert state.step == 3
    assert all(torch.isfinite(t).all() for t in state.lora.values())
    assert not list(tmp_path.glob("*.safetensors"))  # no final LoRA pretending the run finished


def test_fresh_run_never_clobbers_earlier_lora_or_its_checkpoints(sample_cache, tmp_path):
    _, first = train(sample_cache, tmp_path, fast(steps=2))
    before = first.lora_path.read_bytes()
    _, second = train(sample_cache, tmp_path, fast(steps=2, seed=8))
    assert second.lora_path.name == "t_001.safetensors"
    assert first.lora_path.read_bytes() == before
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints" / "t").name == "step_000002.safetensors"


def test_only_the_newest_checkpoints_are_kept(sample_cache, tmp_path):
    train(sample_cache, tmp_path, fast(steps=9, checkpoint_every=2, keep_checkpoints=2))
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints" / "t")]
    assert names == ["step_000008.safetensors", "step_000009.safetensors"]


@pytest.mark.parametrize("field,value", [("steps", 0), ("steps", -5), ("learning_rate", 0.0)])
def test_bad_training_settings_are_refused(sample_cache, tmp_path, field, value):
    with pytest.raises(TrainerInputError, match=f"train.{field}"):
        train(sample_cache, tmp_path, fast(**{field: value}))


def test_unwritable_output_folder_is_refused_before_training(sample_cache, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainerInputError, match="output folder.*a_file"):
        train(sample_cache, blocker / "loras", fast())


def test_bf16_compute_trains(sample_cache, tmp_path):
    model, result = train(sample_cache, tmp_path, fast(steps=3, compute_dtype="bf16"))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(model))  # fp32 master weights


def test_memory_preset_reaches_the_model_and_optimizer(sample_cache):
    """A preset is not a label: its knobs (fp8 base, checkpointing, 8-bit optimizer) are what the session runs."""
    from trainer_core.config import MemoryConfig
    from trainer_core.train import TrainingSession

    session = TrainingSession(build_tiny_transformer(seed=0), sample_cache, LoraConfig(rank=4, alpha=4),
                              fast(steps=2), MemoryConfig(preset="16gb", blocks_to_swap=2), device="cpu")
    try:
        assert session.mem_cfg.base_precision == "fp8" and session.mem_cfg.blocks_to_swap == 2  # override wins
        assert session.transformer.gradient_checkpointing
        assert type(session.optimizer).__name__ == "AdamW8bit"
        assert session.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
        assert torch.isfinite(torch.tensor(session.step()))
    finally:
        session.close()


def test_captions_of_different_token_lengths_batch_together(sample_cache, tmp_path):
    """ComfyUI's T5 gives 256 tokens, more for a long caption: a batch mixing both must still train."""
    class MixedLengths(LatentCache):
        def text(self, index):
            hidden, pooled = super().text(index)
            return (torch.cat([hidden, hidden[:3]]) if index % 2 else hidden), pooled

    cache = MixedLengths(sample_cache.items, sample_cache._latent_files, sample_cache._text_files)
    _, result = train(cache, tmp_path, fast(steps=3, batch_size=4))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
