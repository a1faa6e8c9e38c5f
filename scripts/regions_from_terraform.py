#!/usr/bin/env python3
"""Write the dispatcher's regions file from ``terraform output -json``, so no URL is copied by hand.

    terraform -chdir=terraform output -json | scripts/regions_from_terraform.py -o regions.toml
    scripts/regions_from_terraform.py --terraform-dir terraform -o regions.toml \\
        --env-file .env.regions     # also the executors' keys, as ES_REGION_*_KEY=... (mode 0600)

It reads the ``dispatcher_regions`` output (url, concurrency, models and
api_key_env per region, see terraform/outputs.tf) and, for ``--env-file``, the
sensitive ``executor_api_keys`` output. The file it writes is the one
``ES_REGIONS_FILE`` points the dispatcher at. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

REGIONS_OUTPUT = "dispatcher_regions"
KEYS_OUTPUT = "executor_api_keys"
BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HEADER = (
    "# The dispatcher's regions file (ES_REGIONS_FILE), written by\n"
    "# scripts/regions_from_terraform.py from `terraform output -json`: do not edit by hand,\n"
    "# re-run the script after `terraform apply`. Each api_key_env names the environment\n"
    "# variable that must hold that executor's key.\n"
)


class OutputError(ValueError):
    """The Terraform outputs are missing something the regions file needs."""


def _toml_string(value: str) -> str:
    # A JSON string without ASCII escaping is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=False)


def _toml_key(name: str) -> str:
    return name if BARE_KEY.match(name) else _toml_string(name)


def _output_value(outputs: Mapping[str, Any], name: str) -> Any:
    entry = outputs.get(name)
    if not isinstance(entry, dict) or "value" not in entry:
        raise OutputError(
            f"terraform output {name!r} is missing: run `terraform apply` with this "
            "repository's terraform/ configuration first"
        )
    return entry["value"]


def _check_region(name: str, region: Any) -> dict[str, Any]:
    where = f"region {name!r}"
    if not BARE_KEY.match(name):
        raise OutputError(f"{where}: a region name must be letters, digits, '-' or '_'")
    if not isinstance(region, dict):
        raise OutputError(f"{where}: expected an object, got {type(region).__name__}")
    url = region.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme != "https" or not urlsplit(url).netloc:
        raise OutputError(f"{where}: url must be an https:// URL, got {url!r}")
    concurrency = region.get("concurrency")
    # Terraform numbers arrive as JSON numbers; 8.0 is fine, 8.5 is not.
    if isinstance(concurrency, float) and concurrency.is_integer():
        concurrency = int(concurrency)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise OutputError(f"{where}: concurrency must be a whole number >= 1, got {concurrency!r}")
    models = region.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise OutputError(f"{where}: models must be a non-empty list of names, got {models!r}")
    api_key_env = region.get("api_key_env")
    if not isinstance(api_key_env, str) or not ENV_NAME.match(api_key_env):
        raise OutputError(f"{where}: api_key_env must name an environment variable")
    return {
        "url": url.rstrip("/"),
        "concurrency": concurrency,
        "models": models,
        "api_key_env": api_key_env,
    }


def regions_from_outputs(outputs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The checked regions, by name, from the parsed ``terraform output -json``."""
    value = _output_value(outputs, REGIONS_OUTPUT)
    if not isinstance(value, dict) or not value:
        raise OutputError(f"terraform output {REGIONS_OUTPUT!r} has no region")
    return {name: _check_region(name, value[name]) for name in sorted(value)}


def render_regions_file(regions: Mapping[str, Mapping[str, Any]]) -> str:
    """The regions file as TOML, one ``[regions.NAME]`` table per region."""
    parts = [HEADER]
    for name, region in regions.items():
        models = ", ".join(_toml_string(m) for m in region["models"])
        parts.append(
            f"\n[regions.{_toml_key(name)}]\n"
            f"url = {_toml_string(region['url'])}\n"
            f"concurrency = {region['concurrency']}\n"
            f"models = [{models}]\n"
            f"api_key_env = {_toml_string(region['api_key_env'])}\n"
        )
    return "".join(parts)


def render_env_file(regions: Mapping[str, Mapping[str, Any]], outputs: Mapping[str, Any]) -> str:
    """``NAME=key`` lines for every region's api_key_env, from the sensitive keys output."""
    keys = _output_value(outputs, KEYS_OUTPUT)
    if not isinstance(keys, dict):
        raise OutputError(f"terraform output {KEYS_OUTPUT!r} must be a map")
    lines = []
    for name, region in regions.items():
        env = region["api_key_env"]
        key = keys.get(env)
        if not isinstance(key, str) or not key or any(c.isspace() for c in key):
            raise OutputError(f"region {name!r}: no usable key for {env} in {KEYS_OUTPUT!r}")
        lines.append(f"{env}={key}\n")
    return "".join(lines)


def _write_atomically(path: Path, text: str, mode: int) -> None:
    """Write next to ``path`` and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_outputs(args: argparse.Namespace, stdin: TextIO) -> Any:
    if args.terraform_dir is not None:
        try:
            done = subprocess.run(
                ["terraform", f"-chdir={args.terraform_dir}", "output", "-json"],
                check=True,
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            raise OutputError(
                "terraform is not on PATH; pipe `terraform output -json` in"
            ) from None
        except subprocess.CalledProcessError as exc:
            raise OutputError(f"terraform output failed: {exc.stderr.strip()}") from None
        text = done.stdout
    elif args.input == "-":
        text = stdin.read()
    else:
        text = Path(args.input).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputError(f"not the JSON of `terraform output -json`: {exc}") from None


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        description="Write the dispatcher's regions file from `terraform output -json`."
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "-i",
        "--input",
        default="-",
        help="file with the output of `terraform output -json` ('-', the default, is stdin)",
    )
    source.add_argument(
        "--terraform-dir", type=Path, help="run `terraform output -json` in this directory"
    )
    parser.add_argument(
        "-o", "--output", type=Path, help="regions file to write (default: standard output)"
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        help="also write the executors' keys here as NAME=key lines, readable by the owner only",
    )
    args = parser.parse_args(argv)
    try:
        outputs = _read_outputs(args, stdin or sys.stdin)
        if not isinstance(outputs, dict):
            raise OutputError("expected the JSON object printed by `terraform output -json`")
        regions = regions_from_outputs(outputs)
        text = render_regions_file(regions)
        env_text = render_env_file(regions, outputs) if args.env_file else None
    except (OutputError, OSError) as exc:
        print(f"regions_from_terraform: {exc}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write_atomically(args.output, text, 0o644)
        print(f"wrote {args.output} ({len(regions)} regions)", file=sys.stderr)
    if env_text is not None and args.env_file is not None:
        _write_atomically(args.env_file, env_text, 0o600)
        print(f"wrote {args.env_file} (keys, mode 0600)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
