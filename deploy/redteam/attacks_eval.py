"""Evaluation as an oracle: a server signs adaptors built to single out one image and reads the evaluate reply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from deploy.redteam import attack
from deploy.redteam.bench import Bench, Hospital, manifest_labels
from shared.labels import CHEXPERT5
from shared.prompts import PromptBank
from shared.wire import METRICS

#: The attacker's run: one stage with every test image (``joint``), adaptors on the wire exactly as built.
ORACLE_RUN = {"scenario": "joint", "stages": 1, "wire-dtype": "float32"}
#: Where the attacker's bump fires: cosine to the target above this (phantoms of one hospital differ by more).
BUMP = 0.995
#: The label oracle holds while the attacker's balanced accuracy (and membership accuracy) is not surely above this;
#: Z99: the one-sided 99% normal quantile "surely" means.
ORACLE_BOUND, Z99 = 0.75, 2.326
TARGETS = 24


def oracle_adaptors(target: np.ndarray, prompts: torch.Tensor, averaging: torch.Tensor, bump: float = BUMP
                    ) -> ArrayRecord:
    """Adaptors (the default MLP kind) under which the image with embedding ``target`` scores high for every
    disease and every other image scores exactly 0: the image adaptor fires a ReLU bump only within cosine
    :data:`BUMP` of the target (everything else maps to the zero vector, which normalises to zero: all tied), and
    the text adaptor maps each positive prompt to +u and each negative one to −u."""
    dim = len(target)
    u = torch.zeros(dim)
    u[0] = 1.0
    image_in, image_out = torch.zeros(2 * dim, dim), torch.zeros(dim, 2 * dim)
    image_bias = torch.zeros(2 * dim)
    image_in[0] = torch.as_tensor(target) / float(np.linalg.norm(target))
    image_bias[0] = -bump
    image_out[:, 0] = u
    sign = torch.where(averaging[0::2].sum(0) > 0, 1.0, -1.0)  # +1 for a positive prompt, −1 for a negative one
    a = torch.linalg.lstsq(prompts.double(), sign.double()).solution.float()  # a·t = ±1 on every prompt
    text_in, text_out = torch.zeros(2 * dim, dim), torch.zeros(dim, 2 * dim)
    text_in[0], text_in[1] = a, -a
    text_out[:, 0], text_out[:, 1] = u, -u
    arrays = {"image_adaptor.net.0.weight": image_in, "image_adaptor.net.0.bias": image_bias,
              "image_adaptor.net.2.weight": image_out, "image_adaptor.net.2.bias": torch.zeros(dim),
              "text_adaptor.net.0.weight": text_in, "text_adaptor.net.0.bias": torch.zeros(2 * dim),
              "text_adaptor.net.2.weight": text_out, "text_adaptor.net.2.bias": torch.zeros(dim)}
    return ArrayRecord({k: Array(np.ascontiguousarray(v.numpy(), dtype=np.float32)) for k, v in arrays.items()})


class Attacker:
    """What the server computes with the public backbone: embeddings of images it holds, and the prompts."""

    def __init__(self, bench: Bench) -> None:
        from shared.backbone import cached_backbone
        from shared.cache import EmbeddingCache

        self.cache = EmbeddingCache(bench.root / "attacker-cache", cached_backbone(bench.backbone))
        bank = PromptBank(CHEXPERT5)
        self.prompts, self.averaging = self.cache.texts(bank.texts()), bank.averaging_matrix()

    def embed(self, paths: list[str]) -> np.ndarray:
        from shared.data.problems import BadFiles

        embeddings, _ = self.cache.images(paths, BadFiles("skip"), show_progress=False)
        return embeddings


def _targets(bench: Bench, hospital: Hospital) -> tuple[list[str], list[str], dict]:
    """Test images of ``hospital`` the attacker holds, and as many phantoms that are not in its data."""
    from research.phantom import write_phantom

    truth = manifest_labels(hospital)
    folder = Path(hospital.node_config["manifest"]).parent
    tests = [folder / name for name, row in truth.items() if row["split"] == "test"][:TARGETS]
    outside = bench.root / f"attacker-images-{TARGETS}"
    if not (outside / "manifest.csv").exists():
        write_phantom(outside, n=TARGETS, hospital=hospital.index, seed=99, size=64, start=10_000)
    others = sorted(str(p) for p in (outside / "images").glob("*.png"))[:TARGETS]
    return [str(p) for p in tests], others, truth


def _evaluate(bench: Bench, hospital: Hospital, arrays: ArrayRecord, run_config: dict, run_id: int) -> dict | None:
    hospital.join(run_id, run_config)
    reply = bench.send(hospital, "evaluate", arrays, run_config, run_id)
    return None if reply.has_error() else dict(reply.content[METRICS])


def _looks(metrics: dict, disease: str) -> list[float]:
    return [v for k, v in metrics.items() if k.startswith("auroc/") and k.endswith(f"/{disease}")]


@attack("eval-label-oracle", "server", "evaluate adaptors that lift one held image and tie every other test image, "
        "read each disease's AUROC as 0.5 + 0.5/P (positive), 0.5 − 0.5/N (negative) or 0.5 (not in the test set)")
def label_oracle(bench: Bench) -> tuple[bool, str]:
    hospital = bench.reset()[0]
    attacker = Attacker(bench)
    tests, others, truth = _targets(bench, hospital)
    calls = {True: [0, 0], False: [0, 0]}  # truth -> [called right, cells]
    scores: dict[bool, list[float]] = {True: [], False: []}  # present -> how far each reply is from 0.5
    for k, (path, present) in enumerate([(p, True) for p in tests] + [(p, False) for p in others]):
        target = attacker.embed([path])[0]
        run = {**ORACLE_RUN, "run-dir": f"runs/oracle-{k}"}  # a new run identity per query
        metrics = _evaluate(bench, hospital, oracle_adaptors(target, attacker.prompts, attacker.averaging), run,
                            1000 + k)
        if metrics is None:
            continue
        shifts = {d: float(np.mean(_looks(metrics, d))) - 0.5 for d in CHEXPERT5 if _looks(metrics, d)}
        scores[present].append(sum(abs(v) for v in shifts.values()))
        if present:
            row = truth[Path(path).relative_to(Path(hospital.node_config["manifest"]).parent).as_posix()]
            for disease, shift in shifts.items():
                if row.get(disease) in ("0", "1"):
                    positive = row[disease] == "1"
                    calls[positive][0] += (shift > 0) == positive
                    calls[positive][1] += 1
    granted = len(scores[True]) + len(scores[False])
    if not scores[True] or not scores[False]:
        return True, f"{granted} of {2 * TARGETS} evaluations answered: nothing to read"
    # membership: the attacker calibrates on the images it knows are outside (their median distance from 0.5)
    cut = float(np.median(scores[False]))
    member_right = sum(v > cut for v in scores[True]) + sum(v <= cut for v in scores[False])
    rates = [(right / cells, cells) for right, cells in calls.values() if cells]
    balanced = float(np.mean([rate for rate, _ in rates]))
    member_accuracy = member_right / granted
    # the attack succeeds when its accuracy is above ORACLE_BOUND beyond sampling doubt (one-sided 99%): the
    # hospital's random ties make a single run's accuracy spread by several points around its mean
    balanced_low = balanced - Z99 * float(np.sqrt(sum(r * (1 - r) / n for r, n in rates))) / len(rates)
    member_low = member_accuracy - Z99 * float(np.sqrt(member_accuracy * (1 - member_accuracy) / granted))
    held = balanced_low <= ORACLE_BOUND and member_low <= ORACLE_BOUND
    (pos_right, pos), (neg_right, neg) = calls[True], calls[False]
    return held, (f"{granted} of {2 * TARGETS} evaluations answered; labels right: positives {pos_right}/{pos}, "
                  f"negatives {neg_right}/{neg} (balanced {balanced:.0%}, at least {balanced_low:.0%} at 99%), "
                  f"membership {member_right}/{granted} ({member_accuracy:.0%}, at least {member_low:.0%}); chance "
                  f"50%, held while neither is surely above {ORACLE_BOUND:.0%}")


@attack("eval-repeat", "server", "ask one (run, stage, round) again and again with other adaptors (another target "
        "image each time), then rounds past the run's schedule, to scale the oracle to the whole test set in one run")
def repeat(bench: Bench) -> tuple[bool, str]:
    hospital = bench.reset()[0]
    attacker = Attacker(bench)
    tests, _, _ = _targets(bench, hospital)
    run = {**ORACLE_RUN, "rounds-per-stage": 1}
    hospital.join(2000, run)
    same = past = 0
    for k, target in enumerate(attacker.embed(tests[:10])):
        arrays = oracle_adaptors(target, attacker.prompts, attacker.averaging)
        same += not bench.send(hospital, "evaluate", arrays, run, 2000).has_error()  # round 1, again and again
        past += not bench.send(hospital, "evaluate", arrays, run, 2000, 0, 1 + k).has_error()  # rounds 2 to 11
    return same <= 1 and past == 0, (f"{same} of 10 evaluations of round 1 with other adaptors answered, {past} of 10 "
                                     "of rounds past the run's single round")


@attack("eval-unlimited", "server", "ask for evaluations under ever new run identities, to collect as many "
        "replies as needed (the hospital's floor here: eval-max-releases = 8)")
def unlimited(bench: Bench) -> tuple[bool, str]:
    hospital = bench.reset({"eval-max-releases": 8})[0]
    arrays = bench.initial(ORACLE_RUN, Attacker(bench).prompts.shape[1])
    granted = sum(_evaluate(bench, hospital, arrays, {**ORACLE_RUN, "run-dir": f"runs/many-{k}"}, 3000 + k)
                  is not None for k in range(12))
    return granted <= 8, f"{granted} of 12 evaluations answered"
