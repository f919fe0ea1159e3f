import numpy as np
import pytest
import torch

from client.centralized import train_centralized
from client.incremental import Split
from client.trainer import Prompts, predict_logits, train_adaptors
from shared.config import TrainConfig
from shared.model import RetuneModel
from shared.prompts import PromptBank
from shared.scenarios import make_tasks

DISEASES = ("A", "B", "C")
DIM = 16


def _synthetic(n: int, seed: int) -> Split:
    """Embeddings whose labels depend on a hidden linear direction per disease (learnable, not zero-shot)."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(len(DISEASES), DIM))
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    labels = (x @ directions.T + 0.5 * rng.normal(size=(n, len(DISEASES))) > 0.3).astype(np.float32)
    return Split(x, labels)


@pytest.fixture
def prompts() -> Prompts:
    bank = PromptBank(DISEASES)
    return Prompts(torch.nn.functional.normalize(torch.randn(len(bank.texts()), DIM, generator=torch.Generator().manual_seed(0)), dim=-1),
                   bank.averaging_matrix())


def test_training_lowers_loss_and_beats_zero_shot(prompts):
    train, test = _synthetic(2000, 0), _synthetic(500, 1)
    run = train_centralized(train, test, prompts, DISEASES, train_config=TrainConfig(epochs=15, batch_size=128))
    assert run.metrics["loss_per_epoch"][0][-1] < run.metrics["loss_per_epoch"][0][0]
    assert run.metrics["macro_auroc"] > 0.9
    assert run.metrics["macro_auroc"] > run.metrics["zero_shot"]["macro_auroc"] + 0.2


def test_training_is_deterministic_by_seed(prompts):
    """The shuffling follows ``TrainConfig.seed``, not torch's global RNG (set differently before each run)."""
    train = _synthetic(300, 0)
    outputs = []
    for global_seed, seed in ((0, 3), (1, 3), (0, 4)):
        torch.manual_seed(global_seed)
        model = RetuneModel(DIM)
        train_adaptors(model, train.embeddings, train.labels, prompts, TrainConfig(epochs=2, seed=seed))
        outputs.append(predict_logits(model, train.embeddings, prompts))
    assert np.array_equal(outputs[0], outputs[1])  # same seed, other global RNG state: the same adaptors
    assert not np.array_equal(outputs[0], outputs[2])  # another seed: another order, other adaptors


def test_rows_without_any_label_are_dropped(prompts):
    """Training with 50 all-unlabelled rows equals training on the labelled rows alone."""
    train = _synthetic(200, 0)
    labels = train.labels.copy()
    labels[:, 1:] = np.nan
    labels[:50] = np.nan
    models = []
    for x, y in ((train.embeddings, labels), (train.embeddings[50:], labels[50:])):
        torch.manual_seed(0)
        models.append(RetuneModel(DIM))
        train_adaptors(models[-1], x, y, prompts, TrainConfig(epochs=2))
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_incremental_scenarios_report_task_matrix_and_forgetting(prompts):
    train, test = _synthetic(900, 0), _synthetic(300, 1)
    for scenario, n_tasks in (("class", 3), ("label", 3), ("data", 3)):
        run = train_centralized(train, test, prompts, DISEASES, scenario=scenario, train_config=TrainConfig(epochs=3),
                                n_tasks=3)
        tasks = make_tasks(scenario, train.labels, len(test.labels), DISEASES, 3, 0)
        assert run.metrics["tasks"] == [t.name for t in tasks] and len(set(run.metrics["tasks"])) == n_tasks
        matrix = run.metrics["task_matrix"]
        assert len(matrix) == n_tasks and all(len(row) == n_tasks for row in matrix)
        assert all(0.0 <= v <= 1.0 for row in matrix for v in row if v is not None)
        assert len(run.metrics["loss_per_epoch"]) == n_tasks, scenario  # one loss curve per task
        # forgetting by hand: best AUROC on an earlier task before the last one, minus its final AUROC
        drops = [max(matrix[i][j] for i in range(j, n_tasks - 1)) - matrix[-1][j] for j in range(n_tasks - 1)]
        transfer = [matrix[-1][j] - matrix[j][j] for j in range(n_tasks - 1)]
        assert run.metrics["forgetting"] == pytest.approx(np.mean(drops)), scenario
        assert run.metrics["backward_transfer"] == pytest.approx(np.mean(transfer)), scenario
