"""The hospital's Flower ClientApp: trains and evaluates the global adaptors on local data only.

A train reply holds the adaptor arrays, the example count and scalar metrics; an evaluate reply holds scalar
metrics; both carry the hospital's name and backbone identity (``site``). Both pass the wire-format allow-list before they leave (:func:`shared.wire.check_reply`). In secure mode
(``secure-aggregation = true``) the train handler runs inside the secure-aggregation stages of
:mod:`client.secagg` and only its masked update leaves; a plain train message is then refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.audit import AuditLog
from client.dp_trainer import release_dp_round
from client.guard import AUDIT_LOG_KEY, DECLINED_BUDGET, NOTHING_TO_TRAIN, hospital_mods
from client.privacy import BudgetExhausted, HospitalPrivacy, released_key
from client.secagg import register_secure_handlers
from client.site import Site, load_site, node_values, site_metrics, site_model, site_settings
from client.trainer import stage_targets, train_adaptors
from shared.config import FederationConfig, TrainConfig, run_identity
from shared.continual import stage_examples
from shared.errors import RetuneError
from shared.model import RetuneModel
from shared.signing import arrays_digest
from shared.wire import (ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SITE, adaptor_spec, check_reply, load_record,
                         record_dtype, secure_stage, site_record, to_record, wire_spec)


def local_seed(config: FederationConfig, site: Site, stage: int, round_: int) -> int:
    """A seed of non-DP training that differs per site, stage and round, and is the same when a run is resumed (DP
    training draws from the hospital's CSPRNG instead, which no seed determines)."""
    key = f"{config.seed}/{site.settings.name}/{stage}/{round_}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def _context(msg: Message, context: Context, config: FederationConfig | None) -> tuple[FederationConfig, Site]:
    config = config or FederationConfig.from_run_config(dict(context.run_config))
    return config, load_site(config, site_settings(config, dict(context.node_config)))


def _global_model(msg: Message, config: FederationConfig, site: Site) -> RetuneModel:
    return load_record(site_model(config, site), msg.content[ARRAYS])


def _site(site: Site):
    return site_record(site.settings.name, site.backbone_identity)


def _identity(context: Context) -> dict[str, int]:
    return {"partition-id": int(context.node_config["partition-id"])} if "partition-id" in context.node_config else {}


def _simulated_site(config: FederationConfig | None) -> Mod:
    """Give a simulated SuperNode the node config its ``hospital.json`` describes (a no-op when deployed)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        cfg = config or FederationConfig.from_run_config(dict(context.run_config))
        context.node_config.update(node_values(cfg, dict(context.node_config)))
        return call_next(msg, context)

    return mod


def make_client_app(config: FederationConfig | None = None, mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp; with ``config=None`` it reads the Flower run config (``flwr run``).

    The hospital's own mods (boundary guard + audit log, code approval, consortium signature; configured by the
    node config, see :func:`client.guard.hospital_mods`) always wrap the handlers; extra ``mods`` go outside them.
    """
    def run_of(context: Context) -> str:  # the run's identity, from the run config this hospital trains with
        return run_identity((config or FederationConfig.from_run_config(dict(context.run_config))).to_run_config())

    app = ClientApp(mods=[*(mods or []), _simulated_site(config), *hospital_mods(run_of)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, site = _context(msg, context, config)
        if cfg.secure_aggregation and secure_stage(msg.metadata.message_type) is None:
            raise RetuneError("this run uses secure aggregation: the hospital sends masked updates only")
        model = _global_model(msg, cfg, site)
        settings = msg.content[CONFIG]
        stage, round_ = int(settings["stage"]), int(settings["round"])
        rows, labels = stage_examples(site.tasks, stage, site.train.labels, site.diseases, cfg.continual_method)
        train_config = TrainConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                                   lr=cfg.lr if site.settings.dp is None else cfg.dp_lr,
                                   seed=local_seed(cfg, site, stage, round_))
        embeddings = site.train.inputs(model)[rows]
        targets = stage_targets(model, embeddings, labels, site.prompts, site.diseases, site.tasks, stage,
                                cfg.continual_method, cfg.lwf_weight)  # the received global model distils
        examples = int((~torch.isnan(torch.as_tensor(targets.labels))).any(dim=1).sum())
        if examples == 0:  # e.g. a class-incremental stage of a disease this hospital does not label
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=NOTHING_TO_TRAIN), reply_to=msg)
        if site.settings.dp is not None:  # nothing un-noised leaves: no train loss, ε and δ only
            audit = context.node_config.get(AUDIT_LOG_KEY)
            ledger = HospitalPrivacy(Path(site.settings.ledger), site.settings.dp, AuditLog(audit) if audit else None)
            rounds_left = cfg.stages * cfg.rounds_per_stage - (stage * cfg.rounds_per_stage + round_)
            run = run_identity(cfg.to_run_config())
            key = released_key(run, stage, round_, arrays_digest(msg.content[ARRAYS]).hex())
            try:
                epsilon, _ = release_dp_round(model, embeddings, targets.labels, site.prompts, train_config, ledger,
                                              rounds_left, (run, stage, round_), key, targets.weights)
            except BudgetExhausted as exc:  # a deliberate decline: the server learns that, the detail stays here
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{DECLINED_BUDGET}: {exc}"),
                               reply_to=msg)
            metrics = {NUM_EXAMPLES: examples, "epsilon": epsilon, "delta": site.settings.dp.delta}
        else:
            losses = train_adaptors(model, embeddings, targets.labels, site.prompts, train_config,
                                    proximal_mu=float(settings.get("proximal-mu", 0.0)), weights=targets.weights)
            metrics = {NUM_EXAMPLES: examples, "train-loss": losses[-1] if losses else 0.0}
        metrics.update(_identity(context))
        dtype = record_dtype(msg.content[ARRAYS])  # the reply crosses the wire as the global adaptors came
        content = RecordDict({ARRAYS: to_record(model, dtype), METRICS: MetricRecord(metrics), SITE: _site(site)})
        check_reply(content, wire_spec(adaptor_spec(model), dtype))
        return Message(content=content, reply_to=msg)

    register_secure_handlers(app, train, run_of)  # secure mode: train runs inside the masked-vector stage

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, site = _context(msg, context, config)
        model = _global_model(msg, cfg, site)
        metrics = {**site_metrics(model, site, int(msg.content[CONFIG]["stage"])), **_identity(context)}
        content = RecordDict({METRICS: MetricRecord(metrics), SITE: _site(site)})
        check_reply(content, None)
        return Message(content=content, reply_to=msg)

    return app


#: The app ``flwr run .`` loads (``[tool.flwr.app.components] clientapp``).
app = make_client_app()
