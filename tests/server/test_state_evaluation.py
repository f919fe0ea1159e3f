import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from sklearn.metrics import roc_auc_score

from server.evaluation import federated_metrics, pairs_weighted_auroc
from server.state import STATE, RunState
from shared.config import AdaptorConfig, FederationConfig
from shared.errors import RetuneError
from shared.model import RetuneModel
from shared.wire import to_record


def _random_record(seed: int) -> ArrayRecord:
    """Adaptors with seeded random weights: a fresh RetuneModel is the identity map, the same for every seed, so
    a resumed state holding fresh adaptors instead of the committed ones would otherwise go unnoticed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return to_record(RetuneModel(8, AdaptorConfig(init="random")))


def _assert_same_arrays(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert set(got.keys()) == set(expected.keys())
    for key, array in expected.items():
        assert got[key].dtype == array.dtype == "float32", key
        assert np.array_equal(got[key].numpy(), array.numpy()), key


def _differ(a: ArrayRecord, b: ArrayRecord) -> bool:
    return all(not np.array_equal(a[key].numpy(), b[key].numpy()) for key in a.keys())


def test_state_commits_atomically_and_resumes(tmp_path):
    config = FederationConfig(stages=2, rounds_per_stage=2, run_dir=str(tmp_path), strategy="fedadam")
    first, second, third = (_random_record(seed) for seed in (1, 2, 3))
    assert _differ(first, second) and _differ(second, third) and _differ(first, third)
    state = RunState.open(config, first)
    assert (state.stage, state.round, state.server_round) == (0, 0, 0)
    state.commit(second, {"m/x": np.ones(3, dtype=np.float32)}, {"macro_auroc": 0.6})
    state.commit(third, {"m/x": np.full(3, 2, dtype=np.float32)}, {"macro_auroc": 0.7})
    assert (state.stage, state.round) == (1, 0)
    resumed = RunState.open(config, first)
    assert (resumed.stage, resumed.round, resumed.server_round) == (1, 0, 2)
    assert [r["macro_auroc"] for r in resumed.history] == [0.6, 0.7]
    _assert_same_arrays(resumed.arrays, third)  # the last committed adaptors, not the initial or an earlier ones
    assert _differ(resumed.arrays, first) and _differ(resumed.arrays, second)
    assert set(resumed.optimizer) == {"m/x"} and resumed.optimizer["m/x"].dtype == np.float32
    assert np.array_equal(resumed.optimizer["m/x"], np.full(3, 2))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["global-00002.safetensors",
                                                                       "optimizer-00002.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / STATE).read_text())["server_round"] == 2


def test_resuming_with_other_settings_is_refused(tmp_path):
    state = RunState.open(FederationConfig(run_dir=str(tmp_path)), to_record(RetuneModel(8)))
    state.commit(state.arrays, {}, {})
    with pytest.raises(RetuneError, match="local-epochs"):
        RunState.open(FederationConfig(run_dir=str(tmp_path), local_epochs=9), to_record(RetuneModel(8)))
    RunState.open(FederationConfig(run_dir=str(tmp_path), round_timeout=5), to_record(RetuneModel(8)))


def test_pairs_weighted_auroc_equals_auroc_over_within_site_pairs():
    """Weighting site AUROCs by pos×neg pairs is exactly the AUROC over all within-site pairs."""
    rng = np.random.default_rng(0)
    sites, wins, pairs = [], 0.0, 0
    for n in (40, 90):
        y = (rng.random(n) < 0.3).astype(int)
        s = rng.normal(size=n) + y
        pos, neg = s[y == 1], s[y == 0]
        wins += (pos[:, None] > neg[None, :]).sum()
        pairs += len(pos) * len(neg)
        sites.append({"auroc/all/A": roc_auc_score(y, s), "pos/all/A": len(pos), "neg/all/A": len(neg)})
    assert pairs_weighted_auroc(sites, "all", ("A",))["A"] == pytest.approx(wins / pairs)


def test_federated_metrics_skip_sites_without_a_disease_and_score_stages():
    sites = [{"auroc/all/A": 0.8, "pos/all/A": 1, "neg/all/A": 1, "auroc/all/B": 0.6, "pos/all/B": 1,
              "neg/all/B": 1, "auroc/s0/A": 0.9, "pos/s0/A": 1, "neg/s0/A": 1},
             {"auroc/all/A": 0.6, "pos/all/A": 1, "neg/all/A": 3}]
    result = federated_metrics(sites, ("A", "B"), 1, [("A",), ("B",)])
    assert result["per_class_auroc"] == {"A": pytest.approx(0.65), "B": pytest.approx(0.6)}
    assert result["macro_auroc"] == pytest.approx(0.625)
    assert result["stage_auroc"] == [pytest.approx(0.9), None]


@pytest.mark.parametrize("tamper", ["zero the adaptors", "edit the history", "drop the seal", "no key", "other key"])
def test_a_tampered_run_folder_is_refused_on_resume(tmp_path, tamper):
    """The attack: change the run folder between two invocations (zero the image adaptor, claim AUROC 0.999) and
    let the server resume and sign it. The seal stops the resumption with a clear error instead."""
    from safetensors.numpy import load_file, save_file

    from shared.signing import generate_keys, load_private_key

    key = load_private_key(generate_keys(tmp_path / "keys")[0])
    config = FederationConfig(stages=2, rounds_per_stage=2, run_dir=str(tmp_path / "run"))
    state = RunState.open(config, _random_record(0), key)
    for seed, auroc in ((1, 0.61), (2, 0.64)):
        state.commit(_random_record(seed), {}, {"macro_auroc": auroc}, key=key)
    untouched = RunState.open(config, None, key)  # untouched: resumes, with the adaptors the seal covers
    assert untouched.history[-1]["macro_auroc"] == 0.64
    _assert_same_arrays(untouched.arrays, _random_record(2))
    path = tmp_path / "run" / STATE
    saved = json.loads(path.read_text())
    opening_key = key
    if tamper == "zero the adaptors":
        arrays = tmp_path / "run" / saved["arrays"]
        save_file({k: np.zeros_like(v) for k, v in load_file(arrays).items()}, arrays)
    elif tamper == "edit the history":
        saved["history"][-1]["macro_auroc"] = 0.999
        path.write_text(json.dumps(saved))
    elif tamper == "drop the seal":
        del saved["seal"]
        path.write_text(json.dumps(saved))
    elif tamper == "no key":
        opening_key = None
    else:
        opening_key = load_private_key(generate_keys(tmp_path / "other")[0])
    with pytest.raises(RetuneError, match="cannot be resumed"):
        RunState.open(config, None, opening_key)


@pytest.mark.parametrize("putback", ["at its own path", "at another path"])
def test_a_run_folder_put_back_from_before_its_last_sealed_round_is_refused(tmp_path, putback):
    """The attack the seal alone cannot see: copy the run folder after round 1 (validly sealed), let the run go
    on, then put the copy back, where it was or anywhere else, and resume. The key holder's register remembers that
    round 2 was sealed in that folder (by the folder's own identity, not its path)."""
    import shutil

    from server.state import SealRegister
    from shared.signing import generate_keys, load_private_key

    key = load_private_key(generate_keys(tmp_path / "keys")[0])
    seals = SealRegister(tmp_path / "runtime" / "seals.json")
    config = FederationConfig(stages=2, rounds_per_stage=2, run_dir=str(tmp_path / "run"))
    state = RunState.open(config, _random_record(0), key, seals)
    state.commit(_random_record(1), {}, {"macro_auroc": 0.6}, key=key)
    shutil.copytree(tmp_path / "run", tmp_path / "after-round-1")
    state.commit(_random_record(2), {}, {"macro_auroc": 0.7}, key=key)
    assert RunState.open(config, None, key, seals).server_round == 2  # the latest folder resumes
    where = tmp_path / ("run" if putback == "at its own path" else "run-b")
    if putback == "at its own path":
        shutil.rmtree(tmp_path / "run")
    shutil.copytree(tmp_path / "after-round-1", where)
    moved = FederationConfig(stages=2, rounds_per_stage=2, run_dir=str(where))
    assert RunState.open(moved, None, key).server_round == 1  # what the seal alone would have let through
    with pytest.raises(RetuneError, match="round 2 was sealed in this run folder"):
        RunState.open(moved, None, key, seals)
    other = FederationConfig(stages=2, rounds_per_stage=2, run_dir=str(tmp_path / "another-run"))
    assert RunState.open(other, _random_record(0), key, seals).server_round == 0  # a new folder starts afresh
