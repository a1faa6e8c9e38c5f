"""The image as these machines can run it: a buildah working container whose commands run
with ``buildah run --isolation chroot --network host`` (no daemon, no cgroups; the
container shares the host's loopback), with the image's own user, working directory and
environment. ``podman run`` needs cgroups, which these machines do not give.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import REPO

CONTAINERS_CONF = REPO / "scripts" / "image" / "containers.conf"
# buildah tries to set its default rlimits on every run, which is not permitted here.
BUILDAH_ENV = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def buildah(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["buildah", *args], env=BUILDAH_ENV, capture_output=True, text=True, timeout=timeout
    )


def why_buildah_cannot_run() -> str | None:
    """None where `make image` can build and run the image; else the reason it cannot."""
    if sys.platform != "linux":
        return f"buildah builds and runs Linux containers only; this is {sys.platform}"
    if shutil.which("buildah") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        return (
            "buildah is not installed, and `make image` can install it only as root "
            "with apt-get (Debian)"
        )
    return None


def why_buildah_failed() -> str | None:
    """After a failed build: the reason if buildah itself cannot run here (then the image
    test is skipped with it), None if buildah runs (then the failure is the build's)."""
    if shutil.which("buildah") is None:
        return "buildah is still not installed after `make image` tried to install it"
    probe = buildah("info")
    if probe.returncode != 0:
        return f"buildah cannot run here: `buildah info` failed: {probe.stderr.strip()[-500:]}"
    return None


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about how to run it (its Docker-format config)."""

    cmd: list[str]
    env: dict[str, str]
    user: str
    workdir: str
    healthcheck: list[str]
    health_timeout_s: float
    health_start_period_s: float
    health_interval_s: float
    health_retries: int

    @classmethod
    def of(cls, image: str) -> ImageConfig:
        done = buildah("inspect", "--type", "image", image)
        assert done.returncode == 0, done.stderr
        config: dict[str, Any] = json.loads(done.stdout)["Docker"]["config"]
        check = config["Healthcheck"]
        test = check["Test"]
        assert test[0] == "CMD", f"an exec-form HEALTHCHECK: {test}"
        ns = 1e9
        return cls(
            cmd=list(config["Cmd"]),
            env=dict(item.split("=", 1) for item in config["Env"]),
            user=config["User"],
            workdir=config["WorkingDir"],
            healthcheck=list(test[1:]),
            health_timeout_s=check["Timeout"] / ns,
            health_start_period_s=check["StartPeriod"] / ns,
            health_interval_s=check["Interval"] / ns,
            health_retries=int(check["Retries"]),
        )


class Container:
    """A working container of ``image``; every command gets ``env`` (the image's own
    environment stays underneath) and ``volumes`` (host path -> container path, read-only)."""

    def __init__(
        self,
        image: str,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[Path, str] | None = None,
    ) -> None:
        self.name = f"es-image-test-{uuid.uuid4().hex[:8]}"
        self.env = dict(env or {})
        self.volumes = dict(volumes or {})
        done = buildah("from", "--pull-never", "--name", self.name, image)
        assert done.returncode == 0, done.stderr

    def argv(self, command: Sequence[str]) -> list[str]:
        argv = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        for key, value in self.env.items():
            argv += ["--env", f"{key}={value}"]
        for host, inside in self.volumes.items():
            argv += ["--volume", f"{host}:{inside}:ro"]
        return [*argv, self.name, "--", *command]

    def start(self, command: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Run ``command`` in the background, its output to ``log``."""
        with log.open("ab") as out:
            return subprocess.Popen(
                self.argv(command), env=BUILDAH_ENV, stdout=out, stderr=subprocess.STDOUT
            )

    def run(self, command: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command), env=BUILDAH_ENV, capture_output=True, text=True, timeout=timeout
        )

    def remove(self) -> None:
        buildah("rm", self.name)


# -- the processes a container runs, seen from the host --------------------------------


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    children = _children()
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def uids(pid: int) -> tuple[int, int]:
    """(real, effective) uid of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            real, effective = line.split()[1:3]
            return int(real), int(effective)
    raise AssertionError(f"no Uid line for {pid}")


def runs(pid: int, program: str) -> bool:
    """Whether the process is ``program`` itself or a Python interpreter running it (not
    buildah's own ``buildah-chroot-exec PROGRAM``, which runs as root outside the image)."""
    argv = cmdline(pid)
    if not argv:
        return False
    first = Path(argv[0]).name
    if first == program:
        return True
    return first.startswith("python") and len(argv) > 1 and Path(argv[1]).name == program


def processes_running(runner: subprocess.Popen[bytes], program: str) -> list[int]:
    """The processes under ``buildah run`` that run ``program``."""
    return [pid for pid in descendants(runner.pid) if runs(pid, program)]


def main_process(runner: subprocess.Popen[bytes], program: str) -> int | None:
    """The first process of ``program`` under ``buildah run`` (its parent is not ``program``):
    the one a container platform signals."""
    pids = processes_running(runner, program)
    for pid in pids:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if parent not in pids:
            return pid
    return None
