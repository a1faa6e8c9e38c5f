"""The Terraform in terraform/, checked offline: it parses, it has the shape a reviewer
expects, it agrees with gunicorn's settings and the app's routes, checkov passes, and
the dispatcher's regions file comes straight out of it.

No Terraform CLI and no Azure here: expressions are evaluated by a small evaluator for
the arithmetic this configuration uses, with each variable's declared default.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from executor_service import create_app
from executor_service.auth import PUBLIC_PATHS
from executor_service.cli import build_parser
from executor_service.config import Settings
from executor_service.dispatcher.regions import KNOWN_KEYS, Regions

try:
    import hcl2
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip(
        "python-hcl2 is not installed (pip install 'python-hcl2>=8,<9'): Terraform not checked",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[2]
TF = REPO / "terraform"
REGION_MODULE = TF / "modules" / "executor_region"
DISPATCHER_MODULE = TF / "modules" / "dispatcher"
SCRIPT = REPO / "scripts" / "regions_from_terraform.py"
BIN = Path(sys.executable).parent  # the virtualenv's bin/, not resolved through symlinks

pytestmark = pytest.mark.deploy

# Names of env vars whose value is a credential: they must come from a secret.
SECRET_ENV = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|DSN|DATABASE_URL|CREDENTIAL", re.I)
# Inputs that carry secret values: an env `value` must never mention them.
SECRET_SOURCES = re.compile(
    r"var\.(api_key|sentry_dsn|provider_secrets|region_api_keys)\b|random_password\."
)


# ------------------------------------------------------------------ loading ---


def _options() -> Any:
    try:
        from hcl2.utils import SerializationOptions
    except ImportError:
        pytest.fail(
            "the 'hcl2' module is not python-hcl2 8 (checkov's bc-python-hcl2 overwrites it "
            "when both share a virtualenv): reinstall python-hcl2>=8,<9 and keep checkov in "
            "its own virtualenv"
        )
    return SerializationOptions(
        strip_string_quotes=True, with_comments=False, explicit_blocks=False
    )


def load_tf(path: Path) -> dict[str, Any]:
    """One .tf file as python-hcl2 8 sees it, string quotes stripped."""
    return hcl2.loads(path.read_text(), serialization_options=_options())


class Config:
    """Every .tf file of one module directory, merged by block kind."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.variables: dict[str, dict[str, Any]] = {}
        self.locals: dict[str, Any] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.modules: dict[str, dict[str, Any]] = {}
        self.terraform: list[dict[str, Any]] = []
        for path in sorted(directory.glob("*.tf")):
            doc = load_tf(path)
            for block in doc.get("resource", []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        self.resources[(rtype, name)] = body
            for block in doc.get("variable", []):
                self.variables.update(block)
            for block in doc.get("locals", []):
                self.locals.update(block)
            for block in doc.get("output", []):
                self.outputs.update(block)
            for block in doc.get("module", []):
                self.modules.update(block)
            self.terraform += doc.get("terraform", [])

    def of_type(self, rtype: str) -> dict[str, dict[str, Any]]:
        return {name: body for (t, name), body in self.resources.items() if t == rtype}

    def defaults(self) -> dict[str, Any]:
        return {name: v["default"] for name, v in self.variables.items() if "default" in v}


@pytest.fixture(scope="module")
def root() -> Config:
    return Config(TF)


@pytest.fixture(scope="module")
def region() -> Config:
    return Config(REGION_MODULE)


@pytest.fixture(scope="module")
def dispatcher() -> Config:
    return Config(DISPATCHER_MODULE)


def container_apps() -> Iterator[tuple[str, dict[str, Any]]]:
    for config in (Config(REGION_MODULE), Config(DISPATCHER_MODULE)):
        for name, body in config.of_type("azurerm_container_app").items():
            yield f"{config.directory.name}.{name}", body


def one(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(blocks) == 1, blocks
    return blocks[0]


def blocks_of(body: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """Static `kind` blocks plus the content of `dynamic "kind"` blocks."""
    found = list(body.get(kind, []))
    for dyn in body.get("dynamic", []):
        if kind in dyn:
            found += dyn[kind]["content"]
    return found


# --------------------------------------------------------------- evaluating ---


def _ternary_to_python(src: str) -> str:
    # `c ? a : b` -> `(a) if (c) else (b)`; this configuration nests none.
    if "?" not in src:
        return src
    assert src.count("?") == 1, f"nested conditionals are not supported: {src}"
    match = re.fullmatch(r"(.+?)\?(.+?):(.+)", src)
    assert match, src
    cond, then, other = match.groups()
    return f"({then}) if ({cond}) else ({other})"


_ALLOWED = (
    ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Call,
    ast.Constant, ast.Name, ast.Subscript, ast.Load, ast.And, ast.Or, ast.Not, ast.Add,
    ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.USub, ast.Eq, ast.NotEq, ast.Lt, ast.LtE,
    ast.Gt, ast.GtE,
)  # fmt: skip
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min, "max": max, "floor": math.floor, "ceil": math.ceil, "tostring": str,
}  # fmt: skip


def evaluate(value: Any, variables: Mapping[str, Any], locals_: Mapping[str, Any]) -> Any:
    """Evaluate a python-hcl2 value: arithmetic, comparisons, a ternary, var.* and local.*."""
    if not isinstance(value, str) or not (value.startswith("${") and value.endswith("}")):
        return value
    src = value[2:-1]
    src = re.sub(r"\bvar\.(\w+)", r'V["\1"]', src)
    src = re.sub(r"\blocal\.(\w+)", r'L("\1")', src)
    src = src.replace("&&", " and ").replace("||", " or ")
    src = re.sub(r"!(?!=)", " not ", src)
    src = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", src))
    src = _ternary_to_python(src)
    tree = ast.parse(src.strip(), mode="eval")
    for node in ast.walk(tree):
        assert isinstance(node, _ALLOWED), f"cannot evaluate {value!r}: {type(node).__name__}"
        if isinstance(node, ast.Name):
            assert node.id in {"V", "L", *_FUNCTIONS}, f"cannot evaluate {value!r}: {node.id}"

    def local(name: str) -> Any:
        return evaluate(locals_[name], variables, locals_)

    scope = {"V": variables, "L": local, **_FUNCTIONS}
    return eval(compile(tree, "<hcl>", "eval"), {"__builtins__": {}}, scope)


def tf_str(value: Any) -> str:
    """Terraform's string form of a number (tostring(4) is "4", tostring(0.5) is "0.5")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_evaluator_understands_this_configuration() -> None:
    variables = {"workers": 4, "threads": 2, "worker_class": "gevent", "gevent_max_in_flight": 100}
    locals_ = {
        "per": '${var.worker_class == "gevent" ? var.gevent_max_in_flight : var.threads}',
        "total": "${var.workers * local.per}",
    }
    assert evaluate("${local.total}", variables, locals_) == 400
    assert evaluate("${local.total}", {**variables, "worker_class": "gthread"}, locals_) == 8
    assert evaluate("${min(10, ceil(60 / 10) + 2)}", {}, {}) == 8
    assert evaluate("${var.workers >= 1 && !(var.workers > 3)}", variables, {}) is False


# -------------------------------------------------------- gunicorn defaults ---


@pytest.fixture(scope="module")
def gunicorn_defaults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The settings executor_service/gunicorn_config.py gives with none of its variables set."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("GUNICORN_", "ES_")) or k in {"PORT", "HOST", "WEB_CONCURRENCY"})
    }
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path_factory.mktemp("metrics"))
    code = (
        "import json, executor_service.gunicorn_config as c; print(json.dumps({"
        "'bind': c.bind, 'workers': c.workers, 'threads': c.threads, "
        "'worker_class': c.worker_class, 'timeout': c.timeout, "
        "'graceful_timeout': c.graceful_timeout, "
        "'gevent_max_in_flight': c.GEVENT_MAX_IN_FLIGHT}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    settings: dict[str, Any] = json.loads(done.stdout)
    settings["port"] = int(settings["bind"][0].rsplit(":", 1)[1])
    return settings


# ------------------------------------------------------------------ parsing ---

TF_FILES = sorted([*TF.rglob("*.tf"), *TF.rglob("*.tfvars.example")])


def test_there_is_terraform_to_check() -> None:
    names = {p.relative_to(TF).as_posix() for p in TF_FILES}
    assert {"main.tf", "variables.tf", "outputs.tf", "versions.tf"} <= names
    assert {"modules/executor_region/main.tf", "modules/dispatcher/main.tf"} <= names


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: p.relative_to(TF).as_posix())
def test_every_tf_file_parses(path: Path) -> None:
    doc = load_tf(path)
    assert doc, f"{path} parsed to nothing"


def test_the_example_tfvars_sets_only_declared_variables(root: Config) -> None:
    example = load_tf(TF / "terraform.tfvars.example")
    assert set(example) <= set(root.variables)
    region_type = root.variables["regions"]["type"]
    attributes = set(re.findall(r"(\w+) = ", region_type))
    for name, settings in example["regions"].items():
        assert set(settings) <= attributes, name
    assert set(example["dispatcher"]) <= set(
        re.findall(r"(\w+) = ", root.variables["dispatcher"]["type"])
    )
    catalog = example["regions"]["us-east"]["catalog_toml"]
    toml_text = "\n".join(line.strip() for line in catalog.splitlines()[1:-1])
    assert set(tomllib.loads(toml_text)["models"]) == set(example["regions"]["us-east"]["models"])


# ------------------------------------------------------------------ structure ---


def test_azurerm_provider_is_pinned(root: Config, region: Config, dispatcher: Config) -> None:
    providers = one(one(root.terraform)["required_providers"])
    assert providers["azurerm"]["source"] == "hashicorp/azurerm"
    assert re.fullmatch(r"~> 4\.\d+", providers["azurerm"]["version"])
    assert one(root.terraform)["required_version"]
    for module in (region, dispatcher):
        azurerm = one(one(module.terraform)["required_providers"])["azurerm"]
        assert "< 5.0" in azurerm["version"], f"{module.directory.name} allows azurerm 5"


def test_default_regions_are_the_three_of_the_demo(root: Config) -> None:
    regions = root.variables["regions"]["default"]
    assert {name: r["location"] for name, r in regions.items()} == {
        "us-east": "eastus",
        "eu-west": "westeurope",
        "asia-pacific": "southeastasia",
    }
    for name, r in regions.items():
        assert r["models"] and all(isinstance(m, str) for m in r["models"]), name


def test_every_region_gets_every_resource(root: Config, region: Config) -> None:
    module = root.modules["executor_region"]
    assert module["source"] == "./modules/executor_region"
    assert module["for_each"] == "${var.regions}"
    assert module["region"] == "${each.key}"
    assert module["location"] == "${each.value.location}"

    expected = {
        "azurerm_resource_group",
        "azurerm_log_analytics_workspace",
        "azurerm_container_app_environment",
        "azurerm_user_assigned_identity",
        "azurerm_role_assignment",
        "azurerm_container_app",
    }
    assert expected <= {rtype for rtype, _ in region.resources}
    optional = {("azurerm_role_assignment", "key_vault_secrets")}  # only with a Key Vault
    for key, body in region.resources.items():
        if key in optional:
            continue
        assert "count" not in body and "for_each" not in body, f"{key} is not in every region"
        if "location" in body:
            assert body["location"] == "${var.location}", f"{key} is not in its region"
        if "name" in body and key[0] != "azurerm_role_assignment":
            assert "${var.region}" in body["name"] or body["name"].startswith("${local."), (
                f"{key}: name does not include the region, two regions would collide"
            )
    assert "${var.region}" in region.locals["app_name"]


def test_registry_is_premium_and_geo_replicated_to_the_regions(root: Config) -> None:
    acr = root.resources[("azurerm_container_registry", "this")]
    assert acr["sku"] == "Premium"
    assert acr["admin_enabled"] is False
    assert acr["anonymous_pull_enabled"] is False
    replicas = one([d["georeplications"] for d in acr["dynamic"] if "georeplications" in d])
    assert replicas["for_each"] == "${local.registry_replica_locations}"
    assert one(replicas["content"])["location"] == "${georeplications.value}"
    # The replica set is every region's location except the registry's home.
    expr = root.locals["registry_replica_locations"]
    assert "r.location" in expr and "var.regions" in expr and "!= var.registry_location" in expr


def test_registry_is_pulled_by_identity_not_by_password(
    root: Config, region: Config, dispatcher: Config
) -> None:
    for name in ("executor_region", "dispatcher"):
        module = root.modules[name]
        assert module["registry_id"] == "${azurerm_container_registry.this.id}"
        assert module["registry_login_server"] == "${azurerm_container_registry.this.login_server}"
    for config in (region, dispatcher):
        where = config.directory.name
        identity_id = "${azurerm_user_assigned_identity.this.id}"
        pull = config.resources[("azurerm_role_assignment", "acr_pull")]
        assert pull["role_definition_name"] == "AcrPull"
        assert pull["scope"] == "${var.registry_id}"
        assert pull["principal_id"] == "${azurerm_user_assigned_identity.this.principal_id}"
        app = config.resources[("azurerm_container_app", "this")]
        registry = one(app["registry"])
        assert registry == {"server": "${var.registry_login_server}", "identity": identity_id}
        identity = one(app["identity"])
        assert identity["type"] == "UserAssigned" and identity["identity_ids"] == [identity_id]
        # The role must exist before the first pull.
        assert "${azurerm_role_assignment.acr_pull}" in app["depends_on"], where
        assert "registry_password" not in json.dumps(app)


def _probes(app: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    container = one(one(app["template"])["container"])
    return {
        kind: one(container[kind])
        for kind in ("startup_probe", "readiness_probe", "liveness_probe")
        if kind in container
    }


@pytest.mark.usefixtures("quiet_root_logger")
def test_probes_point_at_public_routes_of_the_app(
    region: Config, dispatcher: Config, gunicorn_defaults: dict[str, Any], tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[models.sim]\nprovider = "simulated"\n')
    app = create_app(settings=Settings(api_keys="ops:k3y", catalog_path=catalog))
    client = app.test_client()

    executor = _probes(region.resources[("azurerm_container_app", "this")])
    assert {k: p["path"] for k, p in executor.items()} == {
        "startup_probe": "/health",
        "readiness_probe": "/ready",  # 503 while loading and draining
        "liveness_probe": "/health",
    }
    disp = _probes(dispatcher.resources[("azurerm_container_app", "this")])
    assert set(disp) == {"startup_probe", "readiness_probe", "liveness_probe"}
    # The dispatcher shares base_app's /health; its other routes are not this app's.
    assert {p["path"] for p in disp.values()} == {"/health"}

    for probe in [*executor.values(), *disp.values()]:
        assert probe["transport"] == "HTTP"
        assert probe["port"] == "${var.port}"
        assert probe["path"] in PUBLIC_PATHS, "the platform's probes carry no API key"
        # What the platform sees: 200 without a key (while /models asks for one).
        response = client.get(probe["path"])
        assert response.status_code == 200, (probe["path"], response.get_json())
    assert client.get("/models").status_code == 401

    for config in (region, dispatcher):
        app_body = config.resources[("azurerm_container_app", "this")]
        assert one(app_body["ingress"])["target_port"] == "${var.port}"
    assert region.defaults()["port"] == gunicorn_defaults["port"]


def test_dispatcher_command_listens_where_ingress_and_probes_point(
    root: Config, dispatcher: Config
) -> None:
    defaults = dispatcher.defaults()
    command = defaults["command"]
    assert command[0] == "executor-service"  # the console script the image installs
    args = build_parser().parse_args(command[1:])  # the real CLI accepts it
    assert args.command == "dispatcher"
    assert args.host == "0.0.0.0", "loopback would be unreachable from the ingress"
    assert args.port == defaults["port"]
    # The root's defaults for the optional dispatcher are the module's.
    root_type = root.variables["dispatcher"]["type"]
    assert f"port = optional(number, {defaults['port']})" in root_type
    assert f"command = optional(list(string), {json.dumps(command)})" in root_type
    app = dispatcher.resources[("azurerm_container_app", "this")]
    container = one(one(app["template"])["container"])
    assert container["command"] == "${var.command}"
    grace = evaluate(one(app["template"])["termination_grace_period_seconds"], defaults, {})
    assert grace > defaults["shutdown_grace_s"] + 5  # the CLI waits grace + 5 s for its API


def test_ingress_allows_no_insecure_connections() -> None:
    apps = dict(container_apps())
    assert len(apps) == 2
    for name, app in apps.items():
        ingress = one(app["ingress"])
        assert ingress["allow_insecure_connections"] is False, name
        assert one(ingress["traffic_weight"]) == {"latest_revision": True, "percentage": 100}


def test_scale_rule_is_workers_times_threads_of_gunicorn(
    region: Config, gunicorn_defaults: dict[str, Any]
) -> None:
    defaults = region.defaults()
    assert defaults["workers"] == gunicorn_defaults["workers"]
    assert defaults["threads"] == gunicorn_defaults["threads"]
    assert defaults["worker_class"] == gunicorn_defaults["worker_class"]
    assert defaults["worker_timeout_s"] == gunicorn_defaults["timeout"]

    app = region.resources[("azurerm_container_app", "this")]
    template = one(app["template"])
    rule = one(template["http_scale_rule"])
    per_replica = evaluate(rule["concurrent_requests"], defaults, region.locals)
    expected = gunicorn_defaults["workers"] * gunicorn_defaults["threads"]
    assert per_replica == str(expected) == "8"

    # The env the container gets is the same arithmetic, so the two cannot drift.
    gunicorn_env = {"PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS", "GUNICORN_WORKER_CLASS"}
    env = {
        e["name"]: evaluate(e["value"], defaults, region.locals)
        for e in one(template["container"])["env"]
        if e["name"] in gunicorn_env | {"ES_MAX_IN_FLIGHT"}
    }
    assert int(env["WEB_CONCURRENCY"]) * int(env["ES_MAX_IN_FLIGHT"]) == expected
    assert env["GUNICORN_THREADS"] == str(gunicorn_defaults["threads"])
    assert env["GUNICORN_WORKER_CLASS"] == gunicorn_defaults["worker_class"]
    assert env["PORT"] == str(gunicorn_defaults["port"])

    assert defaults["gevent_max_in_flight"] == gunicorn_defaults["gevent_max_in_flight"]
    gevent = {**defaults, "worker_class": "gevent"}
    assert evaluate(rule["concurrent_requests"], gevent, region.locals) == str(
        defaults["workers"] * defaults["gevent_max_in_flight"]
    )


def test_termination_grace_covers_gunicorns_graceful_timeout(
    region: Config, gunicorn_defaults: dict[str, Any]
) -> None:
    defaults = region.defaults()
    assert defaults["graceful_timeout_s"] == gunicorn_defaults["graceful_timeout"]
    app = region.resources[("azurerm_container_app", "this")]
    template = one(app["template"])
    grace = evaluate(template["termination_grace_period_seconds"], defaults, region.locals)
    graceful = gunicorn_defaults["graceful_timeout"]
    assert graceful <= grace <= graceful + 10
    env = {e["name"]: e.get("value") for e in one(template["container"])["env"]}
    assert evaluate(env["GUNICORN_GRACEFUL_TIMEOUT"], defaults, region.locals) == str(graceful)


def _preconditions(app: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(one(app["lifecycle"])["precondition"])


def test_cpu_and_memory_fit_the_worker_count(region: Config, root: Config) -> None:
    app = region.resources[("azurerm_container_app", "this")]
    container = one(one(app["template"])["container"])
    defaults = region.defaults()
    assert container["cpu"] == "${var.cpu}"
    assert container["memory"] == "${var.memory_gib}Gi"

    def failing(variables: Mapping[str, Any]) -> list[str]:
        return [
            p["error_message"]
            for p in _preconditions(app)
            if evaluate(p["condition"], variables, region.locals) is not True
        ]

    assert failing(defaults) == []
    assert defaults["workers"] <= defaults["cpu"] * 2
    assert defaults["memory_gib"] * 1024 / defaults["workers"] >= 1024
    # The checks bite: too many workers for the CPU, memory off the Consumption ratio.
    assert any("two gunicorn workers per vCPU" in m for m in failing({**defaults, "workers": 8}))
    assert any("two gunicorn workers per vCPU" in m for m in failing({**defaults, "cpu": 1}))
    assert any("twice cpu" in m for m in failing({**defaults, "memory_gib": 3}))
    assert any("0.25 to 2" in m for m in failing({**defaults, "cpu": 4, "memory_gib": 8}))

    # The root's per-region defaults must be the module's, or the root overrides them.
    region_type = root.variables["regions"]["type"]
    root_optional = dict(re.findall(r"(\w+) = optional\(\w+, ([^)]+)\)", region_type))
    for name in ("workers", "threads", "cpu", "memory_gib", "min_replicas", "max_replicas"):
        assert float(root_optional[name]) == float(defaults[name]), name
    assert root_optional["worker_class"].strip('"') == defaults["worker_class"]


def test_liveness_outlasts_gunicorns_worker_timeout(region: Config) -> None:
    defaults = region.defaults()
    probe = _probes(region.resources[("azurerm_container_app", "this")])["liveness_probe"]
    interval = evaluate(probe["interval_seconds"], defaults, region.locals)
    failures = evaluate(probe["failure_count_threshold"], defaults, region.locals)
    assert 1 <= failures <= 10  # the platform's limits
    assert interval * failures > defaults["worker_timeout_s"]


def test_no_secret_is_a_plain_env_value(region: Config, dispatcher: Config, root: Config) -> None:
    for config in (region, dispatcher):
        app = config.resources[("azurerm_container_app", "this")]
        container = one(one(app["template"])["container"])
        secret_names = {s["name"] for s in blocks_of(app, "secret")}
        envs = blocks_of(container, "env")
        assert envs
        for env in envs:
            where = f"{config.directory.name}: env {env['name']}"
            if "secret_name" in env:
                assert "value" not in env, where
                assert env["secret_name"] in secret_names or env["secret_name"].startswith("${"), (
                    f"{where} names an unknown secret {env['secret_name']}"
                )
                continue
            assert not SECRET_ENV.search(env["name"]), f"{where} is a credential in plain text"
            assert not SECRET_SOURCES.search(str(env["value"])), f"{where} leaks a secret"
        for secret in blocks_of(app, "secret"):
            source = secret.get("value", secret.get("key_vault_secret_id"))
            assert isinstance(source, str) and "${" in source, f"literal secret {secret['name']}"
        assert any(e.get("secret_name") == "api-keys" for e in envs)

    # Credentials handed to the modules are declared sensitive, and so are outputs of them.
    for config, names in (
        (root, ["provider_secrets", "sentry_dsn"]),
        (region, ["api_key", "sentry_dsn", "provider_secrets"]),
        (dispatcher, ["region_api_keys", "sentry_dsn"]),
    ):
        for name in names:
            assert config.variables[name].get("sensitive") is True, name
    assert root.outputs["executor_api_keys"]["sensitive"] is True
    assert root.outputs["dispatcher_api_keys"]["sensitive"] is True


def test_dispatcher_gets_the_database_url_and_regions_file_as_secrets(
    root: Config, dispatcher: Config
) -> None:
    module = root.modules["dispatcher"]
    assert module["count"] == "${var.dispatcher.enabled ? 1 : 0}"
    assert root.variables["dispatcher"]["default"] == {}  # off unless asked for
    assert module["regions_toml"] == "${local.regions_file}"

    server = dispatcher.resources[("azurerm_postgresql_flexible_server", "this")]
    assert server["public_network_access_enabled"] is False
    assert server["delegated_subnet_id"] == "${azurerm_subnet.postgres.id}"
    app = dispatcher.resources[("azurerm_container_app", "this")]
    secrets = {s["name"]: s for s in blocks_of(app, "secret")}
    url = secrets["database-url"]["value"]
    assert url.startswith("postgresql://") and "sslmode=require" in url
    assert "${azurerm_postgresql_flexible_server.this.fqdn}" in url
    assert "${random_password.postgres_admin.result}" in url
    assert secrets["regions-toml"]["value"] == "${var.regions_toml}"

    container = one(one(app["template"])["container"])
    env = {e["name"]: e for e in blocks_of(container, "env")}
    assert env["ES_DATABASE_URL"] == {"name": "ES_DATABASE_URL", "secret_name": "database-url"}
    mount = one(container["volume_mounts"])
    assert mount["path"] == "${local.secrets_mount}"
    assert env["ES_REGIONS_FILE"]["value"] == "${local.secrets_mount}/regions-toml"
    assert one(one(app["template"])["volume"])["storage_type"] == "Secret"
    assert env["ES_API_KEYS"]["secret_name"] == "api-keys"


def test_outputs_give_each_regions_url(root: Config) -> None:
    assert root.outputs["executor_urls"]["value"] == (
        "${{for name, m in module.executor_region : name => m.url}}"
    )
    region_outputs = Config(REGION_MODULE).outputs
    assert region_outputs["url"]["value"] == "https://${azurerm_container_app.this.ingress[0].fqdn}"


# -------------------------------------------------------------- regions file ---


def test_regions_file_fields_are_the_dispatchers(root: Config) -> None:
    expr = root.locals["dispatcher_regions"]
    fields = set(re.findall(r"\b(\w+) = ", expr))
    assert {"url", "concurrency", "models", "api_key_env"} <= fields <= KNOWN_KEYS
    assert "r.models" in expr, "the model list comes from each region's entry"
    api_key_env = root.locals["api_key_env"]
    assert 'ES_REGION_${upper(replace(name, "-", "_"))}_KEY' in api_key_env


def sample_outputs() -> dict[str, Any]:
    """What `terraform output -json` prints after an apply of the default regions."""
    regions = {
        "asia-pacific": ("southeastasia", ["smollm2-135m"], 80),
        "eu-west": ("westeurope", ["smollm2-135m", "gpt-4o-mini"], 80),
        "us-east": ("eastus", ["smollm2-135m", "gpt-4o-mini", "llama-3.1-8b"], 160),
    }
    dispatcher_regions = {
        name: {
            "url": f"https://ca-execsvc-{name}.nicedune-1234abcd.{loc}.azurecontainerapps.io",
            "concurrency": concurrency,
            "models": models,
            "api_key_env": f"ES_REGION_{name.upper().replace('-', '_')}_KEY",
        }
        for name, (loc, models, concurrency) in regions.items()
    }
    keys = {r["api_key_env"]: f"k{i}" * 24 for i, r in enumerate(dispatcher_regions.values())}
    return {
        "dispatcher_regions": {
            "sensitive": False,
            "type": ["object", {}],
            "value": dispatcher_regions,
        },
        "executor_api_keys": {"sensitive": True, "type": ["map", "string"], "value": keys},
        "executor_urls": {
            "sensitive": False,
            "type": ["object", {}],
            "value": {n: r["url"] for n, r in dispatcher_regions.items()},
        },
        "dispatcher_url": {"sensitive": False, "type": "dynamic", "value": None},
    }


def run_script(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_script_writes_a_regions_file_the_dispatcher_loads(tmp_path: Path) -> None:
    outputs = sample_outputs()
    src = tmp_path / "outputs.json"
    src.write_text(json.dumps(outputs))
    regions_path = tmp_path / "conf" / "regions.toml"
    env_path = tmp_path / "regions.env"

    done = run_script("-i", str(src), "-o", str(regions_path), "--env-file", str(env_path))
    assert done.returncode == 0, done.stderr
    assert "3 regions" in done.stderr

    regions = Regions.load(regions_path)  # the dispatcher's own loader and checks
    expected = outputs["dispatcher_regions"]["value"]
    assert regions.names() == sorted(expected)
    for name, want in expected.items():
        got = regions[name]
        assert (got.url, got.concurrency, list(got.models), got.api_key_env) == (
            want["url"],
            want["concurrency"],
            want["models"],
            want["api_key_env"],
        )

    assert env_path.stat().st_mode & 0o777 == 0o600
    environ = dict(line.split("=", 1) for line in env_path.read_text().splitlines())
    keys = outputs["executor_api_keys"]["value"]
    for region in regions:
        assert region.api_key(environ) == keys[region.api_key_env]


def test_script_reads_stdin_and_prints_the_file() -> None:
    done = run_script(stdin=json.dumps(sample_outputs()))
    assert done.returncode == 0, done.stderr
    data = tomllib.loads(done.stdout)
    assert data["regions"]["eu-west"]["models"] == ["smollm2-135m", "gpt-4o-mini"]
    assert "do not edit by hand" in done.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.pop("dispatcher_regions"), "'dispatcher_regions' is missing"),
        (
            lambda o: o["dispatcher_regions"]["value"]["us-east"].update(url="http://x.io"),
            "url must be an https:// URL",
        ),
        (
            lambda o: o["dispatcher_regions"]["value"]["eu-west"].update(models=[]),
            "models must be a non-empty list",
        ),
    ],
    ids=["no-output", "plain-http", "no-models"],
)
def test_script_refuses_outputs_it_cannot_use(
    change: Callable[[dict[str, Any]], Any], message: str, tmp_path: Path
) -> None:
    outputs = sample_outputs()
    change(outputs)
    target = tmp_path / "regions.toml"
    done = run_script("-o", str(target), stdin=json.dumps(outputs))
    assert done.returncode == 2
    assert message in done.stderr
    assert not target.exists(), "a refused run must not leave a regions file"


def render_template(path: Path, regions: Mapping[str, Mapping[str, Any]]) -> str:
    """Render terraform/templates/regions.toml.tftpl the way templatefile() does, for the
    directives it uses: one `for name, r in regions` loop with `~` strip markers,
    `${name}`, `${r.KEY}` and `${jsonencode(r.KEY)}`."""
    text = path.read_text()
    match = re.search(r"%\{ for name, r in regions ~\}\n(.*?)%\{ endfor ~\}\n?", text, re.S)
    assert match, "template loop not found"
    body = match.group(1)

    def fill(name: str, r: Mapping[str, Any]) -> str:
        out = body.replace("${name}", name)
        out = re.sub(r"\$\{jsonencode\(r\.(\w+)\)\}", lambda m: json.dumps(r[m.group(1)]), out)
        return re.sub(r"\$\{r\.(\w+)\}", lambda m: tf_str(r[m.group(1)]), out)

    rendered = "".join(fill(name, regions[name]) for name in sorted(regions))
    return text[: match.start()] + rendered + text[match.end() :]


def test_terraform_regions_file_output_matches_the_script(root: Config) -> None:
    assert root.outputs["regions_file"]["value"] == "${local.regions_file}"
    assert "templates/regions.toml.tftpl" in root.locals["regions_file"]
    outputs = sample_outputs()
    regions = outputs["dispatcher_regions"]["value"]
    rendered = render_template(TF / "templates" / "regions.toml.tftpl", regions)
    from_template = Regions.from_mapping(tomllib.loads(rendered), "template")
    done = run_script(stdin=json.dumps(outputs))
    from_script = Regions.from_mapping(tomllib.loads(done.stdout), "script")
    assert from_template == from_script
    assert len(from_template) == 3


# ------------------------------------------------------------------- checkov ---


def tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(
            f"{name} is not installed in {BIN} (see docs/deploy.md, 'Offline checks'): not run"
        )
    return path


def run_checkov(args: list[str]) -> dict[str, Any]:
    """checkov's JSON report; --skip-download keeps it offline (no Prisma Cloud calls)."""
    done = subprocess.run(
        [str(tool("checkov")), *args, "--skip-download", "--compact", "-o", "json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.stdout.strip(), f"checkov printed no report: {done.stderr[-2000:]}"
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    assert len(reports) == 1, [r.get("check_type") for r in reports]
    return reports[0]


def describe(checks: list[dict[str, Any]]) -> str:
    return "\n".join(f"{c['check_id']} {c['resource']} {c['file_path']}" for c in checks)


@pytest.fixture(scope="module")
def checkov_terraform() -> dict[str, Any]:
    return run_checkov(
        [
            "-d",
            "terraform",
            "--framework",
            "terraform",
            "--external-checks-dir",
            "terraform/checkov",
        ]
    )


def test_checkov_passes_on_terraform(checkov_terraform: dict[str, Any]) -> None:
    results = checkov_terraform["results"]
    assert checkov_terraform["summary"]["parsing_errors"] == 0
    assert results.get("failed_checks", []) == [], describe(results["failed_checks"])
    assert checkov_terraform["summary"]["passed"] >= 10
    for check in results.get("skipped_checks", []):
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 30, f"{check['check_id']} is skipped without a reason"


def test_checkov_runs_the_repositorys_container_app_policies(
    checkov_terraform: dict[str, Any],
) -> None:
    passed: dict[str, set[str]] = {}
    for check in checkov_terraform["results"]["passed_checks"]:
        passed.setdefault(check["check_id"], set()).add(check["resource"])
    policies = sorted(p.stem for p in (TF / "checkov").glob("*.yaml"))
    assert len(policies) == 4
    apps = {
        f'module.executor_region["{r}"].azurerm_container_app.this'
        for r in ("us-east", "eu-west", "asia-pacific")
    } | {"module.dispatcher.azurerm_container_app.this"}
    for check_id in ("CKV2_ES_1", "CKV2_ES_2", "CKV2_ES_3"):
        assert passed.get(check_id, set()) == apps, check_id
    assert passed["CKV2_ES_4"] == {"azurerm_container_registry.this"}
