"""Aggregation strategies: Flower's, subclassed to carry RE-tune adaptors. One strategy per file."""

from __future__ import annotations

from server.strategy.adaptor_strategy import AdaptorStrategy, UpdateLimits
from server.strategy.bulyan import RetuneBulyan
from server.strategy.fedadam import RetuneFedAdam
from server.strategy.fedavg import RetuneFedAvg
from server.strategy.fedmedian import RetuneFedMedian
from server.strategy.fedprox import RetuneFedProx
from server.strategy.fedtrimmedavg import RetuneFedTrimmedAvg
from server.strategy.krum import RetuneKrum
from server.strategy.multikrum import RetuneMultiKrum
from shared.config import FederationConfig
from shared.wire import ArraySpec


def make_strategy(config: FederationConfig, spec: dict[str, ArraySpec]) -> AdaptorStrategy:
    """The strategy named by ``config.strategy`` (validated by the config), sampling every connected hospital each
    round and containing each reply by the config's :class:`UpdateLimits`."""
    common = dict(spec=spec, limits=UpdateLimits.of(config), wire_dtype=config.wire_dtype,
                  min_train_nodes=config.min_hospitals, min_evaluate_nodes=config.min_hospitals,
                  min_available_nodes=config.min_hospitals)
    byzantine = dict(num_malicious_nodes=max(0, config.byzantine_hospitals),
                     auto_byzantine=config.byzantine_hospitals == -1)
    builders = {
        "fedavg": lambda: RetuneFedAvg(**common),
        "fedprox": lambda: RetuneFedProx(proximal_mu=config.proximal_mu, **common),
        "fedadam": lambda: RetuneFedAdam(eta=config.server_lr, **common),
        "fedmedian": lambda: RetuneFedMedian(**common),
        "fedtrimmedavg": lambda: RetuneFedTrimmedAvg(beta=config.trim_fraction, **common),
        "krum": lambda: RetuneKrum(**byzantine, **common),
        "multikrum": lambda: RetuneMultiKrum(**byzantine, **common),
        "bulyan": lambda: RetuneBulyan(**byzantine, **common),
    }
    return builders[config.strategy]()
