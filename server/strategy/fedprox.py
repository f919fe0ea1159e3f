"""FedProx: FedAvg aggregation; hospitals add ``mu/2·||w − w_global||²`` (sent as ``proximal-mu``)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from server.strategy.adaptor_strategy import AdaptorStrategy


class RetuneFedProx(AdaptorStrategy, FedProx):
    """Flower's FedProx with the RE-tune wire-format check (see :class:`AdaptorStrategy`)."""
