"""The cross-region comparison of a job's answers, and its usage and cost totals.

Pure functions over execution views (the dicts ``GET /jobs/<id>/results`` returns),
so the API, the CLI and the job page share one definition of "the regions'
answers differ" and tests need neither a store nor a server.

Per model, a grid: one row per (question, sample), one cell per requested region.
For each row:

- ``exact_match``: every region answered and the answers are identical after
  normalisation (case folded, whitespace collapsed);
- ``similarity``: the lowest pairwise similarity between the regions' answers,
  0..1 (difflib's ratio over normalised words): the two regions that disagree
  most decide how different the row is;
- ``differs``: the regions answered differently, or some answered and some
  refused (a refusal beside an answer is a difference);
- ``complete``: every region has an answer or a refusal; a dead, cancelled or
  still running cell is no answer, so its row is not complete (and a dead cell is
  not a difference: it says nothing about what the region would have answered);
- ``refusals``: the regions whose answer is a refusal: an empty answer, or the
  provider said so (a finish_reason such as ``content_filter``, or an error
  code such as ``content_policy_violation``).

Each answered cell carries ``segments``: its words split into runs that are the
same as, or differ from, the reference answer (the row's first answered region;
the reference's own runs are marked where any other region differs), which is
what the page highlights.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

View = Mapping[str, Any]
# model -> {"prompt": USD per million prompt tokens, "completion": ...}
Prices = Mapping[str, Mapping[str, float]]

# finish_reason values providers use to say "I will not answer this" (OpenAI and
# Azure: content_filter; Anthropic-style and some gateways: refusal; Gemini: safety).
REFUSAL_FINISH_REASONS = frozenset({"content_filter", "refusal", "safety"})
# error codes an executor or provider returns for a refused prompt.
REFUSAL_ERROR_CODES = frozenset(
    {"content_filter", "content_policy_violation", "refusal", "safety", "responsible_ai_policy"}
)
# A word or a run of whitespace: diffs are per word, and the runs keep the spacing.
_WORD = re.compile(r"\S+|\s+")


def normalise(text: str | None) -> str:
    """Text as compared: case folded, runs of whitespace as one space, trimmed."""
    return " ".join((text or "").casefold().split())


def similarity(a: str | None, b: str | None) -> float:
    """How alike two answers are, 0..1: difflib's ratio over their normalised words
    (1.0 for two empty answers)."""
    wa, wb = normalise(a).split(), normalise(b).split()
    if not wa and not wb:
        return 1.0
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def _tokens(text: str) -> list[str]:
    """Words and the whitespace between them, so joining them gives the text back."""
    return _WORD.findall(text)


def _changed_words(a: str, b: str) -> tuple[list[bool], list[bool]]:
    """For the word tokens of ``a`` and of ``b``: which differ from the other text
    (compared normalised, so case and spacing alone are not a difference)."""
    ta = [t for t in _tokens(a) if not t.isspace()]
    tb = [t for t in _tokens(b) if not t.isspace()]
    ca, cb = [True] * len(ta), [True] * len(tb)
    matcher = difflib.SequenceMatcher(
        None, [t.casefold() for t in ta], [t.casefold() for t in tb], autojunk=False
    )
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            ca[block.a + k] = False
            cb[block.b + k] = False
    return ca, cb


def segments(text: str, changed: Sequence[bool]) -> list[dict[str, Any]]:
    """``text`` as runs ``{"text", "changed"}``, ``changed[i]`` saying whether its
    i-th word differs; whitespace joins the run it sits in."""
    out: list[dict[str, Any]] = []
    word = 0
    for token in _tokens(text):
        if token.isspace():
            flag = out[-1]["changed"] if out else False
        else:
            flag = bool(changed[word]) if word < len(changed) else True
            word += 1
        if out and out[-1]["changed"] == flag:
            out[-1]["text"] += token
        else:
            out.append({"text": token, "changed": flag})
    return out


def word_diff(a: str, b: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The two texts as runs marked where they differ word by word."""
    ca, cb = _changed_words(a, b)
    return segments(a, ca), segments(b, cb)


def refusal_reason(view: View) -> str | None:
    """Why this execution counts as a refusal, or None: the provider said so
    (finish_reason or error code), or it succeeded with an empty answer."""
    finish = view.get("finish_reason")
    if isinstance(finish, str) and finish in REFUSAL_FINISH_REASONS:
        return f"finish_reason {finish}"
    error = view.get("last_error") or {}
    code = error.get("code") if isinstance(error, Mapping) else None
    if isinstance(code, str) and code in REFUSAL_ERROR_CODES:
        return f"error {code}"
    if view.get("state") == "succeeded" and not (view.get("output") or "").strip():
        return "empty answer"
    return None


def _cell(view: View) -> dict[str, Any]:
    error = view.get("last_error") or None
    return {
        "execution_id": view.get("id"),
        "state": view.get("state"),
        "executed_region": view.get("executed_region"),
        "attempts": view.get("attempts"),
        "output": view.get("output"),
        "finish_reason": view.get("finish_reason"),
        "error": error,
        "refusal": refusal_reason(view),
        "segments": None,
    }


def _answered(cell: Mapping[str, Any]) -> bool:
    return cell["state"] == "succeeded" and cell["refusal"] is None


