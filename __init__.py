"""ComfyUI entry point of the FLUX LoRA trainer pack.

ComfyUI imports this folder as a package from custom_nodes/. Outside ComfyUI (tests, the CLI, a plain
``import``) it exports empty mappings and imports nothing heavy; the library lives in ``trainer_core``.
"""

try:
    import comfy.model_management  # noqa: F401  (only importable inside ComfyUI)
    import folder_paths  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
