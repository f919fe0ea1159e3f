import pytest
import torch

from shared.config import AdaptorConfig
from shared.model import RetuneModel, masked_bce, zero_shot_logits
from shared.prompts import PromptBank


def test_prompt_bank_has_four_templates_each_and_averaging_rows_sum_to_one():
    bank = PromptBank(("Edema", "Pleural Effusion"))
    prompts = bank.prompts("Pleural Effusion")
    assert prompts["positive"][0] == "Findings consistent with pleural effusion"
    assert prompts["negative"][1] == "No evidence of pleural effusion"
    assert len(prompts["positive"]) == len(prompts["negative"]) == 4
    matrix = bank.averaging_matrix()
    assert matrix.shape == (4, len(bank.texts())) and len(bank.texts()) == 16
    assert torch.allclose(matrix.sum(1), torch.ones(4))


def test_overrides_and_round_trip():
    bank = PromptBank(("Edema",), overrides={"Edema": {"positive": ["fluid"], "negative": ["dry", "clear"]}})
    assert bank.texts() == ["fluid", "dry", "clear"]
    assert PromptBank.from_dict(bank.to_dict()).texts() == bank.texts()


def test_new_disease_adds_no_parameters():
    model = RetuneModel(32)
    n_params = sum(p.numel() for p in model.parameters())
    for diseases in (("A",), ("A", "B", "C")):
        bank = PromptBank(diseases)
        text = torch.randn(len(bank.texts()), 32)
        logits = model(torch.randn(5, 32), text, bank.averaging_matrix())
        assert logits.shape == (5, len(diseases))
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_logit_is_scaled_cosine_difference():
    model = RetuneModel(8, AdaptorConfig(kind="linear", logit_scale=3.0))
    with torch.no_grad():
        for adaptor in (model.image_adaptor.net, model.text_adaptor.net):
            adaptor.weight.copy_(torch.eye(8))
            adaptor.bias.zero_()
    image, pos, neg = torch.randn(1, 8), torch.randn(1, 8), torch.randn(1, 8)
    averaging = torch.eye(2)
    cos = torch.nn.functional.cosine_similarity
    expected = 3.0 * (cos(image, pos) - cos(image, neg))
    assert torch.allclose(model(image, torch.cat([pos, neg]), averaging)[0], expected, atol=1e-5)
    assert torch.allclose(zero_shot_logits(image, torch.cat([pos, neg]), averaging)[0], expected / 3, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "linear", "residual"])
def test_identity_init_starts_from_the_zero_shot_scores(kind):
    bank = PromptBank(("Edema", "Atelectasis"))
    prompts, images = torch.randn(len(bank.texts()), 16), torch.randn(6, 16)
    model = RetuneModel(16, AdaptorConfig(kind=kind))  # identity is the default
    expected = model.config.logit_scale * zero_shot_logits(images, prompts, bank.averaging_matrix())
    assert torch.allclose(model(images, prompts, bank.averaging_matrix()), expected, atol=1e-5)
    random = RetuneModel(16, AdaptorConfig(kind=kind, init="random"))
    assert not torch.allclose(random(images, prompts, bank.averaging_matrix()), expected, atol=1e-2)
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values()) and len(params) == len(dict(random.named_parameters()))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_residual_adaptor_mixes_identity(alpha):
    """alpha·mlp(x) + (1 − alpha)·x, checked with random MLP weights (an identity-initialised MLP is x itself, so
    any mix of it would pass)."""
    torch.manual_seed(0)
    model = RetuneModel(8, AdaptorConfig(kind="residual", residual_alpha=alpha, init="random"))
    x = torch.randn(3, 8)
    mlp = model.image_adaptor.net(x)
    assert not torch.allclose(mlp, x, atol=1e-2)
    assert torch.allclose(model.image_adaptor(x), alpha * mlp + (1 - alpha) * x, atol=1e-6)


def test_masked_bce_ignores_unlabelled_entries():
    logits = torch.tensor([[2.0, -1.0], [0.5, 9.0]])
    labels = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels[:, 0])
    assert torch.allclose(masked_bce(logits, labels), expected)
    per_sample = masked_bce(logits, labels, reduction="none")
    assert per_sample.shape == (2,)
    assert torch.allclose(per_sample.mean(), expected)
    assert masked_bce(logits, torch.full((2, 2), float("nan"))) == 0