def compare_row(cells: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Fill each answered cell's ``segments`` and say how the regions' answers differ.
    ``cells`` maps region -> cell (from ``_cell``), in display order."""
    answered = [r for r, c in cells.items() if _answered(c)]
    refusals = [r for r, c in cells.items() if c["refusal"] is not None]
    texts = {r: cells[r]["output"] or "" for r in answered}
    pairs = list(itertools.combinations(answered, 2))
    lowest = min((similarity(texts[a], texts[b]) for a, b in pairs), default=None)
    normalised = {normalise(t) for t in texts.values()}
    complete = len(answered) == len(cells)
    if answered:
        reference = answered[0]
        ref_changed = [False] * len([t for t in _tokens(texts[reference]) if not t.isspace()])
        for region in answered[1:]:
            ca, cb = _changed_words(texts[reference], texts[region])
            ref_changed = [x or y for x, y in zip(ref_changed, ca, strict=True)]
            cells[region]["segments"] = segments(texts[region], cb)
        cells[reference]["segments"] = segments(texts[reference], ref_changed)
    return {
        "differs": len(normalised) > 1 or (bool(answered) and bool(refusals)),
        "complete": len(answered) + len(refusals) == len(cells),
        "exact_match": complete and len(normalised) == 1,
        "similarity": None if lowest is None else round(lowest, 4),
        "refusals": refusals,
        "answered": len(answered),
        "cells": cells,
    }


def compare(
    executions: Iterable[View],
    models: Sequence[str],
    regions_by_model: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """The comparison grid of a job: per model (in job order), one row per
    (question, sample) with a cell per requested region (in job order)."""
    by_key: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    questions: dict[int, str] = {}
    for view in executions:
        model = view["model"]
        key = (model, int(view["question_index"]), int(view.get("sample") or 0))
        questions.setdefault(key[1], view.get("question") or "")
        by_key.setdefault(key, {})[view["requested_region"]] = _cell(view)
    out_models = []
    for model in models:
        regions = list(regions_by_model.get(model, []))
        rows = []
        for (m, index, sample), found in sorted(by_key.items(), key=lambda kv: kv[0][1:]):
            if m != model:
                continue
            cells = {r: found[r] for r in regions if r in found}
            row = compare_row(cells)
            rows.append({"question_index": index, "sample": sample, "question": questions[index]})
            rows[-1].update(row)
        out_models.append(
            {
                "model": model,
                "regions": regions,
                "rows": rows,
                "rows_differing": sum(1 for r in rows if r["differs"]),
            }
        )
    return {"models": out_models}


def _add_usage(total: dict[str, Any], usage: Mapping[str, Any] | None) -> None:
    total["executions"] += 1
    if usage:
        total["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
        total["completion_tokens"] += int(usage.get("completion_tokens") or 0)


def _empty() -> dict[str, Any]:
    return {"executions": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None}


def cost_usd(usage: Mapping[str, Any] | None, price: Mapping[str, float] | None) -> float | None:
    """The cost of one call from prices in USD per million tokens (None: no price)."""
    if not price:
        return None
    usage = usage or {}
    prompt = float(price.get("prompt", 0.0)) * int(usage.get("prompt_tokens") or 0)
    completion = float(price.get("completion", 0.0)) * int(usage.get("completion_tokens") or 0)
    return (prompt + completion) / 1_000_000


def usage_totals(
    executions: Iterable[View], prices: Mapping[str, Prices] | None = None
) -> dict[str, Any]:
    """Prompt and completion tokens of the answered calls, for the job, per executed
    region and per model; ``cost_usd`` where ``prices`` (region -> model -> price per
    million tokens) prices every counted call of that total, else None."""
    prices = prices or {}
    job = _empty()
    by_region: dict[str, dict[str, Any]] = {}
    by_model: dict[str, dict[str, Any]] = {}
    # a total's cost is known only if every call in it had a price
    priced: dict[int, list[float | None]] = {}
    for view in executions:
        if view.get("state") != "succeeded":
            continue
        region = view.get("executed_region") or view["requested_region"]
        usage = view.get("usage")
        cost = cost_usd(usage, prices.get(region, {}).get(view["model"]))
        for total in (
            job,
            by_region.setdefault(region, _empty()),
            by_model.setdefault(view["model"], _empty()),
        ):
            _add_usage(total, usage)
            priced.setdefault(id(total), []).append(cost)
    for total in (job, *by_region.values(), *by_model.values()):
        costs = priced.get(id(total), [])
        if costs and all(c is not None for c in costs):
            total["cost_usd"] = round(sum(c for c in costs if c is not None), 6)
    return {"job": job, "by_region": by_region, "by_model": by_model}


def wide_rows(grid: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The comparison as a wide table: one row per (model, question, sample), one
    answer column per region (an error or refusal where there is no answer)."""
    regions: list[str] = []
    for m in grid["models"]:
        regions += [r for r in m["regions"] if r not in regions]
    header = ["model", "question_index", "sample", "question", "differs", "exact_match"]
    header += ["similarity", *regions]
    rows: list[list[Any]] = []
    for m in grid["models"]:
        for row in m["rows"]:
            line: list[Any] = [m["model"], row["question_index"], row["sample"], row["question"]]
            line += [row["differs"], row["exact_match"], row["similarity"]]
            line += [cell_text(row["cells"].get(r)) for r in regions]
            rows.append(line)
    return header, rows


def cell_text(cell: Mapping[str, Any] | None) -> str:
    """What a cell shows as text: the answer, else why there is none."""
    if cell is None:
        return ""
    if cell["state"] == "succeeded" and cell["refusal"] is None:
        return str(cell["output"] or "")
    if cell["refusal"] is not None:
        return f"[refused: {cell['refusal']}] {cell['output'] or ''}".rstrip()
    error = cell.get("error") or {}
    if cell["state"] in ("dead", "cancelled"):
        detail = f": {error.get('code')}: {error.get('message')}" if error else ""
        return f"[{cell['state']}{detail}]"
    return f"[{cell['state']}]"
