"""`echoink report RUN_DIR`: one self-contained HTML page of a run — the curves, the evaluation
tables with their intervals and ablations, the before/after comparison, and sample completions with
their picture and a player for their sound.

Everything is inlined (charts as PNG, pictures and clips as base64 data URIs), so the page can be
mailed or archived alone. Only ``metrics.jsonl`` is required; a part the run has not written yet (no
evaluation, no samples) is stated on the page.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from watch.jsonl import read_jsonl
from watch.samples import read_samples

CONDITION_WORDS = {
    "none": "as given",
    "audio": "audio → silence",
    "image": "picture → flat grey",
    "video": "video → flat grey frames",
    "both": "every medium replaced",
}
MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".wav": "audio/wav"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: right; white-space: nowrap; font-size: 0.92em; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
.note { color: #666; font-style: italic; }
.charts { display: grid; grid-template-columns: 1fr 1fr 1fr; gap: 0.5em; }
.chart { width: 100%; display: block; }
.facts td { text-align: left; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 0.8em; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; }
.sample img { width: 128px; image-rendering: pixelated; border: 1px solid #eee; }
.sample audio { width: 100%; margin: 0.4em 0; }
.sample pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.5em; font-size: 0.85em; }
.sample ul { list-style: none; padding-left: 0.5em; margin: 0.3em 0; } .gold { font-weight: bold; color: #17662c; }
.good { color: #17662c; } .bad { color: #a11; }
"""


def build_report(run_dir: Path, out: Path | None = None, *, sample_steps: int = 6) -> Path:
    """Write the page (default ``RUN_DIR/report.html``) and return its path; ``sample_steps``: how
    many of the sampled steps to show, spread over the run (0: all)."""
    page = render_report(Path(run_dir), sample_steps=sample_steps)
    target = Path(out) if out is not None else Path(run_dir) / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


