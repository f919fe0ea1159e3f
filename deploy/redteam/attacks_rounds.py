"""A server that sends rounds the hospital must refuse, or reads more than a reply should carry."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from deploy.redteam import attack
from deploy.redteam.bench import Bench, Hospital, brief
from shared.config import FederationConfig
from shared.wire import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES

PLAIN_RUN = {"wire-dtype": "float32"}


def _dim(bench: Bench) -> int:
    from shared.backbone import cached_backbone

    return cached_backbone(bench.backbone).embed_dim


def _train(bench: Bench, hospital: Hospital, run: dict, run_id: int, stage: int = 0, round_: int = 0,
           arrays: ArrayRecord | None = None):
    return bench.send(hospital, "train", arrays or bench.initial(run, _dim(bench)), run, run_id, stage, round_)


def _verdict(reply, leaked: str) -> tuple[bool, str]:
    if reply.has_error():
        return True, f"refused ({brief(reply.error.reason)})"
    return False, leaked


def floor_refused(reply) -> bool:
    """Whether the hospital's own floor (a privacy officer's ``--node-config``) refused a run an attack needs as its
    starting point: then the defence under test was never reached, and the attack does not apply."""
    from client.floor import FLOOR_REFUSED

    return reply.has_error() and reply.error.reason == FLOOR_REFUSED


NOT_APPLICABLE = "not applicable under this floor: it refuses the run the attack starts from"


@attack("floor-secure-aggregation", "server", "submit a run with secure-aggregation = false to a hospital whose node "
        "config requires it, and read its plain adaptors")
def secure_aggregation_off(bench: Bench) -> tuple[bool, str]:
    hospital = bench.reset({"require-secure-aggregation": True})[0]  # the scenario: a hospital that requires it
    hospital.join(10, PLAIN_RUN)
    reply = _train(bench, hospital, PLAIN_RUN, 10)
    held, said = _verdict(reply, "")
    if not held:
        said = (f"the hospital's own adaptors in the clear ({len(reply.content[ARRAYS])} arrays) and its exact example "
                f"count {int(reply.content[METRICS][NUM_EXAMPLES])}")
    return held, said


@attack("floor-adaptor-kind", "server", "submit a run asking for LoRA inside the hospital's backbone (another "
        "adaptor kind than its node config accepts), with LoRA matrices of the right shapes")
def adaptor_kind(bench: Bench) -> tuple[bool, str]:
    hospital = bench.reset({"adaptor-kinds": "retune"})[0]
    run = {**PLAIN_RUN, "adaptor-kind": "lora", "lora-rank": 4}
    hospital.join(11, run)
    reply = _train(bench, hospital, run, 11)
    return _verdict(reply, f"LoRA trained on the hospital's images and sent ({len(reply.content[ARRAYS])} matrices)"
                    if not reply.has_error() else "")


@attack("dp-exact-values", "server", "read what a DP hospital's train replies carry besides the noisy adaptors: in a "
        "class-incremental stage the example count is positives + ⌈(N − positives) / 2⌉ (its positives of a "
        "disease, to ±1), and a cumulative ε tells of the hospital's other federations")
def dp_exact_values(bench: Bench) -> tuple[bool, str]:
    from client.site import load_site, site_settings
    from shared.continual import stage_examples

    hospital = bench.reset({"dp-max-epsilon": 50.0})[0]
    runs = [{**PLAIN_RUN, "scenario": "class", "stages": 5, "run-dir": f"runs/count-{k}"} for k in range(5)]
    config = FederationConfig.from_run_config(runs[0])
    site = load_site(config, site_settings(config, hospital.node_config))
    rows, labels = stage_examples(site.tasks, 0, site.train.labels, site.diseases, config.continual_method)
    exact = int((~np.isnan(labels)).any(axis=1).sum())
    counts, epsilons = [], []
    for k, run in enumerate(runs):
        hospital.join(20 + k, run)
        reply = _train(bench, hospital, run, 20 + k)
        if floor_refused(reply):
            return True, NOT_APPLICABLE
        if reply.has_error():
            return True, f"refused ({brief(reply.error.reason)})"
        metrics = reply.content[METRICS]
        counts.append(int(metrics[NUM_EXAMPLES]))
        epsilons += [float(metrics[k]) for k in ("epsilon", "delta") if k in metrics]
    exposed = sum(c == exact for c in counts) >= 3  # with σ = 10, three of five exact happens once in 10^5 runs
    held = not exposed and not epsilons
    return held, (f"example counts {counts} (exact, label-dependent: {exact})"
                  + (f"; ε/δ in the replies: {epsilons}" if epsilons else "; no ε"))


@attack("unsigned-rounds", "server", "send global adaptors without the consortium's signature to a hospital whose "
        "node config names no consortium key")
def unsigned(bench: Bench) -> tuple[bool, str]:
    hospital = bench.reset()[0]
    hospital.node_config.pop("consortium-key")
    hospital.join(30, PLAIN_RUN)
    content = RecordDict({ARRAYS: bench.initial(PLAIN_RUN, _dim(bench)), CONFIG: ConfigRecord({"stage": 0, "round": 0})})
    reply = hospital.handle(bench.message(hospital, "train", content, 30))
    return _verdict(reply, "the hospital trained on adaptors nobody signed and sent its update")


@attack("replay", "server", "replay an earlier round's signed message after the hospital served a later one")
def replay(bench: Bench) -> tuple[bool, str]:
    hospital = bench.reset()[0]
    hospital.join(40, PLAIN_RUN)
    arrays = bench.initial(PLAIN_RUN, _dim(bench))
    first = bench.round_content(arrays, PLAIN_RUN, 40, 0, 0, "train")
    for reply in (hospital.handle(bench.message(hospital, "train", first, 40)),
                  _train(bench, hospital, PLAIN_RUN, 40, 0, 1, arrays)):
        if reply.has_error():
            return True, NOT_APPLICABLE if floor_refused(reply) else f"the rounds before the replay were refused " \
                                                                      f"({brief(reply.error.reason, 60)})"
    return _verdict(hospital.handle(bench.message(hospital, "train", first, 40)),
                    "the hospital trained round 1 again after round 2")


@attack("forged-adaptors", "server", "alter signed global adaptors before they reach the hospital")
def forged(bench: Bench) -> tuple[bool, str]:
    hospital = bench.reset()[0]
    hospital.join(50, PLAIN_RUN)
    arrays = bench.initial(PLAIN_RUN, _dim(bench))
    content = bench.round_content(arrays, PLAIN_RUN, 50, 0, 0, "train")
    content[ARRAYS] = ArrayRecord({k: Array(a.numpy() * 3) for k, a in arrays.items()})
    return _verdict(hospital.handle(bench.message(hospital, "train", content, 50)),
                    "the hospital trained on adaptors the consortium did not sign")
