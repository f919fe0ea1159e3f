"""Randomness for DP-SGD that nobody outside the hospital can derive or replay.

The Gaussian noise and the Poisson sampling of DP-SGD are what make its ε hold. Drawn from a generator seeded by
anything the run config determines, a server that knows the seed can regenerate the noise and the batches and
subtract them: the guarantee would not hold against the server. Opacus' own secure mode needs ``torchcsprng``,
which no longer exists for current torch releases, so this module is its equivalent: a ChaCha20 keystream
(``cryptography``) under a fresh 256-bit key from the operating system's entropy (``os.urandom``) for every
training round, turned into uniform doubles with 53 random bits and, by the inverse normal CDF, Gaussians.

Opacus' secure mode also sums four draws per coordinate, against attacks on the floating-point representation of a
single released Gaussian sample (Holohan et al., 2021). Here no noisy gradient is released: the hospital sends its
adaptors after many Adam steps on noisy gradients, so one draw per coordinate is used, which keeps DP-SGD's extra
cost to about one more pass over the parameters per step.

The price: DP training does not repeat bit for bit, even with the same seed (non-DP training stays seeded).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed


class SecureRandom:
    """Uniform and Gaussian samples from a ChaCha20 keystream keyed with ``os.urandom`` (a CSPRNG)."""

    def __init__(self) -> None:
        self._stream = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()

    def uniform(self, n: int) -> np.ndarray:
        """``n`` doubles, uniform on (0, 1) with 53 random bits each."""
        words = np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53

    def normal(self, n: int) -> torch.Tensor:
        """``n`` standard normal doubles (inverse normal CDF of :meth:`uniform`)."""
        return torch.special.ndtri(torch.from_numpy(self.uniform(n)))

    def gaussian(self, shape: torch.Size | tuple[int, ...], std: float) -> torch.Tensor:
        """N(0, std²) per coordinate, float32."""
        return (std * self.normal(int(np.prod(shape)))).to(torch.float32).reshape(shape)


def poisson_batches(n: int, sample_rate: float, steps: int, rng: SecureRandom) -> Iterator[np.ndarray]:
    """``steps`` batches of row indices, each row in each batch independently with probability ``sample_rate``:
    the Poisson sampling the accountant assumes (a batch may be empty)."""
    for _ in range(steps):
        yield np.flatnonzero(rng.uniform(n) < sample_rate)


class SecureNoiseOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' DP optimizer for pre-clipped gradients (it expects the sum of the clipped per-sample gradients in
    ``.grad``, adds N(0, (σ·C)²) and divides by the expected batch size), with the noise from :class:`SecureRandom`
    instead of torch's generator."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, rng: SecureRandom) -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size)
        self.rng = rng

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.rng.gaussian(p.summed_grad.shape, self.noise_multiplier * self.max_grad_norm)
            p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)
