"""FedAdam: the averaged update drives a server-side Adam step; its moments persist for resume."""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedAdam

from server.strategy.adaptor_strategy import AdaptorStrategy


class RetuneFedAdam(AdaptorStrategy, FedAdam):
    """Flower's FedAdam with the RE-tune wire-format check and persistable moments ``m_t``/``v_t``."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        moments = {"m": self.m_t or {}, "v": self.v_t or {}}
        return {f"{kind}/{name}": value for kind, values in moments.items() for name, value in values.items()}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        self.m_t = {k[2:]: v for k, v in state.items() if k.startswith("m/")} or None
        self.v_t = {k[2:]: v for k, v in state.items() if k.startswith("v/")} or None
