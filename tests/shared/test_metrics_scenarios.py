import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from shared.errors import RetuneError
from shared.metrics import auroc, classification_metrics, forgetting
from shared.scenarios import make_tasks, supervise

DISEASES = ("A", "B", "C")


def test_classification_metrics_mask_missing_labels_and_undefined_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (50, 3)).astype(np.float32)
    labels[:10, 0] = np.nan
    labels[:, 2] = 1.0  # one class only: AUROC undefined
    logits = rng.normal(size=(50, 3)).astype(np.float32)
    metrics = classification_metrics(logits, labels, DISEASES)
    assert metrics["per_class_auroc"]["A"] == pytest.approx(roc_auc_score(labels[10:, 0], logits[10:, 0]))
    assert metrics["per_class_auroc"]["C"] is None
    assert metrics["macro_auroc"] == pytest.approx(np.mean([metrics["per_class_auroc"][d] for d in "AB"]))


def test_auroc_is_sklearns_with_ties_and_imbalance():
    rng = np.random.default_rng(3)
    for trial in range(200):
        n = int(rng.integers(2, 60))
        y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(np.float32)
        y[:2] = [0, 1]  # both classes
        scores = rng.integers(0, 4, n).astype(np.float32) if trial % 2 else rng.normal(size=n).astype(np.float32)
        assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12), trial


def test_forgetting_and_backward_transfer():
    matrix = [[0.9, 0.5], [0.7, 0.8]]
    result = forgetting(matrix)
    assert result["forgetting"] == pytest.approx(0.2)
    assert result["backward_transfer"] == pytest.approx(-0.2)


def test_scenarios_partition_training_rows():
    rng = np.random.default_rng(1)
    labels = (rng.random((300, 3)) < 0.3).astype(np.float32)
    for scenario, n_tasks in (("joint", 1), ("class", 3), ("label", 3), ("data", 4)):
        tasks = make_tasks(scenario, labels, 100, DISEASES, n_tasks=4 if scenario == "data" else None, seed=0)
        assert len(tasks) == n_tasks
        rows = np.concatenate([t.train_rows for t in tasks])
        assert sorted(rows) == list(range(300)), scenario  # disjoint and complete: no replay
    label_tasks = make_tasks("label", labels, 100, DISEASES)
    assert [t.supervised for t in label_tasks] == [("A",), ("A", "B"), ("A", "B", "C")]
    class_tasks = make_tasks("class", labels, 100, DISEASES)
    for t, task in enumerate(class_tasks):
        has_positive = labels[task.train_rows].sum(1) > 0
        assert (labels[task.train_rows][has_positive, t] == 1).all()  # positives belong to their disease's task
    data_tasks = make_tasks("data", labels, 100, DISEASES, n_tasks=4)
    assert sorted(np.concatenate([t.test_rows for t in data_tasks])) == list(range(100))
    grouped = make_tasks("label", labels, 100, DISEASES, n_tasks=2)
    assert [t.supervised for t in grouped] == [("A", "B"), ("A", "B", "C")] and grouped[1].scored == ("C",)
    with pytest.raises(RetuneError):
        make_tasks("class", labels, 100, DISEASES, n_tasks=4)
    with pytest.raises(RetuneError):
        make_tasks("bogus", labels, 100, DISEASES)  # type: ignore[arg-type]


def test_supervise_masks_other_diseases():
    labels = np.ones((2, 3), dtype=np.float32)
    masked = supervise(labels, DISEASES, ("B",))
    assert np.isnan(masked[:, [0, 2]]).all() and (masked[:, 1] == 1).all()
