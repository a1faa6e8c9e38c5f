"""The cross-region comparison and the usage totals, on execution views."""

from __future__ import annotations

from typing import Any

import pytest

from executor_service.dispatcher import compare


def view(q: int, region: str, output: str | None, state: str = "succeeded", **kw: Any) -> dict:
    return {
        "id": kw.pop("id", hash((q, region)) % 10_000),
        "question_index": q,
        "question": f"question {q}",
        "model": kw.pop("model", "m"),
        "requested_region": region,
        "executed_region": kw.pop("executed_region", region),
        "sample": kw.pop("sample", 0),
        "state": state,
        "attempts": 1,
        "output": output,
        "finish_reason": kw.pop("finish_reason", "stop"),
        "usage": kw.pop("usage", None),
        "last_error": kw.pop("last_error", None),
    }


def grid(views: list[dict], regions: list[str] = ["eu", "us"]) -> dict:  # noqa: B006
    return compare.compare(views, ["m"], {"m": regions})["models"][0]


def test_similarity_ignores_case_and_spacing_and_measures_word_overlap() -> None:
    assert compare.similarity("Paris is the capital.", "paris   is the  capital.") == 1.0
    assert compare.similarity("", "") == 1.0
    assert compare.similarity("a b c d", "w x y z") == 0.0
    assert 0.4 < compare.similarity("the capital is Paris", "the capital is Lyon") < 1.0


def test_identical_answers_are_an_exact_match() -> None:
    m = grid([view(0, "eu", "Paris."), view(0, "us", "paris.")])
    row = m["rows"][0]
    assert (row["differs"], row["exact_match"], row["similarity"]) == (False, True, 1.0)
    assert m["rows_differing"] == 0
    assert all(not s["changed"] for c in row["cells"].values() for s in c["segments"])


def test_differing_answers_are_marked_word_by_word() -> None:
    m = grid([view(0, "eu", "The answer is yes today"), view(0, "us", "The answer is no today")])
    row = m["rows"][0]
    assert row["differs"] and not row["exact_match"]
    assert row["similarity"] == pytest.approx(0.8)
    cells = row["cells"]
    changed = {r: [s["text"] for s in c["segments"] if s["changed"]] for r, c in cells.items()}
    assert [t.strip() for t in changed["eu"]] == ["yes"]
    assert [t.strip() for t in changed["us"]] == ["no"]
    # the runs join back into the answer, spacing included
    assert "".join(s["text"] for s in row["cells"]["us"]["segments"]) == "The answer is no today"
    assert m["rows_differing"] == 1


def test_similarity_is_the_most_different_pair() -> None:
    views = [view(0, "eu", "a b c d"), view(0, "us", "a b c d"), view(0, "asia", "w x y z")]
    row = grid(views, ["eu", "us", "asia"])["rows"][0]
    assert row["similarity"] == 0.0 and row["differs"]


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"output": ""}, "empty answer"),
        ({"output": "  \n"}, "empty answer"),
        ({"output": "I can't", "finish_reason": "content_filter"}, "finish_reason content_filter"),
        (
            {
                "output": None,
                "state": "dead",
                "last_error": {"code": "content_policy_violation", "message": "no"},
            },
            "error content_policy_violation",
        ),
    ],
)
def test_refusals_are_flagged_and_count_as_a_difference(kw: dict, reason: str) -> None:
    output = kw.pop("output")
    row = grid([view(0, "eu", "Tiananmen Square, 1989."), view(0, "us", output, **kw)])["rows"][0]
    assert row["refusals"] == ["us"]
    assert row["cells"]["us"]["refusal"] == reason
    assert row["differs"] and not row["exact_match"] and row["complete"]


def test_a_dead_cell_is_neither_a_refusal_nor_a_difference() -> None:
    dead = view(0, "us", None, "dead", last_error={"code": "connection_error", "message": "down"})
    row = grid([view(0, "eu", "yes"), dead])["rows"][0]
    assert row["refusals"] == [] and not row["differs"] and not row["complete"]
    assert not row["exact_match"]
    assert compare.cell_text(row["cells"]["us"]) == "[dead: connection_error: down]"


def test_cells_still_running_decide_nothing_yet() -> None:
    row = grid([view(0, "eu", "yes"), view(0, "us", None, "queued")])["rows"][0]
    assert not row["differs"] and not row["exact_match"] and row["similarity"] is None
    assert not row["complete"]


def test_rows_per_question_and_sample_cells_in_job_region_order() -> None:
    views = [
        view(1, "us", "b", sample=1),
        view(0, "us", "a"),
        view(0, "eu", "a"),
        view(1, "eu", "c", sample=1),
        view(0, "eu", "x", model="other"),
    ]
    m = grid(views, ["us", "eu"])
    assert [(r["question_index"], r["sample"]) for r in m["rows"]] == [(0, 0), (1, 1)]
    assert list(m["rows"][0]["cells"]) == ["us", "eu"]


def test_usage_totals_with_cost_only_where_every_call_is_priced() -> None:
    usage = {"prompt_tokens": 1_000, "completion_tokens": 2_000}
    views = [
        view(0, "eu", "a", usage=usage),
        view(0, "us", "a", usage=usage),
        view(1, "eu", None, "dead", usage=None),
    ]
    prices = {"eu": {"m": {"prompt": 1.0, "completion": 2.0}}}
    totals = compare.usage_totals(views, prices)
    assert totals["job"] == {
        "executions": 2,
        "prompt_tokens": 2_000,
        "completion_tokens": 4_000,
        "cost_usd": None,  # us has no price
    }
    assert totals["by_region"]["eu"]["cost_usd"] == pytest.approx(0.005)
    assert totals["by_region"]["us"]["cost_usd"] is None
    assert totals["by_model"]["m"]["prompt_tokens"] == 2_000


def test_wide_rows_one_column_per_region() -> None:
    g = compare.compare([view(0, "eu", "yes"), view(0, "us", "no")], ["m"], {"m": ["eu", "us"]})
    header, rows = compare.wide_rows(g)
    assert header[-2:] == ["eu", "us"]
    assert rows == [["m", 0, 0, "question 0", True, False, 0.0, "yes", "no"]]
