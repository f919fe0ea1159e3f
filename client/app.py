"""The hospital's Flower ClientApp: trains and evaluates the global adaptors on local data only.

A train reply holds the adaptor arrays, the example count and scalar metrics (with DP-SGD: the noisy update and a
noisy count, no loss, no ε); an evaluate reply holds the metrics the hospital's evaluation policy releases
(:mod:`client.evaluation`); both carry the hospital's name and backbone identity (``site``). Both pass the
wire-format allow-list before they leave (:func:`shared.wire.check_reply`). In secure mode
(``secure-aggregation = true``) the train handler runs inside the secure-aggregation stages of
:mod:`client.secagg` and only its masked update leaves; a plain train message is then refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.audit import AUDIT_LOG_KEY, AuditLog
from client.dp_random import SecureRandom
from client.dp_trainer import release_dp_round
from client.evaluation import EVALUATION_DECLINED, EvaluationRecord, EvaluationRefused, released_metrics
from client.guard import DECLINED_BUDGET, NOTHING_TO_TRAIN, hospital_mods
from client.privacy import BudgetExhausted, HospitalPrivacy, released_key
from client.secagg import register_secure_handlers
from client.site import Site, load_site, node_values, site_logits, site_model, site_settings, test_parts
from client.trainer import stage_targets, train_adaptors
from shared.config import FederationConfig, TrainConfig, run_identity
from shared.continual import stage_examples
from shared.errors import RetuneError
from shared.model import RetuneModel
from shared.signing import arrays_digest
from shared.wire import (ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SITE, adaptor_spec, check_reply, load_record,
                         record_dtype, site_record, to_record, wire_spec)


def local_seed(config: FederationConfig, site: Site, stage: int, round_: int) -> int:
    """A seed of non-DP training that differs per site, stage and round, and is the same when a run is resumed (DP
    training draws from the hospital's CSPRNG instead, which no seed determines)."""
    key = f"{config.seed}/{site.settings.name}/{stage}/{round_}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def _site_of(context: Context, config: FederationConfig) -> Site:
    return load_site(config, site_settings(config, dict(context.node_config)))


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
    def config_of(context: Context) -> FederationConfig:  # the run's settings, as this hospital reads them
        return config or FederationConfig.from_run_config(dict(context.run_config))

    app = ClientApp(mods=[*(mods or []), _simulated_site(config), *hospital_mods(config_of)])

    def trained(msg: Message, context: Context) -> tuple[Message, str]:
        """The train reply, and the digest of the stage data it trained on (what secure aggregation remembers)."""
        cfg = config_of(context)
        site = _site_of(context, cfg)
        model = _global_model(msg, cfg, site)
        settings = msg.content[CONFIG]
        stage, round_ = int(settings["stage"]), int(settings["round"])
        rows, labels = stage_examples(site.tasks, stage, site.train.labels, site.diseases, cfg.continual_method)
        data = hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()
                              + np.ascontiguousarray(labels, dtype=np.float32).tobytes()).hexdigest()
        dp = site.settings.floor.dp
        train_config = TrainConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                                   lr=cfg.lr if dp is None else cfg.dp_lr,
                                   seed=local_seed(cfg, site, stage, round_))
        embeddings = site.train.inputs(model)[rows]
        targets = stage_targets(model, embeddings, labels, site.prompts, site.diseases, site.tasks, stage,
                                cfg.continual_method, cfg.lwf_weight)  # the received global model distils
        examples = int((~torch.isnan(torch.as_tensor(targets.labels))).any(dim=1).sum())
        if examples == 0:  # e.g. a class-incremental stage of a disease this hospital does not label
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=NOTHING_TO_TRAIN),
                           reply_to=msg), data
        if dp is not None:  # nothing exact leaves: the noisy update and a noisy count; no loss, no ε
            audit = context.node_config.get(AUDIT_LOG_KEY)
            ledger = HospitalPrivacy(Path(site.settings.ledger), dp, AuditLog(audit) if audit else None)
            rounds_left = cfg.stages * cfg.rounds_per_stage - (stage * cfg.rounds_per_stage + round_)
            run = run_identity(cfg.to_run_config())
            key = released_key(run, stage, round_, arrays_digest(msg.content[ARRAYS]).hex())
            try:
                noisy_examples, _ = release_dp_round(
                    model, embeddings, targets.labels, prompts=site.prompts, config=train_config, privacy=ledger,
                    rounds_left=rounds_left, where=(run, stage, round_), key=key,
                    count_noise=site.settings.floor.dp_count_noise, weights=targets.weights)
            except BudgetExhausted as exc:  # a deliberate decline: the server learns that, the detail stays here
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{DECLINED_BUDGET}: {exc}"),
                               reply_to=msg), data
            metrics = {NUM_EXAMPLES: noisy_examples}
        else:
            losses = train_adaptors(model, embeddings, targets.labels, site.prompts, train_config,
                                    proximal_mu=float(settings.get("proximal-mu", 0.0)), weights=targets.weights)
            metrics = {NUM_EXAMPLES: examples, "train-loss": losses[-1] if losses else 0.0}
        metrics.update(_identity(context))
        dtype = record_dtype(msg.content[ARRAYS])  # the reply crosses the wire as the global adaptors came
        content = RecordDict({ARRAYS: to_record(model, dtype), METRICS: MetricRecord(metrics), SITE: _site(site)})
        check_reply(content, wire_spec(adaptor_spec(model), dtype))
        return Message(content=content, reply_to=msg), data

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if config_of(context).secure_aggregation:
            raise RetuneError("this run uses secure aggregation: the hospital sends masked updates only")
        return trained(msg, context)[0]

    register_secure_handlers(app, trained)  # secure mode: training runs inside the masked-vector stage

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        settings = site_settings(cfg, dict(context.node_config))
        policy = settings.floor.evaluation
        stage, round_ = int(msg.content[CONFIG]["stage"]), int(msg.content[CONFIG]["round"])
        record = EvaluationRecord(context.node_config, context.state, policy)

        def release() -> dict[str, float]:  # only when the policy allows a new release: then the data are read
            site = load_site(cfg, settings)
            return released_metrics(site_logits(_global_model(msg, cfg, site), site), site.test.labels,
                                    test_parts(site, stage), site.diseases, policy, SecureRandom())

        try:
            released = record.answer(run_identity(cfg.to_run_config()), stage, round_,
                                     arrays_digest(msg.content[ARRAYS]).hex(), release)
        except EvaluationRefused as exc:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{EVALUATION_DECLINED}: {exc}"),
                           reply_to=msg)
        site = load_site(cfg, settings)  # loaded already when released now (memoised): its name and backbone
        content = RecordDict({METRICS: MetricRecord({**released, **_identity(context)}), SITE: _site(site)})
        check_reply(content, None)
        return Message(content=content, reply_to=msg)

    return app


#: The app ``flwr run .`` loads (``[tool.flwr.app.components] clientapp``).
app = make_client_app()
