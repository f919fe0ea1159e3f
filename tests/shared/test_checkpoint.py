import json

import pytest
import torch

from shared.checkpoint import SIDECAR, WEIGHTS, load_checkpoint, save_checkpoint
from shared.config import AdaptorConfig
from shared.errors import RetuneError
from shared.model import RetuneModel
from shared.prompts import PromptBank


def _perturbed(model: RetuneModel, seed: int) -> RetuneModel:
    """``model`` with every parameter moved by seeded noise: adaptors start as the identity, so a fresh model has
    the same weights as any other and a loader that loads nothing would go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    return model


@pytest.mark.parametrize("kind", ["mlp", "linear", "residual"])
def test_round_trip_keeps_weights_prompts_and_config(tmp_path, kind):
    config = AdaptorConfig(kind=kind, logit_scale=4.0)
    model = _perturbed(RetuneModel(16, config), seed=1)
    bank = PromptBank(("Edema", "Atelectasis"), overrides={"Edema": {"positive": ["wet"], "negative": ["dry"]}})
    save_checkpoint(tmp_path, model, bank, {"spec": "x", "identity": "abc"})
    sidecar = json.loads((tmp_path / SIDECAR).read_text())
    assert sidecar["diseases"] == ["Edema", "Atelectasis"] and sidecar["embed_dim"] == 16
    loaded, loaded_bank, meta = load_checkpoint(tmp_path)
    assert loaded.config == model.config and loaded_bank.texts() == bank.texts()
    assert meta["backbone"]["identity"] == "abc"
    saved, fresh = model.state_dict(), RetuneModel(16, config).state_dict()
    assert set(loaded.state_dict()) == set(saved)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[name]), name  # what was saved came back ...
        assert not torch.equal(value, fresh[name]), name  # ... and is not what a fresh model starts with
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.image_adaptor(x), model.image_adaptor(x))


def test_missing_or_mismatched_files_are_clear_errors(tmp_path):
    with pytest.raises(RetuneError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, RetuneModel(16), PromptBank(("A",)), {})
    sidecar = json.loads((tmp_path / SIDECAR).read_text())
    sidecar["embed_dim"] = 32
    (tmp_path / SIDECAR).write_text(json.dumps(sidecar))
    with pytest.raises(RetuneError, match="do not match"):
        load_checkpoint(tmp_path)
    assert (tmp_path / WEIGHTS).exists()
