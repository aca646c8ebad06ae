"""Rectified-flow objective and Euler sampler for FLUX.1 — the heart of the trainer.

    x_t = (1 − σ)·x0 + σ·ε        (σ = 1 is pure noise)
    v   = ε − x0                   (the model predicts v; dx_t/dσ = v)
    loss = MSE(v_pred, v)          (in latent layout, after unpacking the prediction)

Sampling integrates dx/dσ = v from σ = 1 to 0 with Euler steps over FLUX's shifted schedule.
Latents here are always model-space latents [B, 16, H/8, W/8]; FLUX sees them as 2×2 patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H/2·W/2, 4C]: each token is one 2×2 patch (channel-major, like BFL's rearrange)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height`` × ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """Position ids [(H/2)·(W/2), 3] = [0, row, col] for a latent of ``height`` × ``width``."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


def text_ids(length: int, device=None) -> torch.Tensor:
    return torch.zeros(length, 3, device=device)


def image_token_count(height: int, width: int) -> int:
    return (height // 2) * (width // 2)


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ): spends more steps at high noise for s > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_shift(n_image_tokens: int) -> float:
    """FLUX's resolution-dependent shift e^μ, μ linear from 0.5 at 256 tokens to 1.15 at 4096 tokens."""
    mu = 0.5 + (1.15 - 0.5) * (n_image_tokens - 256) / (4096 - 256)
    return math.exp(mu)


def sample_sigmas(
    batch: int,
    method: str,
    n_image_tokens: int,
    generator: torch.Generator,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    scale: float = 1.0,
    shift: float = 3.0,
) -> torch.Tensor:
    """Training noise levels σ ∈ (0, 1) of shape [batch].

    uniform: σ ~ U(0, 1). sigmoid: σ = sigmoid(scale · N(mean, std)). shift / flux_shift: the sigmoid draw
    shifted by ``shift`` or by FLUX's resolution-dependent shift (as kohya's sd-scripts does).
    """
    if method == "uniform":
        return torch.rand(batch, generator=generator)
    sigma = torch.sigmoid(scale * (mean + std * torch.randn(batch, generator=generator)))
    if method == "sigmoid":
        return sigma
    if method == "shift":
        return shift_sigmas(sigma, shift)
    if method == "flux_shift":
        return shift_sigmas(sigma, flux_shift(n_image_tokens))
    raise ValueError(f"unknown timestep sampling '{method}'")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    # fp32 σ would promote bf16 latents to fp32 (reference.md §1): keep the latents' dtype.
    return ((1 - s) * x0 + s * noise).to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predict_velocity(
    transformer,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    guidance: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run FLUX on latents in latent layout and return v in latent layout (fp32); ``dtype`` = compute dtype."""
    b, _, h, w = x_t.shape
    device = x_t.device
    guidance_vec = torch.full((b,), guidance, device=device, dtype=dtype) if transformer.config.guidance_embeds else None
    out = transformer(
        hidden_states=pack_latents(x_t).to(dtype),
        encoder_hidden_states=hidden.to(device, dtype),
        pooled_projections=pooled.to(device, dtype),
        timestep=sigma.to(device, dtype),
        img_ids=latent_image_ids(h, w, device=device),
        txt_ids=text_ids(hidden.shape[1], device=device),
        guidance=guidance_vec,
        return_dict=False,
    )[0]
    return unpack_latents(out.float(), h, w)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.1) -> torch.Tensor:
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type == "huber":  # pseudo-Huber: quadratic near 0, linear beyond c
        return 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=huber_c)
    raise ValueError(f"unknown loss type '{loss_type}'")


def flow_matching_loss(
    transformer,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    guidance: float,
    loss_type: str = "l2",
    weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    huber_c: float = 0.1,
) -> torch.Tensor:
    """Mean flow-matching loss for one batch; ``weight`` (broadcastable to x0) weights the elements."""
    x_t = noisy_latents(x0, noise, sigma)
    v_pred = predict_velocity(transformer, x_t, sigma, hidden, pooled, guidance, dtype)
    loss = elementwise_loss(v_pred, velocity_target(x0, noise).float(), loss_type, huber_c)
    if weight is None:
        return loss.mean()
    weight = weight.expand_as(loss)
    return (loss * weight).sum() / weight.sum().clamp_min(1e-8)


def sampling_sigmas(steps: int, n_image_tokens: int, shift: bool = True) -> torch.Tensor:
    """σ from 1 to 0 in ``steps`` Euler steps, over FLUX's resolution-dependent shifted schedule."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return shift_sigmas(sigmas, flux_shift(n_image_tokens)) if shift else sigmas


@torch.no_grad()
def euler_sample(
    transformer,
    noise: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    guidance: float,
    steps: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Integrate dx/dσ = v from pure noise (σ = 1) to a clean latent (σ = 0)."""
    _, _, h, w = noise.shape
    sigmas = sampling_sigmas(steps, image_token_count(h, w)).to(noise.device)
    x = noise.float()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = predict_velocity(transformer, x, sigma.expand(x.shape[0]), hidden, pooled, guidance, dtype)
        x = x + (sigma_next - sigma) * v
    return x
