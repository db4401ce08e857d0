"""Inversion of flow-matching models (``inversion/flow.py``) through the same DDIM Inversion
node: against the closed-form flow of Gaussian data, step by step against the Euler update,
the chain between its sigmas, cache, progress, interrupt, and on the tiny Flux.1 / SD3.5."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy.patcher_extension import WrappersMP

from qkv_control.inversion import flow
from qkv_control.inversion import invert as invert_module
from qkv_control.nodes.ddim_inversion import QKVDDIMInversion
from dit_helpers import dit_kit

MEAN, STD = 0.3, 0.8


def gaussian_flow_denoiser(mean=MEAN, std=STD):
    """APPLY_MODEL wrapper replacing the transformer by the exact denoiser of Gaussian data
    N(mean, std²) under x = (1 - s) x0 + s eps: E[x0 | x] = mean + (1 - s) std² (x - (1 - s) mean)
    / ((1 - s)² std² + s²). No network error hides a bug."""

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        s = t.reshape(-1, 1, 1, 1).to(x)
        return mean + (1 - s) * std ** 2 * (x - (1 - s) * mean) / ((1 - s) ** 2 * std ** 2 + s ** 2)

    return wrapper


def exact_flow(x0, sigma, mean=MEAN, std=STD):
    """The probability-flow ODE of Gaussian data in closed form: the affine map that keeps each
    value's standard score, x_s = (1 - s) mean + sqrt((1 - s)² std² + s²) (x0 - mean) / std."""
    return (1 - sigma) * mean + math.sqrt((1 - sigma) ** 2 * std ** 2 + sigma ** 2) * (x0 - mean) / std


def relative_rms(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def exact_kit(family):
    model, positive, _ = dit_kit(family)
    m = model.clone()
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test_exact", gaussian_flow_denoiser())
    x0 = MEAN + STD * torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    latent = model.get_model_object("latent_format").process_out(x0)  # the LATENT a VAE would give
    return m, positive, x0, latent


def reconstruct(model, inversion, positive, steps, scheduler):
    """Sample back from z_T on the same schedule (euler, cfg 1): a flow model starts at sigma_max = 1
    from its noise alone, so z_T is given as the noise."""
    latent = torch.zeros((1,) + inversion.chain.latent_shape)
    return comfy.sample.sample(model, inversion.chain.z_top, steps, 1.0, "euler", scheduler, positive, positive,
                               latent, disable_pbar=True)


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_flow_inversion_reconstructs_with_an_exact_denoiser(family):
    """The only error left is the inversion's v(x_lo, sigma_hi) approximation, O(1/steps).
    Measured, 'simple' schedule, relative RMS, z_T / reconstruction: Flux.1 (shift 1.15) 10
    steps 17.7% / 5.0%, 50 steps 2.8% / 1.4%; SD3 (shift 3) 10 steps 16.8% / 4.9%, 50 steps
    2.7% / 1.3% (a plain-Python simulation of the same scheme gives the same figures)."""
    m, positive, x0, latent = exact_kit(family)
    inversion, _ = invert_module.invert(m, latent, 50, "simple", positive, use_cache=False)
    assert inversion.prediction == "flow" and inversion.chain.sigma_max == pytest.approx(1.0)
    assert relative_rms(inversion.chain.z_top, exact_flow(x0, 1.0)) < 0.035
    assert torch.allclose(inversion.chain.z0, x0, atol=1e-6)  # sigma 0: the clean latent itself (model space)
    assert relative_rms(reconstruct(m, inversion, positive, 50, "simple"), latent) < 0.02
    coarse, _ = invert_module.invert(m, latent, 10, "simple", positive, use_cache=False)
    assert 0.1 < relative_rms(coarse.chain.z_top, exact_flow(x0, 1.0)) < 0.2  # O(1/steps): it grows as steps shrink


def test_first_steps_are_the_closed_form_euler_update():
    """chain[i+1] = chain[i] + (s_{i+1} - s_i) * v(chain[i], s_{i+1}), v = (x - D(x, s)) / s, with
    the closed-form D: the inversion evaluates the model at the sampler's sigma of the segment."""
    m, positive, x0, latent = exact_kit("flux")
    inversion, _ = invert_module.invert(m, latent, 8, "simple", positive, use_cache=False)
    chain = inversion.chain
    for i in range(3):
        lo, hi = float(chain.sigmas[i]), float(chain.sigmas[i + 1])
        x = chain.latents[i]
        denoised = MEAN + (1 - hi) * STD ** 2 * (x - (1 - hi) * MEAN) / ((1 - hi) ** 2 * STD ** 2 + hi ** 2)
        expected = x + (hi - lo) * (x - denoised) / hi
        assert torch.allclose(chain.latents[i + 1], expected, atol=1e-6, rtol=1e-6)
    sampler_sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 8)
    assert torch.allclose(chain.sigmas, torch.flip(sampler_sigmas.float(), (0,)))  # the sampler's, walked up


