"""What runs in a deployed federation, and with which flags: the one source for the launcher and compose.

Server site (the consortium operator):

- ``superlink``: ``flower-superlink`` with TLS, SuperNode authentication, a persistent database, process isolation
  and no run-time dependency installation. It listens where only the operator's host reaches it: its Control API
  (``flwr run``, ``flwr supernode register``) has no authentication in open-source Flower.
- ``gateway``: ``retune gateway``, the only port hospitals reach; forwards the Fleet API alone (:mod:`deploy.gateway`).
- ``serverapp``: ``retune server serve``, the consortium's own ServerApp runtime (:mod:`server.runtime`): it runs the
  installed ServerApp for runs of approved app packages only, and is the only holder of the consortium signing key
  (a file it reads, never an environment variable a run's code could inherit).

Hospital site K:

- ``hospital-K``: ``flower-supernode`` with the hospital's own authentication key, the federation CA and process
  isolation; its node config names the hospital's data and protections (:func:`node_config`).
- ``runtime-K``: ``retune hospital serve``, the hospital-owned ClientApp runtime (:mod:`client.runtime`): the only
  process that reads the hospital's data.

:func:`server_services` and :func:`hospital_services` return each process's argv and environment for a set of file
paths (:class:`ServerFiles`, :class:`HospitalFiles`) and addresses, so the launcher (host paths, 127.0.0.1) and
``docker-compose.yml`` (container paths, service names) are built from the same flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Ports: the SuperLink (Control + Runtime APIs, operator only), the gateway (Fleet API), a SuperNode's Runtime API.
SUPERLINK_PORT, GATEWAY_PORT, RUNTIME_PORT = 9093, 9092, 9094
#: Environment of every process: offline, no telemetry, no update check.
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class ServerFiles:
    """Where the server site's files are (host or container paths)."""

    ca_cert: str
    server_cert: str
    server_key: str
    superexec_secret: str
    signing_key: str
    database: str
    approved_apps: str
    state: str


@dataclass(frozen=True)
class HospitalFiles:
    """Where one hospital's files are, as its runtime and SuperNode see them."""

    ca_cert: str
    auth_key: str
    superexec_secret: str
    manifest: str
    cache: str
    audit_log: str
    approved_apps: str
    privacy_ledger: str
    consortium_key: str
    roster: str


@dataclass(frozen=True)
class Service:
    """One process: its name, site, argv (program first) and extra environment."""

    name: str
    site: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hospital_floors(specs: list[str], names: list[str]) -> dict[str, dict]:
    """Each hospital's privacy-floor keys from ``--floor`` specs: ``key=value ...`` for every hospital, or
    ``NAME: key=value ...`` for one (later specs win)."""
    from client.floor import floor_settings
    from shared.errors import RetuneError

    floors: dict[str, dict] = {name: {} for name in names}
    for spec in specs:
        who, sep, rest = spec.partition(":")
        targets, text = ([who.strip()], rest) if sep and "=" not in who else (names, spec)
        unknown = [t for t in targets if t not in floors]
        if unknown:
            raise RetuneError(f"--floor {spec!r}: no hospital {unknown[0]!r} (hospitals: {', '.join(names)})")
        values = floor_settings(text)
        for target in targets:
            floors[target].update(values)
    return floors


def node_config(files: HospitalFiles, name: str, extra: dict[str, str] | None = None) -> str:
    """The SuperNode's ``--node-config``: the hospital's name, data and protections (read by its runtime)."""
    values = {"name": name, "manifest": files.manifest, "cache": files.cache, "audit-log": files.audit_log,
              "approved-apps": files.approved_apps, "privacy-ledger": files.privacy_ledger,
              "consortium-key": files.consortium_key, "roster": files.roster, "secagg-key": files.auth_key,
              **(extra or {})}
    return " ".join(f'{key}="{str(value).lower() if isinstance(value, bool) else value}"'
                    for key, value in values.items())


def server_services(files: ServerFiles, superlink_host: str, gateway_host: str, superlink_name: str,
                    superlink_port: int = SUPERLINK_PORT, gateway_port: int = GATEWAY_PORT) -> list[Service]:
    """SuperLink, gateway and the ServerApp runtime. ``superlink_host``/``gateway_host``: where each listens;
    ``superlink_name``: how the gateway and the SuperExec reach the SuperLink (a name its certificate holds)."""
    superlink_at = address(superlink_name, superlink_port)
    return [
        Service("superlink", "server", (
            "flower-superlink", "--ssl-ca-certfile", files.ca_cert, "--ssl-certfile", files.server_cert,
            "--ssl-keyfile", files.server_key, "--enable-supernode-auth", "--isolation", "process",
            "--superexec-auth-secret-file", files.superexec_secret, "--database", files.database,
            "--disable-runtime-dependency-installation", "--host", superlink_host, "--port", str(superlink_port))),
        Service("gateway", "server", (
            "retune", "gateway", "--listen", address(gateway_host, gateway_port), "--superlink", superlink_at,
            "--ca", files.ca_cert, "--cert", files.server_cert, "--key", files.server_key)),
        Service("serverapp", "server", (
            "retune", "server", "serve", "--runtime-api", superlink_at, "--root-certificates", files.ca_cert,
            "--superexec-secret", files.superexec_secret, "--signing-key", files.signing_key,
            "--approved-apps", files.approved_apps, "--state", files.state)),
    ]


def hospital_services(index: int, name: str, files: HospitalFiles, gateway_at: str, runtime_host: str,
                      runtime_name: str, runtime_port: int = RUNTIME_PORT,
                      extra_node_config: dict[str, str] | None = None) -> list[Service]:
    """Hospital ``index``'s SuperNode and runtime. ``gateway_at``: the gateway's ``host:port`` (a name the server
    certificate holds); ``runtime_host``: where the SuperNode's Runtime API listens; ``runtime_name``: how the
    runtime reaches it."""
    return [
        Service(f"hospital-{index}", f"hospital-{index}", (
            "flower-supernode", "--superlink", gateway_at, "--root-certificates", files.ca_cert,
            "--auth-supernode-private-key", files.auth_key, "--isolation", "process",
            "--superexec-auth-secret-file", files.superexec_secret, "--host", runtime_host,
            "--port", str(runtime_port), "--node-config", node_config(files, name, extra_node_config))),
        Service(f"runtime-{index}", f"hospital-{index}", (
            "retune", "hospital", "serve", "--runtime-api", address(runtime_name, runtime_port),
            "--superexec-secret", files.superexec_secret)),
    ]
