"""``retune simulate``: a whole federation on one machine, in one process (:mod:`deploy.local_grid`).

It makes the hospitals from one label table (N phantom hospitals, each with its own scanner style, prevalence skew
and labelled diseases, or a researcher's own file split by :mod:`deploy.partition`: :mod:`deploy.sim_data`),
embeds their images once, computes the zero-shot and centralized baselines, runs S stages × R rounds with
the same ServerApp and ClientApp a deployment uses, and writes ``report.json``, ``report.html`` and the final
checkpoint. Everything lands under ``--out``; running the same command again resumes an interrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table

from client.app import make_client_app
from client.site import SIM_SITE_FILE, Site, load_site, site_logits, site_metrics, site_settings
from client.trainer import stage_targets, train_adaptors
from deploy.certs import make_hospital_keys
from deploy.local_grid import run_local
from deploy.sim_data import SimulatedData, prepare_data
from server.app import CHECKPOINT, make_server_app
from server.evaluation import federated_metrics
from server.federation import initial_model, stage_diseases
from server.state import RunState, SealRegister
from shared.config import ADAPTOR_KINDS, LORA_TOWERS, FederationConfig, SimulationPlan, TrainConfig
from shared.continual import stage_examples
from shared.errors import RetuneError
from shared.identity import Roster
from shared.labels import CHEXPERT5
from shared.model import zero_shot_logits
from shared.scenarios import disease_groups
from shared.signing import PRIVATE_KEY, PUBLIC_KEY, generate_keys, load_private_key
from shared.wire import encoded, load_record

HOSPITALS_DIR = "hospitals"
ROSTER_FILE = "roster.json"
#: The simulated consortium's Ed25519 key pair: the server signs adaptors, hospitals and users verify; beside it, the
#: register of the rounds sealed in the run folder.
KEYS_DIR = "keys"
SEALS = "seals.json"


def simulation_config(out: Path, hospitals: int, **settings) -> FederationConfig:
    """Federation settings of a simulation under ``out``: by default a round counts only when every hospital's
    update was aggregated (``min_hospitals`` in ``settings`` says otherwise)."""
    return FederationConfig(**{"min_hospitals": hospitals, **settings}, run_dir=str(out),
                            sim_dir=str(out / HOSPITALS_DIR))


def trainable_hospitals(labelled: Sequence[Sequence[str]], scenario: str, stages: int,
                        diseases: tuple[str, ...] = CHEXPERT5) -> int:
    """The fewest hospitals (``labelled``: what each labels) that label a disease some stage supervises: a hospital
    that labels none of a class-incremental stage's diseases has nothing to train on then, and declines that stage's
    rounds."""
    if scenario not in ("class", "label"):
        return len(labelled)
    groups = disease_groups(diseases, stages)
    supervised = groups if scenario == "class" else [sum(groups[:t + 1], ()) for t in range(stages)]
    return min(sum(any(d in mine for d in group) for mine in labelled) for group in supervised)


def simulated_roster(config: FederationConfig, names: Sequence[str]) -> Path:
    """Each simulated hospital's identity key (as a deployed one uses its SuperNode key) and the consortium's roster
    of them, made once: what secure aggregation checks every key announcement against."""
    roster = Path(config.sim_dir) / ROSTER_FILE
    folders = {name: Path(config.sim_dir) / f"hospital-{k}" / "identity" for k, name in enumerate(names)}
    for name, folder in folders.items():
        if not (folder / "auth.pub").exists():
            make_hospital_keys(folder, name)
    if not roster.exists() or set(json.loads(roster.read_text())["hospitals"]) != set(folders):
        Roster.write(roster, {name: folder / "auth.pub" for name, folder in folders.items()})
    return roster


def prepare_hospitals(config: FederationConfig, plan: SimulationPlan, data: SimulatedData,
                      console: Console) -> list[Site]:
    """Write each simulated hospital's node settings (``hospital.json``) and embed its data (through the cache);
    returns their sites."""
    sites = []
    roster = simulated_roster(config, [h.name for h in data.hospitals])
    for k, hospital in enumerate(data.hospitals):
        folder = Path(config.sim_dir) / f"hospital-{k}"
        privacy = {"dp-max-epsilon": plan.dp_epsilon, "dp-delta": plan.dp_delta} if plan.dp_at(k) else {}
        (folder / SIM_SITE_FILE).write_text(json.dumps({
            "name": hospital.name, "manifest": str(hospital.manifest.resolve()), "allow-outside-paths": True,
            "cache": str(Path(plan.cache_dir or Path(config.run_dir) / "cache").resolve()), "backbone": config.backbone,
            "diseases": ",".join(hospital.labelled), "adaptor-kinds": ",".join(ADAPTOR_KINDS),
            "lora-towers": ",".join(LORA_TOWERS), **privacy,
            "audit-log": str((folder / "audit.jsonl").resolve()),
            "secagg-key": str((folder / "identity" / "auth.key").resolve()), "roster": str(roster.resolve()),
            "consortium-key": str((Path(config.run_dir) / KEYS_DIR / PUBLIC_KEY).resolve())}, indent=2))
        with console.status(f"embedding {hospital.name}"):
            sites.append(load_site(config, site_settings(config, {"partition-id": k})))
    return sites


def evaluate_sites(sites: list[Site], config: FederationConfig, logits_of, stage: int | None = None) -> dict:
    """Aggregate per-site exact metrics on the test data of the stages up to ``stage`` (default: the last) as the
    server does (pairs-weighted AUROC over hospitals)."""
    stage = config.stages - 1 if stage is None else stage
    reports = [site_metrics(None, site, stage, logits=logits_of(site)) for site in sites]
    return federated_metrics(reports, sites[0].diseases, stage, stage_diseases(config))


def zero_shot_baseline(sites: list[Site], config: FederationConfig) -> dict:
    """The frozen backbone with the prompts and no adaptors."""
    return evaluate_sites(sites, config, lambda s: zero_shot_logits(
        torch.as_tensor(s.test.embeddings), s.prompts.embeddings, s.prompts.averaging).numpy())


def exact_metrics(sites: list[Site], config: FederationConfig, arrays, stage: int | None = None) -> dict:
    """Global adaptors ``arrays`` scored exactly on every hospital's test data up to ``stage`` (what the hospitals'
    released, protected evaluations approximate)."""
    model = load_record(initial_model(config, sites[0].embed_dim), encoded(arrays, config.wire_dtype))  # as sent
    return evaluate_sites(sites, config, lambda s: site_logits(model, s), stage)


def centralized_baseline(sites: list[Site], config: FederationConfig) -> dict:
    """Pooled training on the same stage data, stage by stage, with the same epoch budget (rounds × epochs)."""
    model = initial_model(config, sites[0].embed_dim)
    train_config = TrainConfig(epochs=config.rounds_per_stage * config.local_epochs, batch_size=config.batch_size,
                               lr=config.lr, seed=config.seed)
    for stage in range(config.stages):
        examples = [stage_examples(s.tasks, stage, s.train.labels, s.diseases, config.continual_method)
                    for s in sites]
        x = np.concatenate([s.train.inputs(model)[rows] for s, (rows, _) in zip(sites, examples)])
        y = np.concatenate([labels for _, labels in examples])
        targets = stage_targets(model, x, y, sites[0].prompts, sites[0].diseases, sites[0].tasks, stage,
                                config.continual_method, config.lwf_weight)  # the same continual option
        train_adaptors(model, x, targets.labels, sites[0].prompts, train_config, weights=targets.weights)
    return evaluate_sites(sites, config, lambda s: site_logits(model, s))


def _progress_table(config: FederationConfig, history: list[dict], baselines: dict) -> Table:
    table = Table(title=f"federation: {config.stages} stages × {config.rounds_per_stage} rounds, "
                        f"{config.strategy}, {config.scenario}-incremental")
    for column in ("stage", "round", "hospitals", "macro AUROC", "bytes up", "s/round"):
        table.add_column(column, justify="right")
    for r in history[-12:]:
        table.add_row(str(r["stage"] + 1), str(r["round"] + 1), str(r["clients"]),
                      f"{r['macro_auroc']:.3f}" if r["macro_auroc"] is not None else "-",
                      f"{r['bytes_up']:,}", f"{r['wall_s']:.1f}")
    table.caption = " · ".join(f"{name.replace('_', '-')} {b['macro_auroc']:.3f}" for name, b in baselines.items())
    return table


class SimulationInterrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM stopped the simulation after a committed round; running it again resumes."""


