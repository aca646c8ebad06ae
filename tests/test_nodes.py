"""The ComfyUI node pack without ComfyUI: registration, input schemas, and the adapters over stand-in objects.

The pack is imported the way ComfyUI imports it — as a package from its folder — so its relative imports
(``from ..trainer_core import …``) are exercised; its trainer_core is that package's copy, so errors are
checked by that copy's classes.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PACK = "flux_lora_pack"


def load_pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


@pytest.fixture(scope="module")
def pack():
    load_pack()
    return SimpleNamespace(
        root=sys.modules[PACK],
        nodes=importlib.import_module(f"{PACK}.nodes"),
        bridge=importlib.import_module(f"{PACK}.nodes.comfy_bridge"),
        dataset=importlib.import_module(f"{PACK}.nodes.dataset"),
        cache=importlib.import_module(f"{PACK}.nodes.cache"),
        train=importlib.import_module(f"{PACK}.nodes.train"),
        errors=importlib.import_module(f"{PACK}.trainer_core.errors"),
        config=importlib.import_module(f"{PACK}.trainer_core.config"),
    )


# ---------------------------------------------------------------------------------------------------------------
# Registration and schemas

def test_pack_root_imports_without_comfyui_and_registers_nothing(pack):
    assert importlib.util.find_spec("comfy") is None, "this test needs an environment without ComfyUI"
    assert pack.root.NODE_CLASS_MAPPINGS == {}
    assert pack.root.NODE_DISPLAY_NAME_MAPPINGS == {}


def test_importing_the_nodes_leaves_training_libraries_unloaded():
    """ComfyUI imports every pack at start-up: diffusers and peft load only when a node trains."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_nodes; "
            f"test_nodes.load_pack(); import {PACK}.nodes; "
            f"print(sorted(m for m in ('diffusers', 'peft', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_nodes_package_registers_the_four_nodes(pack):
    mappings = pack.nodes.NODE_CLASS_MAPPINGS
    assert set(mappings) == {"FluxLoraDataset", "FluxLoraCache", "FluxLoraMemory", "FluxLoraOptions", "FluxLoraTrain"}
    assert set(pack.nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(mappings)
    assert {cls.CATEGORY for cls in mappings.values()} == {"FLUX LoRA"}


def _node_classes():
    load_pack()
    return sorted(importlib.import_module(f"{PACK}.nodes").NODE_CLASS_MAPPINGS.items())


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SOCKET_TYPES = {"MODEL", "CLIP", "VAE", "IMAGE", "MASK", "FLUX_LORA_DATASET", "FLUX_LORA_CACHE", "FLUX_LORA_MEMORY",
                "FLUX_LORA_OPTIONS"}


@pytest.mark.parametrize("name,cls", _node_classes())
def test_input_schema_is_valid(name, cls):
    schema = cls.INPUT_TYPES()
    assert set(schema) <= {"required", "optional", "hidden"} and schema["required"]
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for section in ("required", "optional"):
        for input_name, spec in schema.get(section, {}).items():
            kind, options = spec[0], spec[1]
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
            assert isinstance(kind, list) or kind in WIDGET_TYPES | SOCKET_TYPES, (input_name, kind)
            if isinstance(kind, list):
                assert kind and options["default"] in kind, input_name
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], input_name
                assert options["max"] < 2**63, input_name
            elif kind in ("STRING", "BOOLEAN"):
                assert isinstance(options["default"], str if kind == "STRING" else bool), input_name
            # every input reaches the node function; optional ones have defaults there
            assert input_name in params, f"{name}.{cls.FUNCTION} does not take {input_name}"
            assert (params[input_name].default is inspect.Parameter.empty) == (section == "required"), input_name
    for hidden in schema.get("hidden", {}):
        assert params[hidden].default is None
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    assert cls.DESCRIPTION


def test_train_node_widgets_match_trainer_settings(pack):
    """The Train node's choices are trainer_core's, and its defaults are a valid training configuration."""
    required = pack.train.FluxLoraTrain.INPUT_TYPES()["required"]
    assert required["optimizer"][0] == list(pack.config.OPTIMIZERS)
    assert required["timestep_sampling"][0] == list(pack.config.TIMESTEP_SAMPLERS)
    assert required["seed"][1]["control_after_generate"] is False  # a randomised seed would break resume
    defaults = {k: v[1]["default"] for k, v in required.items()
                if k in inspect.signature(pack.train.configs).parameters}
    lora_cfg, train_cfg = pack.train.configs(**defaults, compute_dtype="bf16")
    assert (lora_cfg.rank, train_cfg.steps, train_cfg.optimizer) == (16, 1000, "adamw")
    with pytest.raises(pack.errors.TrainerInputError, match="rank"):
        pack.train.configs(**{**defaults, "rank": 0}, compute_dtype="bf16")


def test_requirements_leave_comfyui_packages_alone():
    """The pack installs into ComfyUI's environment: lower bounds only, and nothing that ComfyUI pins itself."""
    comfy_owned = {"torch", "torchvision", "torchaudio", "numpy", "comfyui-frontend-package"}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        requirement = line.split("#")[0].split(";")[0].strip()
        if not requirement:
            continue
        name = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()
        assert name not in comfy_owned, requirement
        assert not re.search(r"<|==|~=|===", requirement), f"upper bound or pin: {requirement}"


# ---------------------------------------------------------------------------------------------------------------
# Dataset node

def test_parse_resolutions(pack):
    assert pack.dataset.parse_resolutions("768, 512;512 1024") == [512, 768, 1024]
    for bad, field in (("512, big", "'big'"), ("", "at least one"), ("32", "outside")):
        with pytest.raises(pack.errors.TrainerInputError, match=field):
            pack.dataset.parse_resolutions(bad)


