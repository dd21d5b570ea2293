"""docker-compose.yml and the Dockerfile: they parse, and every command is a real orgsync command."""

from __future__ import annotations

import re
import shlex
import tomllib
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from orgsync.cli import cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

ORGSYNC_SERVICES = {"migrate", "web", "worker", "clerk-worker", "beat"}
SETTINGS = {"DATABASE_URL", "BROKER_URL", "CLERK_WEBHOOK_SIGNING_SECRET", "CLERK_SECRET_KEY", "CLERK_API_URL"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def command_argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def resolve(argv: list[str]) -> click.Context:
    """Walk the click tree like the real command line would, and parse the leaf's options."""
    assert argv[0] == "orgsync"
    command: click.Command = cli
    args = argv[1:]
    parent: click.Context | None = None
    path = ["orgsync"]
    while isinstance(command, click.Group):
        assert args, f"{' '.join(path)} needs a subcommand"
        name, args = args[0], args[1:]
        context = click.Context(command, info_name=path[-1], parent=parent)
        sub = command.get_command(context, name)
        assert sub is not None, f"{' '.join(path)} has no subcommand {name!r}"
        parent, command = context, sub
        path.append(name)
    # make_context parses the options: an unknown option or a bad value raises here.
    return command.make_context(path[-1], list(args), parent=parent)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): str(value) for key, value in env.items()}


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert {"postgres", "redis", *ORGSYNC_SERVICES} <= set(services)


@pytest.mark.parametrize("name", sorted(ORGSYNC_SERVICES))
def test_each_orgsync_command_is_real_and_parses(services: dict[str, dict[str, Any]], name: str) -> None:
    argv = command_argv(services[name])
    assert argv, f"{name} has no command"
    assert argv[0] == "orgsync"
    context = resolve(argv)
    assert context.command.callback is not None


def test_every_command_starting_with_orgsync_resolves(services: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for service in services.values():
        argv = command_argv(service)
        if argv and argv[0] == "orgsync":
            resolve(argv)
            checked += 1
    assert checked >= len(ORGSYNC_SERVICES)


def test_the_resolver_rejects_what_the_cli_rejects() -> None:
    with pytest.raises(AssertionError, match="no subcommand"):
        resolve(["orgsync", "srve"])
    with pytest.raises(click.NoSuchOption):
        resolve(["orgsync", "serve", "--prot", "8000"])
    with pytest.raises(click.BadParameter):
        resolve(["orgsync", "serve", "--port", "eighty"])


def test_web_command_listens_on_all_interfaces_and_publishes_the_port(
    services: dict[str, dict[str, Any]],
) -> None:
    web = services["web"]
    context = resolve(command_argv(web))
    assert context.command.name == "serve"
    assert context.params["host"] == "0.0.0.0"
    port = context.params["port"]
    published = [str(item) for item in web.get("ports", [])]
    assert any(item.split(":")[-1] == str(port) for item in published), published


@pytest.mark.parametrize("name", sorted(ORGSYNC_SERVICES))
def test_orgsync_services_get_the_settings(services: dict[str, dict[str, Any]], name: str) -> None:
    env = environment(services[name])
    assert set(env) >= SETTINGS, SETTINGS - set(env)
    assert "postgres" in env["DATABASE_URL"]
    assert env["BROKER_URL"].startswith("redis://")


def test_a_missing_signing_secret_fails_loudly(services: dict[str, dict[str, Any]]) -> None:
    # ${VAR:?message}: compose refuses to start instead of serving an endpoint nobody can verify.
    value = environment(services["web"])["CLERK_WEBHOOK_SIGNING_SECRET"]
    assert re.fullmatch(r"\$\{CLERK_WEBHOOK_SIGNING_SECRET:\?[^}]+\}", value), value


def test_depends_on_graph(services: dict[str, dict[str, Any]]) -> None:
    graph: dict[str, set[str]] = {}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec.get("condition", "service_started") in CONDITIONS
        graph[name] = set(depends)
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as exc:  # pragma: no cover - only on a broken file
        pytest.fail(f"depends_on has a cycle: {exc}")

    def condition(name: str, dep: str) -> str:
        return str(services[name]["depends_on"][dep].get("condition", "service_started"))

    assert condition("migrate", "postgres") == "service_healthy"
    assert "healthcheck" in services["postgres"]
    for name in ORGSYNC_SERVICES - {"migrate"}:
        assert condition(name, "migrate") == "service_completed_successfully"
        assert condition(name, "postgres") == "service_healthy"
        assert "redis" in graph[name]
    for name in services:
        for dep in graph[name]:
            if condition(name, dep) == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep} to be healthy, it has no check"
                )


