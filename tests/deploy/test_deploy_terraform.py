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
    match = re.fullmatch(r"(.+?)\?(.+?):(.+)", src, re.S)
    assert match, src
    cond, then, other = match.groups()
    return f"({then}) if ({cond}) else ({other})"


def _closing(src: str, start: int) -> int:
    """Index of the bracket closing the one at ``start`` (strings are already masked)."""
    depth = 0
    for i in range(start, len(src)):
        if src[i] in "([{":
            depth += 1
        elif src[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError(f"unbalanced brackets: {src}")


def _top_level(src: str, token: str) -> int:
    """First index of ``token`` outside any bracket, or -1."""
    depth = 0
    for i in range(len(src)):
        if src[i] in "([{":
            depth += 1
        elif src[i] in ")]}":
            depth -= 1
        elif depth == 0 and src.startswith(token, i):
            return i
    return -1


def _for_to_python(src: str) -> str:
    """`[for k, v in c : e if f]` -> a Python list comprehension, innermost first."""
    while (start := src.rfind("[for ")) >= 0:
        end = _closing(src, start)
        inner = src[start + len("[for ") : end]
        head = re.match(r"\s*(\w+)(?:\s*,\s*(\w+))?\s+in\s+", inner)
        assert head, inner
        rest = inner[head.end() :]
        colon = _top_level(rest, ":")
        assert colon > 0, inner
        collection, body = rest[:colon], rest[colon + 1 :]
        cond = ""
        if (at := _top_level(body, " if ")) >= 0:
            body, cond = body[:at], f" if ({body[at + 4 :]})"
        if head.group(2):
            target, iterate = f"{head.group(1)}, {head.group(2)}", "_pairs"
        else:
            target, iterate = head.group(1), "_elements"
        src = (
            f"{src[:start]}[({body}) for {target} in {iterate}({collection}){cond}]{src[end + 1 :]}"
        )
    return src


class _Obj(dict[str, Any]):
    """A Terraform object: ``r.location`` as well as ``r["location"]``."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def _objects(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _Obj({k: _objects(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_objects(v) for v in value]
    return value


def _matches(args: tuple[str, Any]) -> bool:
    # can(regex(p, s)): Terraform's regex() fails without a match (RE2; these
    # patterns use nothing Python's re reads differently).
    pattern, text = args
    return isinstance(text, str) and re.search(pattern, text) is not None


_ALLOWED = (
    ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Call,
    ast.Constant, ast.Name, ast.Subscript, ast.Load, ast.And, ast.Or, ast.Not, ast.Add,
    ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.USub, ast.Eq, ast.NotEq, ast.Lt, ast.LtE,
    ast.Gt, ast.GtE, ast.ListComp, ast.comprehension, ast.Store, ast.Tuple, ast.List,
    ast.Attribute,
)  # fmt: skip
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min, "max": max, "floor": math.floor, "ceil": math.ceil, "tostring": str,
    "lower": str.lower, "replace": lambda s, old, new: s.replace(old, new),
    "startswith": str.startswith, "length": len, "contains": lambda xs, x: x in xs,
    "alltrue": all, "values": lambda m: list(m.values()), "keys": lambda m: sorted(m),
    "distinct": lambda xs: list(dict.fromkeys(xs)), "toset": lambda xs: set(xs),
    "nonsensitive": lambda x: x, "_matches": _matches, "_args": lambda *a: a,
    "coalesce": lambda *a: next(x for x in a if x is not None and x != ""),
    "_elements": lambda c: list(c.values()) if isinstance(c, Mapping) else list(c),
    "_pairs": lambda c: list(c.items()) if isinstance(c, Mapping) else list(enumerate(c)),
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def evaluate(value: Any, variables: Mapping[str, Any], locals_: Mapping[str, Any]) -> Any:
    """Evaluate a python-hcl2 value: arithmetic, comparisons, a ternary, string and
    collection functions, can(regex()), for-expressions, var.* and local.*."""
    if not isinstance(value, str) or not (value.startswith("${") and value.endswith("}")):
        return value
    strings: list[str] = []

    def mask(match: re.Match[str]) -> str:
        strings.append(json.loads(match.group(0)))  # HCL's escapes are JSON's here
        return f"_S[{len(strings) - 1}]"

    src = _STRING.sub(mask, value[2:-1])
    src = re.sub(r"\bvar\.(\w+)", r'V["\1"]', src)
    src = re.sub(r"\blocal\.(\w+)", r'L("\1")', src)
    src = src.replace("can(regex(", "_matches(_args(")
    src = src.replace("&&", " and ").replace("||", " or ")
    src = re.sub(r"!(?!=)", " not ", src)
    src = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", src))
    src = re.sub(r"\bnull\b", "None", src)
    src = _for_to_python(src)
    src = _ternary_to_python(src)
    tree = ast.parse(src.strip(), mode="eval")
    bound = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    for node in ast.walk(tree):
        assert isinstance(node, _ALLOWED), f"cannot evaluate {value!r}: {type(node).__name__}"
        if isinstance(node, ast.Name):
            known = {"V", "L", "_S", "None", "True", "False", *_FUNCTIONS, *bound}
            assert node.id in known, f"cannot evaluate {value!r}: {node.id}"
        if isinstance(node, ast.Attribute):
            assert not node.attr.startswith("_"), f"cannot evaluate {value!r}: {node.attr}"

    def local(name: str) -> Any:
        return evaluate(locals_[name], variables, locals_)

    # Globals, not locals: a comprehension's own scope sees only globals.
    scope = {"__builtins__": {}, "V": _objects(variables), "L": local, "_S": strings, **_FUNCTIONS}
    return eval(compile(tree, "<hcl>", "eval"), scope)


def failing_validations(config: Config, name: str, value: Any) -> list[str]:
    """The error messages of ``variable "name"``'s validations that refuse ``value``."""
    variable = config.variables[name]
    return [
        v["error_message"]
        for v in variable.get("validation", [])
        if evaluate(v["condition"], {name: value}, {}) is not True
    ]


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
    # for-expressions over maps (one and two symbols), can(regex()), strings with ? and :
    regions = {"a": {"location": "East US"}, "b": {"location": "x"}}
    expr = (
        "${toset([for l in distinct([for r in values(var.regions) : lower(r.location)])"
        ' : l if l != "x"])}'
    )
    assert evaluate(expr, {"regions": regions}, {}) == {"east us"}
    expr = '${alltrue([for k, r in var.regions : can(regex("^[a-z]?$", k)) && r.location != null])}'
    assert evaluate(expr, {"regions": regions}, {}) is True
    assert evaluate('${can(regex("^a$", var.x))}', {"x": None}, {}) is False
    assert evaluate('${replace("a_b:c?", "_", "-")}', {}, {}) == "a-b:c?"


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
    assert acr["location"] == "${local.registry_home}"


@pytest.mark.parametrize(
    ("home", "locations", "replicas"),
    [
        ("eastus", ["eastus", "westeurope", "southeastasia"], {"westeurope", "southeastasia"}),
        # Azure's display names are the same locations: no replica in the home location.
        ("eastus", ["East US", "West Europe", "westeurope"], {"westeurope"}),
        ("East US", ["eastus", "UK South"], {"uksouth"}),
    ],
    ids=["names", "display-names", "display-home"],
)
def test_registry_replicas_compare_locations_as_azure_does(
    root: Config, home: str, locations: list[str], replicas: set[str]
) -> None:
    regions = {f"r{i}": {"location": loc} for i, loc in enumerate(locations)}
    variables = {"registry_location": home, "regions": regions}
    got = evaluate("${local.registry_replica_locations}", variables, root.locals)
    assert got == replicas
    assert evaluate("${local.registry_home}", variables, root.locals) not in got


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
        # The role must have propagated before the first pull (see the next test).
        assert app["depends_on"][0] == "${time_sleep.role_propagation}", where
        assert "registry_password" not in json.dumps(app)


def test_apps_wait_for_their_roles_to_propagate(
    root: Config, region: Config, dispatcher: Config
) -> None:
    """Azure takes minutes to propagate a new role assignment: an app created right after
    its AcrPull assignment cannot pull and its create runs until it times out."""
    providers = one(one(root.terraform)["required_providers"])
    assert providers["time"]["source"] == "hashicorp/time"
    for config, roles in (
        (region, ["acr_pull", "key_vault_secrets"]),
        (dispatcher, ["acr_pull"]),
    ):
        where = config.directory.name
        module_providers = one(one(config.terraform)["required_providers"])
        assert module_providers["time"]["source"] == "hashicorp/time", where
        wait = config.resources[("time_sleep", "role_propagation")]
        assert wait["create_duration"] == "${var.role_propagation_wait_s}s"
        # Recreating a role assignment replaces the wait, so it is waited for again.
        triggers = json.dumps(wait["triggers"])
        for role in roles:
            assert f"azurerm_role_assignment.{role}" in triggers, (where, role)
        app = config.resources[("azurerm_container_app", "this")]
        assert "${time_sleep.role_propagation}" in app["depends_on"], where
        assert not any("azurerm_role_assignment" in d for d in app["depends_on"]), (
            f"{where}: depending on the role as well as the wait hides which one is meant"
        )
        assert (
            config.defaults()["role_propagation_wait_s"]
            == root.defaults()["role_propagation_wait_s"]
        )
    module_args = [
        root.modules[m]["role_propagation_wait_s"] for m in ("executor_region", "dispatcher")
    ]
    assert module_args == ["${var.role_propagation_wait_s}"] * 2
    # Azure documents "up to a few minutes"; a minute is too little to rely on.
    assert root.defaults()["role_propagation_wait_s"] >= 120


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


def test_per_replica_capacity_is_workers_times_calls_of_gunicorn(
    region: Config, gunicorn_defaults: dict[str, Any]
) -> None:
    defaults = region.defaults()
    assert defaults["workers"] == gunicorn_defaults["workers"]
    assert defaults["threads"] == gunicorn_defaults["threads"]
    # Terraform names its worker class explicitly (GUNICORN_WORKER_CLASS below): gthread,
    # behind Azure's ingress, which buffers slow clients. The app's own default is gevent
    # (no proxy in front: make demo, a VM; docs/reliability.md), the same 8 calls a replica.
    assert defaults["worker_class"] == "gthread" and gunicorn_defaults["worker_class"] == "gevent"
    assert defaults["worker_timeout_s"] == gunicorn_defaults["timeout"]

    capacity = evaluate("${local.concurrent_requests}", defaults, region.locals)
    expected = gunicorn_defaults["workers"] * gunicorn_defaults["threads"]
    assert capacity == expected == 8

    # The env the container gets is the same arithmetic, so the two cannot drift.
    template = one(region.resources[("azurerm_container_app", "this")]["template"])
    gunicorn_env = {"PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS", "GUNICORN_WORKER_CLASS"}
    env = {
        e["name"]: evaluate(e["value"], defaults, region.locals)
        for e in one(template["container"])["env"]
        if e["name"] in gunicorn_env | {"ES_MAX_IN_FLIGHT"}
    }
    assert int(env["WEB_CONCURRENCY"]) * int(env["ES_MAX_IN_FLIGHT"]) == expected
    assert env["GUNICORN_THREADS"] == str(gunicorn_defaults["threads"])
    assert env["GUNICORN_WORKER_CLASS"] == defaults["worker_class"]
    assert env["PORT"] == str(gunicorn_defaults["port"])

    assert defaults["gevent_max_in_flight"] == gunicorn_defaults["gevent_max_in_flight"]
    gevent = {**defaults, "worker_class": "gevent"}
    assert evaluate("${local.concurrent_requests}", gevent, region.locals) == (
        defaults["workers"] * defaults["gevent_max_in_flight"]
    )


@pytest.mark.parametrize(
    ("worker_class", "latency_s", "target"),
    [
        ("gthread", 2, 3),  # the default: 0.8 x 8 / 2 = 3.2 requests/s per replica
        ("gthread", 1, 6),
        ("gthread", 0.5, 12),
        ("gthread", 20, 1),  # below 1 request/s the rule cannot go lower (docs/deploy.md)
        ("gevent", 2, 400),  # 0.8 x 4 x 250 / 2
    ],
)
def test_scale_target_is_a_rate_derived_from_model_latency(
    region: Config, root: Config, worker_class: str, latency_s: float, target: int
) -> None:
    """Azure's "concurrent requests" is requests in the past 15 s / 15, a rate. A replica
    with C slots and latency L serves C / L requests/s: the target must be below that,
    not C (which fires only at C x L calls in flight)."""
    defaults = {**region.defaults(), "worker_class": worker_class, "model_latency_s": latency_s}
    rule = one(
        one(region.resources[("azurerm_container_app", "this")]["template"])["http_scale_rule"]
    )
    got = int(evaluate(rule["concurrent_requests"], defaults, region.locals))
    assert got == target
    capacity = evaluate("${local.concurrent_requests}", defaults, region.locals)
    throughput = capacity / latency_s  # Little's law, requests/s one replica completes
    if throughput >= 1:
        assert got <= defaults["scale_utilisation"] * throughput, "replica saturates first"
        assert got > defaults["scale_utilisation"] * throughput - 1, "target is not floor()"
    assert region.defaults()["scale_utilisation"] < 1

    # Every region passes its own latency; the root's default is the module's.
    assert root.modules["executor_region"]["model_latency_s"] == "${each.value.model_latency_s}"
    region_type = root.variables["regions"]["type"]
    root_optional = dict(re.findall(r"(\w+) = optional\(\w+, ([^)]+)\)", region_type))
    assert float(root_optional["model_latency_s"]) == float(region.defaults()["model_latency_s"])


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


def test_probes_let_a_busy_replica_pass(region: Config) -> None:
    """A probe waits for a free slot behind model calls (gthread): its timeout outlasts one
    capped call, so a busy replica answers late (a success); only draining (503 at once)
    or a stuck replica fails, and readiness drops a draining replica within seconds."""
    defaults = region.defaults()
    assert defaults["timeout_cap_s"] == Settings().timeout_cap_s  # the app's own cap
    probes = _probes(region.resources[("azurerm_container_app", "this")])

    def value(probe: str, key: str) -> Any:
        return evaluate(probes[probe][key], defaults, region.locals)

    for kind in ("readiness_probe", "liveness_probe"):
        timeout = value(kind, "timeout")
        assert 1 <= timeout <= 240 and 1 <= value(kind, "interval_seconds") <= 240  # platform
        assert 1 <= value(kind, "failure_count_threshold") <= 10
        assert timeout > defaults["timeout_cap_s"], f"{kind}: a busy replica would fail it"
    # Draining: /ready answers 503 at once; out of rotation within ~15 s of SIGTERM,
    # well inside the graceful timeout.
    drain = value("readiness_probe", "interval_seconds") * value(
        "readiness_probe", "failure_count_threshold"
    )
    assert drain <= 15 < defaults["graceful_timeout_s"]
    # Liveness gives up only after gunicorn's own worker timeout would have acted.
    liveness = value("liveness_probe", "timeout") * value(
        "liveness_probe", "failure_count_threshold"
    )
    assert liveness > defaults["worker_timeout_s"]

    # The cap the timeout is derived from is the one the container runs with.
    container = one(
        one(region.resources[("azurerm_container_app", "this")]["template"])["container"]
    )
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ES_TIMEOUT_CAP_S"] == "${tostring(var.timeout_cap_s)}"

    # The preconditions refuse a cap the probes cannot outlast, or one above the worker timeout.
    app = region.resources[("azurerm_container_app", "this")]

    def failing(variables: Mapping[str, Any]) -> list[str]:
        return [
            p["error_message"]
            for p in _preconditions(app)
            if evaluate(p["condition"], variables, region.locals) is not True
        ]

    assert failing(defaults) == []
    assert any(
        "outlast one model call" in m
        for m in failing({**defaults, "timeout_cap_s": 240, "worker_timeout_s": 300})
    )
    assert any("below worker_timeout_s" in m for m in failing({**defaults, "timeout_cap_s": 70}))


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
    assert env["ES_REGIONS_FILE"]["value"] == "${local.secrets_mount}/regions-toml"
    # The regions file alone is a file; the database URL and the keys are not.
    assert mount == {
        "name": "secrets",
        "path": env["ES_REGIONS_FILE"]["value"],
        "sub_path": "regions-toml",
    }
    assert one(one(app["template"])["volume"])["storage_type"] == "Secret"
    assert env["ES_API_KEYS"]["secret_name"] == "api-keys"


def test_outputs_give_each_regions_url(root: Config) -> None:
    assert root.outputs["executor_urls"]["value"] == (
        "${{for name, m in module.executor_region : name => m.url}}"
    )
    region_outputs = Config(REGION_MODULE).outputs
    assert region_outputs["url"]["value"] == "https://${azurerm_container_app.this.ingress[0].fqdn}"


# ------------------------------------------------- what only apply would find ---
# Each test below would have failed before issue 16 ("Terraform that applies the first
# time"): the Terraform parsed and passed checkov, but Azure would refuse it.

REGION_NAMES_OK = ["us-east", "eu-west", "asia-pacific", "a", "uk-south-2", "x" * 16]
REGION_NAMES_REFUSED = ["us-", "us--east", "-us", "1us", "Us-east", "us_east", "x" * 17, ""]


@pytest.mark.parametrize("name", REGION_NAMES_OK + REGION_NAMES_REFUSED)
def test_region_names_follow_azures_rule_for_app_names(
    root: Config, region: Config, name: str
) -> None:
    """Azure refuses a trailing or double hyphen in container app and environment names."""
    accepted = name in REGION_NAMES_OK
    assert (failing_validations(region, "region", name) == []) is accepted
    regions = {name: {"location": "eastus", "models": ["m"], "model_latency_s": 2}}
    refused = failing_validations(root, "regions", regions)
    assert (refused == []) is accepted
    if not accepted:
        assert any("not end with a hyphen" in m and "us--east" in m for m in refused)
        assert (
            "not end with a hyphen" in region.variables["region"]["validation"][0]["error_message"]
        )
    # ca-<prefix>-<region> and cae-<prefix>-<region> fit Azure's 32 characters.
    longest_prefix = "p" * 10
    if accepted:
        assert len(f"cae-{longest_prefix}-{name}") <= 32


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("OPENAI_API_KEY", True),
        ("AZURE_OPENAI_KEY", True),
        ("API_KEYS", False),  # secret api-keys: the executor's own key
        ("SENTRY_DSN", False),
        ("CATALOG_TOML", False),
        ("ES_API_KEYS", False),  # an env var the module sets
        ("GUNICORN_TIMEOUT", False),
        ("PORT", False),
        ("OPENAI_", False),  # secret openai-: Azure refuses a trailing hyphen
        ("openai_key", False),
    ],
)
def test_provider_secrets_cannot_collide_with_the_modules_own(
    root: Config, region: Config, name: str, accepted: bool
) -> None:
    value = {name: "sk-test"}
    assert (failing_validations(root, "provider_secrets", value) == []) is accepted
    assert (failing_validations(region, "provider_secrets", value) == []) is accepted
    # The collision check uses the module's own name derivation and its own names.
    app = region.resources[("azurerm_container_app", "this")]
    derived = {
        d["secret"]["content"][0]["name"]
        for d in app["dynamic"]
        if "secret" in d and d["secret"]["for_each"] == "${local.provider_secret_names}"
    }
    assert derived == {'${lower(replace(secret.value, "_", "-"))}'}
    own = {s["name"] for s in app["secret"]} | {"sentry-dsn", region.locals["catalog_secret"]}
    assert own == {"api-keys", "sentry-dsn", "catalog-toml"}
    condition = region.variables["provider_secrets"]["validation"][0]["condition"]
    assert all(f'"{secret}"' in condition for secret in own)
    if accepted:
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-.]*[a-z0-9])?", name.lower().replace("_", "-"))


