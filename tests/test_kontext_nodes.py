"""The edit-LoRA (Kontext / FLUX.2 reference) side of the nodes without ComfyUI: the Dataset node's control folder
and control IMAGE batch, and the Train node's validation sample with a control."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
_test_nodes = importlib.import_module("test_nodes")  # imports the pack as ComfyUI does
pack = _test_nodes.pack
_image, _dataset_widgets = _test_nodes._image, _test_nodes._dataset_widgets


def test_edit_dataset_node_pairs_a_control_folder_and_notices_its_changes(pack, tmp_path, monkeypatch):
    node = pack.dataset.FluxLoraDataset
    for stem, colour in (("cat", (200, 30, 30)), ("dog", (30, 200, 30))):
        _image(tmp_path / "input" / "edited" / f"{stem}.png", (64, 64), colour)
        (tmp_path / "input" / "edited" / f"{stem}.txt").write_text(f"make the {stem} blue")
        _image(tmp_path / "input" / "before" / f"{stem}.png", (64, 64), (30, 30, 200))
    monkeypatch.setattr(pack.bridge, "comfy_folders", lambda: (tmp_path / "input", tmp_path / "output"))
    options = node.INPUT_TYPES()["optional"]["control_folder"][0]
    assert options[0] == pack.dataset.NO_CONTROLS and {"edited", "before"} <= set(options)

    widgets = dict(_dataset_widgets(pack, folder="edited", resolutions="64"), control_folder="before")
    (spec,) = node().build(**widgets)
    assert [Path(str(i.source)).name for i in spec.items] == ["cat.png", "dog.png"]
    assert [[Path(str(c.source)).parent.name for c in i.controls] for i in spec.items] == [["before"], ["before"]]
    assert spec.config.control_folder == str(tmp_path / "input" / "before")
    assert node.VALIDATE_INPUTS("edited", "before") is True
    assert "control_folder 'gone' does not exist" in node.VALIDATE_INPUTS("edited", "gone")

    before = node.IS_CHANGED(**widgets)
    _image(tmp_path / "input" / "before" / "cat.png", (64, 64), (0, 0, 0))  # a control changed, not the targets
    assert node.IS_CHANGED(**widgets) != before

    _image(tmp_path / "input" / "before" / "bird.png", (64, 64))
    with pytest.raises(pack.errors.TrainerInputError, match=r"control image '.*bird\.png' has no target image"):
        node().build(**widgets)


def test_edit_dataset_node_pairs_a_control_image_batch(pack):
    node = pack.dataset.FluxLoraDataset
    batch = dict(_dataset_widgets(pack, folder=pack.dataset.NO_FOLDER, resolutions="64"),
                 images=torch.rand(2, 64, 64, 3), captions="make it red\nmake it green")
    controls = torch.zeros(2, 64, 64, 3)
    controls[1] = 1.0
    (spec,) = node().build(**batch, control_images=controls)
    assert [item.caption for item in spec.items] == ["make it red", "make it green"]
    assert spec.items[0].controls[0].load_pixels().max() == 0 and spec.items[1].controls[0].load_pixels().min() == 1
    with pytest.raises(pack.errors.TrainerInputError, match=r"controls: expected an IMAGE batch \[2, H, W, 3\]"):
        node().build(**batch, control_images=controls[:1])
    with pytest.raises(pack.errors.TrainerInputError, match="control_images: they pair with the 'images' input"):
        node().build(**_dataset_widgets(pack, folder=pack.dataset.NO_FOLDER), control_images=controls)


def test_edit_train_node_validates_with_a_training_control_at_kontext_guidance(pack, tmp_path):
    tc = importlib.import_module(f"{_test_nodes.PACK}.trainer_core.data.cache")
    ds = importlib.import_module(f"{_test_nodes.PACK}.trainer_core.data.dataset")
    pairs = importlib.import_module(f"{_test_nodes.PACK}.trainer_core.data.pairs")
    tiny = importlib.import_module(f"{_test_nodes.PACK}.trainer_core.models.tiny")
    cfg = pack.config.DatasetConfig(resolutions=[64])
    items = pairs.controls_from_images(ds.dataset_from_images(torch.rand(2, 64, 64, 3), ["a", "b"], cfg),
                                       torch.rand(2, 64, 64, 3), cfg)
    cache = tc.build_cache(items, tiny.build_tiny_vae(seed=0), tiny.build_tiny_text_encoder(seed=0), tmp_path)
    data = SimpleNamespace(cache=cache, prompts=[], prompt_texts=[])
    validation = pack.train.FluxLoraTrain._validation(data, 5, "dev")
    assert validation.config.guidance == 2.5
    assert len(validation.controls) == 1 and torch.equal(validation.controls[0][0], cache.controls(0)[0])


def test_kontext_workflow_trains_pairs_and_validates_through_reference_latent(pack):
    """The shipped Kontext graph: the Dataset node has a control folder; the trained MODEL samples with the edit
    instruction + a held-out control (LoadImage → FluxKontextImageScale → VAEEncode → ReferenceLatent), FluxGuidance
    2.5, cfg 1, starting from the control's latent size."""
    import json

    api = json.loads((Path(__file__).resolve().parents[1] / "workflows" / "api" / "flux_kontext_lora_train.json")
                     .read_text(encoding="utf-8"))
    by_type: dict[str, list[str]] = {}
    for node_id, node in api.items():
        by_type.setdefault(node["class_type"], []).append(node_id)

    def source(node_id: str, name: str) -> tuple[str, dict]:
        upstream = api[node_id]["inputs"][name][0]
        return api[upstream]["class_type"], api[upstream]

    (dataset,), (train,), (sampler,) = by_type["FluxLoraDataset"], by_type["FluxLoraTrain"], by_type["KSampler"]
    assert api[dataset]["inputs"]["control_folder"] not in ("", pack.dataset.NO_CONTROLS)
    assert source(train, "model")[0] == "UNETLoader" and "kontext" in source(train, "model")[1]["inputs"]["unet_name"]
    assert api[sampler]["inputs"]["model"] == [train, 0] and api[sampler]["inputs"]["cfg"] == 1.0
    kind, guidance = source(sampler, "positive")
    assert kind == "FluxGuidance" and guidance["inputs"]["guidance"] == 2.5
    reference = api[guidance["inputs"]["conditioning"][0]]
    assert reference["class_type"] == "ReferenceLatent"
    assert api[reference["inputs"]["conditioning"][0]]["class_type"] == "CLIPTextEncode"
    encode = reference["inputs"]["latent"][0]
    assert api[encode]["class_type"] == "VAEEncode" and api[sampler]["inputs"]["latent_image"] == [encode, 0]
    scale = api[api[encode]["inputs"]["pixels"][0]]
    assert scale["class_type"] == "FluxKontextImageScale"
    assert api[scale["inputs"]["image"][0]]["class_type"] == "LoadImage"



