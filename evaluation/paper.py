"""The EchoInk-R1 paper's numbers beside ours: the folders of an `echoink reproduce` run, the four
evaluations it makes, and its ``report.md`` (the stages that fill the folders are the driver's:
`echoink.reproduce`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.results import compare

PAPER = {"base": 0.8053, "trained": 0.8577}  # EchoInk-R1 (arXiv 2505.04623), AVQA-R1-6K validation

EVALS: tuple[tuple[str, str, str], ...] = (
    # (folder, which model, protocol)
    ("base-paper", "base", "paper-base"),
    ("base-fair", "base", "fair"),
    ("trained-paper", "trained", "paper-trained"),
    ("trained-fair", "trained", "fair"),
)


@dataclass
class ReproductionFolders:
    """Where an `echoink reproduce` run keeps each stage's output."""

    out: Path

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def train_dir(self) -> Path:
        return self.out / "train"

    def eval_dir(self, name: str) -> Path:
        return self.out / "eval" / name


def _summary(run: ReproductionFolders, name: str) -> dict[str, Any]:
    path = run.eval_dir(name) / "summary.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _acc(summary: dict[str, Any]) -> str:
    lo, hi = summary["ci95"]
    return f"{_pct(summary['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"


def _paired(result: dict[str, Any]) -> str:
    delta = result["accuracy_b"] - result["accuracy_a"]
    return (
        f"{100 * delta:+.2f} ({result['a_wrong_b_right']} wins, {result['a_right_b_wrong']} losses, "
        f"McNemar p = {result['mcnemar']['p_value']:.3g})"
    )


def write_report(
    run: ReproductionFolders,
    *,
    model: Path,
    trained: Path,
    rehearse: bool,
    token_limit: int | None,
    training: dict[str, Any],
) -> Path:
    """report.md: the paper's numbers, ours under the paper's protocols and under the fair one;
    ``training`` names the run's settings that the report quotes (key → value)."""
    s = {name: _summary(run, name) for name, _, _ in EVALS}
    paper_pair = compare(run.eval_dir("base-paper"), run.eval_dir("trained-paper"), allow_mixed_protocols=True)
    fair_pair = compare(run.eval_dir("base-fair"), run.eval_dir("trained-fair"))
    train_summary = json.loads((run.train_dir / "summary.json").read_text(encoding="utf-8"))
    counts = {split: json.loads((run.data_dir / split / "curate.json").read_text(encoding="utf-8")) for split in ("train", "valid")}
    paper_gain = f"{100 * (PAPER['trained'] - PAPER['base']):+.2f}"
    steps = train_summary["steps"]
    reward = train_summary.get("last", {}).get("reward/accuracy")
    lines = [
        "# Reproducing EchoInk-R1" + (" — rehearsal (tiny random model, synthetic data)" if rehearse else ""),
        "",
        f"- base model: `{model}`",
        f"- trained model: `{trained}` ({steps} GRPO steps with `{Path(train_summary['run_dir'])}`)",
        f"- data: {counts['train']['check']}; {counts['valid']['check']}",
        f"- validation questions scored: {s['base-fair']['questions']}",
        f"- training: accuracy reward of the last step {'—' if reward is None else f'{reward:.3f}'}; config "
        + ", ".join(f"{key} `{value}`" for key, value in training.items()),
        "",
        "Validation accuracy in % with 95 % intervals (Wilson); paired tests on the same questions.",
        "",
        "| | paper | ours, the paper's protocol | ours, fair protocol |",
        "|---|---|---|---|",
        f"| base model | {_pct(PAPER['base'])} (paper-base) | {_acc(s['base-paper'])} | {_acc(s['base-fair'])} |",
        f"| after {steps} steps | {_pct(PAPER['trained'])} (paper-trained, 562 steps) | {_acc(s['trained-paper'])} | "
        f"{_acc(s['trained-fair'])} |",
        f"| gain (paired: before → after) | {paper_gain} | {_paired(paper_pair)} | {_paired(fair_pair)} |",
        f"| format rate, base → after | — | {s['base-paper']['format_rate']:.3f} → {s['trained-paper']['format_rate']:.3f} | "
        f"{s['base-fair']['format_rate']:.3f} → {s['trained-fair']['format_rate']:.3f} |",
        f"| completions cut at the token limit, base → after | — | {s['base-paper']['cut_rate']:.3f} → "
        f"{s['trained-paper']['cut_rate']:.3f} | {s['base-fair']['cut_rate']:.3f} → {s['trained-fair']['cut_rate']:.3f} |",
        "",
        "The paper's column pairs two protocols (`paper-base` before, `paper-trained` after: another prompt, "
        "system message and decoding), so its gain mixes the training's effect with the protocols'. The fair "
        "column asks both models the same way (the training prompt, greedy, the reward's parser): its gain is "
        "the training's.",
        "",
        "Protocols as run (summary.json of each folder):",
        "",
    ]
    for name, which, protocol in EVALS:
        d = s[name]["protocol"]["decoding"]
        decoding = (
            "greedy" if d["temperature"] == 0 else f"temperature {d['temperature']:g}, top-p {d['top_p']:g}, top-k {d['top_k']}"
        )
        lines.append(
            f"- `eval/{name}` ({which} model, {protocol}): {decoding}, {d['max_new_tokens']} new tokens, "
            f"parser {s[name]['protocol']['parser']}"
        )
    if token_limit is not None:
        lines += ["", f"Rehearsal: the paper protocols' token limit was cut from 1024 to {token_limit}."]
    path = run.out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
