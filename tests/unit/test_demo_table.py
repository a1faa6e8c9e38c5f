"""The demo's answer table shows every answer whole, as text: brackets in an answer or an
error are not taken for rich markup, and an answer the token limit cut says so."""

from __future__ import annotations

import io

from rich.console import Console

from executor_service.dispatcher.demo import print_side_by_side


def test_answers_are_shown_whole_and_as_text() -> None:
    long = "word " * 90 + "Supercalifragilisticexpialidocious-and-then-some-more-characters"
    results = {
        "executions": [
            {"question_index": 0, "question": "Q [x]?", "requested_region": "a",
             "state": "succeeded", "output": "an answer [with brackets]",
             "finish_reason": "length"},
            {"question_index": 0, "question": "Q [x]?", "requested_region": "b",
             "state": "dead", "output": None, "last_error": {"code": "provider_error"}},
            {"question_index": 1, "question": "long?", "requested_region": "a",
             "state": "succeeded", "output": long, "finish_reason": "stop"},
        ]
    }  # fmt: skip
    out = io.StringIO()
    # Wide enough for the first row on one line; the long answer still wraps.
    print_side_by_side(results, Console(file=out, width=200), ["a", "b"])
    text = out.getvalue()
    assert "…" not in text
    flat = "".join(ch for ch in text if ch not in "│┃ \n")
    assert "Q[x]?" in flat
    assert "ananswer[withbrackets][cutatthetokenlimit]" in flat
    assert "[dead]provider_error" in flat
    assert "".join(long.split()) in flat