@contextmanager
def stop_after_round(console: Console) -> Iterator[threading.Event]:
    """While inside, SIGINT/SIGTERM ask the run to stop once the current round is committed (the event is set); a
    second one ends the process at once (every committed round is sealed on disk, so that loses only the round in
    progress)."""
    requested = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        if requested.is_set():  # hospitals' threads would outlive an exception here: leave now
            console.print("[yellow]stopped at once[/]: the round in progress is lost; run the same command again to "
                          "resume from the last committed one")
            os._exit(130)
        requested.set()
        console.print("[yellow]stopping after the current round is committed[/] (again to stop at once, losing it)")

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_simulation(config: FederationConfig, plan: SimulationPlan, console: Console | None = None,
                   client_mods: list | None = None, data: SimulatedData | None = None) -> dict:
    """Prepare hospitals, compute baselines, federate, and return the report (also written to disk).

    ``data``: the hospitals :func:`deploy.sim_data.prepare_data` made from ``plan.data`` (made here when not given);
    ``client_mods`` are Flower client mods wrapped around every simulated hospital's ClientApp; ``plan.poison`` adds
    the (testing only) poisoning one.
    """
    from deploy.report import build_report, write_html
    from research.poison import Poison

    if plan.poison:
        if config.secure_aggregation:
            raise RetuneError("--poison alters plain train replies: it cannot be combined with secure aggregation")
        client_mods = [*(client_mods or []), Poison.parse(plan.poison, plan.hospitals).mod()]

    console = console or Console(stderr=True)
    if config.min_hospitals > plan.hospitals:
        raise RetuneError(f"min-hospitals {config.min_hospitals} can never be met with only {plan.hospitals} "
                          "hospitals: no round would count")
    out = Path(config.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / KEYS_DIR / PRIVATE_KEY).exists():
        generate_keys(out / KEYS_DIR)
    key = load_private_key(out / KEYS_DIR / PRIVATE_KEY)
    seals = out / KEYS_DIR / SEALS
    resumed = RunState.open(config, None, key, SealRegister(seals))  # a changed or rolled-back folder is refused
    start = time.perf_counter()
    data = data or prepare_data(Path(config.sim_dir), plan, config.seed, console)
    if len(data.hospitals) != plan.hospitals:
        raise RetuneError(f"the plan counts {plan.hospitals} hospitals, the data make {len(data.hospitals)}")
    sites = prepare_hospitals(config, plan, data, console)
    prepared_s = time.perf_counter() - start
    with console.status("baselines: zero-shot and centralized"):
        baselines = {"zero_shot": zero_shot_baseline(sites, config),
                     "centralized": centralized_baseline(sites, config)}
    history: list[dict] = []
    # each round's global adaptors scored on the data directly (what the released figures approximate); rounds
    # committed before a resumption are not rescored
    exact: list[float | None] = [None] * resumed.server_round
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with Live(_progress_table(config, history, baselines), console=console, refresh_per_second=4) as live, \
            stop_after_round(console) as stop:
        def on_round(record: dict, state: RunState) -> None:
            history[:] = state.history
            exact.append(exact_metrics(sites, config, state.arrays, record["stage"])["macro_auroc"])
            live.update(_progress_table(config, history, baselines))
            if stop.is_set() and not state.done:
                raise SimulationInterrupted(
                    f"interrupted after stage {record['stage'] + 1} round {record['round'] + 1} of {config.stages} × "
                    f"{config.rounds_per_stage} (committed to {out}); run the same command again to resume")

        fed_start = time.perf_counter()
        run_local(make_server_app(config, on_round, out / KEYS_DIR / PRIVATE_KEY, seals),
                  make_client_app(config, client_mods), plan.hospitals,
                  workers=min(plan.hospitals, os.cpu_count() or 1), run_id=secrets.randbits(63))
        federation_s = time.perf_counter() - fed_start
    if not console.is_terminal:  # Live leaves its last line (the table's caption) open where nothing redraws it
        console.line()
    state = RunState.open(config, None, key)
    if not state.done:
        raise RuntimeError(f"the federation stopped before its last round; see the log above ({out})")
    report = build_report(config, plan, state, sites, data.record(), baselines,
                          {"prepare_s": prepared_s, "federation_s": federation_s}, out / CHECKPOINT,
                          exact_metrics(sites, config, state.arrays), exact)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_html(report, out / "report.html")
    return report