@pytest.mark.parametrize(
    ("days", "accepted"), [(29, False), (30, True), (730, True), (731, False), (30.5, False)]
)
def test_log_retention_is_the_workspaces_range(
    root: Config, region: Config, dispatcher: Config, days: float, accepted: bool
) -> None:
    for config in (root, region, dispatcher):
        refused = failing_validations(config, "log_retention_days", days)
        assert (refused == []) is accepted, config.directory.name
        assert config.defaults()["log_retention_days"] == 30


def test_a_key_vault_secret_needs_the_key_vault(root: Config, region: Config) -> None:
    """Without key_vault_id no identity gets "Key Vault Secrets User": the reference fails."""
    app = region.resources[("azurerm_container_app", "this")]
    defaults = region.defaults()
    secret_id = "https://kv-exec.vault.azure.net/secrets/sentry-dsn"

    def failing(variables: Mapping[str, Any]) -> list[str]:
        return [
            p["error_message"]
            for p in _preconditions(app)
            if evaluate(p["condition"], variables, region.locals) is not True
        ]

    assert any(
        "needs key_vault_id" in m
        for m in failing({**defaults, "sentry_dsn_key_vault_secret_id": secret_id})
    )
    vault = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv-exec"
    ok = {**defaults, "sentry_dsn_key_vault_secret_id": secret_id, "key_vault_id": vault}
    assert failing(ok) == []
    assert failing(defaults) == []
    # The root checks the ID's shape: versionless, a secret, in a vault.
    name = "sentry_dsn_key_vault_secret_id"
    assert failing_validations(root, name, None) == []
    assert failing_validations(root, name, secret_id) == []
    for bad in ("sentry-dsn", "https://kv-exec.vault.azure.net/keys/x", secret_id + "/0123abc"):
        assert failing_validations(root, name, bad), bad


