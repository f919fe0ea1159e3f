"""The hospital's privacy floor: what may leave it, set in its own node config, which no run config can lower.

Flower lets whoever submits a run override every run-config default, and the app package's hash (what the hospital
approved) does not cover those overrides. So every setting that decides what leaves the hospital, or how well it is
protected, is a node-config key read by the hospital's runtime at every message (:func:`client.guard.floor_mod`):

=============================== ========= ==================================================================
node config                     default   what it guarantees
=============================== ========= ==================================================================
``require-secure-aggregation``  false     true: train updates leave masked only; a run without
                                          ``secure-aggregation`` is refused
``secagg-min-hospitals``        3         the fewest hospitals a secure round may have (3 at least: with two,
                                          each would learn the other's update from the sum)
``secagg-max-colluders``        1         peers assumed to collude with the server: a secure round's survivor
                                          set must be signed by more than (hospitals + colluders) / 2 of them,
                                          and its threshold exceed this number (:mod:`client.secagg`)
``adaptor-kinds``               retune    what the hospital trains and sends: ``retune``, ``lora``, ``both``
``max-lora-rank``               64        the largest LoRA rank it accepts
``lora-towers``                 image     the towers LoRA may adapt
``dp-max-epsilon`` and ``dp-*`` (off)     DP-SGD within this ε over every run (:mod:`client.privacy`);
                                          ``dp-count-noise``: the noise on the example count it reports
``evaluation``, ``eval-*``      noised    what an evaluate reply may carry (:class:`EvaluationPolicy`)
=============================== ========= ==================================================================

A run asking for less (no secure aggregation where it is required, another adaptor kind, a larger rank, another
tower) is refused before any data is read, with the fixed public reason :data:`FLOOR_REFUSED`; the detail goes to
the audit log. The DP and evaluation keys have no run-config counterpart at all: a run cannot switch them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from client.node_config import NodeConfig, flag, names, number, whole
from client.privacy import DPConfig
from shared.config import ADAPTOR_KINDS, LORA_TOWERS, FederationConfig, LoraConfig
from shared.errors import RetuneError
from shared.secagg import MIN_PARTICIPANTS

#: What the server learns when a run asks for less than a hospital's floor (the detail stays at the hospital).
FLOOR_REFUSED = "refused: the run asks for less protection than this hospital's privacy floor"
EVALUATION_MODES = ("noised", "none")
#: Every node-config key of the floor (what ``retune federation up --floor`` and ``retune redteam`` accept).
FLOOR_KEYS = ("require-secure-aggregation", "secagg-min-hospitals", "secagg-max-colluders", "adaptor-kinds",
              "max-lora-rank", "lora-towers", "dp-max-epsilon", "dp-delta", "dp-target-epsilon", "dp-noise",
              "dp-max-grad-norm", "dp-accountant", "dp-count-noise", "evaluation", "eval-noise", "eval-min-count",
              "eval-count-step", "eval-max-releases")


def parse_node_config(text: str) -> dict[str, Any]:
    """``key=value ...`` as ``flower-supernode --node-config`` takes it (strings quoted: ``name="st-mary"``)."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([text])
    except (ValueError, click.ClickException):
        raise RetuneError(f"{text!r} is not a node config: write key=value pairs separated by spaces, strings in "
                          'double quotes (name="st-mary" require-secure-aggregation=true)') from None


def floor_settings(text: str) -> dict[str, Any]:
    """The privacy-floor keys of ``key=value ...``, checked: floor keys only, each valid."""
    values = parse_node_config(text)
    unknown = sorted(set(values) - set(FLOOR_KEYS))
    if unknown:
        raise RetuneError(f"{', '.join(unknown)}: not a privacy-floor key; the floor's keys are "
                          f"{', '.join(FLOOR_KEYS)}")
    PrivacyFloor.from_node_config(values)
    return values


