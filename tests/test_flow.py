"""The objective and sampler match the reference recipe (reference.md §1) exactly."""

import math

import pytest
import torch

from trainer_core import flow
from trainer_core.models.family import FLUX1
from trainer_core.models.tiny import build_tiny_transformer


def reference_pack(latents):
    """Independent 2×2 patching with explicit loops: token (i, j) = [c0p00, c0p01, c0p10, c0p11, c1p00, …]."""
    b, c, h, w = latents.shape
    tokens = torch.empty(b, (h // 2) * (w // 2), c * 4)
    for i in range(h // 2):
        for j in range(w // 2):
            patch = latents[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]  # [b, c, 2, 2]
            tokens[:, i * (w // 2) + j] = patch.reshape(b, c * 4)
    return tokens


def reference_ids(h, w):
    return torch.tensor([[0.0, i, j] for i in range(h // 2) for j in range(w // 2)])


def test_pack_matches_reference_and_round_trips():
    x = torch.randn(2, 16, 6, 8)
    assert torch.equal(FLUX1.pack_latents(x), reference_pack(x))
    assert torch.equal(FLUX1.unpack_latents(FLUX1.pack_latents(x), 6, 8), x)
    assert torch.equal(FLUX1.image_ids(6, 8), reference_ids(6, 8))


def test_loss_equals_independent_reference_computation():
    torch.manual_seed(0)
    model = build_tiny_transformer(seed=0).float()
    x0, noise = torch.randn(2, 16, 8, 6), torch.randn(2, 16, 8, 6)
    sigma = torch.tensor([0.3, 0.8])
    hidden, pooled = torch.randn(2, 7, 32), torch.randn(2, 32)
    ours = flow.flow_matching_loss(model, x0, noise, sigma, hidden, pooled, guidance=1.0)

    # reference.md §1, written out independently: x_t = (1 − σ)·x0 + σ·ε, target ε − x0, MSE in latent layout
    x_t = torch.stack([(1 - s) * a + s * n for s, a, n in zip(sigma, x0, noise)])
    with torch.no_grad():
        pred_tokens = model(
            hidden_states=reference_pack(x_t), encoder_hidden_states=hidden, pooled_projections=pooled,
            timestep=sigma, img_ids=reference_ids(8, 6), txt_ids=torch.zeros(7, 3),
            guidance=torch.ones(2), return_dict=False,
        )[0]
    pred = torch.zeros_like(x0)
    for i in range(4):
        for j in range(3):
            pred[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = pred_tokens[:, i * 3 + j].reshape(2, 16, 2, 2)
    reference = ((pred - (noise - x0)) ** 2).mean()
    assert abs(ours.item() - reference.item()) < 1e-6


def test_euler_sampler_recovers_x0_on_an_exact_straight_flow():
    x0, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)

    class StraightFlow(torch.nn.Module):
        """Predicts the true velocity ε − x0 everywhere: Euler must land exactly on x0."""
        config = type("Config", (), {"guidance_embeds": False})()

        def forward(self, hidden_states, **kwargs):
            return (FLUX1.pack_latents(noise - x0),)

    out = flow.euler_sample(StraightFlow(), noise, torch.zeros(1, 3, 8), torch.zeros(1, 8), 1.0, steps=7,
                             family=FLUX1)
    assert torch.allclose(out, x0, atol=1e-5)


def test_flux_shift_values_match_reference():
    # reference.md §1: shift 1.878 at 512², 2.332 at 768², 3.158 at 1024²
    for side, expected in ((512, 1.878), (768, 2.332), (1024, 3.158)):
        tokens = FLUX1.image_token_count(side // 8, side // 8)
        assert FLUX1.resolution_shift(tokens) == pytest.approx(expected, abs=2e-3)
    assert flow.shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


@pytest.mark.parametrize("method", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_sigma_samplers_are_seeded_and_in_range(method):
    draw = lambda: flow.sample_sigmas(4000, method, 4096, torch.Generator().manual_seed(3))  # noqa: E731
    a, b = draw(), draw()
    assert torch.equal(a, b)
    assert 0 < a.min() and a.max() < 1
    if method in ("uniform", "sigmoid"):
        assert abs(a.mean().item() - 0.5) < 0.02
    else:  # shifted samplers favour high noise
        assert a.mean().item() > 0.6


def test_sigmoid_sampler_follows_mean_and_scale():
    g = torch.Generator().manual_seed(0)
    s = flow.sample_sigmas(20000, "sigmoid", 256, g, mean=1.0, std=1.0, scale=1.0)
    logits = torch.log(s / (1 - s))
    assert logits.mean().item() == pytest.approx(1.0, abs=0.03)
    assert logits.std().item() == pytest.approx(1.0, abs=0.03)


def test_loss_types_and_weights():
    pred, target = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    assert flow.elementwise_loss(pred, target, "l2").tolist() == [1.0, 4.0]
    assert flow.elementwise_loss(pred, target, "l1").tolist() == [1.0, 2.0]
    huber = flow.elementwise_loss(pred, target, "huber", huber_c=0.1)
    assert huber[1].item() == pytest.approx(2 * 0.1 * (math.sqrt(4.01) - 0.1))