def test_postgres_server_name_is_unique_and_its_zone_optional(
    root: Config, dispatcher: Config
) -> None:
    server = dispatcher.resources[("azurerm_postgresql_flexible_server", "this")]
    assert server["name"].endswith("-${random_string.postgres_suffix.result}")
    suffix = dispatcher.resources[("random_string", "postgres_suffix")]
    assert suffix["upper"] is False and suffix["special"] is False and suffix["length"] >= 6
    # 3-63 lowercase letters, digits and hyphens, with the longest prefix.
    name = server["name"].replace("${var.name_prefix}", "p" * 10)
    name = name.replace("${random_string.postgres_suffix.result}", "a" * suffix["length"])
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", name)

    # Zones: none unless asked for (locations without availability zones refuse "1").
    assert server["zone"] == "${var.postgres_zone}"
    assert dispatcher.defaults()["postgres_zone"] is None
    assert "postgres_zone = optional(string)" in root.variables["dispatcher"]["type"]
    assert root.modules["dispatcher"]["postgres_zone"] == "${var.dispatcher.postgres_zone}"
    for zone, accepted in ((None, True), ("1", True), ("3", True), ("4", False), ("", False)):
        assert (failing_validations(dispatcher, "postgres_zone", zone) == []) is accepted, zone
    # The registry's zone redundancy is switchable too.
    acr = root.resources[("azurerm_container_registry", "this")]
    assert acr["zone_redundancy_enabled"] == "${var.registry_zone_redundancy}"
    replicas = one([d["georeplications"] for d in acr["dynamic"] if "georeplications" in d])
    assert one(replicas["content"])["zone_redundancy_enabled"] == "${var.registry_zone_redundancy}"


