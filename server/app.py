"""The aggregation server's Flower ServerApp: runs the stage scheduler and writes the final checkpoint.

The server never holds the backbone: it learns the embedding size from the run config or the backbone's
configuration (:func:`shared.backbone.config_embed_dim`) and the backbone's identity from the hospitals' replies.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import RoundCallback, initial_model, run_federation
from server.state import RunState, SealRegister
from shared.backbone import config_embed_dim
from shared.checkpoint import save_checkpoint
from shared.config import FederationConfig, run_identity
from shared.labels import resolve_schema
from shared.prompts import PromptBank
from shared.signing import PrivateKeyLike, load_private_key, sign_checkpoint
from shared.wire import load_record

CHECKPOINT = "checkpoint"


def backbone_record(config: FederationConfig, state: RunState, embed_dim: int) -> dict:
    """What the checkpoint records of the backbone: the spec, and the identity every admitted hospital reported."""
    return {"spec": config.backbone, "label": config.backbone, "embed_dim": embed_dim, "identity": state.backbone}


def run_record(config: FederationConfig, state: RunState, run_id: int) -> dict:
    """What the checkpoint records of the run it ends (inside what its signature covers): the run's identity and
    settings, the Flower run that finished it, and the rounds."""
    return {"identity": run_identity(config.to_run_config()), "flower_run_id": run_id, "config": state.config,
            "stages": state.stage, "rounds": state.server_round}


def save_final(config: FederationConfig, state: RunState, embed_dim: int, signing_key: PrivateKeyLike | None = None,
               run_id: int = 0) -> Path:
    """Write the global adaptors as a checkpoint that ``retune evaluate``/``predict`` read, signed if a key is
    given: the signature covers the adaptors and the sidecar, with the backbone identity and :func:`run_record`."""
    model = load_record(initial_model(config, embed_dim), state.arrays)
    bank = PromptBank(resolve_schema(config.diseases).diseases)
    folder = save_checkpoint(Path(config.run_dir) / CHECKPOINT, model, bank, backbone_record(config, state, embed_dim),
                             run=run_record(config, state, run_id))
    if signing_key is not None:
        sign_checkpoint(folder, signing_key)
    return folder


def make_server_app(config: FederationConfig | None = None, on_round: RoundCallback | None = None,
                    signing_key: PrivateKeyLike | None = None, seals: Path | None = None) -> ServerApp:
    """A ServerApp; with ``config=None`` it reads the Flower run config (``flwr run``). Rounds and the checkpoint are
    signed with ``signing_key`` (the consortium's key, held by :mod:`server.runtime` or a simulation, never taken
    from the environment a run's code could read); ``seals``: the register of sealed rounds
    (:class:`server.state.SealRegister`). Without a key nothing is signed, and hospitals refuse the rounds."""
    app = ServerApp()
    key = load_private_key(signing_key) if signing_key else None  # read once, when the app is made

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or FederationConfig.from_run_config(dict(context.run_config))
        embed_dim = cfg.embed_dim or config_embed_dim(cfg.backbone)
        state = run_federation(grid, cfg, embed_dim, on_round, key, context.run_id,
                               SealRegister(seals) if seals else None)
        save_final(cfg, state, embed_dim, key, context.run_id)

    return app


#: The app ``flwr run .`` loads (``[tool.flwr.app.components] serverapp``).
app = make_server_app()
