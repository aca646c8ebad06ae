"""FLUX.1 LoRA training library behind the ComfyUI nodes; never imports ComfyUI.

Import the submodules you need (``trainer_core.train``, ``trainer_core.lora``, …); importing the package
itself is cheap.
"""

import logging

__version__ = "0.1.0"


class _DropOptionalKernelNotice(logging.Filter):
    """diffusers imports bitsandbytes, whose CPU backend warns at import that the optional ``kernels`` package (an
    nf4 speed-up fetched from a model hub, which this project never contacts) is missing. It is not a fault of the
    user's set-up, so it is dropped; every other bitsandbytes message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())