# What each set of resource_provider_registrations registers, from the provider's
# internal/resourceproviders/required.go (azurerm 4.x): "core" is the smallest.
AZURERM_CORE_PROVIDERS = {
    "Microsoft.Authorization", "Microsoft.Compute", "Microsoft.CostManagement",
    "Microsoft.ManagedIdentity", "Microsoft.MarketplaceOrdering", "Microsoft.Network",
    "Microsoft.Resources", "Microsoft.Storage",
}  # fmt: skip
# The Azure resource provider behind each resource type this configuration uses.
RESOURCE_PROVIDER_OF = {
    "azurerm_resource_group": "Microsoft.Resources",
    "azurerm_container_registry": "Microsoft.ContainerRegistry",
    "azurerm_log_analytics_workspace": "Microsoft.OperationalInsights",
    "azurerm_container_app_environment": "Microsoft.App",
    "azurerm_container_app": "Microsoft.App",
    "azurerm_user_assigned_identity": "Microsoft.ManagedIdentity",
    "azurerm_role_assignment": "Microsoft.Authorization",
    "azurerm_virtual_network": "Microsoft.Network",
    "azurerm_subnet": "Microsoft.Network",
    "azurerm_private_dns_zone": "Microsoft.Network",
    "azurerm_private_dns_zone_virtual_network_link": "Microsoft.Network",
    "azurerm_postgresql_flexible_server": "Microsoft.DBforPostgreSQL",
    "azurerm_postgresql_flexible_server_database": "Microsoft.DBforPostgreSQL",
}


