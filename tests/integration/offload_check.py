"""Run by ComfyUI's own Python (test_comfyui.py::test_comfyuis_partial_loading_works_on_the_shared_weights):
ComfyUI's partial ("lowvram") loading on a MODEL whose weights the trainer has taken over.

    python offload_check.py COMFYUI_DIR PACK_DIR FLUX_FILE LORA_FILE  → one JSON line on stdout

A headless server on CPU always loads models completely (load device cpu: ComfyUI turns its VRAM states off), so
this drives ComfyUI's own ModelPatcher in-process: load the FLUX file as UNETLoader does, run the diffusion model
fully loaded, hand the MODEL to the bridge as FLUX LoRA Train does (re-homed out of inference mode, shared with a
trainer-side transformer that runs a forward and backward pass), then load it again the lowvram way
(``ModelPatcher.load`` with a budget of a third of the model: the rest of the layers get ComfyUI's cast-on-use
weights), partially unload and reload it, and apply a LoRA in both ways (patched weights when fully loaded,
LowVramPatch weight functions when partially loaded). Reports the outputs' differences.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

PACKAGE = "flux_lora_trainer"


def main(comfyui_dir: str, pack_dir: str, flux_file: str, lora_file: str) -> dict:
    sys.path.insert(0, comfyui_dir)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    pack = Path(pack_dir)
    spec = importlib.util.spec_from_file_location(PACKAGE, pack / "__init__.py", submodule_search_locations=[str(pack)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    bridge = importlib.import_module(f"{PACKAGE}.nodes.comfy_bridge")
    flux = importlib.import_module(f"{PACKAGE}.trainer_core.models.flux")

    cpu = torch.device("cpu")
    patcher = comfy.sd.load_diffusion_model(flux_file)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, 16, 8, 8), generator=generator)
    context = torch.randn((1, 8, 768), generator=generator)
    pooled = torch.randn((1, 768), generator=generator)
    sigma, guidance = torch.tensor([0.7]), torch.tensor([3.5])

    def run(model) -> torch.Tensor:
        with torch.inference_mode():  # as a node runs
            return model.model.apply_model(x, sigma, c_crossattn=context, y=pooled, guidance=guidance).clone()

    def lowvram_layers(model) -> int:
        return sum(bool(getattr(m, "comfy_cast_weights", False)) for m in model.model.modules())

    mm.load_models_gpu([patcher])
    full = run(patcher)
    mm.unload_all_models()

    # FLUX LoRA Train's hand-over, then a forward and backward pass through the shared weights
    held = {t.untyped_storage().data_ptr() for t in patcher.model_state_dict("diffusion_model.").values()}
    with torch.inference_mode(False), torch.enable_grad():
        transformer = flux.load_flux_transformer(bridge.flux_state_dict(patcher, torch.float32),
                                                 dtype=torch.float32, device=None)
        shared = sum(p.untyped_storage().data_ptr() in held for p in transformer.parameters())
        hidden = torch.randn((1, 16, 64), requires_grad=True)
        out = transformer(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 8, 768),
                          pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.7]),
                          img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5])).sample
        out.square().mean().backward()
        backward_ok = hidden.grad is not None and bool(torch.isfinite(hidden.grad).all())
    parameters = sum(1 for _ in transformer.parameters())
    del transformer, out, hidden

    size = patcher.model_size()
    patcher.load(cpu, lowvram_model_memory=size // 3)
    partial_layers = lowvram_layers(patcher)
    partial = run(patcher)
    freed = patcher.partially_unload(cpu, memory_to_free=size // 2)
    patcher.partially_load(cpu, extra_memory=size // 6)
    reloaded = run(patcher)
    patcher.unpatch_model(cpu)
    mm.load_models_gpu([patcher])
    full_again = run(patcher)
    mm.unload_all_models()

    lora = comfy.utils.load_torch_file(lora_file)
    with_lora, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    mm.load_models_gpu([with_lora])
    lora_full = run(with_lora)
    mm.unload_all_models()
    with_lora.load(cpu, lowvram_model_memory=size // 3)
    lora_partial_layers = lowvram_layers(with_lora)
    lora_partial = run(with_lora)
    with_lora.unpatch_model(cpu)
    mm.load_models_gpu([patcher])
    base_after_lora = run(patcher)
    mm.unload_all_models()

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    return {"shared": shared, "parameters": parameters, "backward_ok": backward_ok,
            "partial_layers": partial_layers, "freed": int(freed), "lora_partial_layers": lora_partial_layers,
            "partial_vs_full": diff(partial, full), "reloaded_vs_full": diff(reloaded, full),
            "full_again_vs_full": diff(full_again, full), "lora_vs_base": diff(lora_full, full),
            "lora_partial_vs_lora_full": diff(lora_partial, lora_full),
            "base_after_lora_vs_full": diff(base_after_lora, full)}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
