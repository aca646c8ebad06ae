"""The smallest model files a stock ComfyUI 0.8 loads as FLUX.1 + CLIP-L + a 16-channel VAE, and a tiny dataset.

Generated into a temporary folder by the integration tests; never committed. Facts they rest on (ComfyUI's
``comfy/model_detection.py``, ``comfy/sd.py``, ``comfy/sd1_clip_config.json``):

- A FLUX.1 file is recognised by ``double_blocks.0.img_attn.norm.key_norm.scale`` + ``img_in.weight``; the head
  count (24) and rope axes (16+56+56 = head dim 128) are fixed, so the width must be 3072. Depth is counted from
  the keys: 1 double + 1 single block is the smallest complete model (≈545 M parameters, ≈1 GiB in bf16).
  ``txt_in`` / ``vector_in`` widths are read from the tensors: 768 lets a CLIP-L (via
  ``CLIPLoader(type="stable_diffusion")``) provide both the context and the pooled vector, because ComfyUI's
  T5-XXL config is fixed (≈4.7 B parameters) and far too big for a CPU test.
- CLIP-L's config is fixed too (12 layers, width 768, ≈124 M parameters); missing tensors would stay
  uninitialised, so every tensor is written.
- VAELoader builds a TAESD (``taesd_encoder.*`` / ``taesd_decoder.*``; ≈2.4 M parameters) whenever it sees
  ``taesd_decoder.1.weight``, with the latent channels read from that tensor: 16 channels and 8× downsampling,
  as FLUX.1 needs. ``vae_scale`` / ``vae_shift`` put its latents in the FLUX VAE's raw space. (A full-size
  16-channel KL VAE, the architecture of ``ae.safetensors``, would be ≈84 M parameters.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

WIDTH = 3072  # fixed by ComfyUI's FLUX detection (24 heads × 128)
HEAD_DIM = 128
CONTEXT = 768  # CLIP-L hidden size: the conditioning CLIPLoader(type="stable_diffusion") produces
MLP = 4 * WIDTH
IN_CHANNELS = 64  # 16 latent channels × 2×2 patch
LATENT_CHANNELS = 16

FLUX_FILE = "flux1-tiny.safetensors"
CLIP_FILE = "clip_l-tiny.safetensors"
VAE_FILE = "taef1-tiny.safetensors"
DATASET = "flux_lora_dataset"
TRIGGER = "zxq"
IMAGE_SIZE = 64


@dataclass
class Fixtures:
    base: Path  # a ComfyUI --base-directory: models/, input/, output/, custom_nodes/
    flux: str
    clip: str
    vae: str
    dataset: str  # subfolder of input/
    trigger: str


class _Init:
    """Seeded weights that keep activations O(1): linear weights ~ N(0, gain²/fan_in), biases 0, norms 1."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.sd: dict[str, torch.Tensor] = {}

    def linear(self, name: str, out_f: int, in_f: int, bias: bool = True, gain: float = 1.0) -> None:
        w = torch.randn((out_f, in_f), generator=self.gen) * (gain / math.sqrt(in_f))
        self.sd[f"{name}.weight"] = w.to(self.dtype)
        if bias:
            self.sd[f"{name}.bias"] = torch.zeros(out_f, dtype=self.dtype)

    def conv(self, name: str, out_c: int, in_c: int, k: int = 3, bias: bool = True, gain: float = 1.0) -> None:
        w = torch.randn((out_c, in_c, k, k), generator=self.gen) * (gain / math.sqrt(in_c * k * k))
        self.sd[f"{name}.weight"] = w.to(self.dtype)
        if bias:
            self.sd[f"{name}.bias"] = torch.zeros(out_c, dtype=self.dtype)

    def ones(self, name: str, n: int) -> None:
        self.sd[name] = torch.ones(n, dtype=self.dtype)

    def zeros(self, name: str, n: int) -> None:
        self.sd[name] = torch.zeros(n, dtype=self.dtype)


