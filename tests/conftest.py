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