def test_every_resource_provider_used_is_registered(
    root: Config, region: Config, dispatcher: Config
) -> None:
    """A fresh subscription has no Microsoft.App, and azurerm 4's default set lacks it."""
    provider = one([b["azurerm"] for b in load_tf(TF / "versions.tf")["provider"]])
    assert provider["resource_provider_registrations"] == "core"
    registered = AZURERM_CORE_PROVIDERS | set(provider["resource_providers_to_register"])
    assert "Microsoft.App" in registered
    used = {
        rtype
        for config in (root, region, dispatcher)
        for rtype, _ in config.resources
        if rtype.startswith("azurerm_")
    }
    unknown = used - set(RESOURCE_PROVIDER_OF)
    assert not unknown, f"add the resource provider of {unknown} to RESOURCE_PROVIDER_OF"
    missing = {RESOURCE_PROVIDER_OF[t] for t in used} - registered
    assert not missing, f"not registered: {missing}"
    # Registered by the provider, not by a resource that would unregister it on destroy.
    assert "azurerm_resource_provider_registration" not in used


def test_subscription_id_is_documented_as_azurerm_4_requires(root: Config) -> None:
    description = root.variables["subscription_id"]["description"]
    assert "ARM_SUBSCRIPTION_ID" in description
    assert "no longer falls back" in description  # azurerm 4.0: the CLI's is not taken
    assert failing_validations(root, "subscription_id", None) == []
    assert (
        failing_validations(root, "subscription_id", "00000000-1111-2222-3333-444444444444") == []
    )
    assert failing_validations(root, "subscription_id", "my-subscription")
    deploy_md = (REPO / "docs" / "deploy.md").read_text()
    assert "ARM_SUBSCRIPTION_ID" in deploy_md
    assert "the az CLI's subscription" not in deploy_md


