"""FedAvg over adaptor weights, weighted by each hospital's example count (the default)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from server.strategy.adaptor_strategy import AdaptorStrategy


class RetuneFedAvg(AdaptorStrategy, FedAvg):
    """Flower's FedAvg with the RE-tune wire-format check (see :class:`AdaptorStrategy`)."""
