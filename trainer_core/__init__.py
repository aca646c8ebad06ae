"""FLUX.1 LoRA training library behind the ComfyUI nodes; never imports ComfyUI.

Import the submodules you need (``trainer_core.train``, ``trainer_core.lora``, …); importing the package
itself is cheap.
"""

__version__ = "0.1.0"
