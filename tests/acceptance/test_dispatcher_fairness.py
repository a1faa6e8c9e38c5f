"""Fairness between tenants: alice submits 2,000 executions, then bob submits 5. Bob's calls
start within the first claim cycles after he submits, not after alice's backlog."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from dispatcher_harness import DispatcherProcess, executor, wait_finished, write_regions
from support import wait_until

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

SLOTS = 4
LATENCY_S = 0.05


def test_a_small_tenant_is_not_stuck_behind_a_big_backlog(tmp_path: Path) -> None:
    model = {"sim": {"provider": "simulated", "latency_s": LATENCY_S}}
    with executor(tmp_path, "solo", model, threads=SLOTS) as ex:
        regions = write_regions(tmp_path / "regions.toml", {"solo": (ex.url, SLOTS, ["sim"])})
        with DispatcherProcess(tmp_path, f"sqlite:///{tmp_path / 'd.db'}", regions) as d:
            alice, bob = d.api("alice"), d.api("bob")
            big = alice.submit({"questions": [f"a{i}" for i in range(2000)], "models": ["sim"]})
            assert big["total"] == 2000
            wait_until(
                lambda: alice.job(big["id"])["states"].get("succeeded", 0) >= 20,
                30,
                what="alice's job running",
            )
            small = bob.submit({"questions": [f"b{i}" for i in range(5)], "models": ["sim"]})
            wait_finished(bob, small["id"], timeout=30)
            alice_left = alice.job(big["id"])["states"].get("queued", 0)
            alice.cancel(big["id"])
            wait_finished(alice, big["id"], timeout=30)
            bob_runs = bob.results(small["id"])["executions"]
            alice_runs = alice.results(big["id"])["executions"]

    assert {e["state"] for e in bob_runs} == {"succeeded"}
    submitted = small["created_at"]
    bob_starts = sorted(e["attempt_log"][0]["started_at"] for e in bob_runs)
    alice_starts = [e["attempt_log"][0]["started_at"] for e in alice_runs if e["attempt_log"]]
    overtaking = [t for t in alice_starts if submitted <= t <= bob_starts[-1]]
    logger.warning(
        "bob's first call %.3f s after submit, last %.3f s; alice started %d calls meanwhile, "
        "%d of hers still queued",
        bob_starts[0] - submitted,
        bob_starts[-1] - submitted,
        len(overtaking),
        alice_left,
    )
    # Bob's first call takes the first slot that frees up (plus one claim poll).
    assert bob_starts[0] - submitted < 1.0
    # All of bob's 5 calls start within a couple of cycles of alice's 4 slots, while
    # alice still has most of her 2,000 queued.
    assert len(overtaking) <= 2 * SLOTS + 5
    assert alice_left > 1000