def test_flux2_klein_edit_workflow_trains_pairs_and_validates_through_reference_latent(pack):
    """The shipped klein edit graph: klein base 4B trains on the Dataset node's pairs; the trained MODEL samples the
    instruction with a held-out control (LoadImage → VAEEncode → ReferenceLatent, on the positive and on the
    negative prompt, so CFG contrasts the prompts, not the reference) through CFGGuider and SamplerCustomAdvanced,
    starting from the control's latent size."""
    import json

    api = json.loads((Path(__file__).resolve().parents[1] / "workflows" / "api" / "flux2_klein_edit_lora_train.json")
                     .read_text(encoding="utf-8"))
    by_type: dict[str, list[str]] = {}
    for node_id, node in api.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    (dataset,), (train,), (sampler,) = (by_type["FluxLoraDataset"], by_type["FluxLoraTrain"],
                                        by_type["SamplerCustomAdvanced"])
    assert api[dataset]["inputs"]["control_folder"] not in ("", pack.dataset.NO_CONTROLS)
    unet = api[api[train]["inputs"]["model"][0]]
    assert unet["class_type"] == "UNETLoader" and unet["inputs"]["unet_name"] == "flux-2-klein-base-4b.safetensors"
    clip = api[api[by_type["FluxLoraCache"][0]]["inputs"]["clip"][0]]
    assert clip["class_type"] == "CLIPLoader" and clip["inputs"]["type"] == "flux2"
    guider = api[api[sampler]["inputs"]["guider"][0]]
    assert guider["class_type"] == "CFGGuider" and guider["inputs"]["model"] == [train, 0]
    assert guider["inputs"]["cfg"] > 1
    (encode,) = by_type["VAEEncode"]
    prompts = []
    for side in ("positive", "negative"):
        reference = api[guider["inputs"][side][0]]
        assert reference["class_type"] == "ReferenceLatent" and reference["inputs"]["latent"] == [encode, 0]
        text = api[reference["inputs"]["conditioning"][0]]
        assert text["class_type"] == "CLIPTextEncode"
        prompts.append(text["inputs"]["text"])
    assert prompts[0] and prompts[0] != prompts[1]
    assert api[sampler]["inputs"]["latent_image"] == [encode, 0]
    assert api[api[encode]["inputs"]["pixels"][0]]["class_type"] == "LoadImage"
    assert api[api[sampler]["inputs"]["sigmas"][0]]["class_type"] == "Flux2Scheduler"


