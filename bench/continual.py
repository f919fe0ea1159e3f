"""Benchmark: class-, label- and data-incremental federations with no continual method, learning without forgetting
and replay.

``retune simulate`` defaults (5 phantom hospitals × 600 images, 2 local epochs, FedAvg) with 5 stages × 2 rounds,
per scenario and continual method, over seeds: final macro-AUROC, forgetting, zero-shot and centralized (the
centralized baseline uses the same continual option). ``lwf`` changes nothing where no disease leaves supervision
(data and label schedules): those runs are made for the first seed only and checked to equal ``none``. ``replay``
(each hospital trains on its own earlier stages' images too) runs every scenario over every seed. One more
class-incremental run per method with DP-SGD at ε = 8.

``class/oracle`` is the reference a method without replay would have to approach on the class schedule: the same
stages (each stage's images are those positive for its disease, plus a share of negatives) with the true labels of
every disease seen so far on them, as if the old diseases' labels had been kept. It is not a method (those labels
do not exist in a class-incremental federation): the bench swaps the scenario's task list for it, in this process.

Not a test; writes bench/results/continual.json.

Usage: .venv/bin/python bench/continual.py [--seeds 0 1 2] [--out bench/results/continual.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402

import client.centralized  # noqa: E402
import client.site  # noqa: E402
from deploy.report import headline  # noqa: E402
from deploy.sim_data import phantom_labels  # noqa: E402
from deploy.simulate import HOSPITALS_DIR, run_simulation, simulation_config, trainable_hospitals  # noqa: E402
from shared.config import SimulationPlan  # noqa: E402
from shared.scenarios import Task, make_tasks  # noqa: E402

HOSPITALS, STAGES, ROUNDS = 5, 5, 2
PHANTOM_LABELS = [phantom_labels(k) for k in range(HOSPITALS)]


def run(root: Path, scenario: str, continual: str, seed: int, dp_epsilon: float | None = None, tag: str = "") -> dict:
    name = f"{scenario}-{tag or continual}-seed-{seed}{'-dp' if dp_epsilon else ''}"
    config = simulation_config(root / name, HOSPITALS, scenario=scenario, stages=STAGES, rounds_per_stage=ROUNDS,
                               seed=seed, continual=continual,
                               min_hospitals=trainable_hospitals(PHANTOM_LABELS, scenario, STAGES))
    hospitals = f"seed-{seed}" if not dp_epsilon else name  # a DP run's ε ledgers start empty
    config = dataclasses.replace(config, sim_dir=str(root / hospitals / HOSPITALS_DIR))
    plan = SimulationPlan(hospitals=HOSPITALS, cache_dir=str(root / "cache"), dp_epsilon=dp_epsilon)
    report = run_simulation(config, plan, Console(stderr=True, quiet=True))
    return {**headline(report), "auroc_matrix": report["stages"]["auroc_matrix"], "declined": len(report["refused"]),
            **({"epsilon_max": max(report["privacy"]["epsilon"].values())} if dp_epsilon else {})}


def labelled_class_tasks(*args, **kwargs) -> list[Task]:
    """The class schedule's tasks, each supervising every disease of the tasks up to it (the oracle bound)."""
    tasks = make_tasks(*args, **kwargs)
    seen = [tuple(d for task in tasks[:t + 1] for d in task.supervised) for t in range(len(tasks))]
    return [dataclasses.replace(task, supervised=supervised) for task, supervised in zip(tasks, seen)]


@contextmanager
def class_oracle() -> Iterator[None]:
    """Hospitals and the centralized baseline train on :func:`labelled_class_tasks` (loaded sites are reloaded)."""
    client.site._load_site.cache_clear()
    try:
        with mock.patch.object(client.site, "make_tasks", labelled_class_tasks), \
                mock.patch.object(client.centralized, "make_tasks", labelled_class_tasks):
            yield
    finally:
        client.site._load_site.cache_clear()


def summary(runs: list[dict]) -> dict:
    keys = ("final_macro_auroc", "forgetting", "zero_shot", "centralized")
    return {k: {"mean": round(float(np.mean([r[k] for r in runs])), 4),
                "std": round(float(np.std([r[k] for r in runs])), 4)} for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dp-epsilon", type=float, default=8.0, help="0: skip the DP run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/continual.json"))
    args = parser.parse_args()
    result: dict = {"hospitals": HOSPITALS, "stages": STAGES, "rounds_per_stage": ROUNDS, "seeds": args.seeds,
                    "runs": {}}

    def record(key: str, runs: list[dict]) -> None:
        result["runs"][key] = {"runs": runs, "summary": summary(runs)}
        print(key, json.dumps(result["runs"][key]["summary"]), file=sys.stderr)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for scenario in ("class", "label", "data"):
            record(f"{scenario}/none", [run(root, scenario, "none", seed) for seed in args.seeds])
        record("class/lwf", [run(root, "class", "lwf", seed) for seed in args.seeds])
        for scenario in ("class", "label", "data"):
            record(f"{scenario}/replay", [run(root, scenario, "replay", seed) for seed in args.seeds])
        with class_oracle():
            record("class/oracle", [run(root, "class", "none", seed, tag="oracle") for seed in args.seeds])
        for scenario in ("label", "data"):  # nothing is ever old there: lwf must equal none
            same = run(root, scenario, "lwf", args.seeds[0])
            same["equals_none"] = same["final_macro_auroc"] == result["runs"][f"{scenario}/none"]["runs"][0][
                "final_macro_auroc"]
            record(f"{scenario}/lwf", [same])
        if args.dp_epsilon:
            for method in ("lwf", "replay"):
                record(f"class/{method}/dp-{args.dp_epsilon:g}",
                       [run(root, "class", method, args.seeds[0], args.dp_epsilon)])


if __name__ == "__main__":
    main()
