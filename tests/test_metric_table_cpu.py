"""One table of metric names (omni/metric_table.py): well formed, and the README shows all of it."""

from __future__ import annotations

from pathlib import Path

from omni.metric_table import (
    COMBINES,
    LEARNER_METRICS,
    METRICS,
    SOURCES,
    is_known,
    markdown_table,
    unknown,
)

REPO = Path(__file__).resolve().parent.parent


def test_every_metric_has_a_source_and_learner_metrics_a_combine_rule() -> None:
    for metric in METRICS.values():
        assert metric.source in SOURCES, metric
        assert metric.combine in COMBINES, metric
        assert bool(metric.combine) == (metric.source == "learner"), metric
        assert metric.meaning, metric
    assert {m.name for m in LEARNER_METRICS} >= {"loss", "kl", "grad_norm", "lr", "ratio/mean"}


def test_patterns_match_one_segment() -> None:
    assert is_known("reward/accuracy") and is_known("eval/ablate_audio/accuracy")
    assert not is_known("eval/ablate_audio/format") and not is_known("reward")
    assert unknown(["kl", "klx", "timing/step_s"]) == ["klx"]


def test_the_readme_shows_the_table() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "README.md's metric table differs from omni.metric_table.markdown_table()"
