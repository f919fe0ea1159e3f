import json

import pytest
import torch

from shared.checkpoint import SIDECAR, WEIGHTS, load_checkpoint, save_checkpoint
from shared.config import AdaptorConfig
from shared.errors import RetuneError
from shared.model import RetuneModel
from shared.prompts import PromptBank


def test_round_trip_keeps_weights_prompts_and_config(tmp_path):
    torch.manual_seed(0)
    model = RetuneModel(16, AdaptorConfig(kind="residual", logit_scale=4.0))
    bank = PromptBank(("Edema", "Atelectasis"), overrides={"Edema": {"positive": ["wet"], "negative": ["dry"]}})
    save_checkpoint(tmp_path, model, bank, {"spec": "x", "identity": "abc"})
    sidecar = json.loads((tmp_path / SIDECAR).read_text())
    assert sidecar["diseases"] == ["Edema", "Atelectasis"] and sidecar["embed_dim"] == 16
    loaded, loaded_bank, meta = load_checkpoint(tmp_path)
    assert loaded.config == model.config and loaded_bank.texts() == bank.texts()
    assert meta["backbone"]["identity"] == "abc"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


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