def test_flow_chain_between_its_sigmas_stays_as_accurate_as_on_them():
    """Another scheduler's sigmas (an Euler sub-step on the segment in flow x-space) against the
    closed form: measured with 20 'simple' inversion steps and 'beta' 7-step sigmas."""
    m, positive, x0, latent = exact_kit("sd35")
    inversion, _ = invert_module.invert(m, latent, 20, "simple", positive, use_cache=False)
    chain = inversion.chain
    on = max(relative_rms(chain.latents[i], exact_flow(x0, float(s))) for i, s in enumerate(chain.sigmas) if s > 0)
    ms = m.get_model_object("model_sampling")
    off_sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(ms, "beta", 7)[1:-1]]
    off_sigmas = [s for s in off_sigmas if not chain.is_exact(s)]
    assert len(off_sigmas) >= 4
    off = max(relative_rms(chain.latent_at(s), exact_flow(x0, s)) for s in off_sigmas)
    assert off <= on * 1.2 + 1e-3, (off, on)


@contextlib.contextmanager
def model_rows(model):
    """The batch rows of every diffusion-model call made inside the block."""
    rows: list[int] = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def flux_inversion():
    model, positive, _ = dit_kit("flux")
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(11))
    inversion, z_t = QKVDDIMInversion.execute(model, {"samples": latent}, 3, "simple", positive).args
    return model, positive, latent, inversion


def test_node_inverts_flux_once_and_caches(flux_inversion):
    model, positive, latent, inversion = flux_inversion
    assert inversion.prediction == "flow" and inversion.model_family == "Flux"
    assert inversion.context.shape == (1, 256, 64)  # the T5 context the model saw
    assert set(inversion.conds) == {"y", "guidance"}  # Flux's per-row inputs, for the reference row
    with model_rows(model) as rows:
        again, _ = QKVDDIMInversion.execute(model, {"samples": latent}, 3, "simple", positive).args
    assert rows == [] and again is inversion
    with model_rows(model) as rows:
        QKVDDIMInversion.execute(model, {"samples": latent + 1}, 3, "simple", positive).args
        QKVDDIMInversion.execute(model, {"samples": latent}, 3, "beta", positive).args
    assert rows == [1] * 6  # one row per step, no CFG


def test_flow_inversion_shows_progress_and_stops_on_interrupt(monkeypatch):
    model, positive, _ = dit_kit("sd35")
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(12))
    updates = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: updates.append((value, total)))
    invert_module.invert(model, latent, 3, "simple", positive, use_cache=False)
    assert updates[0] == (1, 3) and updates[-1] == (3, 3)  # ComfyUI throttles the ones between
    monkeypatch.setattr(comfy.model_management, "interrupt_processing", True)  # the Cancel button
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        invert_module.invert(model, latent, 3, "simple", positive, use_cache=False)


def test_flow_inversion_without_a_prompt_uses_the_families_empty_context():
    model, _, _ = dit_kit("sd35")
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(13))
    inversion, _ = invert_module.invert(model, latent, 2, "simple", None, use_cache=False)
    assert inversion.context.shape == (1, 154, 4096) and inversion.conds["y"].shape == (1, 128)


def test_flow_helpers():
    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, generator=generator), torch.randn(4, generator=generator)
    assert torch.allclose(flow.euler_step(x, v, 0.2, 0.5), x + 0.3 * v)
    assert torch.allclose(flow.euler_step(flow.euler_step(x, v, 0.2, 0.5), v, 0.5, 0.2), x, atol=1e-6)
    denoised = x - 0.4 * v
    assert torch.allclose(flow.velocity(x, denoised, 0.4), v)
    model, _, _ = dit_kit("flux")
    assert flow.is_flow(model.get_model_object("model_sampling"))
