"""Run by ComfyUI's Python inside a ComfyUI checkout (cwd): the position ids ComfyUI's FLUX model builds for a target
latent and its reference latents, read from ComfyUI's own code. Prints them as JSON.

argv[1]: a JSON list of {"family": "FLUX.1" | "FLUX.2", "target": [h, w], "references": [[h, w], …]} (latent cells);
prints one JSON list of {"method", "ids"} in the same order.
The model's parameters come from ComfyUI's own detection (model_detection.detect_unet_config) on a header-only state
dict (meta tensors) of the family; its forward pass stops where the ids are complete: the transformer blocks
(forward_orig) are replaced by a function that records the ids and hands the tokens back.
"""

import dataclasses
import json
import sys

sys.path.insert(0, ".")
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import torch  # noqa: E402

import comfy.model_detection  # noqa: E402
from comfy.ldm.flux.model import Flux, FluxParams  # noqa: E402

def reference_ids(request: dict) -> dict:
    flux2 = request["family"] == "FLUX.2"
    meta = {"device": "meta"}
    width, channels, context = 3072, (128 if flux2 else 64), 4096
    keys = {
        "img_in.weight": torch.empty(width, channels, **meta),
        "txt_in.weight": torch.empty(width, context, **meta),
        "double_blocks.0.img_attn.norm.key_norm.scale": torch.empty(128, **meta),
        "single_blocks.0.linear1.weight": torch.empty(1, 1, **meta),
        "guidance_in.in_layer.weight": torch.empty(width, 256, **meta),
    }
    if flux2:
        keys["double_stream_modulation_img.lin.weight"] = torch.empty(1, 1, **meta)
    else:
        keys["vector_in.in_layer.weight"] = torch.empty(width, 768, **meta)
    config = comfy.model_detection.detect_unet_config(keys, "")
    params = FluxParams(**{f.name: config[f.name] for f in dataclasses.fields(FluxParams) if f.name in config})
    model = Flux.__new__(Flux)
    torch.nn.Module.__init__(model)
    model.params, model.patch_size = params, config["patch_size"]
    recorded = {}

    def forward_orig(img, img_ids, *args, **kwargs):
        recorded["ids"] = img_ids
        return img

    model.forward_orig = forward_orig
    latent_channels = 128 if flux2 else 16
    x = torch.zeros(1, latent_channels, *request["target"])
    refs = [torch.zeros(1, latent_channels, *size) for size in request["references"]]
    model._forward(x, torch.zeros(1), torch.zeros(1, 3, context), y=torch.zeros(1, 768), guidance=torch.zeros(1),
                   ref_latents=refs)
    return {"method": params.default_ref_method, "ids": recorded["ids"][0].tolist()}


print(json.dumps([reference_ids(request) for request in json.loads(sys.argv[1])]))
