import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.model import RetuneModel
from shared.wire import (ARRAYS, METRICS, NUM_EXAMPLES, SITE, WireError, adaptor_spec, check_reply, load_record,
                         payload_bytes, site_of, site_record, to_record)

IDENTITY = "ab" * 32


def _reply(model, **metrics):
    return RecordDict({ARRAYS: to_record(model), METRICS: MetricRecord({NUM_EXAMPLES: 10, **metrics}),
                       SITE: site_record("hospital-3", IDENTITY)})


def _perturbed(model: RetuneModel, seed: int) -> RetuneModel:
    """``model`` with seeded noise on every parameter (a fresh model is the identity map, the same every time)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    return model


def test_round_trip_and_payload_size():
    model = _perturbed(RetuneModel(8), seed=1)
    record = to_record(model)
    assert {a.dtype for a in record.values()} == {"float32"}
    fresh = {k: v.clone() for k, v in RetuneModel(8).state_dict().items()}
    copy = load_record(RetuneModel(8), record)
    sent = model.state_dict()
    assert set(copy.state_dict()) == set(sent)
    for name, value in copy.state_dict().items():
        assert torch.equal(value, sent[name]), name  # the receiver holds what was sent ...
        assert not torch.equal(value, fresh[name]), name  # ... not the weights it started with
    n_params = sum(p.numel() for p in model.parameters())
    header = payload_bytes(record) - 4 * n_params
    assert 0 < header <= 128 * len(record)  # float32 payload plus one small npy header per array


def test_allow_list_accepts_adaptors_and_scalars():
    model = RetuneModel(8)
    check_reply(_reply(model, **{"train-loss": 0.3}), adaptor_spec(model))
    check_reply(RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 3, "auroc/all/Edema": 0.7}),
                            SITE: site_record("St_Mary.2", IDENTITY)}), None)
    assert site_of(_reply(model)) == ("hospital-3", IDENTITY)


@pytest.mark.parametrize("tamper", ["extra_array", "shape", "dtype", "extra_record", "no_count", "embeddings",
                                    "no_site", "site_free_text", "site_long_name", "site_not_hex", "site_extra"])
def test_allow_list_refuses_anything_else(tamper):
    model = RetuneModel(8)
    spec = adaptor_spec(model)
    reply = _reply(model)
    arrays = {k: a.numpy() for k, a in reply[ARRAYS].items()}
    if tamper == "extra_array":
        arrays["image_embeddings"] = np.zeros((4, 8), dtype=np.float32)
    elif tamper == "shape":
        arrays["image_adaptor.net.0.bias"] = np.zeros(3, dtype=np.float32)
    elif tamper == "dtype":
        arrays["image_adaptor.net.0.bias"] = arrays["image_adaptor.net.0.bias"].astype(np.float64)
    reply[ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    if tamper == "extra_record":
        reply["config"] = ConfigRecord({"patient": "x"})
    elif tamper == "no_count":
        reply[METRICS] = MetricRecord({"train-loss": 1.0})
    elif tamper == "embeddings":
        reply[METRICS] = MetricRecord({NUM_EXAMPLES: 1, "leak": [0.1, 0.2]})
    elif tamper == "no_site":
        del reply[SITE]
    elif tamper == "site_free_text":  # a name field used to carry a patient's details out
        reply[SITE] = ConfigRecord({"name": "Jane Doe, 1961-04-02, effusion", "backbone": IDENTITY})
    elif tamper == "site_long_name":
        reply[SITE] = ConfigRecord({"name": "h" * 65, "backbone": IDENTITY})
    elif tamper == "site_not_hex":
        reply[SITE] = ConfigRecord({"name": "hospital-3", "backbone": "patient:" + "0" * 56})
    elif tamper == "site_extra":
        reply[SITE] = ConfigRecord({"name": "hospital-3", "backbone": IDENTITY, "note": "x"})
    with pytest.raises(WireError):
        check_reply(reply, spec)