@dataclass(frozen=True)
class EvaluationPolicy:
    """What a hospital's evaluate reply may carry (node config ``evaluation``, ``eval-*``; see
    :mod:`client.evaluation` and ``docs/security.md``).

    Parameters
    ----------
    mode : {"noised", "none"}
        ``noised`` (default): per-disease AUROC with random tie-breaking and Gaussian noise, coarse counts, answered
        once per (run, stage, round); ``none``: the hospital declines every evaluate message.
    noise : float
        Standard deviation of the noise on an AUROC over P positives and N negatives, as a multiple of
        1 / min(P, N), the most one image's score can move that AUROC (default 0.1).
    min_count : int
        A disease with fewer positives or negatives than this in a test part is withheld (default 2: a lone positive's
        or negative's rank is not released).
    count_step : int
        Positive, negative and image counts are released rounded to a multiple of this (default 2).
    max_releases : int
        The most evaluate replies this hospital ever releases, across all runs (default 200); then it declines.
    """

    mode: str = "noised"
    noise: float = 0.1
    min_count: int = 2
    count_step: int = 2
    max_releases: int = 200

    def __post_init__(self) -> None:
        if self.mode not in EVALUATION_MODES:
            raise RetuneError(f"node config evaluation={self.mode!r}: use {' or '.join(EVALUATION_MODES)}")
        if self.noise < 0 or self.min_count < 1 or self.count_step < 1 or self.max_releases < 0:
            raise RetuneError("node config eval-noise must be ≥ 0, eval-min-count and eval-count-step ≥ 1, "
                              "eval-max-releases ≥ 0")


