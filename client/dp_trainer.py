"""DP-SGD of the adaptors: exact per-sample clipping of both adaptors; noise and sampling the server cannot derive.

The text adaptor is trained on private labels too, so its parameters need per-sample clipping, yet all samples
share its output. Rather than giving every sample its own copy of the prompt rows (B × R rows through the text
adaptor), :meth:`client.dp_clip.PerSampleRetune.clipped_backward` runs it once per batch and clips every sample's
gradient over both adaptors exactly, in one backward pass (see :mod:`client.dp_clip`). It leaves in ``.grad``
what opacus' ghost clipping leaves there, the sum of the clipped per-sample gradients, and opacus' DP optimizer
for that case adds Gaussian noise of σ·C and divides by the expected batch size; opacus' accountant (through
:class:`client.privacy.HospitalPrivacy`) gives ε. The noise and the Poisson sampling come from the hospital's
CSPRNG (:mod:`client.dp_random`), never from a seed: a server that knows the run config cannot regenerate them.
An empty Poisson batch still takes a noise-only step, as the accounting assumes. The round's example count, the
weight the server averages with, leaves noised by the same CSPRNG and charged in the same ledger transaction
(:func:`release_dp_round`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from client.dp_clip import PerSampleRetune
from client.dp_random import SecureNoiseOptimizer, SecureRandom, poisson_batches
from client.privacy import DPConfig, HospitalPrivacy, count_spend, spend
from client.trainer import Prompts
from shared.config import TrainConfig
from shared.model import RetuneModel


class DPRound(NamedTuple):
    """What a DP round produced: mean loss per epoch (stays at the hospital), ε spent so far, and the noisy
    example count to report (None when the round was not asked for one)."""

    losses: list[float]
    epsilon: float
    examples: int | None = None


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson batches per epoch: one pass over the data in expectation (as opacus' sampler)."""
    return max(1, round(1 / sample_rate))


def dp_optimizer(module: PerSampleRetune, optimizer: torch.optim.Optimizer, noise: float, config: DPConfig,
                 expected_batch_size: int, rng: SecureRandom) -> SecureNoiseOptimizer:
    """Opacus' DP optimizer for ``module``'s pre-clipped gradients, its noise from ``rng``."""
    return SecureNoiseOptimizer(optimizer, noise_multiplier=noise, max_grad_norm=config.max_grad_norm,
                                expected_batch_size=expected_batch_size, rng=rng)


def train_adaptors_dp(model: RetuneModel, embeddings: np.ndarray, labels: np.ndarray, prompts: Prompts,
                      config: TrainConfig, privacy: HospitalPrivacy, rounds_left: int, where: tuple[str, int, int],
                      key: str = "", weights: np.ndarray | None = None, count_noise: float | None = None) -> DPRound:
    """Train ``model`` in place with DP-SGD; with ``count_noise``, also release the number of labelled examples
    with Gaussian noise of that standard deviation (rounded, at least 1), charged with the round.

    The ledger is held exclusively from the budget check to the commit (see :meth:`HospitalPrivacy.round`), so
    concurrent runs at one hospital add up exactly. Raises :class:`client.privacy.BudgetExhausted` before training
    when the round would exceed the budget. ``config.seed`` is not used: DP randomness is never seeded.
    """
    keep = ~np.isnan(labels).all(axis=1)
    x = torch.as_tensor(embeddings[keep])  # preprocessed images stay float16 until their batch
    y = torch.as_tensor(labels[keep], dtype=torch.float32)
    w = None if weights is None else torch.as_tensor(weights[keep], dtype=torch.float32)
    if len(x) == 0:
        return DPRound([], privacy.epsilon())
    sample_rate = min(1.0, config.batch_size / len(x))
    per_epoch = steps_per_epoch(sample_rate)
    steps = config.epochs * per_epoch
    with privacy.round() as ledger:
        noise = ledger.noise_for(sample_rate, steps, rounds_left, count_noise)
        entries = [spend(noise, sample_rate, steps, *where, key=key)]
        if count_noise is not None:
            entries.append(count_spend(count_noise, *where, key=key))
        ledger.check(*entries)
        rng = SecureRandom()
        module = PerSampleRetune(model, prompts)
        model.train()
        optimizer = dp_optimizer(module, torch.optim.Adam(model.trainable(), lr=config.lr,
                                                          weight_decay=config.weight_decay),
                                 noise, privacy.config, max(1, round(sample_rate * len(x))), rng)
        history = []
        try:
            for _ in range(config.epochs):
                total, seen = 0.0, 0
                for rows in poisson_batches(len(x), sample_rate, per_epoch, rng):
                    if len(rows):
                        losses, _ = module.clipped_backward(x[rows].float(), y[rows], optimizer.max_grad_norm,
                                                            None if w is None else w[rows])
                        total, seen = total + float(losses.sum()), seen + len(rows)
                    else:  # an empty batch: the step still adds noise
                        for p in model.trainable():
                            p.grad = torch.zeros_like(p)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                history.append(total / max(seen, 1))
        finally:
            module.close()
            model.eval()
        examples = None if count_noise is None else max(1, round(len(x) + count_noise * float(rng.normal(1)[0])))
        return DPRound(history, ledger.commit(*entries), examples)


def release_dp_round(model: RetuneModel, embeddings: np.ndarray, labels: np.ndarray, *, prompts: Prompts,
                     config: TrainConfig, privacy: HospitalPrivacy, rounds_left: int, where: tuple[str, int, int],
                     key: str, count_noise: float, weights: np.ndarray | None = None) -> tuple[int, bool]:
    """Set ``model`` to this round's noisy adaptors; returns (the noisy example count to report, whether both were
    sent before).

    A round is trained and charged once: asked again for the same round with the same global adaptors (``key``,
    see :func:`client.privacy.released_key`), the hospital loads the update and count it already sent, at no new ε.
    """
    kept = privacy.released(key)
    if kept is not None:
        arrays, examples = kept
        model.load_state_dict({name: torch.from_numpy(array) for name, array in arrays.items()})
        return examples, True
    released = train_adaptors_dp(model, embeddings, labels, prompts, config, privacy, rounds_left, where, key,
                                 weights, count_noise)
    examples = released.examples or 1  # a round with nothing labelled is declined before it gets here
    privacy.keep_released(key, {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}, examples)
    return examples, False
