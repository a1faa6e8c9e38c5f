"""Group commit of result writes (store/group_commit.py): results that finish while a
transaction is being written share the next one, each caller gets its own answer, and
one failing write never fails another. A fake transaction stands in for the store's,
so the test sees exactly which ops shared which transaction."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from executor_service.dispatcher.store.group_commit import GroupCommit

DEADLINE_S = 10.0


class FakeDB:
    """The transactions run so far: each a list of the ops' names, and whether it committed."""

    def __init__(self) -> None:
        self.transactions: list[tuple[list[str], bool]] = []
        self.hold_first = threading.Event()  # the first transaction waits for this
        self.in_first = threading.Event()

    @contextmanager
    def transaction(self) -> Iterator[list[str]]:
        ops: list[str] = []
        first = not self.transactions and not self.in_first.is_set()
        if first:
            self.in_first.set()
            assert self.hold_first.wait(DEADLINE_S)
        try:
            yield ops
        except BaseException:
            self.transactions.append((ops, False))
            raise
        self.transactions.append((ops, True))


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


def op(name: str, fails: bool = False) -> Callable[[list[str]], str]:
    def write(db: list[str]) -> str:
        db.append(name)
        if fails:
            raise ValueError(f"{name} failed")
        return f"{name} written"

    return write


def run_in_threads(group: GroupCommit[Any], fake: FakeDB, names: list[str], failing: set[str]):
    """Start ``names[0]`` (it leads and is held in its transaction), queue the others
    behind it, then let it commit. Returns name -> value or exception."""
    answers: dict[str, Any] = {}

    def call(name: str) -> None:
        try:
            answers[name] = group.run(op(name, name in failing))
        except ValueError as exc:
            answers[name] = exc

    first = threading.Thread(target=call, args=(names[0],))
    first.start()
    assert fake.in_first.wait(DEADLINE_S)
    others = [threading.Thread(target=call, args=(n,)) for n in names[1:]]
    for t in others:
        t.start()
    wait_for(lambda: len(group._queue) == len(names) - 1)
    fake.hold_first.set()
    for t in [first, *others]:
        t.join(DEADLINE_S)
    return answers


def test_results_finishing_during_a_commit_share_the_next_transaction() -> None:
    fake = FakeDB()
    group = GroupCommit(fake.transaction)
    names = ["a", "b", "c", "d", "e"]

    answers = run_in_threads(group, fake, names, failing=set())

    assert answers == {n: f"{n} written" for n in names}
    assert fake.transactions == [(["a"], True), (["b", "c", "d", "e"], True)]
    assert (group.batches, group.ops) == (2, 5)


def test_a_lone_result_is_written_at_once_in_its_own_transaction() -> None:
    fake = FakeDB()
    fake.hold_first.set()
    group = GroupCommit(fake.transaction)

    assert group.run(op("alone")) == "alone written"
    assert fake.transactions == [(["alone"], True)]


def test_one_failing_write_is_replayed_alone_and_fails_alone() -> None:
    fake = FakeDB()
    group = GroupCommit(fake.transaction)

    answers = run_in_threads(group, fake, ["a", "b", "c", "d"], failing={"c"})

    assert answers["a"] == "a written"
    assert answers["b"] == "b written" and answers["d"] == "d written"
    assert isinstance(answers["c"], ValueError) and str(answers["c"]) == "c failed"
    # the shared transaction rolled back at c; then b, c and d each alone
    assert fake.transactions == [
        (["a"], True),
        (["b", "c"], False),
        (["b"], True),
        (["c"], False),
        (["d"], True),
    ]


def test_a_batch_is_bounded() -> None:
    fake = FakeDB()
    group = GroupCommit(fake.transaction, max_batch=2)

    answers = run_in_threads(group, fake, ["a", "b", "c", "d", "e"], failing=set())

    assert len(answers) == 5
    assert [len(ops) for ops, _ in fake.transactions] == [1, 2, 2]


@pytest.mark.parametrize("error", [KeyError("k"), RuntimeError("r")])
def test_a_single_write_raises_its_own_error(error: Exception) -> None:
    fake = FakeDB()
    fake.hold_first.set()
    group = GroupCommit(fake.transaction)

    def boom(db: list[str]) -> None:
        raise error

    with pytest.raises(type(error)):
        group.run(boom)
    assert group.run(op("next")) == "next written"