def test_environments_are_created_with_a_workload_profile(
    region: Config, dispatcher: Config
) -> None:
    """Without one an environment is Consumption-only: no profile can be added later."""
    for config in (region, dispatcher):
        env = config.resources[("azurerm_container_app_environment", "this")]
        profile = one(env["workload_profile"])
        assert profile == {"name": "Consumption", "workload_profile_type": "Consumption"}
        app = config.resources[("azurerm_container_app", "this")]
        assert app["workload_profile_name"] == profile["name"]
    # A workload-profiles environment in a VNet needs its subnet delegated to it.
    subnet = dispatcher.resources[("azurerm_subnet", "apps")]
    delegation = one(subnet["delegation"])
    assert one(delegation["service_delegation"])["name"] == "Microsoft.App/environments"


def test_only_the_catalog_is_mounted_as_a_file(region: Config) -> None:
    """The Secret volume holds every secret; the container sees only the catalog."""
    app = region.resources[("azurerm_container_app", "this")]
    container = one(one(app["template"])["container"])
    mount = one(blocks_of(container, "volume_mounts"))
    catalog_env = next(
        d["env"]["content"][0]
        for d in container["dynamic"]
        if "env" in d and d["env"]["content"][0]["name"] == "ES_CATALOG"
    )
    assert mount["sub_path"] == "${local.catalog_secret}"
    assert mount["path"] == catalog_env["value"].replace("${env.value}", "${local.catalog_secret}")
    assert mount["path"] != "${local.secrets_mount}", "the whole volume would be every secret"


