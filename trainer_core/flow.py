"""Rectified-flow objective and Euler sampler for FLUX — the heart of the trainer, the same for every family.

    x_t = (1 − σ)·x0 + σ·ε        (σ = 1 is pure noise)
    v   = ε − x0                   (the model predicts v; dx_t/dσ = v)
    loss = MSE(v_pred, v)          (in latent layout, after unpacking the prediction)

Sampling integrates dx/dσ = v from σ = 1 to 0 with Euler steps over the family's shifted schedule.
Latents here are always model-space latents in the cache's layout ([B, 16, H/8, W/8] for FLUX.1, [B, 128, H/16,
W/16] for FLUX.2); how they become tokens, their position ids and the transformer call belong to the model family
(``models/family.py``), detected from the transformer when not given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.family import FLUX1, ModelFamily, detect_family

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ): spends more steps at high noise for s > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


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
    family: ModelFamily = FLUX1,
) -> torch.Tensor:
    """Training noise levels σ ∈ (0, 1) of shape [batch].

    uniform: σ ~ U(0, 1). sigmoid: σ = sigmoid(scale · N(mean, std)). shift / flux_shift: the sigmoid draw
    shifted by ``shift`` or by ``family``'s resolution-dependent shift at ``n_image_tokens`` (as kohya's sd-scripts
    does for FLUX.1; for FLUX.2, the shift of its pipelines at their default step count).
    """
    if method == "uniform":
        return torch.rand(batch, generator=generator)
    sigma = torch.sigmoid(scale * (mean + std * torch.randn(batch, generator=generator)))
    if method == "sigmoid":
        return sigma
    if method == "shift":
        return shift_sigmas(sigma, shift)
    if method == "flux_shift":
        return shift_sigmas(sigma, family.resolution_shift(n_image_tokens))
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
    family: ModelFamily | None = None,
) -> torch.Tensor:
    """Run the transformer on latents in latent layout and return v in latent layout (fp32); ``dtype`` = compute
    dtype; ``family`` defaults to the transformer's."""
    family = family or detect_family(transformer)
    _, _, h, w = x_t.shape
    device = x_t.device
    out = family.call_transformer(
        transformer, family.pack_latents(x_t).to(dtype), sigma.to(device, dtype), hidden.to(device, dtype),
        pooled.to(device, dtype), family.image_ids(h, w, device=device),
        family.text_ids(hidden.shape[1], device=device), guidance, dtype)
    return family.unpack_latents(out.float(), h, w)


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
    family: ModelFamily | None = None,
) -> torch.Tensor:
    """Mean flow-matching loss for one batch; ``weight`` (broadcastable to x0) weights the elements."""
    x_t = noisy_latents(x0, noise, sigma)
    v_pred = predict_velocity(transformer, x_t, sigma, hidden, pooled, guidance, dtype, family)
    loss = elementwise_loss(v_pred, velocity_target(x0, noise).float(), loss_type, huber_c)
    if weight is None:
        return loss.mean()
    weight = weight.expand_as(loss)
    return (loss * weight).sum() / weight.sum().clamp_min(1e-8)


def sampling_sigmas(steps: int, n_image_tokens: int, shift: bool = True, family: ModelFamily = FLUX1
                    ) -> torch.Tensor:
    """σ from 1 to 0 in ``steps`` Euler steps, over ``family``'s resolution-dependent shifted schedule."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return shift_sigmas(sigmas, family.resolution_shift(n_image_tokens, steps)) if shift else sigmas


@torch.no_grad()
def euler_sample(
    transformer,
    noise: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    guidance: float,
    steps: int,
    dtype: torch.dtype = torch.float32,
    family: ModelFamily | None = None,
    negative: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate dx/dσ = v from pure noise (σ = 1) to a clean latent (σ = 0).

    With ``negative`` (hidden, pooled of a negative prompt) each step is classifier-free guided, v = v₋ +
    guidance·(v₊ − v₋), as FLUX.2 klein's pipeline samples; otherwise ``guidance`` goes to the transformer's
    guidance embedding (where it has one).
    """
    family = family or detect_family(transformer)
    _, _, h, w = noise.shape
    sigmas = sampling_sigmas(steps, family.image_token_count(h, w), family=family).to(noise.device)
    x = noise.float()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = sigma.expand(x.shape[0])
        v = predict_velocity(transformer, x, t, hidden, pooled, guidance, dtype, family)
        if negative is not None:
            v_negative = predict_velocity(transformer, x, t, *negative, guidance, dtype, family)
            v = v_negative + guidance * (v - v_negative)
        x = x + (sigma_next - sigma) * v
    return x