def flux_state_dict(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A FLUX.1-dev transformer in BFL key names: width 3072, 1 double + 1 single block, 768-wide text inputs."""
    w = _Init(seed, dtype)
    w.linear("img_in", WIDTH, IN_CHANNELS)
    w.linear("txt_in", WIDTH, CONTEXT)
    for emb, in_f in (("time_in", 256), ("vector_in", CONTEXT), ("guidance_in", 256)):
        w.linear(f"{emb}.in_layer", WIDTH, in_f)
        w.linear(f"{emb}.out_layer", WIDTH, WIDTH)
    block = "double_blocks.0"
    for stream in ("img", "txt"):
        # Small modulation gain: residual gates near zero keep the random network's outputs moderate.
        w.linear(f"{block}.{stream}_mod.lin", 6 * WIDTH, WIDTH, gain=0.2)
        w.linear(f"{block}.{stream}_attn.qkv", 3 * WIDTH, WIDTH)
        w.ones(f"{block}.{stream}_attn.norm.query_norm.scale", HEAD_DIM)
        w.ones(f"{block}.{stream}_attn.norm.key_norm.scale", HEAD_DIM)
        w.linear(f"{block}.{stream}_attn.proj", WIDTH, WIDTH)
        w.linear(f"{block}.{stream}_mlp.0", MLP, WIDTH)
        w.linear(f"{block}.{stream}_mlp.2", WIDTH, MLP)
    block = "single_blocks.0"
    w.linear(f"{block}.modulation.lin", 3 * WIDTH, WIDTH, gain=0.2)
    w.linear(f"{block}.linear1", 3 * WIDTH + MLP, WIDTH)
    w.linear(f"{block}.linear2", WIDTH, WIDTH + MLP)
    w.ones(f"{block}.norm.query_norm.scale", HEAD_DIM)
    w.ones(f"{block}.norm.key_norm.scale", HEAD_DIM)
    w.linear("final_layer.adaLN_modulation.1", 2 * WIDTH, WIDTH, gain=0.2)
    w.linear("final_layer.linear", IN_CHANNELS, WIDTH)
    return w.sd


def clip_l_state_dict(seed: int = 1, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A randomly initialised CLIP-L text model in the key names of ComfyUI's / transformers' CLIPTextModel."""
    w = _Init(seed, dtype)
    hidden, layers, vocab, positions = 768, 12, 49408, 77
    w.sd["text_model.embeddings.token_embedding.weight"] = (torch.randn((vocab, hidden), generator=w.gen)
                                                            * 0.02).to(dtype)
    w.sd["text_model.embeddings.position_embedding.weight"] = (torch.randn((positions, hidden), generator=w.gen)
                                                               * 0.01).to(dtype)
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            w.ones(f"{p}.{norm}.weight", hidden)
            w.zeros(f"{p}.{norm}.bias", hidden)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w.linear(f"{p}.self_attn.{proj}", hidden, hidden, gain=0.5)
        w.linear(f"{p}.mlp.fc1", 4 * hidden, hidden, gain=0.5)
        w.linear(f"{p}.mlp.fc2", hidden, 4 * hidden, gain=0.5)
    w.ones("text_model.final_layer_norm.weight", hidden)
    w.zeros("text_model.final_layer_norm.bias", hidden)
    w.linear("text_projection", hidden, hidden, bias=False)
    return w.sd


def _taesd_block(w: _Init, name: str) -> None:
    w.conv(f"{name}.conv.0", 64, 64)
    w.conv(f"{name}.conv.2", 64, 64)
    w.conv(f"{name}.conv.4", 64, 64, gain=0.5)


def taesd_state_dict(seed: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """TAESD encoder + decoder with 16 latent channels (layer indices of comfy/taesd/taesd.py's nn.Sequential)."""
    w = _Init(seed, dtype)
    enc = "taesd_encoder"
    w.conv(f"{enc}.0", 64, 3)
    _taesd_block(w, f"{enc}.1")
    index = 2
    for _ in range(3):  # three stride-2 stages: 8× downsampling
        w.conv(f"{enc}.{index}", 64, 64, bias=False)
        for j in range(1, 4):
            _taesd_block(w, f"{enc}.{index + j}")
        index += 4
    w.conv(f"{enc}.{index}", LATENT_CHANNELS, 64)
    dec = "taesd_decoder"
    w.conv(f"{dec}.1", 64, LATENT_CHANNELS)
    index = 3
    for _ in range(3):  # three upsampling stages
        for j in range(3):
            _taesd_block(w, f"{dec}.{index + j}")
        w.conv(f"{dec}.{index + 4}", 64, 64, bias=False)
        index += 5
    _taesd_block(w, f"{dec}.{index}")
    w.conv(f"{dec}.{index + 1}", 3, 64)
    # Mid-grey output: ComfyUI clamps to 0..1, and a zero-centred random decoder would clip half the pixels,
    # hiding the differences a LoRA makes.
    w.sd[f"{dec}.{index + 1}.bias"] = torch.full((3,), 0.5, dtype=dtype)
    # FLUX VAE latent statistics, as ComfyUI's own taef1 loader sets them.
    w.sd["vae_scale"] = torch.tensor(0.3611)
    w.sd["vae_shift"] = torch.tensor(0.1159)
    return w.sd


_SHAPES = [  # (caption, background, foreground, shape)
    ("a red circle on a blue background", (40, 60, 200), (220, 40, 40), "circle"),
    ("a yellow square on a green background", (40, 150, 60), (240, 220, 40), "square"),
    ("a white triangle on a black background", (10, 10, 10), (240, 240, 240), "triangle"),
    ("an orange circle on a purple background", (110, 40, 140), (250, 150, 30), "circle"),
]


def write_dataset(folder: Path, size: int = IMAGE_SIZE) -> list[Path]:
    """A few procedurally drawn PNGs, each with a same-name .txt caption."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (caption, bg, fg, shape) in enumerate(_SHAPES):
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
        if shape == "circle":
            draw.ellipse(box, fill=fg)
        elif shape == "square":
            draw.rectangle(box, fill=fg)
        else:
            draw.polygon([(size // 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fg)
        path = folder / f"shape_{i}.png"
        img.save(path)
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
        paths.append(path)
    return paths


def build_fixtures(base: Path) -> Fixtures:
    """Write the model files and the dataset under ``base`` laid out as a ComfyUI --base-directory."""
    base = Path(base)
    models = base / "models"
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "custom_nodes", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    save_file(flux_state_dict(), str(models / "diffusion_models" / FLUX_FILE))
    save_file(clip_l_state_dict(), str(models / "text_encoders" / CLIP_FILE))
    save_file(taesd_state_dict(), str(models / "vae" / VAE_FILE))
    write_dataset(base / "input" / DATASET)
    return Fixtures(base, FLUX_FILE, CLIP_FILE, VAE_FILE, DATASET, TRIGGER)


# ---------------------------------------------------------------------------------------------------------------
# FLUX.2 (ComfyUI ≥ 0.9.2). Facts (ComfyUI 0.33.0's comfy/model_detection.py, comfy/sd.py, nodes.py VAELoader):
# - A FLUX.2 file is a FLUX file with ``double_stream_modulation_img.lin.weight``; its RoPE axes are fixed at
#   4 × 32 (head size 128) but the head count is width / 128, so a width-256 model (2 heads) loads: 1 double +
#   1 single block is ≈ 3 M parameters. ``txt_in``'s width is read from the tensor: 768 lets the tiny CLIP-L
#   stand in for the flux2 text encoder (whose Qwen3-4B ComfyUI builds at full size, ≈ 8 GB, whatever the file).
# - VAELoader's "taef2" is ComfyUI's own tiny FLUX.2 VAE (TAESD layout, 32 channels pixel-shuffled to 128 at /16)
#   read from models/vae_approx/taef2_encoder.* + taef2_decoder.*; the full FLUX.2 KL VAE's encoder has a fixed
#   width (≈ 34 M parameters).

FLUX2_FILES = {"klein": "flux2-klein-tiny.safetensors", "dev": "flux2-dev-tiny.safetensors"}
FLUX2_VAE = "taef2"
FLUX2_WIDTH = 256  # 2 heads of 128


def flux2_state_dict(variant: str, seed: int = 3, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A FLUX.2 transformer in BFL key names (klein: no guidance embedding; dev: with), built with diffusers'
    Flux2Transformer2DModel at width 256 and converted by trainer_core's BFL layout; it starts on trainer_core's
    tiny skip path (orthonormal in/out projections), so a LoRA changes its output visibly."""
    from diffusers import Flux2Transformer2DModel

    from trainer_core.models import flux2

    config = {**flux2.tiny_flux2_config(variant), "num_layers": 1, "num_single_layers": 1,
              "attention_head_dim": 128, "num_attention_heads": FLUX2_WIDTH // 128, "joint_attention_dim": CONTEXT,
              "timestep_guidance_channels": 256, "axes_dims_rope": [32, 32, 32, 32]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Flux2Transformer2DModel(**config).eval()
        with torch.no_grad():
            basis, _ = torch.linalg.qr(torch.randn(FLUX2_WIDTH, flux2.LATENT_CHANNELS))
            model.x_embedder.weight.copy_(basis)
            model.proj_out.weight.copy_(basis.T)
            model.norm_out.linear.weight.zero_()
    return {k: v.to(dtype).contiguous() for k, v in flux2.diffusers_to_bfl(model.state_dict()).items()}


def _taesd_gn_block(w: _Init, name: str) -> None:
    _taesd_block(w, name)
    w.conv(f"{name}.pool.0", 256, 64, k=1, bias=False)
    w.ones(f"{name}.pool.1.weight", 256)
    w.zeros(f"{name}.pool.1.bias", 256)
    w.conv(f"{name}.pool.3", 64, 256, k=1, bias=False, gain=0.5)


def taef2_state_dicts(seed: int = 4) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, decoder) of ComfyUI's FLUX.2 TAESD (comfy/taesd/taesd.py EncoderFlux2 / DecoderFlux2 indices)."""
    enc = _Init(seed, torch.float32)
    enc.conv("0", 64, 3)
    _taesd_block(enc, "1")
    for index in (2, 6, 10):  # three stride-2 stages; the last one's blocks have group-norm pools
        enc.conv(str(index), 64, 64, bias=False)
        for j in range(1, 4):
            (_taesd_gn_block if index == 10 else _taesd_block)(enc, str(index + j))
    enc.conv("14", 32, 64)
    dec = _Init(seed + 1, torch.float32)
    dec.conv("1", 64, 32)
    for j in (3, 4, 5):
        _taesd_gn_block(dec, str(j))
    for upsample_conv, blocks in ((7, (8, 9, 10)), (12, (13, 14, 15)), (17, (18,))):
        dec.conv(str(upsample_conv), 64, 64, bias=False)
        for j in blocks:
            _taesd_block(dec, str(j))
    dec.conv("19", 3, 64)
    dec.sd["19.bias"] = torch.full((3,), 0.5)  # mid-grey, as taesd_state_dict
    return enc.sd, dec.sd


@dataclass
class Flux2Fixtures:
    base: Path
    models: dict[str, str]  # variant → file in models/diffusion_models
    clip: str  # CLIP-L, standing in for the flux2 text encoder
    vae: str  # VAELoader name of the tiny FLUX.2 VAE
    dataset: str
    trigger: str


def build_flux2_fixtures(base: Path) -> Flux2Fixtures:
    """The FLUX.2 model files (klein and dev), the tiny FLUX.2 VAE, CLIP-L and the dataset under ``base``."""
    base = Path(base)
    models = base / "models"
    for sub in ("diffusion_models", "text_encoders", "vae", "vae_approx", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "custom_nodes", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for variant, name in FLUX2_FILES.items():
        save_file(flux2_state_dict(variant), str(models / "diffusion_models" / name))
    save_file(clip_l_state_dict(), str(models / "text_encoders" / CLIP_FILE))
    encoder, decoder = taef2_state_dicts()
    save_file(encoder, str(models / "vae_approx" / f"{FLUX2_VAE}_encoder.safetensors"))
    save_file(decoder, str(models / "vae_approx" / f"{FLUX2_VAE}_decoder.safetensors"))
    write_dataset(base / "input" / DATASET)
    return Flux2Fixtures(base, dict(FLUX2_FILES), CLIP_FILE, FLUX2_VAE, DATASET, TRIGGER)
