"""LoRA inside the frozen backbone: which modules peft adapts, what trains, what is saved and sent, and that an
adapted tower starts as the frozen one and learns while the backbone stays put."""

import numpy as np
import pytest
import torch

from client.trainer import Prompts, predict_logits, train_adaptors
from shared.config import AdaptorConfig, FederationConfig, LoraConfig, TrainConfig
from shared.errors import RetuneError
from shared.lora import adapted_tower, resolve_targets
from shared.model import build_model, zero_shot_logits
from shared.prompts import PromptBank
from shared.wire import adaptor_spec, load_record, to_record
from tests.conftest import tiny_resnet_clip

LORA = LoraConfig(rank=4, alpha=8, dropout=0.0)


def test_the_attention_pool_calls_its_projections_and_gives_the_frozen_embeddings():
    clip = tiny_resnet_clip()
    images = torch.randn(5, 3, 32, 32)
    tower = adapted_tower(clip, "image", LORA)
    calls = []
    tower.visual.attnpool.q_proj.register_forward_hook(lambda *args: calls.append("q"))
    with torch.no_grad():
        torch.testing.assert_close(tower(images), torch.nn.functional.normalize(clip.encode_image(images), dim=-1),
                                   rtol=1e-5, atol=1e-5)
    assert calls == ["q"]  # LoRA's wrapper of q_proj ran: B = 0 at the start, so the output is the frozen one


def test_targets_resolve_to_each_towers_own_names_and_a_wrong_one_is_named():
    clip = tiny_resnet_clip()
    assert resolve_targets(clip.visual, ("q_proj", "v_proj")) == ["attnpool.q_proj", "attnpool.v_proj"]
    text = [n for n in resolve_targets(clip.transformer, ("q_proj", "v_proj"))]
    assert text == ["resblocks.0.attn"]  # open_clip's text transformer: a MultiheadAttention
    # Only attention projections: a run config cannot put LoRA on the stem convolution (which sees raw pixel
    # patches), an MLP or an embedding.
    for target in ("conv1", "c_proj", "qq_proj", "token_embedding"):
        with pytest.raises(RetuneError, match=f"LoRA target '{target}': LoRA adapts the attention's projections only"):
            resolve_targets(clip.visual, (target,))
    with pytest.raises(RetuneError, match="'query' matches no attention projection"):
        resolve_targets(clip.visual, ("query",))


@pytest.mark.parametrize("kind", ["lora", "both"])
def test_only_lora_matrices_and_adaptors_train_are_saved_and_cross_the_wire(kind):
    clip = tiny_resnet_clip()
    model = build_model(16, AdaptorConfig(), kind, LORA, clip)
    names = set(model.state_dict())
    lora = {n for n in names if ".lora_" in n}
    assert lora == {f"image_tower.visual.attnpool.{p}_proj.lora_{m}.default.weight" for p in "qv" for m in "AB"}
    assert (names - lora == set()) == (kind == "lora")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names
    assert set(adaptor_spec(model)) == names  # the wire allow-list is derived from the model
    lora_size = 4 * 4 * 256  # q and v, A and B, rank 4, the pool's width 256
    assert sum(p.numel() for p in model.trainable()) == (lora_size if kind == "lora" else
                                                         lora_size + 2 * (16 * 32 + 32 + 32 * 16 + 16))
    # A round trip through the wire loads the LoRA matrices (random values, not the initial zeros of B).
    sender = build_model(16, AdaptorConfig(), kind, LORA, clip)
    for p in sender.trainable():
        p.data.normal_()
    received = load_record(build_model(16, AdaptorConfig(), kind, LORA, clip), to_record(sender, "float32"))
    for name, value in sender.state_dict().items():
        torch.testing.assert_close(received.state_dict()[name], value)
    assert not torch.equal(received.state_dict()[next(iter(lora))], model.state_dict()[next(iter(lora))])
    with pytest.raises(RuntimeError, match="missing keys"):
        model.load_state_dict({k: v for k, v in sender.state_dict().items() if "lora_B" not in k})
    # A checkpoint or message smuggling backbone weights in is refused, strict or not: the tower stays frozen.
    stem = "image_tower.visual.conv1.weight"
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="frozen backbone weights"):
            model.load_state_dict({**sender.state_dict(), stem: torch.zeros(8, 3, 3, 3)}, strict=strict)
    assert torch.equal(model.image_tower.visual.conv1.weight, clip.visual.conv1.weight)
    assert model.adapted_modules == {"image": ["attnpool.q_proj", "attnpool.v_proj"]}


def test_lora_starts_at_zero_shot_and_learns_while_the_backbone_stays_frozen():
    clip = tiny_resnet_clip()
    frozen = {k: v.clone() for k, v in clip.state_dict().items()}
    bank = PromptBank(("A", "B"))
    prompt_emb = torch.nn.functional.normalize(  # seeded: the global RNG's state depends on earlier tests
        torch.randn(len(bank.texts()), 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    prompts = Prompts(prompt_emb, bank.averaging_matrix())
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(64, 3, 32, 32)).astype(np.float32)
    labels = (pixels[:, 0, :16].mean(axis=(1, 2)) > 0)[:, None].repeat(2, axis=1).astype(np.float32)
    model = build_model(16, AdaptorConfig(), "lora", LORA, clip)
    with torch.no_grad():
        zero = zero_shot_logits(torch.nn.functional.normalize(clip.encode_image(torch.as_tensor(pixels)), dim=-1),
                                prompt_emb, prompts.averaging)
    np.testing.assert_allclose(predict_logits(model, pixels, prompts), 10.0 * zero.numpy(), atol=1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_adaptors(model, pixels, labels, prompts, TrainConfig(epochs=15, batch_size=64, lr=5e-3))
    assert np.mean(losses[-3:]) < 0.75 * losses[0]
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "lora_B" in k)
    for key, value in clip.state_dict().items():  # weights and batch-norm statistics of the backbone
        assert torch.equal(value, frozen[key]), key
    for key, value in model.image_tower.visual.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, frozen[f"visual.{key}".replace(".base_layer", "")]), key


def test_run_config_refuses_bad_lora_settings_and_lists_the_kinds():
    assert FederationConfig().lora_config() is None
    lora = FederationConfig(adaptor_kind="both", lora_targets="q_proj, v_proj", lora_towers="image,text").lora_config()
    assert lora == LoraConfig(targets=("q_proj", "v_proj"), towers=("image", "text"))
    assert LoraConfig() == LoraConfig(rank=64, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))  # PeFoMed's
    with pytest.raises(RetuneError, match="unknown adaptor-kind 'loraa': choose retune, lora, both"):
        FederationConfig(adaptor_kind="loraa")
    with pytest.raises(RetuneError, match="lora-rank must be at least 1"):
        FederationConfig(adaptor_kind="lora", lora_rank=0)
    with pytest.raises(RetuneError, match="lora-towers 'vision'"):
        FederationConfig(adaptor_kind="lora", lora_towers="vision")
