import pytest
import torch

from shared.backbone import BIOMEDCLIP, load_backbone, resolve_spec
from shared.errors import RetuneError


def test_random_backbone_is_frozen_and_labelled(tiny_backbone):
    assert tiny_backbone.embed_dim == 128  # read from the model, not a constant elsewhere
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())
    assert not tiny_backbone.model.training
    assert "RANDOMLY INITIALISED" in tiny_backbone.label and not tiny_backbone.pretrained
    texts = tiny_backbone.encode_texts(["No evidence of edema", "Findings consistent with edema"])
    assert texts.shape == (2, 128)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_random_init_is_reproducible(tiny_backbone):
    again = load_backbone("retune-tiny-random", device="cpu")
    assert again.identity == tiny_backbone.identity


def test_spec_resolution(tmp_path):
    assert resolve_spec("biomedclip") == (BIOMEDCLIP, "")
    assert resolve_spec("hf-hub:org/model") == ("hf-hub:org/model", "")
    assert resolve_spec(str(tmp_path)) == (f"local-dir:{tmp_path.resolve()}", "")
    assert resolve_spec("ViT-B-32:openai") == ("ViT-B-32", "openai")
    with pytest.raises(RetuneError, match="unknown backbone"):
        resolve_spec("no-such-model")


def test_local_directory_round_trip(tmp_path, tiny_backbone):
    """A staged local directory (open_clip_config.json + weights) loads the same weights offline."""
    import json

    import open_clip

    cfg = open_clip.get_model_config("retune-tiny-random")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(tiny_backbone.model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    staged = load_backbone(str(tmp_path), device="cpu")
    assert staged.pretrained and staged.embed_dim == tiny_backbone.embed_dim
    prompt = ["No signs of atelectasis"]
    assert torch.allclose(staged.encode_texts(prompt), tiny_backbone.encode_texts(prompt), atol=1e-6)


def test_identity_follows_the_weights(tmp_path, tiny_backbone):
    """Embeddings are cached per identity: the same folder with one weight changed is another backbone (an identity
    of the name alone would serve it the old embeddings), the same weights again the same one."""
    import json

    import open_clip

    cfg = open_clip.get_model_config("retune-tiny-random")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    state = tiny_backbone.model.state_dict()
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    first = load_backbone(str(tmp_path), device="cpu").identity
    assert load_backbone(str(tmp_path), device="cpu").identity == first
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    changed = {**state, name: state[name].clone()}
    changed[name].view(-1)[0] += 0.5
    torch.save(changed, tmp_path / "open_clip_pytorch_model.bin")
    assert load_backbone(str(tmp_path), device="cpu").identity != first


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(RetuneError, match="could not load backbone"):
        load_backbone(f"local-dir:{tmp_path / 'absent'}", device="cpu")