def _image(path: Path, size=(64, 48), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_folder_list_offers_image_folders_only(pack, tmp_path):
    _image(tmp_path / "cats" / "a.png")
    _image(tmp_path / "people" / "anna" / "b.jpg")
    (tmp_path / "3d").mkdir()
    (tmp_path / "3d" / "model.glb").write_bytes(b"x")
    _image(tmp_path / ".hidden" / "c.png")
    assert pack.bridge.subfolders(tmp_path, (".png", ".jpg")) == ["cats", "people/anna"]
    assert pack.bridge.subfolders(None, (".png",)) == []


def test_dataset_folder_stays_inside_the_input_folder(pack, tmp_path, monkeypatch):
    inside = tmp_path / "input" / "cats"
    inside.mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    resolve = pack.bridge.resolve_dataset_folder
    assert resolve(tmp_path / "input", "cats") == inside
    for escape in ("../secret", "cats/../../secret", str(outside), ""):
        with pytest.raises(pack.errors.TrainerInputError, match="not a subfolder"):
            resolve(tmp_path / "input", escape)
    monkeypatch.delenv(pack.bridge.ALLOW_PATHS_ENV, raising=False)
    with pytest.raises(pack.errors.TrainerInputError, match=pack.bridge.ALLOW_PATHS_ENV):
        resolve(tmp_path / "input", "cats", str(outside))
    monkeypatch.setenv(pack.bridge.ALLOW_PATHS_ENV, "1")
    assert resolve(tmp_path / "input", "cats", str(outside)) == outside
    with pytest.raises(pack.errors.TrainerInputError, match="absolute"):
        resolve(tmp_path / "input", "cats", "relative/path")


def _dataset_widgets(pack, **overrides):
    required = pack.dataset.FluxLoraDataset.INPUT_TYPES()["required"]
    values = {k: v[1]["default"] for k, v in required.items()}
    return {**values, **overrides}


def test_dataset_node_scans_a_folder_and_notices_changes(pack, tmp_path, monkeypatch):
    node = pack.dataset.FluxLoraDataset
    _image(tmp_path / "input" / "shapes" / "red_square.png", (96, 96))
    (tmp_path / "input" / "shapes" / "red_square.txt").write_text("a red square", encoding="utf-8")
    _image(tmp_path / "input" / "shapes" / "blue_thing.png", (96, 96), (20, 20, 200))
    monkeypatch.setattr(pack.bridge, "comfy_folders", lambda: (tmp_path / "input", tmp_path / "output"))

    widgets = _dataset_widgets(pack, folder="shapes", trigger_word="ohwx", resolutions="64", flip=True)
    (spec,) = node().build(**widgets)
    assert len(spec.items) == 4  # two images, each also mirrored
    assert sorted({item.caption for item in spec.items}) == ["ohwx, a red square", "ohwx, blue thing"]
    assert node.VALIDATE_INPUTS("shapes") is True
    message = node.VALIDATE_INPUTS("gone")
    assert "gone" in message and "input" in message

    before = node.IS_CHANGED(**widgets)
    _image(tmp_path / "input" / "shapes" / "third.png", (96, 96))
    assert node.IS_CHANGED(**widgets) != before

    with pytest.raises(pack.errors.TrainerInputError, match="none chosen"):
        node().build(**_dataset_widgets(pack, folder=pack.dataset.NO_FOLDER))


def test_dataset_node_takes_an_image_batch_with_captions(pack):
    images = torch.rand(2, 64, 80, 3)
    (spec,) = pack.dataset.FluxLoraDataset().build(
        **_dataset_widgets(pack, folder=pack.dataset.NO_FOLDER, trigger_word="ohwx", resolutions="64"),
        images=images, captions="a cat\n\na dog\n")
    assert [item.caption for item in spec.items] == ["ohwx, a cat", "ohwx, a dog"]
    assert spec.items[0].load_pixels().shape[0] == 3


def test_dataset_node_masked_loss_pairs_masks_from_folder_and_batch(pack, tmp_path, monkeypatch):
    node = pack.dataset.FluxLoraDataset
    folder = tmp_path / "input" / "masked"
    _image(folder / "cat.png", (64, 64))
    Image.new("L", (64, 64), 255).save(folder / "cat_mask.png")
    _image(folder / "dog.png", (64, 64))
    monkeypatch.setattr(pack.bridge, "comfy_folders", lambda: (tmp_path / "input", tmp_path / "output"))

    (plain,) = node().build(**_dataset_widgets(pack, folder="masked", resolutions="64"))
    assert len(plain.items) == 3 and all(item.mask is None for item in plain.items)  # the mask is an image here
    (masked,) = node().build(**_dataset_widgets(pack, folder="masked", resolutions="64"), masked_loss=True)
    assert {Path(str(item.source)).name: item.mask is not None for item in masked.items} == {"cat.png": True,
                                                                                          "dog.png": False}

    batch = dict(_dataset_widgets(pack, folder=pack.dataset.NO_FOLDER, resolutions="64"), images=torch.rand(2, 64, 64, 3))
    masks = torch.zeros(2, 64, 64)
    masks[:, :32] = 1
    (spec,) = node().build(**batch, masked_loss=True, masks=masks)
    weights = spec.items[0].load_mask()
    assert weights[0, :32].min() == 1 and weights[0, 32:].max() == 0
    with pytest.raises(pack.errors.TrainerInputError, match="no MASK is connected"):
        node().build(**batch, masked_loss=True)


# ---------------------------------------------------------------------------------------------------------------
# Encoders over stand-ins for ComfyUI's VAE and CLIP

class FakeVAE:
    """ComfyUI's VAE contract: IMAGE [B,H,W,C] in, raw latents [B,16,H/8,W/8] out, and back."""

    latent_channels = 16
    downscale_ratio = 8

    def __init__(self, scale=1.0):
        with torch.inference_mode():  # as VAELoader builds it: inference-tensor parameters that require grad
            self.first_stage_model = torch.nn.Conv2d(3, 16, 1)
            self.first_stage_model.weight.fill_(scale)
            self.first_stage_model.bias.zero_()
        self.seen = []

    def encode(self, pixels):
        self.seen.append(tuple(pixels.shape))
        b, h, w, _ = pixels.shape
        grey = pixels.mean(-1).reshape(b, h // 8, 8, w // 8, 8).mean((2, 4))
        return grey[:, None].repeat(1, 16, 1, 1)

    def decode(self, latents):
        weight = self.first_stage_model.weight.mean()
        latents = latents * weight / weight  # computes with the weights, as a real decoder does
        return latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2).movedim(1, -1).clamp(0, 1)


def test_image_encoder_converts_layout_and_latent_space(pack):
    encoders = importlib.import_module(f"{PACK}.trainer_core.models.encoders")
    vae = FakeVAE()
    encoder = pack.bridge.ComfyImageEncoder(vae)
    images = torch.rand(2, 3, 32, 48)
    latents = encoder.encode(images)
    assert vae.seen == [(2, 32, 48, 3)]  # ComfyUI gets IMAGE layout
    assert latents.shape == (2, 16, 4, 6)
    raw = images.mean(1).reshape(2, 4, 8, 6, 8).mean((2, 4))
    torch.testing.assert_close(latents[:, 0], (raw - encoders.FLUX_VAE_SHIFT) * encoders.FLUX_VAE_SCALE)
    with torch.inference_mode(False), torch.enable_grad():  # as the trainer calls it for validation samples
        decoded = encoder.decode(latents)
    assert decoded.shape == (2, 3, 32, 48)
    torch.testing.assert_close(decoded[:, 0, ::8, ::8], raw.clamp(0, 1))
    assert encoder.identity == pack.bridge.ComfyImageEncoder(FakeVAE()).identity
    assert encoder.identity != pack.bridge.ComfyImageEncoder(FakeVAE(scale=2.0)).identity


def test_image_encoder_refuses_a_non_flux_vae(pack):
    vae = FakeVAE()
    vae.latent_channels = 4
    with pytest.raises(pack.errors.TrainerInputError, match="16 channels"):
        pack.bridge.ComfyImageEncoder(vae)


class FakeCLIP:
    """ComfyUI's CLIP contract as CLIPTextEncode uses it."""

    def __init__(self, pooled=True, lengths=None):
        self.cond_stage_model = torch.nn.Linear(4, 4)
        self.tokenizer = object()
        self.patcher = SimpleNamespace(patches={})
        self.pooled, self.lengths, self.texts = pooled, lengths or {}, []

    def tokenize(self, text):
        self.texts.append(text)
        return {"t5xxl": text}

    def encode_from_tokens_scheduled(self, tokens):
        text = tokens["t5xxl"]
        length = self.lengths.get(text, 6)
        hidden = torch.full((1, length, 8), float(len(text)))
        extras = {"pooled_output": torch.full((1, 5), float(len(text)))} if self.pooled else {}
        return [[hidden, extras]]


def test_text_encoder_returns_hidden_and_pooled(pack):
    clip = FakeCLIP(lengths={"long one": 9})
    hidden, pooled = pack.bridge.ComfyTextEncoder(clip).encode(["a (red) cat", "long one"])
    assert clip.texts == ["a \\(red\\) cat", "long one"]  # brackets are text, not prompt weights
    assert hidden.shape == (2, 9, 8) and pooled.shape == (2, 5)
    assert hidden[0, 6:].abs().sum() == 0  # the shorter caption is zero-padded
    assert pooled[1, 0] == len("long one")


def test_text_encoder_needs_pooled_output(pack):
    with pytest.raises(pack.errors.TrainerInputError, match="pooled_output"):
        pack.bridge.ComfyTextEncoder(FakeCLIP(pooled=False)).encode(["a cat"])


def test_text_encoder_identity_follows_weights_and_loras(pack):
    clip = FakeCLIP()
    base = pack.bridge.ComfyTextEncoder(clip).identity
    clip.patcher.patches = {"clip_l.x.weight": [(1.0, SimpleNamespace(weights=(torch.ones(2, 2),)), 1.0, None, None)]}
    with_lora = pack.bridge.ComfyTextEncoder(clip).identity
    with torch.no_grad():
        clip.cond_stage_model.weight.add_(1)
    assert len({base, with_lora, pack.bridge.ComfyTextEncoder(clip).identity}) == 3


def test_fingerprint_samples_large_tensors(pack):
    big = torch.zeros(2**24 + 3)  # float32 index arithmetic would run past the end
    assert len(pack.bridge.fingerprint({"w": big})) == 32


# ---------------------------------------------------------------------------------------------------------------
# MODEL → trainer_core transformer

def module_holding(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module tree whose parameters are ``weights`` under their dotted names (as ComfyUI's FLUX module)."""
    root = torch.nn.Module()
    for name, value in weights.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    return root


class FakeModelPatcher:
    """The parts of comfy.model_patcher.ModelPatcher the bridge reads: ``model`` (BaseModel, an nn.Module holding
    ``diffusion_model``), its state dict, and LoRA patches as ``{key: [(strength, delta)]}``."""

    def __init__(self, module_sd, image_model="flux", guidance=True):
        with torch.inference_mode():  # as ComfyUI's loaders run
            self.model = torch.nn.Module()
            self.model.diffusion_model = module_holding({k: v.clone() for k, v in module_sd.items()})
        self.model.model_config = SimpleNamespace(unet_config={"image_model": image_model, "guidance_embed": guidance})
        self.patches = {}

    @property
    def sd(self):
        return self.model.state_dict(keep_vars=True)

    def model_state_dict(self, prefix):
        return {k: v.detach() for k, v in self.sd.items() if k.startswith(prefix)}

    def get_key_patches(self, prefix):
        """As ModelPatcher.get_key_patches: [(weight, convert)] + that key's patches (nothing is patched in place)."""
        return {k: [(v, lambda w, inplace=False: w), *self.patches.get(k, [])]
                for k, v in self.model_state_dict(prefix).items()}


@pytest.fixture(scope="module")
def tiny_diffusers():
    tiny = importlib.import_module(f"{PACK}.trainer_core.models.tiny")
    return tiny.build_tiny_transformer(seed=0).state_dict()


@pytest.fixture
def comfy_key_map(monkeypatch, tiny_diffusers):
    """A stand-in for ComfyUI's comfy.utils.flux_to_diffusers over the tiny model, laid out as ComfyUI 0.33.0 lays
    out FLUX.1 (q/k norms hold `weight`, where the BFL file has `scale`), with one FLUX.2 alias of a fused tensor
    as the real map has. Returns the MODEL's weights under those module names."""
    flux = importlib.import_module(f"{PACK}.trainer_core.models.flux")
    bfl = flux.diffusers_to_bfl(tiny_diffusers)
    key_map = {}
    for name in tiny_diffusers:
        module = name.rsplit(".", 1)[0]
        if module == "norm_out.linear":
            key_map[name] = (f"final_layer.adaLN_modulation.1.{name.rsplit('.', 1)[1]}", None,
                             lambda w: torch.cat(w.chunk(2)[::-1]))
            continue
        target, rows = flux.diffusers_module_to_bfl(module, tiny_diffusers["x_embedder.weight"].shape[0])
        target = f"{target}.{name.rsplit('.', 1)[1]}"
        key_map[name] = target if rows is None else (target, (0, rows.start, rows.stop - rows.start))
    key_map["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"] = "single_blocks.0.linear1.weight"
    utils = SimpleNamespace(flux_to_diffusers=lambda unet_config, output_prefix="": dict(key_map))
    monkeypatch.setitem(sys.modules, "comfy", SimpleNamespace(utils=utils))
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    return {k[:-len("scale")] + "weight" if k.endswith("_norm.scale") else k: v for k, v in bfl.items()}


def test_model_weights_become_a_trainable_transformer(pack, tiny_diffusers, comfy_key_map):
    flux = importlib.import_module(f"{PACK}.trainer_core.models.flux")
    model = FakeModelPatcher(comfy_key_map)
    weight = model.sd["diffusion_model.img_in.weight"]
    x = torch.randn(3, weight.shape[1], requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        torch.nn.functional.linear(x, weight).sum().backward()  # why the bridge copies

    sd = pack.bridge.flux_state_dict(model, torch.float32)
    assert set(sd) == set(tiny_diffusers) and not any(t.is_inference() for t in sd.values())
    assert all(torch.equal(sd[k], tiny_diffusers[k]) for k in tiny_diffusers)
    transformer = flux.load_flux_transformer(sd, dtype=torch.float32)
    for p in transformer.parameters():
        p.requires_grad_(True)
    out = transformer(hidden_states=torch.randn(1, 4, 64), encoder_hidden_states=torch.randn(1, 3, 32),
                      pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                      img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([1.0])).sample
    out.square().mean().backward()
    assert transformer.x_embedder.weight.grad is not None
    assert pack.bridge.flux_variant(model) == "dev"
    assert pack.bridge.flux_variant(FakeModelPatcher({}, guidance=False)) == "schnell"


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _train_two_steps(pack, transformer, sample_cache, tmp_path, name):
    train = importlib.import_module(f"{PACK}.trainer_core.train")
    lora_cfg, train_cfg = pack.train.configs(4, 4.0, 1e-2, 2, "adamw", "sigmoid", 1.0, 0, 0, "fp32")
    return train.train_lora(transformer, sample_cache, lora_cfg=lora_cfg, train_cfg=train_cfg,
                            output_dir=tmp_path / "loras", output_name=name,
                            checkpoint_root=tmp_path / "checkpoints", device="cpu")


def test_training_shares_the_models_weights_and_leaves_them_unchanged(pack, comfy_key_map, sample_cache, tmp_path):
    """One copy of the base: the trainer's frozen weights are the MODEL's own tensors (q/k/v as views of the fused
    qkv and linear1 rows), re-homed out of inference mode in ComfyUI's module, and training never writes them."""
    flux = importlib.import_module(f"{PACK}.trainer_core.models.flux")
    model = FakeModelPatcher(comfy_key_map)
    transformer = flux.load_flux_transformer(pack.bridge.flux_state_dict(model, torch.float32),
                                             dtype=torch.float32, device=None)
    held = model.sd  # ComfyUI's module after the bridge: normal tensors now, same values
    assert not any(t.is_inference() for t in held.values())
    assert all(torch.equal(held[f"diffusion_model.{k}"], v) for k, v in comfy_key_map.items())
    base = dict(transformer.named_parameters())
    pairs = {"x_embedder.weight": "img_in.weight",
             "transformer_blocks.0.attn.to_q.weight": "double_blocks.0.img_attn.qkv.weight",
             "transformer_blocks.0.attn.to_v.weight": "double_blocks.0.img_attn.qkv.weight",
             "single_transformer_blocks.0.attn.to_k.weight": "single_blocks.0.linear1.weight",
             "single_transformer_blocks.0.proj_mlp.weight": "single_blocks.0.linear1.weight"}
    for trainer_name, comfy_name in pairs.items():
        assert _storage(base[trainer_name]) == _storage(held[f"diffusion_model.{comfy_name}"]), trainer_name
    shared = {_storage(t) for t in held.values()}
    unshared = [k for k, t in base.items() if _storage(t) not in shared]
    assert unshared == ["norm_out.linear.weight", "norm_out.linear.bias"]  # scale/shift halves swapped: a new tensor

    before = {k: v.clone() for k, v in held.items()}
    result = _train_two_steps(pack, transformer, sample_cache, tmp_path, "shared")
    assert result.steps == 2 and result.lora_path.is_file()
    after = model.sd
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-identical: ComfyUI samples as before
    assert _storage(after["diffusion_model.img_in.weight"]) == _storage(held["diffusion_model.img_in.weight"])


def test_a_model_with_a_lora_applied_trains_on_the_merged_weights(pack, comfy_key_map, sample_cache, tmp_path,
                                                                   monkeypatch):
    """Weights a LoRA on the MODEL patches are the one copy left: merged by ComfyUI's calculate_weight, while the
    MODEL's own (unpatched) tensors stay as they were and the unpatched weights are still shared."""
    flux = importlib.import_module(f"{PACK}.trainer_core.models.flux")

    def calculate_weight(patches, weight, key):  # ComfyUI's merge of plain "diff" patches: w + strength · Δ
        for strength, delta in patches:
            weight += strength * delta
        return weight

    lora = SimpleNamespace(calculate_weight=calculate_weight)
    monkeypatch.setattr(sys.modules["comfy"], "lora", lora, raising=False)
    monkeypatch.setitem(sys.modules, "comfy.lora", lora)
    model = FakeModelPatcher(comfy_key_map)
    patched = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    delta = torch.randn(model.sd[patched].shape)
    model.patches = {patched: [(0.5, delta)]}
    original = model.sd[patched].clone()

    transformer = flux.load_flux_transformer(pack.bridge.flux_state_dict(model, torch.float32),
                                             dtype=torch.float32, device=None)
    merged = original + 0.5 * delta
    width = original.shape[1]
    to_k = transformer.transformer_blocks[0].attn.to_k.weight
    assert torch.equal(to_k, merged[width:2 * width])
    assert _storage(to_k) != _storage(model.sd[patched])
    assert _storage(transformer.x_embedder.weight) == _storage(model.sd["diffusion_model.img_in.weight"])

    _train_two_steps(pack, transformer, sample_cache, tmp_path, "patched")
    assert torch.equal(model.sd[patched], original)
    assert torch.equal(transformer.transformer_blocks[0].attn.to_k.base_layer.weight, merged[width:2 * width])


def test_a_model_weight_comfyuis_key_map_does_not_name_is_reported(pack, comfy_key_map):
    """A ComfyUI release whose module layout its own key map does not cover: said so, not "file damaged"."""
    comfy_key_map["double_blocks.0.img_attn.norm.query_norm.gamma"] = torch.ones(4)
    with pytest.raises(pack.errors.TrainerInputError, match="model: .*flux_to_diffusers.*query_norm.gamma"):
        pack.bridge.flux_state_dict(FakeModelPatcher(comfy_key_map), torch.float32)


class FakeFlux2VAE(FakeVAE):
    """ComfyUI's FLUX.2 VAE contract: 128 latent channels at /16, already the transformer's (normalised) latents."""

    latent_channels = 128

    def encode(self, pixels):
        b, h, w, _ = pixels.shape
        grey = pixels.mean(-1).reshape(b, h // 16, 16, w // 16, 16).mean((2, 4))
        return grey[:, None].repeat(1, 128, 1, 1) * torch.arange(128.0)[:, None, None]

    def decode(self, latents):
        return latents[:, :3].repeat_interleave(16, -1).repeat_interleave(16, -2).movedim(1, -1).clamp(0, 1)


def test_flux2_vae_and_text_encoder_give_what_flux2_trains_on(pack):
    """The family comes from the VAE; FLUX.2 latents are taken as ComfyUI returns them (no FLUX.1 shift/scale), and
    the flux2 CLIP's hidden states are front-padded to the 512 tokens ComfyUI's model_base.Flux2 samples with."""
    encoder = pack.bridge.ComfyImageEncoder(FakeFlux2VAE())
    assert encoder.family.name == "FLUX.2"
    images = torch.rand(1, 3, 64, 32)
    latents = encoder.encode(images)
    assert torch.equal(latents, FakeFlux2VAE().encode(images.movedim(1, -1)))  # untouched: [1, 128, 4, 2]
    assert torch.equal(encoder.decode(latents), FakeFlux2VAE().decode(latents).movedim(-1, 1))
    assert pack.bridge.ComfyImageEncoder(FakeVAE()).family.name == "FLUX.1"

    clip = FakeCLIP(pooled=False, lengths={"a cat": 77})
    hidden, pooled = pack.bridge.ComfyTextEncoder(clip, encoder.family).encode(["a cat", "a dog"])
    assert hidden.shape == (2, 512, 8) and pooled.shape == (2, 0)
    assert hidden[0, :512 - 77].abs().sum() == 0 and torch.all(hidden[0, 512 - 77:] == len("a cat"))
    # one CLIP's FLUX.2 entries (padded) are cached apart from its FLUX.1 entries
    assert pack.bridge.ComfyTextEncoder(clip, encoder.family).identity != pack.bridge.ComfyTextEncoder(clip).identity


def test_the_cache_holds_flux2_latents_text_and_masks_at_flux2s_resolution(pack, tmp_path):
    """Through ComfyUI's FLUX.2 VAE and text encoder the cache holds [128, H/16, W/16] latents, 512-token text
    without a pooled vector, and loss masks (per 8 px cell; training averages them over each 16 px latent cell)."""
    dataset = importlib.import_module(f"{PACK}.trainer_core.data.dataset")
    cache_mod = importlib.import_module(f"{PACK}.trainer_core.data.cache")
    images, masks = torch.rand(2, 64, 64, 3), torch.zeros(2, 64, 64)
    masks[:, :, :32] = 1
    items = dataset.dataset_from_images(images, ["a cat", "a dog"], pack.config.DatasetConfig(
        resolutions=[64], masked_loss=True), masks=masks)
    image_encoder = pack.bridge.ComfyImageEncoder(FakeFlux2VAE())
    text_encoder = pack.bridge.ComfyTextEncoder(FakeCLIP(pooled=False), image_encoder.family)
    cache = cache_mod.build_cache(items, image_encoder, text_encoder, tmp_path, empty_caption=True)
    latent = cache.latent(0)
    h, w = items[0].height // 16, items[0].width // 16
    assert latent.shape == (128, h, w)
    hidden, pooled = cache.text(0)
    assert hidden.shape == (512, 8) and pooled.numel() == 0
    mask = cache.mask(0)
    assert mask.shape == (1, 2 * h, 2 * w) and mask[..., :4].min() > 0.99 and mask[..., 4:].max() < 0.01
    again = cache_mod.build_cache(items, image_encoder, text_encoder, tmp_path, empty_caption=True)
    assert again.encoded == 0  # FLUX.2 entries are found again


def test_a_flux2_vae_that_encodes_to_another_size_is_refused(pack):
    class Eight(FakeFlux2VAE):  # 128 channels, but /8
        def encode(self, pixels):
            return torch.zeros(pixels.shape[0], 128, pixels.shape[1] // 8, pixels.shape[2] // 8)

    with pytest.raises(pack.errors.TrainerInputError, match=r"vae: .*\[128, 8, 8\].*FLUX.2 trains on \[128, 4, 4\]"):
        pack.bridge.ComfyImageEncoder(Eight()).encode(torch.rand(1, 3, 64, 64))


def test_flux2_model_weights_become_the_trainers_flux2_transformer_sharing_storage(pack, monkeypatch):
    """A FLUX.2 MODEL (ComfyUI's module: BFL names, q/k norms as ``weight``) becomes trainer_core's FLUX.2
    transformer with the same output as the model it was made from, on the MODEL's own tensors. ComfyUI's key map
    names only the block weights for FLUX.2 (and FLUX.1 names for the embedders), as its flux_to_diffusers does;
    the global modulations and embedders come from trainer_core's FLUX.2 layout."""
    flux2 = importlib.import_module(f"{PACK}.trainer_core.models.flux2")
    family = importlib.import_module(f"{PACK}.trainer_core.models.family")
    reference = flux2.build_tiny_flux2_transformer("dev", seed=2)
    with torch.no_grad():
        reference.norm_out.linear.weight.normal_()  # so the swapped halves matter
    diffusers_sd = reference.state_dict()
    bfl = flux2.diffusers_to_bfl(diffusers_sd)
    comfy_sd = {k[:-len("scale")] + "weight" if k.endswith("_norm.scale") else k: v for k, v in bfl.items()}
    width = reference.inner_dim
    comfy_map = {"time_text_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
                 "norm_out.linear.weight": ("final_layer.adaLN_modulation.1.weight", None,
                                            lambda w: torch.cat(w.chunk(2)[::-1]))}
    for entry in flux2.bfl_layout(1, 3, True, width):
        if entry.diffusers_key.startswith(("transformer_blocks", "single_transformer_blocks")):
            target = entry.bfl_key.replace("_norm.scale", "_norm.weight")
            comfy_map[entry.diffusers_key] = target if entry.rows is None else \
                (target, (0, entry.rows.start, width))
    utils = SimpleNamespace(flux_to_diffusers=lambda unet_config, output_prefix="": dict(comfy_map))
    monkeypatch.setitem(sys.modules, "comfy", SimpleNamespace(utils=utils))
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    model = FakeModelPatcher(comfy_sd, image_model="flux2", guidance=True)
    model.model.model_config.unet_config.update(depth=1, depth_single_blocks=3, hidden_size=width)

    sd = pack.bridge.flux_state_dict(model, torch.float32)
    assert set(sd) == set(diffusers_sd) and all(torch.equal(sd[k], diffusers_sd[k]) for k in sd)
    transformer = family.FLUX2.load_transformer(sd, dtype=torch.float32, device=None)
    held = model.sd
    assert _storage(transformer.x_embedder.weight) == _storage(held["diffusion_model.img_in.weight"])
    assert _storage(transformer.transformer_blocks[0].attn.to_k.weight) == \
        _storage(held["diffusion_model.double_blocks.0.img_attn.qkv.weight"])
    assert _storage(transformer.double_stream_modulation_img.linear.weight) == \
        _storage(held["diffusion_model.double_stream_modulation_img.lin.weight"])
    inputs = dict(hidden_states=torch.randn(1, 4, 128), encoder_hidden_states=torch.randn(1, 3, 60),
                  timestep=torch.tensor([0.5]), img_ids=flux2.latent_image_ids(2, 2), txt_ids=flux2.text_ids(3),
                  guidance=torch.tensor([3.5]), return_dict=False)
    with torch.no_grad():
        assert torch.allclose(transformer(**inputs)[0], reference(**inputs)[0], atol=1e-6)
    assert pack.bridge.flux_variant(model) == "dev"


def test_validation_samples_use_real_cfg_for_klein_and_guidance_for_dev(pack):
    """In-training validation samples as ComfyUI samples each model: klein base (undistilled) with real CFG against
    the empty caption, FLUX.2 dev with embedded guidance; the CFG sample is v_neg + s · (v − v_neg) at every step."""
    flux2 = importlib.import_module(f"{PACK}.trainer_core.models.flux2")
    family = importlib.import_module(f"{PACK}.trainer_core.models.family")
    flow = importlib.import_module(f"{PACK}.trainer_core.flow")
    train = importlib.import_module(f"{PACK}.trainer_core.train")
    prompt, empty = (torch.randn(7, 48), torch.zeros(0)), (torch.randn(7, 48), torch.zeros(0))
    cache = SimpleNamespace(prompts=[prompt], prompt_texts=["zxq"], cache=SimpleNamespace(
        sizes=[(32, 32)], text=lambda i: prompt, empty_text=lambda: empty))
    klein = pack.train.FluxLoraTrain._validation(cache, 5, "klein", family.FLUX2)
    assert klein.config.guidance > 1 and klein.negative is empty  # klein's guidance is its CFG scale
    dev = pack.train.FluxLoraTrain._validation(cache, 5, "dev", family.FLUX2)
    assert dev.negative is None and dev.config.guidance > 1

    model = flux2.build_tiny_flux2_transformer("klein", seed=1)
    klein.config.steps = 2
    sampled = train.sample_validation(model, klein, "cpu")
    noise = torch.randn((1, 128, 2, 2), generator=torch.Generator().manual_seed(klein.config.seed))
    sigmas = flow.sampling_sigmas(2, 4, family=family.FLUX2)
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v, v_neg = (flow.predict_velocity(model, x, sigma.expand(1), h[None], p[None], 1.0, torch.float32,
                                          family.FLUX2) for h, p in (prompt, empty))
        x = x + (sigma_next - sigma) * (v_neg + klein.config.guidance * (v - v_neg))
    assert torch.allclose(sampled, x, atol=1e-5)
    assert not torch.allclose(sampled, train.sample_validation(model, train.ValidationPrompts(
        [prompt], klein.config), "cpu"), atol=1e-4)  # no negative prompt: unguided


def test_non_flux_model_is_refused(pack):
    with pytest.raises(pack.errors.TrainerInputError, match="'sd3'.*not FLUX.1 or FLUX.2"):
        pack.bridge.flux_state_dict(FakeModelPatcher({}, image_model="sd3"), torch.float32)
    assert pack.bridge.model_family(FakeModelPatcher({}, image_model="flux2")).name == "FLUX.2"
    assert pack.bridge.flux_variant(FakeModelPatcher({}, image_model="flux2", guidance=False)) == "klein"
    with pytest.raises(pack.errors.TrainerInputError, match="not FLUX.1"):
        pack.bridge.flux_variant(SimpleNamespace(model=SimpleNamespace()))


# ---------------------------------------------------------------------------------------------------------------
# Progress, previews, interrupt

class FakeBar:
    def __init__(self):
        self.calls = []

    def update_absolute(self, value, total=None, preview=None):
        self.calls.append((value, total, preview))


def _step(pack, step, total, loss=0.5):
    train = importlib.import_module(f"{PACK}.trainer_core.train")
    return train.StepInfo(step=step, total_steps=total, loss=loss, lr=1e-4, seconds_per_step=0.1)


def test_progress_shows_steps_loss_and_a_throttled_preview(pack):
    bar, texts = FakeBar(), []
    progress = pack.bridge.NodeProgress(bar, texts.append, lambda: None)
    progress.PREVIEW_SECONDS = 3600.0
    for step in (1, 2, 3):
        progress.on_step(_step(pack, step, 3, loss=1.0 / step))
    assert [c[:2] for c in bar.calls] == [(1, 3), (2, 3), (3, 3)]
    previews = [c[2] for c in bar.calls]
    assert previews[1] is None  # throttled
    kind, image, size = previews[2]  # the last step always shows the final curve
    assert kind == "JPEG" and isinstance(image, Image.Image) and size == 512
    assert texts[-1].startswith("step 3/3 · loss 0.3333")

    progress.decode = lambda latents: torch.rand(latents.shape[0], 3, 32, 32)
    progress.on_sample(3, torch.zeros(2, 16, 4, 4))
    assert bar.calls[-1][2][1].height > image.height  # the sample sits under the loss curve


def test_interrupt_stops_training_after_a_checkpoint(pack, sample_cache, tmp_path):
    """The Cancel path without ComfyUI: check_interrupt raises, the trainer keeps a checkpoint and re-raises."""
    train = importlib.import_module(f"{PACK}.trainer_core.train")
    tiny = importlib.import_module(f"{PACK}.trainer_core.models.tiny")
    ckpt = importlib.import_module(f"{PACK}.trainer_core.checkpoint")

    class Cancelled(Exception):
        pass

    bar = FakeBar()

    def check_interrupt():
        if len(bar.calls) >= 2:
            raise Cancelled

    progress = pack.bridge.NodeProgress(bar, lambda text: None, check_interrupt)
    lora_cfg, train_cfg = pack.train.configs(4, 4.0, 1e-3, 10, "adamw", "sigmoid", 1.0, 0, 0, "fp32")
    with pytest.raises(Cancelled):
        train.train_lora(tiny.build_tiny_transformer(seed=0), sample_cache, lora_cfg=lora_cfg, train_cfg=train_cfg,
                         output_dir=tmp_path / "loras", output_name="cancelled",
                         checkpoint_root=tmp_path / "checkpoints", callbacks=progress, device="cpu")
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints" / "cancelled")
    assert [p.name for p in saved] == ["step_000002.safetensors"]
    assert not (tmp_path / "loras" / "cancelled.safetensors").exists()


def test_validation_settings_come_from_the_cache(pack):
    hidden, pooled = torch.zeros(4, 8), torch.zeros(5)
    latent_cache = SimpleNamespace(text=lambda i: (hidden, pooled), sizes=[(96, 64)])
    data = pack.cache.TrainingData(latent_cache)
    validate = pack.train.FluxLoraTrain._validation
    assert validate(data, 0, "dev") is None
    prompts = validate(data, 50, "dev")
    assert len(prompts.embeddings) == 1 and prompts.embeddings[0][0] is hidden  # the first caption
    assert (prompts.config.width, prompts.config.height, prompts.config.every) == (96, 64, 50)
    assert prompts.config.guidance == 3.5 and validate(data, 50, "schnell").config.guidance == 1.0


# ---------------------------------------------------------------------------------------------------------------
# CLIP → trainable text encoders (options text_encoders / shuffle_tags)

class FakeClipPatcher:
    """The parts of a CLIP's ModelPatcher the bridge reads; weights made under inference mode, as ComfyUI's."""

    def __init__(self, sd):
        with torch.inference_mode():
            self.sd = {k: v.clone() for k, v in sd.items()}
        self.patches = {}

    def model_state_dict(self, filter_prefix=None):
        return {k: v for k, v in self.sd.items() if filter_prefix is None or k.startswith(filter_prefix)}


@pytest.fixture(scope="module")
def flux_clip(tmp_path_factory):
    """FLUX.1's pair in a ComfyUI CLIP's key layout (clip_l.transformer.… + t5xxl.transformer.…), tiny sizes
    (CLIP head width 64, as every CLIP), and the tokenizer folder layout ComfyUI's source tree has."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = importlib.import_module(f"{PACK}.trainer_core.models.tiny")
    encoders = importlib.import_module(f"{PACK}.trainer_core.models.encoders")
    source = tiny.build_tiny_text_encoder(seed=4)
    tok = source.clip_tokenizer
    torch.manual_seed(4)
    clip_model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    source = encoders.FluxTextEncoder(clip_model, tok, source.t5_model, source.t5_tokenizer,
                                      pack_bridge().T5_TOKENS)
    folder = tmp_path_factory.mktemp("comfy")
    source.clip_tokenizer.save_pretrained(folder / "sd1_tokenizer")
    source.t5_tokenizer.save_pretrained(folder / "text_encoders" / "t5_tokenizer")
    sd = {**{f"clip_l.transformer.{k}": v for k, v in clip_model.state_dict().items()},
          **{f"t5xxl.transformer.{k}": v for k, v in source.t5_model.state_dict().items()}}
    clip = SimpleNamespace(patcher=FakeClipPatcher(sd), cond_stage_model=None)
    return source, clip, folder


def pack_bridge():
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.comfy_bridge")


def test_flux_clip_becomes_trainable_text_encoders_with_the_same_outputs(pack, flux_clip):
    source, clip, folder = flux_clip
    rebuilt = pack.bridge.flux_text_encoder(clip, torch.float32, tokenizer_dir=folder)
    captions = ["zxq, a robot", "a red square on a blue background"]
    for got, want in zip(rebuilt.encode(captions), source.encode(captions)):
        torch.testing.assert_close(got, want)
    assert rebuilt.t5_max_length == 256  # ComfyUI's FLUX T5 length, as inference will encode
    # plain tensors: a LoRA on the copy trains (ComfyUI's inference tensors would refuse backward)
    lora = importlib.import_module(f"{PACK}.trainer_core.lora")
    config = importlib.import_module(f"{PACK}.trainer_core.config")
    trained = lora.add_text_encoder_lora(rebuilt, config.LoraConfig(text_encoders="clip_l", text_encoder_rank=2))
    ids = rebuilt.clip_tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    trained[lora.CLIP_PREFIX](ids).pooler_output.sum().backward()
    grads = [p.grad for p in lora.adapter_parameters(trained[lora.CLIP_PREFIX]).values()]
    assert grads and all(g is not None for g in grads)
    # CLIP-L only: T5-XXL is not copied at all
    assert pack.bridge.flux_text_encoder(clip, torch.float32, with_t5=False, tokenizer_dir=folder).t5_model is None


def test_text_encoder_options_need_flux_text_encoders_on_the_clip_input(pack, flux_clip):
    _, clip, folder = flux_clip
    config = pack.config
    lora_te, plain = config.LoraConfig(text_encoders="t5"), config.LoraConfig()
    with pytest.raises(pack.errors.TrainerInputError, match="clip input is not connected"):
        pack.train._training_text_encoder(None, lora_te, config.TrainConfig(), torch.float32)
    with pytest.raises(pack.errors.TrainerInputError, match="shuffle_tags"):
        pack.train._training_text_encoder(None, plain, config.TrainConfig(shuffle_tags=True), torch.float32)
    assert pack.train._training_text_encoder(None, plain, config.TrainConfig(), torch.float32) is None
    # shuffling alone encodes through ComfyUI's own CLIP, exactly as CLIPTextEncode does
    shuffler = pack.train._training_text_encoder(FakeCLIP(), plain, config.TrainConfig(shuffle_tags=True),
                                                 torch.float32)
    assert isinstance(shuffler, pack.bridge.ComfyTextEncoder)
    clip_l_only = SimpleNamespace(patcher=FakeClipPatcher(
        {k: v for k, v in clip.patcher.sd.items() if k.startswith("clip_l.")}))
    with pytest.raises(pack.errors.TrainerInputError, match="this CLIP holds clip_l.*DualCLIPLoader"):
        pack.bridge.flux_text_encoder(clip_l_only, torch.float32, tokenizer_dir=folder)


def test_dataset_files_may_not_link_out_of_comfyuis_folders(pack, tmp_path, monkeypatch):
    """Every file the Dataset node reads — the folder, images, captions, masks — is checked with symlinks
    resolved: a link out of ComfyUI's folders is refused naming the file (its text would land in cache metadata
    that /view serves); links that stay inside, and anything with FLUX_LORA_TRAINER_ALLOW_PATHS=1, are read."""
    node = pack.dataset.FluxLoraDataset
    secret = tmp_path / "secret"
    _image(secret / "outside.png", (64, 64))
    (secret / "shadow.txt").write_text("root:x:0:0", encoding="utf-8")
    folder = tmp_path / "input" / "shapes"
    _image(folder / "cat.png", (64, 64))
    _image(tmp_path / "input" / "shared" / "dog.png", (64, 64))
    (folder / "dog.png").symlink_to(tmp_path / "input" / "shared" / "dog.png")  # stays inside: fine
    monkeypatch.setattr(pack.bridge, "comfy_folders", lambda: (tmp_path / "input", tmp_path / "output"))
    monkeypatch.delenv(pack.bridge.ALLOW_PATHS_ENV, raising=False)
    widgets = _dataset_widgets(pack, folder="shapes", resolutions="64")
    (spec,) = node().build(**widgets)
    assert len(spec.items) == 2

    links = [(folder / "cat.txt", secret / "shadow.txt", "caption file"),
             (folder / "cow.png", secret / "outside.png", "dataset image"),
             (folder / "cat_mask.png", secret / "outside.png", "mask")]
    for link, target, label in links:
        link.symlink_to(target)
        with pytest.raises(pack.errors.TrainerInputError, match=rf"{label} '{re.escape(str(link))}' is a link that "
                                                                 r"leads outside"):
            node().build(**widgets, masked_loss=label == "mask")
        monkeypatch.setenv(pack.bridge.ALLOW_PATHS_ENV, "1")
        node().build(**widgets, masked_loss=label == "mask")  # the server's owner opted in
        monkeypatch.delenv(pack.bridge.ALLOW_PATHS_ENV)
        link.unlink()
    (tmp_path / "input" / "linked").symlink_to(secret)
    with pytest.raises(pack.errors.TrainerInputError, match="dataset.folder '.*linked' is a link that leads outside"):
        node().build(**_dataset_widgets(pack, folder="linked", resolutions="64"))
