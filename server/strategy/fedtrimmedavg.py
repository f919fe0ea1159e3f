"""FedTrimmedAvg: per coordinate, the mean after cutting a fraction ``beta`` off each tail."""

from __future__ import annotations

from flwr.serverapp.strategy import FedTrimmedAvg

from server.strategy.adaptor_strategy import AdaptorStrategy


class RetuneFedTrimmedAvg(AdaptorStrategy, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (``beta``: the run config's ``trim-fraction``) with the RE-tune containment."""
