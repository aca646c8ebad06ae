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
