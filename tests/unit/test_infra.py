"""The deployment material in infra/ stays true to the Procfile and to the settings.

No container engine runs here, so these parse the files: the compose file, the
Kubernetes manifests, Heroku's app.json and the Dockerfile must run the
Procfile's commands, and every variable they set must be one steprun documents
(or one the Procfile's processes read themselves).
"""
from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import documented_settings
from shared.stats import WAITING

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# Read by the Procfile's commands and gunicorn's config rather than by shared.settings.
PROCESS_VARIABLES = {"PORT", "WEB_CONCURRENCY", "STEPRUN_WORKER_CONNECTIONS", "STEPRUN_WORKER_CONCURRENCY",
                     "STEPRUN_QUEUE"}
KNOWN = {s.env for s in documented_settings()} | PROCESS_VARIABLES


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name.strip(): command.strip() for name, _, command in (ln.partition(":") for ln in lines if ln.strip())}


def normalize(command: Any, *, compose: bool = False) -> str:
    """The command a container runs, as the Procfile line it should equal."""
    if isinstance(command, list):
        command = command[2] if command[:2] == ["sh", "-c"] else shlex.join(command)
    if compose:
        command = command.replace("$$", "$")  # compose's escape for a literal "$"
    command = " ".join(command.split())
    return command[len("exec "):] if command.startswith("exec ") else command


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in infra/k8s, found {len(matches)}"
    return matches[0]


K8S_PROCESSES = {"web": ("Deployment", "steprun-web"), "worker": ("Deployment", "steprun-worker"),
                 "scheduler": ("Deployment", "steprun-scheduler"), "release": ("Job", "steprun-migrate")}


def test_the_procfile_has_the_four_processes() -> None:
    assert set(procfile()) == {"release", "web", "worker", "scheduler"}


# --- compose -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_runs_the_procfile_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, command in procfile().items():
        assert normalize(services[name]["command"], compose=True) == command, f"compose service {name}"


def test_compose_has_the_backing_services_and_migrates_first(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis"} <= set(services)
    for name in ("web", "worker", "scheduler"):
        assert services[name]["depends_on"]["release"]["condition"] == "service_completed_successfully", name
    env = services["web"]["environment"]
    assert "@postgres:" in env["DATABASE_URL"] and "//redis:" in env["REDIS_URL"]


def test_compose_sets_only_known_variables(compose: dict[str, Any]) -> None:
    for name in procfile():
        unknown = set(compose["services"][name].get("environment") or {}) - KNOWN
        assert not unknown, f"compose service {name} sets undocumented variables: {sorted(unknown)}"


# --- Kubernetes --------------------------------------------------------------------

def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def test_k8s_runs_the_procfile_commands() -> None:
    docs = k8s_documents()
    for process, (kind, name) in K8S_PROCESSES.items():
        containers = pod_spec(find(docs, kind, name))["containers"]
        assert len(containers) == 1, f"{kind} {name}"
        assert normalize(containers[0]["command"]) == procfile()[process], f"{kind} {name}"


def test_k8s_sets_only_known_variables() -> None:
    docs = k8s_documents()
    for kind, name in K8S_PROCESSES.values():
        container = pod_spec(find(docs, kind, name))["containers"][0]
        names = {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                names |= set(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
            if "secretRef" in source:
                secret = find(docs, "Secret", source["secretRef"]["name"])
                names |= set(secret.get("stringData") or {}) | set(secret.get("data") or {})
        unknown = names - KNOWN
        assert not unknown, f"{kind} {name} sets undocumented variables: {sorted(unknown)}"
        assert {"DATABASE_URL", "REDIS_URL"} <= names, f"{kind} {name} lacks DATABASE_URL/REDIS_URL"


def test_k8s_service_reaches_the_web_pods() -> None:
    docs = k8s_documents()
    web, service = find(docs, "Deployment", "steprun-web"), find(docs, "Service", "steprun-web")
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in pod_spec(web)["containers"][0]["ports"]}
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    env = {e["name"]: e["value"] for e in pod_spec(web)["containers"][0]["env"]}
    assert int(env["PORT"]) in ports.values()


def test_k8s_runs_exactly_one_scheduler() -> None:
    scheduler = find(k8s_documents(), "Deployment", "steprun-scheduler")
    assert scheduler["spec"]["replicas"] == 1 and scheduler["spec"]["strategy"]["type"] == "Recreate"


def test_keda_scales_the_workers_on_the_queue_latency_query() -> None:
    docs = k8s_documents()
    scaled = find(docs, "ScaledObject", "steprun-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == find(docs, "Deployment", "steprun-worker")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    query = " ".join(trigger["metadata"]["query"].split())
    assert " ".join(WAITING.split()) in query, "the KEDA query must use shared/stats.py's WAITING condition"
    auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    secret = find(docs, "Secret", auth["spec"]["secretTargetRef"][0]["name"])
    assert auth["spec"]["secretTargetRef"][0]["key"] in secret["stringData"]
    # Workers must outlive Celery's soft shutdown (25 s) when KEDA scales in.
    worker = find(docs, "Deployment", "steprun-worker")
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > 25


# --- Heroku ------------------------------------------------------------------------

def test_app_json_matches_the_procfile_and_settings() -> None:
    app = json.loads((INFRA / "app.json").read_text())
    assert set(app["formation"]) == set(procfile()) - {"release"}  # release runs on every deploy, no dyno
    plans = {a["plan"].split(":")[0] for a in app["addons"]}
    assert {"heroku-postgresql", "heroku-redis"} <= plans
    unknown = set(app["env"]) - KNOWN
    assert not unknown, f"app.json sets undocumented variables: {sorted(unknown)}"


# --- the image ---------------------------------------------------------------------

def test_dockerfile_installs_the_runtime_packages_and_runs_web() -> None:
    text = (INFRA / "Dockerfile").read_text()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = {p.strip() for p in cfg["options.packages.find"]["include"].split() if p.strip()}
    runtime = {p for p in packages if "." not in p and not p.endswith("*") and p != "bench"}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    assert runtime <= copied, f"the image lacks packages: {sorted(runtime - copied)}"
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", text, re.M)[-1])
    assert normalize(cmd) == procfile()["web"]


def test_package_data_ships_every_migration_file() -> None:
    """A wheel (the image, Heroku) must carry Alembic's env.py and every revision, or `steprun migrate` fails."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["shared"].replace("\n", ",").split(",") if p.strip()]
    shared = ROOT / "shared"
    files = [p.relative_to(shared).as_posix() for p in (shared / "migrations").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"setup.cfg [options.package_data] shared= misses {missing}"
