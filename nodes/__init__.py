"""The pack's ComfyUI nodes (classic node API). Importable without ComfyUI; the pack root registers them only
when ComfyUI is running."""

from .cache import FluxLoraCache
from .dataset import FluxLoraDataset
from .memory import FluxLoraMemory
from .options import FluxLoraOptions
from .train import FluxLoraTrain

NODE_CLASS_MAPPINGS = {
    "FluxLoraDataset": FluxLoraDataset,
    "FluxLoraCache": FluxLoraCache,
    "FluxLoraMemory": FluxLoraMemory,
    "FluxLoraOptions": FluxLoraOptions,
    "FluxLoraTrain": FluxLoraTrain,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxLoraDataset": "FLUX LoRA Dataset",
    "FluxLoraCache": "FLUX LoRA Cache",
    "FluxLoraMemory": "FLUX LoRA Memory",
    "FluxLoraOptions": "FLUX LoRA Options",
    "FluxLoraTrain": "FLUX LoRA Train",
}
