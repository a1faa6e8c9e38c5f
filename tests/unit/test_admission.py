"""The replica-wide admission limit: slots shared by processes through flock-ed files."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
from support import wait_until

from executor_service.errors import Overloaded
from executor_service.executor.admission import SLOT_PREFIX, Admission


def slot_dir(tmp_path: Path, n: int) -> Path:
    for i in range(n):
        (tmp_path / f"{SLOT_PREFIX}{i:05d}").touch()
    return tmp_path


def test_two_workers_share_the_replica_limit(tmp_path: Path) -> None:
    # Two Admission objects open the files separately, as two gunicorn workers do.
    first, second = (Admission(1, 1, slot_dir(tmp_path, 3)) for _ in range(2))
    assert first.limit == second.limit == 3
    with ExitStack() as held:
        held.enter_context(first.slot())
        held.enter_context(first.slot())
        held.enter_context(second.slot())
        with pytest.raises(Overloaded) as refused, second.slot():
            pass
        assert refused.value.details == {"limit": 3}
        with pytest.raises(Overloaded), first.slot():
            pass
    with second.slot(), second.slot(), second.slot():
        assert second.in_flight == 3


def test_a_killed_holder_gives_its_slot_back(tmp_path: Path) -> None:
    directory = slot_dir(tmp_path, 1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from executor_service.executor.admission import Admission\n"
            f"a = Admission(1, 1, __import__('pathlib').Path({str(directory)!r}))\n"
            "with a.slot():\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        admission = Admission(1, 1, directory)
        with pytest.raises(Overloaded), admission.slot():
            pass
        holder.kill()
        holder.wait(10)

        def free() -> bool:
            with admission.slot():
                return True

        assert wait_until(lambda: free(), 5, what="the dead holder's slot")
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
