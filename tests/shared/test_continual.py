"""Learning without forgetting and replay: which diseases are distilled, with what targets, which rows a stage
trains on with which labels, and that each method keeps the old diseases while a class-incremental stage trains a
new one."""

import numpy as np
import pytest
import torch

from client.incremental import Split, run_scenario
from client.trainer import Prompts, predict_logits, stage_targets, train_adaptors
from shared.config import FederationConfig, TrainConfig
from shared.continual import lwf_targets, old_diseases, stage_examples
from shared.errors import RetuneError
from shared.model import RetuneModel, masked_bce
from shared.prompts import PromptBank
from shared.scenarios import make_tasks, supervise

DISEASES = ("A", "B", "C")


def test_only_diseases_an_earlier_stage_supervised_and_this_one_does_not_are_old():
    labels = np.random.default_rng(0).integers(0, 2, (60, 3)).astype(np.float32)
    classes, label_tasks, data_tasks = (make_tasks(s, labels, 20, DISEASES, None if s != "data" else 3)
                                        for s in ("class", "label", "data"))
    assert [old_diseases(classes, t) for t in range(3)] == [(), ("A",), ("A", "B")]
    assert all(old_diseases(label_tasks, t) == () for t in range(3))  # supervision accumulates
    assert all(old_diseases(data_tasks, t) == () for t in range(3))  # every disease, every stage
    assert FederationConfig(scenario="class").continual_method == "replay"
    assert FederationConfig(scenario="label").continual_method == "replay"
    assert FederationConfig(scenario="data").continual_method == "none"
    assert FederationConfig(scenario="class", continual="none").continual_method == "none"
    with pytest.raises(RetuneError, match="unknown continual 'ewc2'"):
        FederationConfig(continual="ewc2")


def test_lwf_targets_fill_only_unlabelled_old_entries_with_the_teachers_probability():
    labels = np.array([[1.0, np.nan, 0.0], [np.nan, np.nan, 1.0], [0.0, 1.0, np.nan]], dtype=np.float32)
    teacher = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    targets = lwf_targets(labels, teacher, DISEASES, ("A", "B"), 0.5)
    sigmoid = 1 / (1 + np.exp(-teacher))
    expected = np.array([[1.0, sigmoid[0, 1], 0.0], [sigmoid[1, 0], sigmoid[1, 1], 1.0], [0.0, 1.0, np.nan]])
    np.testing.assert_allclose(targets.labels, expected, rtol=1e-6)
    np.testing.assert_array_equal(targets.weights, [[1, 0.5, 1], [0.5, 0.5, 1], [1, 1, 1]])
    assert lwf_targets(labels, teacher, DISEASES, (), 0.5).weights is None  # nothing old: labels as they are


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    dim, n = 16, 400
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    directions = rng.normal(size=(3, dim))
    labels = (x @ directions.T + 0.3 * rng.normal(size=(n, 3)) > 0.4).astype(np.float32)
    bank = PromptBank(DISEASES)
    prompts = Prompts(torch.nn.functional.normalize(torch.randn(len(bank.texts()), dim,
                                                                generator=torch.Generator().manual_seed(seed)), dim=-1),
                      bank.averaging_matrix())
    return x, labels, prompts


def test_with_lwf_the_old_diseases_scores_move_less_while_the_new_one_learns():
    x, labels, prompts = _problem()
    train, test = Split(x[:300], labels[:300]), Split(x[300:], labels[300:])
    tasks = make_tasks("class", train.labels, len(test.labels), DISEASES)
    config = TrainConfig(epochs=40, batch_size=64, lr=3e-3, seed=0)
    moved = {}
    for method in ("none", "lwf"):
        torch.manual_seed(0)
        model = RetuneModel(16)
        # stage 1: disease A
        run_scenario(model, tasks[:1], train=train, test=test, prompts=prompts, diseases=DISEASES, config=config)
        before = predict_logits(model, test.embeddings, prompts)
        rows = tasks[1].train_rows  # stage 2: disease B only
        labels_b = supervise(train.labels[rows], DISEASES, tasks[1].supervised)
        targets = stage_targets(model, train.embeddings[rows], labels_b, prompts, DISEASES, tasks, 1, method, 1.0)
        assert (targets.weights is None) == (method == "none")
        train_adaptors(model, train.embeddings[rows], targets.labels, prompts, config, weights=targets.weights)
        after = predict_logits(model, test.embeddings, prompts)
        moved[method] = (float(np.abs(after[:, 0] - before[:, 0]).mean()), float(np.abs(after[:, 1] - before[:, 1]).mean()))
    assert moved["lwf"][0] < 0.5 * moved["none"][0]  # disease A's scores held
    assert moved["lwf"][1] > 0.5 * moved["none"][1]  # disease B still learns


def test_replay_trains_a_stage_on_every_earlier_stages_rows_each_with_its_own_stages_labels():
    labels = np.random.default_rng(1).integers(0, 2, (90, 3)).astype(np.float32)
    tasks = make_tasks("class", labels, 30, DISEASES)
    for method in ("none", "lwf"):  # the stage's own rows, its diseases only
        rows, masked = stage_examples(tasks, 2, labels, DISEASES, method)
        np.testing.assert_array_equal(rows, tasks[2].train_rows)
        np.testing.assert_array_equal(masked, supervise(labels[rows], DISEASES, ("C",)))
    rows, masked = stage_examples(tasks, 2, labels, DISEASES, "replay")
    np.testing.assert_array_equal(rows, np.concatenate([t.train_rows for t in tasks]))
    start = 0
    for task in tasks:
        part = masked[start:start + len(task.train_rows)]
        np.testing.assert_array_equal(part, supervise(labels[task.train_rows], DISEASES, task.supervised))
        start += len(task.train_rows)
    rows, _ = stage_examples(tasks, 0, labels, DISEASES, "replay")
    np.testing.assert_array_equal(rows, tasks[0].train_rows)  # nothing earlier to replay


def test_replay_trains_the_earlier_stages_images_on_their_own_labels_during_a_later_stage():
    x, labels, prompts = _problem()
    train, test = Split(x[:300], labels[:300]), Split(x[300:], labels[300:])
    tasks = make_tasks("class", train.labels, len(test.labels), DISEASES)
    config = TrainConfig(epochs=40, batch_size=64, lr=3e-3, seed=0)
    first = torch.as_tensor(supervise(train.labels[tasks[0].train_rows], DISEASES, tasks[0].supervised))
    loss = {}
    for method in ("none", "lwf", "replay"):
        torch.manual_seed(0)
        model = RetuneModel(16)
        run_scenario(model, tasks[:2], train=train, test=test, prompts=prompts, diseases=DISEASES, config=config,
                     continual=method, lwf_weight=1.0)
        logits = torch.as_tensor(predict_logits(model, train.embeddings[tasks[0].train_rows], prompts))
        loss[method] = float(masked_bce(logits, first))  # disease A on stage 1's images, after stage 2
    assert loss["replay"] < 0.5 * loss["lwf"] and loss["replay"] < 0.5 * loss["none"]