def test_each_queue_has_workers_of_its_own(services: dict[str, dict[str, Any]]) -> None:
    # Applying events must never wait behind Backend API calls: one service per queue.
    queues: dict[str, str] = {}
    for name, service in services.items():
        argv = command_argv(service)
        if argv[:2] == ["orgsync", "worker"]:
            queue = resolve(argv).params["queue"]
            assert queue is not None, f"{name} runs both pools in one container"
            assert queue not in queues, f"{name} and {queues[queue]} both run {queue}"
            queues[queue] = name
    assert set(queues) == {"apply", "clerk"}


def test_migrate_is_one_shot(services: dict[str, dict[str, Any]]) -> None:
    assert str(services["migrate"].get("restart", "no")) == "no"
    assert command_argv(services["migrate"])[1:] == ["db", "upgrade"]


def test_orgsync_services_build_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    for name in ORGSYNC_SERVICES:
        build = services[name].get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context in {".", "./"}, f"{name} does not build from this repository"


def test_dockerfile_installs_the_project() -> None:
    assert DOCKERFILE.is_file()
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"^RUN pip install \.", text, re.MULTILINE)
    copied = {
        Path(source).as_posix().rstrip("/")
        for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE)
        for source in line.split()[:-1]
    }
    # Every package the project ships must be in the image, and every copied path must exist.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {name.rstrip("*") for name in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, packages - copied
    assert "pyproject.toml" in copied
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"


# ---------------------------------------------------------------- profiles: emulator, prometheus

PROFILED = {"emulator": "emulator", "prometheus": "prometheus"}


def test_the_base_services_run_without_a_profile(services: dict[str, dict[str, Any]]) -> None:
    for name in {"postgres", "redis", *ORGSYNC_SERVICES}:
        assert "profiles" not in services[name], name


@pytest.mark.parametrize("name", sorted(PROFILED))
def test_optional_services_are_in_their_profile(services: dict[str, dict[str, Any]], name: str) -> None:
    assert services[name]["profiles"] == [PROFILED[name]]


def test_the_emulator_delivers_to_the_web_service_with_its_secret(
    services: dict[str, dict[str, Any]],
) -> None:
    emulator = services["emulator"]
    context = resolve(command_argv(emulator))
    assert context.command.name == "emulator"
    assert context.params["host"] == "0.0.0.0"
    web = resolve(command_argv(services["web"]))
    assert context.params["webhook_urls"] == (f"http://web:{web.params['port']}/webhooks/clerk",)
    published = [str(item) for item in emulator.get("ports", [])]
    assert any(item.split(":")[-1] == str(context.params["port"]) for item in published), published
    # The same secrets as orgsync's, so that the signatures verify and the API key is accepted.
    env = environment(emulator)
    for name in ("CLERK_WEBHOOK_SIGNING_SECRET", "CLERK_SECRET_KEY"):
        assert env[name] == environment(services["web"])[name], name
    assert emulator["depends_on"]["web"]["condition"] == "service_healthy"
    build = emulator.get("build")
    assert build in {".", "./"}
    # The comment tells how to point orgsync at it: CLERK_API_URL naming this service and port.
    assert f"CLERK_API_URL=http://emulator:{context.params['port']}/v1" in COMPOSE.read_text()


def test_prometheus_scrapes_the_web_service_with_the_repository_config(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    prometheus = services["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target, *_ = str(volume).split(":")
        mounts[target] = source
    config_path = next(
        arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file=")
    )
    source = mounts[config_path]
    assert (ROOT / source).is_file(), source
    config = yaml.safe_load((ROOT / source).read_text())
    # Rule files resolve beside the config file, and are mounted there.
    directory = config_path.rsplit("/", 1)[0]
    for rule_file in config["rule_files"]:
        assert (ROOT / mounts[f"{directory}/{rule_file}"]).is_file(), rule_file
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "orgsync")
    web = resolve(command_argv(services["web"]))
    assert job["static_configs"][0]["targets"] == [f"web:{web.params['port']}"]
    # The bearer token file is the compose config holding ORGSYNC_METRICS_TOKEN.
    token = next(
        item for item in prometheus["configs"] if item["target"] == job["authorization"]["credentials_file"]
    )
    assert "ORGSYNC_METRICS_TOKEN" in compose["configs"][token["source"]]["content"]
    assert prometheus["depends_on"]["web"]["condition"] == "service_healthy"


def test_web_and_worker_share_the_metrics_directory(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    for name in ORGSYNC_SERVICES:
        volumes = [str(item) for item in services[name].get("volumes", [])]
        assert "metrics:/var/lib/orgsync/metrics" in volumes, name
    assert "metrics" in compose["volumes"]
    # The image's data directory holds it, owned by the user the processes run as.
    text = DOCKERFILE.read_text()
    assert "ORGSYNC_DATA_DIR=/var/lib/orgsync" in text
    assert re.search(r"install -d -o orgsync /var/lib/orgsync/metrics", text)
