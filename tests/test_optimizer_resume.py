"""Every optimizer family checkpoints and resumes exactly, at sizes where bitsandbytes keeps 8-bit state.

bitsandbytes switches a tensor's state to 8 bits only from 4096 elements on, and its 8-bit optimizers give every
parameter the same ``qmap1``/``qmap2`` tensors, which safetensors refuses to write twice. Rank 64 on the tiny
FLUX (width 64) makes every LoRA matrix ≥ 4096 elements, so the 8-bit path is the one under test.

Needs only pytest and the pack's runtime requirements (no tokenizer fixtures): the real-ComfyUI suite runs this
file under ComfyUI's own torch as well.
"""

import pytest
import torch

from trainer_core import checkpoint as ckpt
from trainer_core import lora
from trainer_core.config import LoraConfig, TrainConfig
from trainer_core.data.cache import LatentCache
from trainer_core.data.dataset import DatasetItem
from trainer_core.fileio import save_safetensors
from trainer_core.models.tiny import build_tiny_transformer, tiny_flux_config
from trainer_core.train import train_lora

BNB_8BIT_MIN_ELEMENTS = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit state
RANK = 64
OPTIMIZERS = ["adamw", "adamw8bit", "lion8bit", "paged_adamw8bit", "adafactor", "prodigy"]
QUANT_STATE = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict nests its 8-bit state


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> LatentCache:
    """Two 64 px items with fixed random latents and text embeddings (what a built cache holds)."""
    folder = tmp_path_factory.mktemp("cache")
    width = tiny_flux_config()
    gen = torch.Generator().manual_seed(3)
    items, latents, texts = [], [], []
    for i in range(2):
        items.append(DatasetItem(source=f"image {i}", caption=f"caption {i}", width=64, height=64,
                                 crop=(0, 0, 64, 64), flip=False, content_hash=f"{i:064d}"))
        latents.append(save_safetensors({"latent": torch.randn(16, 8, 8, generator=gen)},
                                        folder / f"latent{i}.safetensors"))
        texts.append(save_safetensors({"hidden": torch.randn(8, width["joint_attention_dim"], generator=gen),
                                       "pooled": torch.randn(width["pooled_projection_dim"], generator=gen)},
                                      folder / f"text{i}.safetensors"))
    return LatentCache(items, latents, texts)


def _train(cache, folder, optimizer, **kwargs):
    cfg = TrainConfig(steps=6, learning_rate=1e-3, compute_dtype="fp32", checkpoint_every=0, seed=7,
                      optimizer=optimizer, optimizer_args="d_coef=2" if optimizer == "prodigy" else "",
                      scheduler="cosine", warmup_steps=1)
    model = build_tiny_transformer(seed=0)
    result = train_lora(model, cache, lora_cfg=LoraConfig(rank=RANK, alpha=RANK / 2, targets="attention"),
                        train_cfg=cfg, output_dir=folder, output_name="t", device="cpu", **kwargs)
    return model, result


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_stop_and_resume_gives_the_uninterrupted_run(cache, tmp_path, optimizer, stop_at):
    full_model, full = _train(cache, tmp_path / "full", optimizer)

    with pytest.raises(KeyboardInterrupt):
        _train(cache, tmp_path / "split", optimizer, callbacks=stop_at(3))
    saved = ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints" / "t")
    assert saved is not None and saved.name == "step_000003.safetensors"
    state = ckpt.load_checkpoint(saved)
    if optimizer.endswith("8bit"):
        per_param = [s[QUANT_STATE] for s in state.optimizer["state"].values()]
        assert len(per_param) > 1 and all(s["state1"].numel() >= BNB_8BIT_MIN_ELEMENTS for s in per_param)
        assert all(s["state1"].dtype == torch.uint8 for s in per_param)  # really 8-bit state, not the fp32 fallback
        # the one shared quantisation map comes back as one tensor, as bitsandbytes had it
        assert all(s["qmap1"] is per_param[0]["qmap1"] for s in per_param)
    resumed_model, resumed = _train(cache, tmp_path / "split", optimizer, resume=True)

    assert resumed.resumed_from == 3
    assert resumed.losses == full.losses  # exact: the same floats, not approximately
    a, b = lora.lora_state_dict(full_model), lora.lora_state_dict(resumed_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
