"""The aggregation server's Flower ServerApp: runs the stage scheduler and writes the final checkpoint."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import RoundCallback, initial_model, run_federation
from server.state import RunState
from shared.backbone import load_backbone
from shared.checkpoint import save_checkpoint
from shared.config import FederationConfig
from shared.labels import resolve_schema
from shared.prompts import PromptBank
from shared.wire import load_record

CHECKPOINT = "checkpoint"


def save_final(config: FederationConfig, state: RunState, backbone: dict, embed_dim: int) -> Path:
    """Write the global adaptors as a checkpoint that ``retune evaluate``/``predict`` read."""
    model = load_record(initial_model(config, embed_dim), state.arrays)
    bank = PromptBank(resolve_schema(config.diseases).diseases)
    return save_checkpoint(Path(config.run_dir) / CHECKPOINT, model, bank, backbone)


def make_server_app(config: FederationConfig | None = None, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp; with ``config=None`` it reads the Flower run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or FederationConfig.from_run_config(dict(context.run_config))
        backbone = load_backbone(cfg.backbone, device="cpu")
        state = run_federation(grid, cfg, backbone.embed_dim, on_round)
        save_final(cfg, state, backbone.describe(), backbone.embed_dim)

    return app


#: The app ``flwr run .`` loads (``[tool.flwr.app.components] serverapp``).
app = make_server_app()
