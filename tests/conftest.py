import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SAMPLES = Path(__file__).resolve().parents[1] / "trainer_core" / "data" / "samples"


@pytest.fixture(autouse=True)
def _quiet_libraries():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory):
    """The bundled sample images at 64 px, encoded once with the tiny VAE and text encoders."""
    from trainer_core.config import DatasetConfig
    from trainer_core.data.cache import build_cache
    from trainer_core.data.dataset import scan_dataset
    from trainer_core.models.tiny import build_tiny_text_encoder, build_tiny_vae

    items = scan_dataset(DatasetConfig(folder=str(SAMPLES), resolutions=[64], allow_upscale=True))
    return build_cache(items, build_tiny_vae(seed=0), build_tiny_text_encoder(seed=0),
                       tmp_path_factory.mktemp("cache"))


@pytest.fixture
def stop_at():
    """``stop_at(step)``: training callbacks that interrupt the run once it finishes ``step``, as Ctrl+C or
    ComfyUI's Cancel does mid-run."""
    from trainer_core.train import Callbacks

    class StopAt(Callbacks):
        def __init__(self, step: int):
            self.step = step

        def on_step(self, info):
            if info.step == self.step:
                raise KeyboardInterrupt

    return StopAt


@pytest.fixture
def load_with_diffusers():
    """``load(route, path, transformer, clip=None)``: a LoRA file into a FLUX transformer (and a CLIP-L, for
    pipelines) the ways diffusers users load one — ``load_lora_weights`` on a FluxPipeline of those models,
    ``load_lora_adapter`` on the transformer, or ``FluxPipeline.lora_state_dict`` + ``load_lora_into_transformer``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from trainer_core.models.tiny import build_tiny_text_encoder

    def load(route: str, path: Path, transformer, clip=None) -> None:
        if route == "load_lora_weights":
            encoders = build_tiny_text_encoder(seed=0)
            pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                text_encoder=clip if clip is not None else encoders.clip_model,
                                tokenizer=encoders.clip_tokenizer, text_encoder_2=encoders.t5_model,
                                tokenizer_2=encoders.t5_tokenizer, transformer=transformer)
            pipe.load_lora_weights(str(path))
        elif route == "load_lora_adapter":
            transformer.load_lora_adapter(str(path), prefix="transformer")
        else:
            state_dict, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
            FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=transformer)

    return load


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory):
    """Tiny model files as ``train --config`` reads them, written once: the transformer as a BFL file with ComfyUI's
    prefix, the VAE as a diffusers folder and as a bare safetensors file, CLIP-L and T5 folders and their tokenizers.
    ``tiny_model_files.model_section(transformer=None)`` is a config's ``[model]`` table for them."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from trainer_core.models.flux import diffusers_to_bfl
    from trainer_core.models.tiny import TINY_T5_MAX_LENGTH, build_tiny_text_encoder, build_tiny_transformer, \
        build_tiny_vae

    models = tmp_path_factory.mktemp("models")
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in
               diffusers_to_bfl(build_tiny_transformer(seed=0).state_dict()).items()}, str(models / "flux.safetensors"))
    vae = build_tiny_vae(seed=0).vae
    vae.save_pretrained(models / "vae")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(models / "vae_weights.safetensors"))
    text = build_tiny_text_encoder(seed=0)
    text.clip_model.save_pretrained(models / "clip_l")
    text.t5_model.save_pretrained(models / "t5")
    text.clip_tokenizer.save_pretrained(models / "tokenizers" / "clip")
    text.t5_tokenizer.save_pretrained(models / "tokenizers" / "t5")

    def model_section(transformer: Path | None = None) -> str:
        return f"""[model]
transformer = "{(transformer or models / 'flux.safetensors').as_posix()}"
vae = "{(models / 'vae').as_posix()}"
clip_l = "{(models / 'clip_l').as_posix()}"
t5 = "{(models / 't5').as_posix()}"
tokenizers = "{(models / 'tokenizers').as_posix()}"
t5_max_length = {TINY_T5_MAX_LENGTH}
"""

    return SimpleNamespace(folder=models, model_section=model_section)
