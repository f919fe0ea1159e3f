import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from client.dp_clip import PerSampleRetune
from client.dp_trainer import train_adaptors_dp
from client.privacy import BudgetExhausted, DPConfig, HospitalPrivacy, spend
from client.trainer import Prompts
from shared.config import AdaptorConfig, TrainConfig
from shared.errors import RetuneError
from shared.model import RetuneModel, zero_shot_logits
from shared.prompts import PromptBank

DIM = 16
DISEASES = ("A", "B")


@pytest.fixture
def prompts() -> Prompts:
    bank = PromptBank(DISEASES)
    rows = torch.nn.functional.normalize(torch.randn(len(bank.texts()), DIM, generator=torch.Generator().manual_seed(0)), dim=-1)
    return Prompts(rows, bank.averaging_matrix())


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_ledger_persists_and_matches_opacus_accounting(tmp_path, name):
    ledger = tmp_path / "ledger.json"
    config = DPConfig(max_epsilon=10, accountant=name)
    HospitalPrivacy(ledger, config).commit(spend(1.1, 0.05, 100, "run-a", 0, 0))
    HospitalPrivacy(ledger, config).commit(spend(1.3, 0.05, 40, "run-b", 1, 2))  # a later round, stage or run
    accountant = {"prv": PRVAccountant, "rdp": RDPAccountant}[name]()
    accountant.history = [(1.1, 0.05, 100), (1.3, 0.05, 40)]
    assert HospitalPrivacy(ledger, config).epsilon() == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-4)
    with pytest.raises(RetuneError, match="same settings"):
        HospitalPrivacy(ledger, DPConfig(max_epsilon=10, delta=1e-6, accountant=name))
    with pytest.raises(RetuneError, match="same settings"):
        HospitalPrivacy(ledger, DPConfig(max_epsilon=10, accountant="rdp" if name == "prv" else "prv"))


def test_default_accountant_is_the_tighter_one(tmp_path):
    """PRV bounds ε more tightly than RDP, so a budget buys less noise: it is the default."""
    assert DPConfig(max_epsilon=1).accountant == "prv"
    spent = spend(1.0, 0.5, 24, "run", 0, 0)
    prv = HospitalPrivacy(tmp_path / "a.json", DPConfig(max_epsilon=10, accountant="prv")).epsilon(spent)
    rdp = HospitalPrivacy(tmp_path / "b.json", DPConfig(max_epsilon=10, accountant="rdp")).epsilon(spent)
    assert prv < rdp


def test_noise_is_planned_for_the_target_and_the_budget_is_enforced(tmp_path):
    privacy = HospitalPrivacy(tmp_path / "l.json", DPConfig(max_epsilon=4.0))
    rounds, steps, rate = 3, 20, 0.1
    for r in range(rounds):
        entry = spend(privacy.noise_for(rate, steps, rounds - r), rate, steps, "run", 0, r)
        privacy.check(entry)
        privacy.commit(entry)
    assert 3.9 < privacy.epsilon() <= 4.0 + 1e-6
    with pytest.raises(BudgetExhausted, match="declining"):
        privacy.check(spend(1.0, rate, steps, "run", 0, 3))


@pytest.mark.parametrize("kind", ["mlp", "linear", "residual"])
def test_per_sample_view_scores_like_the_model(prompts, kind):
    """With random adaptor weights: at the identity initialisation a view that skipped an adaptor (or the
    residual mix) would score exactly like the model."""
    torch.manual_seed(0)
    model = RetuneModel(DIM, AdaptorConfig(kind=kind, init="random"))
    x = torch.randn(5, DIM)
    expected = model(x, prompts.embeddings, prompts.averaging)
    assert not torch.allclose(expected, model.config.logit_scale * zero_shot_logits(x, prompts.embeddings,
                                                                                     prompts.averaging), atol=1e-2)
    assert torch.allclose(PerSampleRetune(model, prompts)(x), expected, atol=1e-5)


def test_dp_training_learns_spends_and_declines(tmp_path, prompts):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, DIM)).astype(np.float32)
    y = (x[:, :2] > 0).astype(np.float32)
    privacy = HospitalPrivacy(tmp_path / "ledger.json", DPConfig(max_epsilon=8.0))
    torch.manual_seed(0)
    model = RetuneModel(DIM)
    before = [p.detach().clone() for p in model.parameters()]
    losses, epsilon, _ = train_adaptors_dp(model, x, y, prompts, TrainConfig(epochs=3, batch_size=100), privacy,
                                           rounds_left=1, where=("run", 0, 0))
    assert 7.5 < epsilon <= 8.0 + 1e-6 and len(losses) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    trained = [p.detach().clone() for p in model.parameters()]
    fixed_noise = HospitalPrivacy(tmp_path / "ledger.json", DPConfig(max_epsilon=8.0, noise_multiplier=1.0))
    with pytest.raises(BudgetExhausted):
        train_adaptors_dp(model, x, y, prompts, TrainConfig(epochs=3, batch_size=100), fixed_noise, 1, ("run", 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(trained, model.parameters()))  # declined before touching anything
    assert len(HospitalPrivacy(tmp_path / "ledger.json", DPConfig(max_epsilon=8.0)).spent) == 1
