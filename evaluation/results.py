"""Reading evaluation folders and comparing two of them: per-question wins and losses, McNemar's
paired test, a run's before/after gain (`echoink compare`, `summary.json`'s ``eval_gain``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evaluation.stats import mcnemar
from watch.jsonl import read_jsonl


def read_results(folder: Path, condition: str = "none") -> dict[str, dict[str, Any]]:
    path = folder / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no results.jsonl (an `echoink eval` output folder?)")
    return {str(row["id"]): row for row in read_jsonl(path) if row.get("condition", "none") == condition}


def protocol_of(folder: Path) -> str:
    """The evaluation protocol a results folder was scored with (folders from before protocols
    existed were scored with the one protocol there was then: fair)."""
    path = folder / "summary.json"
    if not path.is_file():
        return "fair"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg})") from None
    protocol = summary.get("protocol", "fair")
    name = protocol.get("name") if isinstance(protocol, dict) else protocol
    if not isinstance(name, str):
        raise ValueError(f"{path}: field 'protocol' holds no protocol name: {protocol!r}")
    return name


def compare(a: Path, b: Path, condition: str = "none", *, allow_mixed_protocols: bool = False) -> dict[str, Any]:
    """Per-question wins and losses of B against A and McNemar's paired test. Results of different
    evaluation protocols are refused unless ``allow_mixed_protocols``: a difference between them
    would be the protocols' as much as the models'."""
    protocol_a, protocol_b = protocol_of(a), protocol_of(b)
    if protocol_a != protocol_b and not allow_mixed_protocols:
        raise ValueError(
            f"{a} was evaluated with protocol {protocol_a} and {b} with {protocol_b}: their difference would mix "
            "the models' with the protocols'. Evaluate both with one protocol (echoink eval --protocol …), or "
            "pass --allow-mixed-protocols to compare them anyway"
        )
    rows_a, rows_b = read_results(a, condition), read_results(b, condition)
    shared = sorted(set(rows_a) & set(rows_b))
    if not shared:
        raise ValueError(f"{a} and {b} share no question ids")
    right_a = {q: rows_a[q]["correct"] >= 0.5 for q in shared}
    right_b = {q: rows_b[q]["correct"] >= 0.5 for q in shared}
    only_a = [q for q in shared if right_a[q] and not right_b[q]]
    only_b = [q for q in shared if right_b[q] and not right_a[q]]
    both = sum(right_a[q] and right_b[q] for q in shared)
    neither = sum(not right_a[q] and not right_b[q] for q in shared)
    test = mcnemar(len(only_a), len(only_b))
    return {
        "a": str(a),
        "b": str(b),
        "protocol_a": protocol_a,
        "protocol_b": protocol_b,
        "questions": len(shared),
        "only_in_a": len(set(rows_a) - set(rows_b)),
        "only_in_b": len(set(rows_b) - set(rows_a)),
        "accuracy_a": sum(right_a.values()) / len(shared),
        "accuracy_b": sum(right_b.values()) / len(shared),
        "both_right": both,
        "both_wrong": neither,
        "a_right_b_wrong": len(only_a),
        "a_wrong_b_right": len(only_b),
        "b_wins": only_b,
        "b_losses": only_a,
        "mcnemar": test,
    }


def compare_table(result: dict[str, Any]) -> str:
    m = result["mcnemar"]
    return "\n".join(
        [
            f"A: {result['a']} (protocol {result.get('protocol_a', 'fair')})",
            f"B: {result['b']} (protocol {result.get('protocol_b', 'fair')})",
            f"questions compared: {result['questions']}"
            + (f" (ignored: {result['only_in_a']} only in A, {result['only_in_b']} only in B)"
               if result["only_in_a"] or result["only_in_b"] else ""),
            f"accuracy   A {result['accuracy_a']:.4f}   B {result['accuracy_b']:.4f}   "
            f"Δ {result['accuracy_b'] - result['accuracy_a']:+.4f}",
            f"both right {result['both_right']}, both wrong {result['both_wrong']}, "
            f"B wins {result['a_wrong_b_right']}, B loses {result['a_right_b_wrong']}",
            f"McNemar: exact p = {m['p_value']:.4g} (chi² {m['statistic']:.3f}, p = {m['p_value_chi2']:.4g})",
        ]
    )


def gain_summary(start: Path, end: Path) -> tuple[dict[str, Any], str]:
    """Paired before/after on the same questions (a run's ``eval/start`` and ``eval/final``): the
    gain and McNemar's test of it, for ``summary.json``, and the printed table."""
    result = compare(start, end)
    gain = {
        "accuracy_start": result["accuracy_a"],
        "accuracy_end": result["accuracy_b"],
        "questions": result["questions"],
        "wins": result["a_wrong_b_right"],
        "losses": result["a_right_b_wrong"],
        "mcnemar_p": result["mcnemar"]["p_value"],
    }
    return gain, compare_table(result)
