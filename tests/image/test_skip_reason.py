"""Where buildah cannot run, the image tests are skipped with a reason that says why."""

from __future__ import annotations

import subprocess

import buildah
import pytest


def test_no_reason_where_buildah_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildah.sys, "platform", "linux")
    monkeypatch.setattr(buildah.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert buildah.why_buildah_cannot_run() is None


def test_the_reason_names_the_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildah.sys, "platform", "darwin")
    reason = buildah.why_buildah_cannot_run()
    assert reason is not None and "darwin" in reason and "Linux" in reason


def test_the_reason_says_buildah_cannot_be_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildah.sys, "platform", "linux")
    monkeypatch.setattr(buildah.shutil, "which", lambda name: None)
    monkeypatch.setattr(buildah.os, "geteuid", lambda: 1000)
    reason = buildah.why_buildah_cannot_run()
    assert reason is not None and "not installed" in reason and "apt-get" in reason


def test_a_failing_buildah_info_is_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildah.shutil, "which", lambda name: f"/usr/bin/{name}")
    failed = subprocess.CompletedProcess(["buildah", "info"], 125, "", "cannot mount: EPERM")
    monkeypatch.setattr(buildah, "buildah", lambda *args, **kw: failed)
    reason = buildah.why_buildah_failed()
    assert reason is not None and "cannot mount: EPERM" in reason
    ok = subprocess.CompletedProcess(["buildah", "info"], 0, "{}", "")
    monkeypatch.setattr(buildah, "buildah", lambda *args, **kw: ok)
    assert buildah.why_buildah_failed() is None, "buildah runs: the build failure is real"