def test_outputs_give_each_regions_outbound_addresses(root: Config, region: Config) -> None:
    assert root.outputs["executor_outbound_ip_addresses"]["value"] == (
        "${{for name, m in module.executor_region : name => m.outbound_ip_addresses}}"
    )
    assert region.outputs["outbound_ip_addresses"]["value"] == (
        "${azurerm_container_app.this.outbound_ip_addresses}"
    )
    assert (
        "module.dispatcher[0].outbound_ip_addresses"
        in (root.outputs["dispatcher_outbound_ip_addresses"]["value"])
    )
    assert "m.scale_target" in root.outputs["executor_scale_targets"]["value"]


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
    assert len(policies) == 8
    regions = ("us-east", "eu-west", "asia-pacific")

    def everywhere(rtype: str) -> set[str]:
        return {f'module.executor_region["{r}"].{rtype}.this' for r in regions} | {
            f"module.dispatcher.{rtype}.this"
        }

    apps = everywhere("azurerm_container_app")
    for check_id in ("CKV2_ES_1", "CKV2_ES_2", "CKV2_ES_3", "CKV2_ES_6", "CKV2_ES_7"):
        assert passed.get(check_id, set()) == apps, check_id
    assert passed["CKV2_ES_4"] == {"azurerm_container_registry.this"}
    assert passed["CKV2_ES_5"] == everywhere("azurerm_container_app_environment")
    assert passed["CKV2_ES_8"] == {"module.dispatcher.azurerm_postgresql_flexible_server.this"}


def test_checkov_policies_refuse_the_unfixed_configuration(tmp_path: Path) -> None:
    """The policies bite: on Terraform written as it was before issue 16 (no wait after
    the role, no workload profile, 3 s probes, a fixed server name) each one fails."""
    unfixed = Path(__file__).parent / "fixtures" / "unfixed"
    report = run_checkov(
        [
            "-d",
            str(unfixed),
            "--framework",
            "terraform",
            "--external-checks-dir",
            str(TF / "checkov"),
            "--check",
            "CKV2_ES_5,CKV2_ES_6,CKV2_ES_7,CKV2_ES_8",
        ]
    )
    failed = {(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]}
    assert failed == {
        ("CKV2_ES_5", "azurerm_container_app_environment.this"),
        ("CKV2_ES_6", "azurerm_container_app.this"),
        ("CKV2_ES_7", "azurerm_container_app.this"),
        ("CKV2_ES_8", "azurerm_postgresql_flexible_server.this"),
    }