def render_report(run_dir: Path, *, sample_steps: int = 6) -> str:
    """The page's HTML. A folder without ``metrics.jsonl`` is an error naming both."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no metrics.jsonl (not a training run folder, or a run that has not logged a step yet)"
        )
    rows = read_jsonl(metrics_path)
    summary = read_json(run_dir / "summary.json")
    body = [
        _header(run_dir, rows, summary),
        _curves(rows, metrics_path),
        _evaluations(run_dir),
        _before_after(run_dir, summary),
        _samples(run_dir, sample_steps),
        _details(run_dir),
    ]
    title = f"EchoInk run {run_dir.name}"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# ---------------------------------------------------------------------------- reading
def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None where the file does not exist (yet)."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _num(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "–"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def data_uri(path: Path) -> str:
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ---------------------------------------------------------------------------- sections
def _header(run_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    config = _config(run_dir)
    grpo = config.get("grpo", {}) if config else {}
    facts: list[tuple[str, Any]] = [("run folder", run_dir.resolve())]
    if config:
        facts += [("model", config.get("model_path", "–")),
                  ("questions × completions a step", f"{grpo.get('questions_per_step', '–')} × {grpo.get('group_size', '–')}")]
    last_step = rows[-1].get("step", "–") if rows else "–"
    if summary is not None:
        state = "finished" if summary.get("finished") else "stopped (continue with --resume)"
        facts.append(("steps", f"{summary.get('steps', last_step)} of {summary.get('total_steps', '–')}, {state}"))
    else:
        facts.append(("steps", f"{last_step} logged; no summary.json (the run is going on, or ended without one)"))
    times = [r["time"] for r in rows if isinstance(r.get("time"), int | float)]
    if len(times) > 1:
        facts.append(("steps logged between", f"{_clock(times[0])} and {_clock(times[-1])}"))
    if rows:
        last = rows[-1]
        facts.append(("last step", ", ".join(
            f"{k} {_num(last[k])}" for k in ("reward/total", "reward/accuracy", "reward/format", "kl", "timing/step_s")
            if isinstance(last.get(k), int | float))))
    facts.append(("report written", _clock(time.time())))
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    return f'<h1>EchoInk run {_e(run_dir.name)}</h1><table class="facts">{table}</table>'


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))


def _config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else None


def _curves(rows: list[dict[str, Any]], path: Path) -> str:
    from watch.plot import render_figures

    out = ["<h2>Training curves</h2>"]
    if not rows:
        return out[0] + _note(f"{path} holds no steps yet.")
    smoothing = max(1, len(rows) // 30)  # a visible trend on long runs; raw points on short ones
    figures = render_figures(rows, smoothing=smoothing, width=540, height=340, dpi=100)
    if smoothing > 1:
        out.append(_note(f"Moving average over {smoothing} steps; metrics.jsonl holds every step."))
    charts = []
    for name, title, png in figures:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        charts.append(f'<img class="chart" id="chart-{_e(name)}" alt="{_e(title)}" src="{uri}">')
    out.append('<div class="charts">' + "".join(charts) + "</div>")
    if not figures:
        out.append(_note(f"{path} holds none of the plotted metrics."))
    return "\n".join(out)


def _condition_table(summary: dict[str, Any]) -> str:
    conditions = summary.get("conditions") or {}
    plain = conditions.get("none", {}).get("accuracy")
    rows = []
    for name, s in conditions.items():
        lo, hi = (s.get("ci95") or [None, None])[:2]
        accuracy = s.get("accuracy")
        comparable = name != "none" and isinstance(plain, float) and isinstance(accuracy, float)
        drop = accuracy - plain if comparable else None
        rows.append([
            f"{name}: {CONDITION_WORDS.get(name, name)}",
            _num(accuracy),
            f"[{_num(lo)}, {_num(hi)}]",
            "–" if drop is None else f"{drop:+.3f}",
            _num(s.get("accuracy_lenient")),
            _num(s.get("format_rate")),
            _num(s.get("mean_completion_length"), ".1f"),
            _num(s.get("answer_changed_rate")),
            f"{s.get('questions', '–')}" + (f" ({s['errors']} failed)" if s.get("errors") else ""),
        ])
    return _table(["condition", "accuracy", "95 % interval", "Δ accuracy", "lenient", "format", "length",
                   "answers changed", "questions"], rows)


def _protocol_words(summary: dict[str, Any]) -> str:
    protocol = summary.get("protocol")
    name = protocol.get("name") if isinstance(protocol, dict) else protocol or "fair"
    return f"protocol {name}, {summary.get('mode', 'greedy')}, {summary.get('samples', 1)} completion(s) a question"


def _evaluations(run_dir: Path) -> str:
    out = ["<h2>Evaluation</h2>"]
    folder = run_dir / "eval"
    found = False
    for name, words in (("start", "Starting weights"), ("final", "After training")):
        summary = read_json(folder / name / "summary.json")
        if summary is None:
            continue
        found = True
        out.append(f"<h3>{words} (eval/{name})</h3><p>{_e(_protocol_words(summary))}</p>")
        out.append(_condition_table(summary))
    periodic = []
    for path in sorted(folder.glob("step-*/summary.json")) if folder.is_dir() else []:
        summary = read_json(path) or {}
        lo, hi = (summary.get("ci95") or [None, None])[:2]
        step = path.parent.name.removeprefix("step-").lstrip("0") or "0"
        periodic.append([step, _num(summary.get("accuracy")), f"[{_num(lo)}, {_num(hi)}]",
                         _num(summary.get("format_rate")), _num(summary.get("mean_completion_length"), ".1f"),
                         summary.get("questions", "–")])
    if periodic:
        found = True
        out.append("<h3>During training (eval/step-N, eval.subset questions)</h3>")
        out.append(_table(["step", "accuracy", "95 % interval", "format", "length", "questions"], periodic))
    if not found:
        out.append(_note(f"No evaluation in {folder} yet: eval.at_start, eval.every and eval.at_end write one, "
                         "or `echoink eval --checkpoint …`."))
    return "\n".join(out)


def _before_after(run_dir: Path, summary: dict[str, Any] | None) -> str:
    head = "<h2>Before and after training</h2>"
    gain = (summary or {}).get("eval_gain")
    if not isinstance(gain, dict):
        why = "no summary.json yet" if summary is None else "summary.json has no eval_gain"
        return head + _note(f"No paired comparison ({why}): a finished run with eval.at_start and eval.at_end "
                            "compares the same questions before and after, or `echoink compare A B`.")
    for key in ("accuracy_start", "accuracy_end", "questions", "wins", "losses", "mcnemar_p"):
        if not isinstance(gain.get(key), int | float):
            raise ValueError(f"{run_dir / 'summary.json'}: eval_gain has no number {key!r}")
    n = gain["questions"]
    wins, losses = gain["wins"], gain["losses"]
    both_right = round(gain["accuracy_end"] * n) - wins
    rows = [["accuracy", _num(gain["accuracy_start"]), _num(gain["accuracy_end"]),
             f"{gain['accuracy_end'] - gain['accuracy_start']:+.3f}"]]
    text = (f"The same {n} questions: {wins} right only after training, {losses} right only before, "
            f"{both_right} right in both, {n - both_right - wins - losses} wrong in both. McNemar's exact test: "
            f"p = {gain['mcnemar_p']:.3g}.")
    return head + _table(["", "before (eval/start)", "after (eval/final)", "change"], rows) + f"<p>{_e(text)}</p>"


def choose_steps(steps: Sequence[int], limit: int) -> list[int]:
    """At most ``limit`` of the sampled steps, spread evenly, first and last always (0: all)."""
    steps = sorted(set(steps))
    if limit <= 0 or len(steps) <= limit:
        return steps
    if limit == 1:
        return [steps[-1]]
    return sorted({steps[round(i * (len(steps) - 1) / (limit - 1))] for i in range(limit)})


def _samples(run_dir: Path, limit: int) -> str:
    head = "<h2>Sample completions</h2>"
    rows = read_samples(run_dir)
    if not rows:
        return head + _note(f"No samples in {run_dir / 'samples.jsonl'}: the run logs them at step 1 and every "
                            "log.samples_every steps (0 turns them off).")
    steps = sorted({r["step"] for r in rows})
    shown = choose_steps(steps, limit)
    out = [head]
    if len(shown) < len(steps):
        out.append(_note(f"Steps {', '.join(map(str, shown))} of the {len(steps)} sampled steps "
                         "(echoink report --sample-steps 0 shows all)."))
    for step in shown:
        cards = [_sample_card(run_dir, r) for r in rows if r["step"] == step]
        out.append(f'<h3>Step {step}</h3><div class="samples">' + "".join(cards) + "</div>")
    return "\n".join(out)


def _media(run_dir: Path, row: dict[str, Any], kind: str) -> str:
    """A picture or player inlined from the run folder, or a sentence saying why there is none."""
    errors, relative = row.get("media_errors") or {}, row.get(kind)
    if kind in errors:
        return _note(f"{kind}: could not be read when sampled ({errors[kind]})")
    if relative is None:
        return _note(f"no {'picture' if kind == 'image' else 'sound file'} in this question "
                     f"(data_type {row.get('data_type', 'image_audio')})")
    path = (run_dir / relative).resolve()
    if not path.is_relative_to(run_dir.resolve()):
        return _note(f"{kind}: {relative} is outside the run folder; not inlined")
    if not path.is_file():
        return _note(f"{kind}: {relative} is missing from the run folder")
    if kind == "image":
        return f'<img alt="the question\'s picture" src="{data_uri(path)}">'
    return f'<audio controls preload="metadata" src="{data_uri(path)}"></audio>'


def _sample_card(run_dir: Path, row: dict[str, Any]) -> str:
    gold = set(str(row["answer"]).replace(" ", "").split(","))
    options = "".join(
        # options carry their letter ("A. …"), as in the prompt
        f'<li class="{"gold" if chr(65 + i) in gold else ""}">{_e(option)}{" ✓" if chr(65 + i) in gold else ""}</li>'
        for i, option in enumerate(row["options"])
    )
    parts = ", ".join(f"{k} {_num(v, 'g')}" for k, v in row["rewards"].items())
    tone = "good" if row["advantage"] > 0 else "bad" if row["advantage"] < 0 else ""
    group = row.get("group_rewards")
    group_text = f" · its group's rewards: {', '.join(_num(g, 'g') for g in group)}" if group else ""
    video = f"<p>video: {_e(row['video'])} (not copied into the run folder)</p>" if row.get("video") else ""
    return (
        f'<div class="sample" id="sample-{row["step"]}-{row["slot"]}">'
        f"<div><b>{_e(row['id'])}</b> · completion {_e(row.get('completion_index', 0))} · gold {_e(row['answer'])}</div>"
        f"<p>{_e(row['question'])}</p><ul>{options}</ul>"
        + _media(run_dir, row, "image")
        + _media(run_dir, row, "audio")
        + video
        + f"<pre>{_e(row['completion'])}</pre>"
        f"<div>reward {_num(row['reward'], 'g')} ({_e(parts)}) · "
        f'<span class="{tone}">advantage {row["advantage"]:+.3f}</span>{_e(group_text)}'
        f" · {_e(row.get('tokens', '–'))} tokens, {_e(row.get('finish_reason', '–'))}</div></div>"
    )


def _details(run_dir: Path) -> str:
    out = ["<h2>Run details</h2>"]
    for name, words in (("placement.json", "where each engine and learner rank ran"), ("config.yaml", "the resolved config")):
        path = run_dir / name
        if path.is_file():
            out.append(f"<details><summary>{_e(name)}: {_e(words)}</summary><pre>{_e(path.read_text(encoding='utf-8'))}</pre></details>")
        else:
            out.append(_note(f"no {name} in the run folder"))
    return "\n".join(out)
