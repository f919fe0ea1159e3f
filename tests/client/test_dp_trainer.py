"""DP-SGD's clipped gradient equals brute-force per-sample clipping of both adaptors, one sample at a time."""

import pytest
import torch

from client.dp_clip import PerSampleRetune
from client.dp_random import SecureRandom
from client.dp_trainer import dp_optimizer
from client.privacy import DPConfig
from client.trainer import Prompts
from shared.config import AdaptorConfig
from shared.model import RetuneModel, masked_bce
from shared.prompts import PromptBank

DIM, BATCH = 12, 10


def setup(kind: str) -> tuple[RetuneModel, Prompts, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    bank = PromptBank(("A", "B", "C"))
    prompts = Prompts(torch.nn.functional.normalize(torch.randn(len(bank.texts()), DIM), dim=-1),
                      bank.averaging_matrix())
    model = RetuneModel(DIM, AdaptorConfig(kind=kind))
    x = torch.randn(BATCH, DIM)
    y = (torch.rand(BATCH, 3) < 0.4).float()
    y[torch.rand(BATCH, 3) < 0.3] = float("nan")
    y[:, 0] = torch.nan_to_num(y[:, 0], nan=1.0)  # every sample labelled at least once
    return model, prompts, x, y


def per_sample_grads(model: RetuneModel, prompts: Prompts, x: torch.Tensor, y: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B, all trainable parameters]: plain autograd on the model, one sample at a time."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        masked_bce(model(x[i:i + 1], prompts.embeddings, prompts.averaging), y[i:i + 1],
                   weights=None if weights is None else weights[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.trainable()]))
    return torch.stack(rows)


def dp_gradient(model: RetuneModel, prompts: Prompts, x: torch.Tensor, y: torch.Tensor, bound: float,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i clip(g_i) as the DP optimizer has it before the update with noise 0, the per-sample norms)."""
    module = PerSampleRetune(model, prompts)
    model.train()
    optimizer = dp_optimizer(module, torch.optim.SGD(model.trainable(), lr=0.0), 0.0,
                             DPConfig(max_epsilon=1.0, max_grad_norm=bound), len(x), SecureRandom())
    _, norms = module.clipped_backward(x, y, optimizer.max_grad_norm, weights)
    optimizer.pre_step()  # adds the noise (σ = 0) and divides by the expected batch size
    return torch.cat([p.grad.flatten() for p in model.trainable()]) * optimizer.expected_batch_size, norms


def clipped_sum(grads: torch.Tensor, norms: torch.Tensor, bound: float) -> torch.Tensor:
    return ((bound / (norms + 1e-6)).clamp(max=1.0)[:, None] * grads).sum(0)  # opacus' clip factor


@pytest.mark.parametrize("kind", ["mlp", "linear", "residual"])
def test_dp_gradient_is_exact_per_sample_clipping_of_both_adaptors(kind):
    model, prompts, x, y = setup(kind)
    grads = per_sample_grads(model, prompts, x, y)
    norms = grads.norm(dim=1)
    bound = float(norms.median())  # about half of the samples clipped
    expected = clipped_sum(grads, norms, bound)
    actual, dp_norms = dp_gradient(model, prompts, x, y, bound)
    torch.testing.assert_close(dp_norms, norms, rtol=1e-5, atol=0)
    text = torch.zeros(grads.shape[1], dtype=torch.bool)
    text[-sum(p.numel() for p in model.text_adaptor.parameters()):] = True
    for part in (slice(None), text, ~text):  # all parameters, the text adaptor's, the image adaptor's
        assert (actual[part] - expected[part]).norm() <= 1e-5 * expected[part].norm()
    # The text adaptor matters: leaving it out of the per-sample norms, or unclipped, gives another gradient.
    image_only = clipped_sum(grads, grads[:, ~text].norm(dim=1), bound)
    text_unclipped = torch.where(text, grads.sum(0), expected)
    for wrong in (image_only, text_unclipped):
        assert (actual - wrong).norm() > 1e-2 * expected.norm()


def test_opacus_adds_gaussian_noise_of_sigma_times_the_bound():
    """The clipped sum goes through opacus' DP optimizer: noise N(0, (σ·C)²) per coordinate, then / batch."""
    model, prompts, x, y = setup("mlp")
    clean, _ = dp_gradient(model, prompts, x, y, bound=0.5)
    module = PerSampleRetune(model, prompts).train()
    optimizer = dp_optimizer(module, torch.optim.SGD(module.parameters(), lr=0.0), 2.0,
                             DPConfig(max_epsilon=1.0, max_grad_norm=0.5), len(x), SecureRandom())
    module.clipped_backward(x, y, optimizer.max_grad_norm)
    optimizer.pre_step()
    noisy = torch.cat([p.grad.flatten() for p in model.parameters()]) * optimizer.expected_batch_size
    noise = noisy - clean
    # σ·C = 1: bounds at 5 standard errors (the noise comes from a CSPRNG, so every run draws anew)
    assert len(noise) > 1000 and abs(float(noise.std()) - 2.0 * 0.5) < 5 / (2 * len(noise)) ** 0.5
    assert abs(float(noise.mean())) < 5 / len(noise) ** 0.5


