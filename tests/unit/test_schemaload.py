"""The compiled load gives what ``schema.load`` gives, for every body: generated bodies
near the /execute schema's edges (types, bounds, None, unknown keys, missing fields)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from executor_service.executor.schemas import ExecuteRequestSchema
from executor_service.schemaload import _compile, _Unsure, compile_load

SCHEMA = ExecuteRequestSchema()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, 256, 4096, 4097, 3600, 3601]),
    st.floats(allow_nan=False, allow_infinity=True),
    st.sampled_from([0.0, 0.001, 0.0009, 2.0, 2.5, 1e308, float("inf"), -float("inf")]),
    st.text(max_size=5),
    st.sampled_from(["", "user", "system", "tool", "ok-id.1:2", "bad id", "x\n", "x" * 129]),
)
messages = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "name"]),
        st.one_of(scalars, st.sampled_from(["user", "assistant", "system"])),
        max_size=3,
    )
    | scalars,
    max_size=3,
)
KEYS = ["model", "prompt", "messages", "max_tokens", "temperature", "seed", "timeout_s",
        "request_id", "stream"]  # fmt: skip
# what a value may be instead: each JSON type, and the bounds' neighbours
edges = st.one_of(st.booleans(), st.none(), scalars, messages)
valid = st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "sim-zero"]), "prompt": st.sampled_from(["hi", "x" * 10])},
    optional={
        "max_tokens": st.integers(1, 4096),
        "temperature": st.floats(0, 2),
        "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
        "timeout_s": st.none() | st.floats(0.001, 3600),
        "request_id": st.none() | st.sampled_from(["a", "job-1.call:2"]),
    },
)
# A valid body with a few values replaced or dropped: each edge is met with the rest valid.
edited = st.builds(
    lambda base, changes, dropped: {
        **{k: v for k, v in base.items() if k not in dropped},
        **changes,
    },
    valid,
    st.dictionaries(st.sampled_from(KEYS), edges, min_size=1, max_size=1),
    st.sets(st.sampled_from(KEYS), max_size=1),
)
bodies = st.one_of(
    edited,
    edited,
    edited,
    st.dictionaries(st.sampled_from(KEYS), st.one_of(scalars, messages), max_size=9),
    scalars,
    st.lists(scalars, max_size=2),
)


def schema_load(body: Any) -> tuple[str, Any]:
    try:
        return "ok", SCHEMA.load(body)
    except ValidationError as exc:
        return "error", exc.normalized_messages()


@settings(max_examples=1500, deadline=None, derandomize=True, database=None)
@given(body=bodies)
def test_the_compiled_load_answers_as_marshmallow(body: Any) -> None:
    expected = schema_load(body)
    try:
        fast = _compile(SCHEMA)(body)  # type: ignore[misc]
    except (_Unsure, ValidationError):
        fast = None  # left to marshmallow: compile_load answers with schema.load itself
    else:
        assert expected == ("ok", fast)
        assert [type(v) for v in fast.values()] == [type(v) for v in expected[1].values()]
    assert schema_load_via(compile_load(SCHEMA), body) == expected


def schema_load_via(load: Any, body: Any) -> tuple[str, Any]:
    try:
        return "ok", load(body)
    except ValidationError as exc:
        return "error", exc.normalized_messages()


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "What is the capital of France?", "max_tokens": 64},
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 1,
            "seed": 7,
            "timeout_s": 30,
            "request_id": "job-1.call:2",
        },
    ],
)
def test_plain_bodies_take_the_fast_path(body: dict[str, Any]) -> None:
    compiled = _compile(SCHEMA)
    assert compiled is not None
    assert compiled(body) == SCHEMA.load(body)
