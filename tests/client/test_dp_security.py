"""DP against a curious or malicious server: randomness it cannot derive, a ledger that cannot undercount and
shows any edit, and a round asked again that is answered with the same update, uncharged."""

from __future__ import annotations

import json
import multiprocessing
import random
import time

import numpy as np
import pytest
import torch

from client.audit import AuditLog
from client.dp_random import SecureRandom, poisson_batches
from client.dp_trainer import release_dp_round, train_adaptors_dp
from client.privacy import DP_CHARGE, DPConfig, HospitalPrivacy, LedgerTampered, released_key, spend
from client.trainer import Prompts
from shared.config import AdaptorConfig, TrainConfig
from shared.model import RetuneModel

DIM = 16


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, DIM)).astype(np.float32)
    y = (x[:, :2] > 0).astype(np.float32)
    prompts = Prompts(torch.nn.functional.normalize(torch.randn(8, DIM), dim=-1),
                      torch.kron(torch.eye(4), torch.full((1, 2), 0.5)))
    return x, y, prompts


def _seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_dp_randomness_ignores_every_seed_and_has_the_right_distribution():
    _seed_everything()
    first = SecureRandom()
    _seed_everything()
    second = SecureRandom()
    assert not np.array_equal(first.uniform(16), second.uniform(16))
    u = first.uniform(200_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    g = first.gaussian((400, 500), std=2.5).numpy()
    assert abs(g.std() - 2.5) < 0.02 and abs(g.mean()) < 0.03  # 5 standard errors each (2.5 / √200000 for the mean)
    sizes = [len(b) for b in poisson_batches(1000, 0.2, 400, first)]
    assert abs(np.mean(sizes) - 200) < 2 and np.std(sizes) > 5  # Poisson: batch sizes vary


def test_a_server_that_knows_the_run_config_cannot_recompute_the_noise(tmp_path, data):
    """Everything the server knows (data aside) is the same for both trainings, every seed included: the updates
    differ, so no seed the run config determines reproduces a hospital's noise or batches."""
    x, y, prompts = data
    config = TrainConfig(epochs=2, batch_size=100, lr=0.05, seed=1234)
    updates = []
    for k in range(2):
        _seed_everything(config.seed)
        model = RetuneModel(DIM)
        privacy = HospitalPrivacy(tmp_path / f"ledger-{k}.json", DPConfig(max_epsilon=8.0, noise_multiplier=1.0))
        train_adaptors_dp(model, x, y, prompts, config, privacy, 1, ("run", 0, 0))
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (updates[0] - updates[1]).abs().max() > 1e-3


def _spender(path: str, rounds: int, start: multiprocessing.Event) -> None:
    privacy = HospitalPrivacy(path, DPConfig(max_epsilon=1e6, noise_multiplier=1.0, accountant="rdp"))
    start.wait()
    for r in range(rounds):
        with privacy.round() as ledger:
            entry = spend(1.0, 0.1, 10, "run", 0, r)
            ledger.check(entry)
            time.sleep(0.02)  # a round takes a while: the other process tries meanwhile
            ledger.commit(entry)


def test_two_processes_spending_from_one_ledger_at_once_record_the_exact_sum(tmp_path):
    path = tmp_path / "ledger.json"
    start = multiprocessing.get_context("fork").Event()
    procs = [multiprocessing.get_context("fork").Process(target=_spender, args=(str(path), 4, start))
             for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    ledger = HospitalPrivacy(path, DPConfig(max_epsilon=1e6, noise_multiplier=1.0, accountant="rdp"))
    assert len(ledger.spent) == 8  # not one charge lost
    alone = HospitalPrivacy(tmp_path / "sequential.json", DPConfig(max_epsilon=1e6, noise_multiplier=1.0, accountant="rdp"))
    for r in range(8):
        alone.commit(spend(1.0, 0.1, 10, "run", 0, r))
    assert ledger.epsilon() == pytest.approx(alone.epsilon(), rel=1e-9)


def _three_charges(tmp_path) -> tuple[HospitalPrivacy, AuditLog]:
    audit = AuditLog(tmp_path / "audit.jsonl")
    privacy = HospitalPrivacy(tmp_path / "ledger.json", DPConfig(max_epsilon=8.0, noise_multiplier=1.0), audit)
    for r in range(3):
        with privacy.round() as ledger:
            ledger.commit(spend(1.0, 0.3, 6, "run", 0, r))
    return privacy, audit


@pytest.mark.parametrize("edit", ["drop-middle", "drop-last", "lower-steps", "reorder"])
def test_an_edited_ledger_is_detected(tmp_path, edit):
    privacy, audit = _three_charges(tmp_path)
    assert [e["event"] for e in audit.entries()] == [DP_CHARGE] * 3  # every charge is in the audit log too
    saved = json.loads(privacy.path.read_text())
    entries = saved["entries"]
    if edit == "drop-middle":
        del entries[1]
    elif edit == "drop-last":  # the chain still holds: the audit log shows the charge that went missing
        del entries[2]
    elif edit == "lower-steps":
        entries[0]["steps"] = 1
    else:
        entries[0], entries[1] = entries[1], entries[0]
    privacy.path.write_text(json.dumps(saved))
    with pytest.raises(LedgerTampered):
        HospitalPrivacy(privacy.path, privacy.config, audit)


def test_a_ledger_changed_under_a_round_is_not_committed_to(tmp_path):
    privacy, audit = _three_charges(tmp_path)
    with pytest.raises(LedgerTampered, match="changed while"):
        with privacy.round() as ledger:
            privacy.path.write_text(privacy.path.read_text().replace('"steps": 6', '"steps": 5', 1))
            ledger.commit(spend(1.0, 0.3, 6, "run", 0, 3))


def test_a_round_asked_again_gets_the_same_update_and_no_new_charge(tmp_path, data):
    x, y, prompts = data
    config = TrainConfig(epochs=2, batch_size=100, lr=0.05)
    privacy = HospitalPrivacy(tmp_path / "ledger.json", DPConfig(max_epsilon=8.0, accountant="rdp"),
                              AuditLog(tmp_path / "a.jsonl"))
    key = released_key("run-identity", 0, 0, "digest-of-the-global-adaptors")
    first, other = RetuneModel(DIM), RetuneModel(DIM)
    torch.manual_seed(7)
    again = RetuneModel(DIM, AdaptorConfig(init="random"))  # weights of its own, which the release must replace
    fresh = RetuneModel(DIM).state_dict()
    release = {"prompts": prompts, "config": config, "privacy": privacy, "rounds_left": 2,
               "where": ("run-identity", 0, 0), "count_noise": 5.0}
    examples, reused = release_dp_round(first, x, y, key=key, **release)
    epsilon = privacy.epsilon()
    assert not reused and len(privacy.spent) == 2  # the update's steps and the noisy count, charged together
    assert [s.sample_rate for s in privacy.spent] == [pytest.approx(100 / len(x)), 1.0]
    sent = {name: t.detach().clone() for name, t in first.state_dict().items()}
    kept, kept_examples = privacy.released(key)  # what is kept beside the ledger is exactly what was sent
    assert set(kept) == set(sent) and all(np.array_equal(kept[name], sent[name].numpy()) for name in sent)
    assert kept_examples == examples and examples >= 1
    assert all(not torch.equal(sent[name], fresh[name]) for name in sent)  # trained and noised: not the start
    examples_again, reused = release_dp_round(again, x, y, key=key, **release)
    assert reused and examples_again == examples and privacy.epsilon() == epsilon and len(privacy.spent) == 2
    for name, value in again.state_dict().items():
        assert torch.equal(value, sent[name]), name
    changed = released_key("run-identity", 0, 0, "other global adaptors")  # same round, other adaptors: a new release
    release_dp_round(other, x, y, key=changed, **release)
    assert len(privacy.spent) == 4


def test_a_dp_hospitals_reply_carries_no_exact_count_and_no_epsilon(tmp_path):
    """In a class-incremental stage the example count is positives + ⌈(N − positives) / 2⌉: exact, it gives the
    training positives of a disease away; a cumulative ε tells of the hospital's other federations. Through the
    installed ClientApp: the count leaves noised (dp-count-noise, charged), no ε or δ leaves at all."""
    from client.site import load_site, site_settings
    from deploy.redteam.bench import Bench
    from shared.config import FederationConfig
    from shared.continual import stage_examples
    from shared.wire import METRICS, NUM_EXAMPLES

    bench = Bench.build(tmp_path, "retune-tiny-random", hospitals=1, images=80, size=32)
    hospital = bench.reset({"dp-max-epsilon": 100.0, "dp-count-noise": 10.0, "dp-accountant": "rdp"})[0]
    runs = [{"scenario": "class", "stages": 5, "wire-dtype": "float32", "run-dir": f"runs/{k}"} for k in range(4)]
    config = FederationConfig.from_run_config(runs[0])
    site = load_site(config, site_settings(config, hospital.node_config))
    _, labels = stage_examples(site.tasks, 0, site.train.labels, site.diseases, config.continual_method)
    exact = int((~np.isnan(labels)).any(axis=1).sum())
    counts = []
    for k, run in enumerate(runs):
        hospital.join(10 + k, run)
        reply = bench.send(hospital, "train", bench.initial(run, 128), run, 10 + k)
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content[METRICS].keys()) == {NUM_EXAMPLES}
        counts.append(int(reply.content[METRICS][NUM_EXAMPLES]))
    assert counts != [exact] * 4 and all(c >= 1 for c in counts)  # exact four times: p ≈ 3e-6 with σ = 10
    ledger = json.loads((hospital.folder / "state" / "privacy-ledger.json").read_text())["entries"]
    assert [(e["sample_rate"], e["steps"], e["noise_multiplier"]) for e in ledger[1::2]] == [(1.0, 1, 10.0)] * 4
