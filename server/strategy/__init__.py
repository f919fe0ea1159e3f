"""Aggregation strategies: Flower's, subclassed to carry RE-tune adaptors. One strategy per file."""

from __future__ import annotations

from server.strategy.adaptor_strategy import AdaptorStrategy
from server.strategy.fedadam import RetuneFedAdam
from server.strategy.fedavg import RetuneFedAvg
from server.strategy.fedprox import RetuneFedProx
from shared.config import FederationConfig
from shared.errors import RetuneError
from shared.wire import ArraySpec


def make_strategy(config: FederationConfig, spec: dict[str, ArraySpec]) -> AdaptorStrategy:
    """The strategy named by ``config.strategy``, sampling every connected hospital each round."""
    common = dict(spec=spec, min_train_nodes=config.min_hospitals, min_evaluate_nodes=config.min_hospitals,
                  min_available_nodes=config.min_hospitals)
    if config.strategy == "fedavg":
        return RetuneFedAvg(**common)
    if config.strategy == "fedprox":
        return RetuneFedProx(proximal_mu=config.proximal_mu, **common)
    if config.strategy == "fedadam":
        return RetuneFedAdam(eta=config.server_lr, **common)
    raise RetuneError(f"unknown strategy {config.strategy!r}: choose fedavg, fedprox or fedadam")