@dataclass(frozen=True)
class PrivacyFloor:
    """A hospital's floor, from its node config (:meth:`from_node_config`); defaults as the module table says."""

    require_secure_aggregation: bool = False
    secagg_min_hospitals: int = MIN_PARTICIPANTS
    secagg_max_colluders: int = 1
    adaptor_kinds: tuple[str, ...] = ("retune",)
    max_lora_rank: int = LoraConfig.rank
    lora_towers: tuple[str, ...] = LoraConfig.towers
    dp: DPConfig | None = None
    dp_count_noise: float = 10.0
    evaluation: EvaluationPolicy = field(default_factory=EvaluationPolicy)

    @classmethod
    def from_node_config(cls, values: NodeConfig) -> PrivacyFloor:
        """The floor a node config sets; a malformed value is a :class:`RetuneError` naming its key."""
        policy = EvaluationPolicy(
            mode=str(values.get("evaluation", EvaluationPolicy.mode)),
            noise=number(values, "eval-noise", EvaluationPolicy.noise),
            min_count=whole(values, "eval-min-count", EvaluationPolicy.min_count),
            count_step=whole(values, "eval-count-step", EvaluationPolicy.count_step),
            max_releases=whole(values, "eval-max-releases", EvaluationPolicy.max_releases, minimum=0))
        floor = cls(require_secure_aggregation=flag(values, "require-secure-aggregation"),
                    secagg_min_hospitals=whole(values, "secagg-min-hospitals", MIN_PARTICIPANTS),
                    secagg_max_colluders=whole(values, "secagg-max-colluders", 1, minimum=0),
                    adaptor_kinds=names(values, "adaptor-kinds", ("retune",), ADAPTOR_KINDS),
                    max_lora_rank=whole(values, "max-lora-rank", LoraConfig.rank),
                    lora_towers=names(values, "lora-towers", LoraConfig.towers, LORA_TOWERS),
                    dp=_dp_config(values), dp_count_noise=number(values, "dp-count-noise", 10.0),
                    evaluation=policy)
        if floor.secagg_min_hospitals < MIN_PARTICIPANTS:
            raise RetuneError(f"node config secagg-min-hospitals={floor.secagg_min_hospitals}: secure aggregation "
                              f"needs at least {MIN_PARTICIPANTS} hospitals")
        if floor.dp is not None and not floor.dp_count_noise > 0:
            raise RetuneError("node config dp-count-noise must be positive: a DP hospital never reports an exact "
                              "example count")
        return floor

    def problems(self, config: FederationConfig) -> list[str]:
        """What ``config`` asks for below this floor (empty: the run may be served)."""
        found = []
        if self.require_secure_aggregation and not config.secure_aggregation:
            found.append("the run does not use secure aggregation, which this hospital requires "
                         "(node config require-secure-aggregation)")
        if config.adaptor_kind not in self.adaptor_kinds:
            found.append(f"the run trains adaptor-kind {config.adaptor_kind!r}; this hospital trains only "
                         f"{', '.join(self.adaptor_kinds)} (node config adaptor-kinds)")
        lora = config.lora_config()
        if lora is not None and config.adaptor_kind in self.adaptor_kinds:
            if lora.rank > self.max_lora_rank:
                found.append(f"LoRA rank {lora.rank} is above this hospital's max-lora-rank {self.max_lora_rank}")
            refused = [t for t in lora.towers if t not in self.lora_towers]
            if refused:
                found.append(f"this hospital adapts only its {', '.join(self.lora_towers)} tower with LoRA (node "
                             f"config lora-towers), not its {', '.join(refused)} tower")
        return found

    def rows(self, config: FederationConfig) -> list[tuple[str, str, str, str]]:
        """(setting, this floor, what ``config`` asks, verdict) per setting, for ``retune approve``."""
        lora = config.lora_config()
        asked = {
            "secure aggregation": ("required" if self.require_secure_aggregation else "optional",
                                   str(config.secure_aggregation).lower(),
                                   not self.require_secure_aggregation or config.secure_aggregation),
            "adaptor kind": (",".join(self.adaptor_kinds), config.adaptor_kind,
                             config.adaptor_kind in self.adaptor_kinds),
            "LoRA rank": (f"≤ {self.max_lora_rank}", "-" if lora is None else str(lora.rank),
                          lora is None or lora.rank <= self.max_lora_rank),
            "LoRA towers": (",".join(self.lora_towers), "-" if lora is None else ",".join(lora.towers),
                            lora is None or set(lora.towers) <= set(self.lora_towers)),
        }
        rows = [(name, floor, run, "ok" if fine else "REFUSED") for name, (floor, run, fine) in asked.items()]
        secure = f"≥ {self.secagg_min_hospitals} hospitals, ≤ {self.secagg_max_colluders} colluding"
        dp = "off" if self.dp is None else (f"ε ≤ {self.dp.max_epsilon:g} over all runs (δ {self.dp.delta:g}), "
                                            f"example count ± {self.dp_count_noise:g}")
        e = self.evaluation
        evaluation = "declined" if e.mode == "none" else (
            f"noised ({e.noise:g}/min(P, N)), withheld below {e.min_count}, counts to {e.count_step}, "
            f"≤ {e.max_releases} replies ever")
        return rows + [("secure rounds", secure, "-", "hospital only"), ("DP-SGD", dp, "-", "hospital only"),
                       ("evaluation", evaluation, "-", "hospital only")]


def _dp_config(values: NodeConfig) -> DPConfig | None:
    """DP settings from node-config keys ``dp-*``; ``None`` unless ``dp-max-epsilon`` is set."""
    if "dp-max-epsilon" not in values:
        return None
    optional = {"dp-target-epsilon": "target_epsilon", "dp-noise": "noise_multiplier",
                "dp-max-grad-norm": "max_grad_norm", "dp-delta": "delta"}
    kwargs: dict[str, Any] = {name: number(values, key, 0.0) for key, name in optional.items() if key in values}
    if "dp-accountant" in values:
        kwargs["accountant"] = str(values["dp-accountant"])
    return DPConfig(max_epsilon=number(values, "dp-max-epsilon", 0.0), **kwargs)
