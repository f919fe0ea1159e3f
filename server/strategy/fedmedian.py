"""FedMedian: the coordinate-wise median of the hospitals' adaptors (robust to a minority of Byzantine hospitals)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian

from server.strategy.adaptor_strategy import AdaptorStrategy


class RetuneFedMedian(AdaptorStrategy, FedMedian):
    """Flower's FedMedian with the RE-tune containment (see :class:`AdaptorStrategy`); example counts are ignored."""