def test_flux2_edit_pairs_cache_through_comfyuis_flux2_vae_and_klein_validates_with_a_control(pack, tmp_path,
                                                                                               monkeypatch):
    """A control folder on the Dataset node with ComfyUI's FLUX.2 VAE: the controls are cached as FLUX.2 latents
    ([128, H/16, W/16], as ComfyUI's VAE returns them) beside their targets, and klein's in-training validation
    sample is conditioned on a training control with real CFG against the empty caption."""
    tc = importlib.import_module(f"{_test_nodes.PACK}.trainer_core.data.cache")
    family = importlib.import_module(f"{_test_nodes.PACK}.trainer_core.models.family")
    for stem, colour in (("cat", (200, 30, 30)), ("dog", (30, 200, 30))):
        _image(tmp_path / "input" / "edited" / f"{stem}.png", (64, 64), colour)
        (tmp_path / "input" / "edited" / f"{stem}.txt").write_text(f"make the {stem} blue")
        _image(tmp_path / "input" / "before" / f"{stem}.png", (64, 64), (30, 30, 20 + 100 * (stem == "dog")))
    monkeypatch.setattr(pack.bridge, "comfy_folders", lambda: (tmp_path / "input", tmp_path / "output"))
    (spec,) = pack.dataset.FluxLoraDataset().build(
        **dict(_dataset_widgets(pack, folder="edited", resolutions="64"), control_folder="before"))
    vae = _test_nodes.FakeFlux2VAE()
    image_encoder = pack.bridge.ComfyImageEncoder(vae)
    text_encoder = pack.bridge.ComfyTextEncoder(_test_nodes.FakeCLIP(pooled=False), image_encoder.family)
    cache = tc.build_cache(spec.items, image_encoder, text_encoder, tmp_path / "cache", empty_caption=True)
    assert image_encoder.family is family.FLUX2 and cache.control_count == 1
    for i, item in enumerate(spec.items):
        (control,) = cache.controls(i)
        assert control.shape == (128, 4, 4)
        assert torch.equal(control, vae.encode(item.controls[0].load_pixels()[None].movedim(1, -1))[0])
    data = SimpleNamespace(cache=cache, prompts=[cache.text(1)], prompt_texts=["make the dog blue"])
    validation = pack.train.FluxLoraTrain._validation(data, 5, "klein", family.FLUX2)
    assert validation.config.guidance > 1 and validation.negative is not None
    (controls,) = validation.controls
    assert torch.equal(controls[0], cache.controls(cache.captions.index("make the dog blue"))[0])
    assert not torch.equal(controls[0], cache.controls(cache.captions.index("make the cat blue"))[0])
