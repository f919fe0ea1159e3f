"""Consortium signatures: key files, signed checkpoints, signed rounds and sealed run state."""

from __future__ import annotations

import json
import stat
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from shared.checkpoint import SIDECAR, WEIGHTS, load_checkpoint, save_checkpoint
from shared.config import AdaptorConfig
from shared.errors import RetuneError
from shared.model import RetuneModel
from shared.prompts import PromptBank
from shared.signing import (ARRAYS_SIGNATURE, PRIVATE_KEY, PUBLIC_KEY, SIGNATURE, RoundBinding, SignatureError,
                            arrays_digest, check_seal, generate_keys, key_id, load_private_key, load_public_key, seal,
                            sign_checkpoint, sign_round, verify_checkpoint, verify_round)
from shared.wire import to_record


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return generate_keys(folder)


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    return generate_keys(tmp_path_factory.mktemp("other"))


def _random_model(seed: int = 0) -> RetuneModel:
    """Seeded random adaptors (a fresh model is the identity map, the same for every seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RetuneModel(8, AdaptorConfig(init="random"))


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "ckpt", _random_model(), PromptBank(("Edema", "Atelectasis")),
                           {"spec": "x", "identity": "abc"})


def test_key_files_are_pem_and_private_key_is_owner_only(keys, tmp_path):
    private, public = keys
    assert private.name == PRIVATE_KEY and public.name == PUBLIC_KEY
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert key_id(load_private_key(private)) == key_id(public) and len(key_id(public)) == 16
    with pytest.raises(RetuneError, match="already holds"):
        generate_keys(private.parent)
    with pytest.raises(RetuneError, match="not an Ed25519 public key"):
        load_public_key(private)
    with pytest.raises(RetuneError, match="does not exist"):
        load_private_key(tmp_path / "nope.key")


def test_checkpoint_round_trip(keys, checkpoint):
    private, public = keys
    sig = sign_checkpoint(checkpoint, private)
    assert sig == checkpoint / SIGNATURE and json.loads(sig.read_text())["key_id"] == key_id(public)
    verify_checkpoint(checkpoint, public)
    loaded, _, _ = load_checkpoint(checkpoint)  # the signature file does not disturb loading
    saved, fresh = _random_model().state_dict(), RetuneModel(8, loaded.config).state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[name]) and not torch.equal(value, fresh[name]), name


@pytest.mark.parametrize("tamper", ["weights", "sidecar", "signature", "unsigned", "garbled"])
def test_tampered_or_unsigned_checkpoint_is_refused(keys, checkpoint, tamper):
    private, public = keys
    sign_checkpoint(checkpoint, private)
    if tamper == "weights":
        data = bytearray((checkpoint / WEIGHTS).read_bytes())
        data[-1] ^= 1  # one bit of one weight
        (checkpoint / WEIGHTS).write_bytes(bytes(data))
    elif tamper == "sidecar":
        sidecar = json.loads((checkpoint / SIDECAR).read_text())
        sidecar["diseases"] = ["Edema", "Pneumothorax"]
        (checkpoint / SIDECAR).write_text(json.dumps(sidecar))
    elif tamper == "signature":
        body = json.loads((checkpoint / SIGNATURE).read_text())
        body["signature"] = body["signature"][:10] + ("A" if body["signature"][10] != "A" else "B") + \
            body["signature"][11:]
        (checkpoint / SIGNATURE).write_text(json.dumps(body))
    elif tamper == "unsigned":
        (checkpoint / SIGNATURE).unlink()
    else:
        (checkpoint / SIGNATURE).write_text("not json")
    with pytest.raises(SignatureError):
        verify_checkpoint(checkpoint, public)


def test_checkpoint_signed_by_another_key_is_refused(keys, other_keys, checkpoint):
    sign_checkpoint(checkpoint, other_keys[0])
    with pytest.raises(SignatureError, match="signed by key"):
        verify_checkpoint(checkpoint, keys[1])
    body = json.loads((checkpoint / SIGNATURE).read_text())
    del body["key_id"]  # without the hint the signature itself still fails
    (checkpoint / SIGNATURE).write_text(json.dumps(body))
    with pytest.raises(SignatureError, match="does not match"):
        verify_checkpoint(checkpoint, keys[1])


BINDING = RoundBinding(run_id=7, run="run-identity", stage=1, round=2, kind="train")


def test_round_signatures_cover_the_arrays_and_the_round(keys, other_keys):
    private, public = keys
    record = to_record(RetuneModel(8))
    signature = sign_round(record, BINDING, private)
    assert len(signature) == 64
    verify_round(record, BINDING, signature, public)
    # the digest is about the values, not the serialisation or the order of the arrays
    rebuilt = ArrayRecord({k: Array(np.array(record[k].numpy())) for k in reversed(list(record.keys()))})
    assert arrays_digest(rebuilt) == arrays_digest(record)
    verify_round(rebuilt, BINDING, signature, load_public_key(public))

    arrays = {k: np.array(a.numpy()) for k, a in record.items()}
    name = next(iter(arrays))
    changed = dict(arrays)
    changed[name] = arrays[name].copy()
    changed[name].flat[0] += 1e-6
    renamed = {("x" + k if k == name else k): v for k, v in arrays.items()}
    recast = {**arrays, name: arrays[name].astype(np.float64)}
    reshaped = {**arrays, name: arrays[name].reshape(-1)}
    for tampered in (changed, renamed, recast, reshaped):
        with pytest.raises(SignatureError, match="does not verify"):
            verify_round(ArrayRecord({k: Array(v) for k, v in tampered.items()}), BINDING, signature, public)
    for field, value in (("run_id", 8), ("run", "other"), ("stage", 0), ("round", 3), ("kind", "evaluate")):
        with pytest.raises(SignatureError, match="replayed or re-targeted"):
            verify_round(record, replace(BINDING, **{field: value}), signature, public)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_round(record, BINDING, signature, other_keys[1])
    with pytest.raises(SignatureError, match="no consortium signature"):
        verify_round(record, BINDING, None, public)


def test_a_run_state_seal_covers_the_state_and_its_files(keys, other_keys):
    private, public = keys
    state = {"stage": 1, "round": 0, "history": [{"macro_auroc": 0.71}], "arrays": "global-00003.safetensors"}
    files = {"global-00003.safetensors": b"adaptor bytes"}
    sealed = {**state, "seal": seal(state, files, private)}
    check_seal(sealed, files, public)
    edited = {**sealed, "history": [{"macro_auroc": 0.999}]}
    for bad_state, bad_files, key in ((edited, files, public), (sealed, {"global-00003.safetensors": b"zeros"}, public),
                                      (sealed, files, other_keys[1]), (state, files, public)):
        with pytest.raises(SignatureError):
            check_seal(bad_state, bad_files, key)


def test_signature_survives_flowers_object_transport(keys):
    """Deflate the server's content into Flower's transported objects and inflate it as a SuperNode does."""
    private, public = keys
    record = to_record(RetuneModel(8))
    content = RecordDict({"arrays": record, "config": ConfigRecord({
        ARRAYS_SIGNATURE: sign_round(record, BINDING, private), "stage": 1, "round": 2})})
    wire = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(content).items()}
    received = inflate_object_from_contents(content.object_id, wire)
    assert received["arrays"] is not record
    verify_round(received["arrays"], BINDING, received["config"][ARRAYS_SIGNATURE], public)