@pytest.mark.parametrize("kind", ["lora", "both"])
def test_dp_gradient_with_lora_is_exact_per_sample_clipping_over_lora_and_adaptors(kind):
    """LoRA in the image tower: opacus' grad-sample hooks give each sample's LoRA gradient, clipped jointly with
    the adaptors' (one sample at a time with plain autograd as the reference)."""
    from shared.config import LoraConfig
    from shared.model import build_model
    from tests.conftest import tiny_resnet_clip

    _, prompts, _, y = setup("mlp")
    prompts = Prompts(torch.nn.functional.normalize(torch.randn(len(prompts.embeddings), 16), dim=-1),
                      prompts.averaging)  # the tiny CLIP's embedding size
    model = build_model(16, AdaptorConfig(), kind, LoraConfig(rank=4, alpha=8, dropout=0.0), tiny_resnet_clip())
    torch.manual_seed(1)
    for p in model.trainable():  # B = 0 at the start would make A's gradient zero
        p.data.normal_(0, 0.1)
    images = torch.randn(BATCH, 3, 32, 32)
    grads = per_sample_grads(model, prompts, images, y)
    norms = grads.norm(dim=1)
    bound = float(norms.median())
    expected = clipped_sum(grads, norms, bound)
    model.zero_grad()
    actual, dp_norms = dp_gradient(model, prompts, images, y, bound)
    torch.testing.assert_close(dp_norms, norms, rtol=1e-5, atol=0)
    lora = torch.cat([torch.full((p.numel(),), ".lora_" in n) for n, p in model.named_parameters() if p.requires_grad])
    for part in (slice(None), lora):
        assert (actual[part] - expected[part]).norm() <= 1e-5 * expected[part].norm()
    # LoRA's gradient is clipped: its unclipped sum is another gradient.
    unclipped = grads[:, lora].sum(0)
    assert (actual[lora] - unclipped).norm() > 1e-2 * expected[lora].norm()


def test_dp_refuses_lora_on_a_multihead_attention(tiny_backbone):
    """open_clip's ViT: peft adapts a MultiheadAttention by merging weights, which opacus' hooks cannot see."""
    from shared.config import LoraConfig
    from shared.errors import RetuneError
    from shared.model import build_model

    _, prompts, _, _ = setup("mlp")
    model = build_model(tiny_backbone.embed_dim, AdaptorConfig(), "lora", LoraConfig(rank=2), tiny_backbone.model)
    with pytest.raises(RetuneError, match="is a MultiheadAttention, whose LoRA layers opacus cannot see"):
        PerSampleRetune(model, prompts)


def test_dp_refuses_lora_in_the_text_tower():
    from shared.config import LoraConfig
    from shared.errors import RetuneError
    from shared.model import build_model
    from tests.conftest import tiny_resnet_clip

    _, prompts, _, _ = setup("mlp")
    model = build_model(16, AdaptorConfig(), "lora", LoraConfig(rank=2, towers=("text",)), tiny_resnet_clip())
    with pytest.raises(RetuneError, match="DP-SGD with LoRA in the text tower is not supported"):
        PerSampleRetune(model, prompts)


def test_dp_gradient_with_distilled_targets_is_exact_per_sample_clipping():
    """Learning without forgetting adds soft, weighted entries to each sample's own loss: DP-SGD still clips each
    sample's gradient exactly (reference: one sample at a time with plain autograd)."""
    model, prompts, x, y = setup("mlp")
    free = torch.isnan(y)
    soft = torch.where(free, torch.rand(y.shape, generator=torch.Generator().manual_seed(3)), y)
    weights = torch.where(free, torch.full_like(y, 0.5), torch.ones_like(y))
    grads = per_sample_grads(model, prompts, x, soft, weights)
    norms = grads.norm(dim=1)
    bound = float(norms.median())
    expected = clipped_sum(grads, norms, bound)
    actual, dp_norms = dp_gradient(model, prompts, x, soft, bound, weights)
    torch.testing.assert_close(dp_norms, norms, rtol=1e-5, atol=0)
    assert (actual - expected).norm() <= 1e-5 * expected.norm()
    _, hard_norms = PerSampleRetune(model, prompts).clipped_backward(x, y, bound)  # without the distilled entries
    assert not torch.allclose(hard_norms, norms)
