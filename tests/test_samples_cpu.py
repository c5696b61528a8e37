"""Samples of a step (watch/samples.py): which completions are picked, what samples.jsonl
and RUN/samples/ hold, and what TensorBoard reads back (text, image and audio summaries), on real
synthetic records scored by the real rewards."""

from __future__ import annotations

import shutil
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avqa import load_audio, load_image, load_records
from omni.inputs import MediaSettings
from orchestrator.scoring import ScoringRules, score_step
from rewards import RewardSet
from rollout.types import Completion, RolloutResult
from watch.samples import SAMPLES_FILE, SampleLog, is_due, media_name, pick, read_samples

RIGHT = "<think>the shape is {colour} and the tone is {tone}</think><answer>{letter}</answer>"
WRONG = "I think it is <answer>{letter}</answer>"


def completion(text: str) -> Completion:
    tokens = len(text.split())
    return Completion(text=text, token_ids=list(range(tokens)), logprobs=[-0.5] * tokens, finish_reason="stop")


def wrong_letter(answer: str) -> str:
    return "A" if answer != "A" else "B"


@pytest.fixture(scope="module")
def records(train_json: Path) -> list:
    return load_records(train_json)[:3]


def scored_step(records: list, step: int = 1):
    """Three completions a question: right, wrong letter in the wrong format, right again."""
    results = []
    for r in records:
        right = RIGHT.format(colour="red", tone="low", letter=r.answer)
        results.append(RolloutResult(r.id, completions=[
            completion(right), completion(WRONG.format(letter=wrong_letter(r.answer))), completion(right + " ")]))
    return score_step(step, records, results, RewardSet(), ScoringRules())


def test_due_steps_are_step_one_and_every_n() -> None:
    assert [s for s in range(1, 13) if is_due(s, 5)] == [1, 5, 10]
    assert not any(is_due(s, 0) for s in range(1, 100))


def test_pick_goes_round_robin_over_questions_in_rollout_order(records) -> None:
    completions = scored_step(records).completions
    picked = pick(completions, 4)
    # completion 0 of each of the three questions, then completion 1 of the first
    assert [(i, c.record.id) for i, c in picked] == [
        (0, records[0].id), (0, records[1].id), (0, records[2].id), (1, records[0].id)]
    assert picked[3][1] is completions[1]
    assert len(pick(completions, 100)) == 9  # never more than there are
    # a question drawn twice in a step is one group: its completions are taken one after the other
    twice = scored_step([records[0], records[1], records[0]]).completions
    assert [(i, c.record.id) for i, c in pick(twice, 4)] == [
        (0, records[0].id), (0, records[1].id), (1, records[0].id), (1, records[1].id)]


def test_rows_hold_the_question_rewards_advantage_and_media(records, tmp_path) -> None:
    scored = scored_step(records, step=10)
    media = MediaSettings()
    rows = SampleLog(tmp_path, every=5, count=4, media=media).log(10, scored.completions)
    assert [row["slot"] for row in rows] == [0, 1, 2, 3]
    assert read_samples(tmp_path) == rows  # samples.jsonl holds exactly these rows
    first, fourth = rows[0], rows[3]
    r = records[0]
    assert (first["id"], first["question"], first["options"], first["answer"]) == (r.id, r.question, list(r.options), r.answer)
    assert first["completion"] == RIGHT.format(colour="red", tone="low", letter=r.answer)
    # the reward and the advantage are those the learner got for that completion
    assert first["rewards"] == {"accuracy": 1.0, "format": 1.0} and first["reward"] == 2.0
    assert fourth["completion_index"] == 1 and fourth["rewards"] == {"accuracy": 0.0, "format": 0.0}
    experiences = [e for e in scored.experiences if e.record.id == r.id]
    assert first["advantage"] == pytest.approx(experiences[0].advantage)
    assert fourth["advantage"] == pytest.approx(experiences[1].advantage) and fourth["advantage"] < 0 < first["advantage"]
    assert first["group_rewards"] == [2.0, 0.0, 2.0]
    # the picture: a thumbnail of what the model saw, in the run folder
    assert first["image"] == f"samples/{media_name(r.id)}.jpg" and not first["media_errors"]
    seen = load_image(r.image_path)
    with Image.open(tmp_path / first["image"]) as thumb:
        assert thumb.size == seen.size  # 112 px: below the thumbnail size, kept as seen
        centre = np.asarray(thumb.convert("RGB"))[thumb.height // 2, thumb.width // 2].astype(int)
    assert np.abs(centre - np.asarray(seen)[seen.height // 2, seen.width // 2].astype(int)).max() <= 12
    # the sound: the clip the model heard, as 16-bit WAV
    clip = load_audio(r.audio_path)
    with wave.open(str(tmp_path / first["audio"]), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16_000, 1, 2)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2") / 32767.0
    assert len(pcm) == len(clip) and np.abs(pcm - clip).max() < 1e-4
    # one copy per question however often it is sampled
    assert len(list((tmp_path / "samples").iterdir())) == 2 * len(records)


def test_steps_not_due_write_nothing(records, tmp_path) -> None:
    log = SampleLog(tmp_path, every=5, count=4, media=MediaSettings())
    assert log.log(3, scored_step(records).completions) == []
    assert not (tmp_path / SAMPLES_FILE).exists() and not (tmp_path / "samples").exists()


def test_a_question_without_a_picture_or_with_a_broken_one_is_stated(records, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    audio_only = replace(records[0], image_path=None, data_type="audio")
    bad_picture = replace(records[1], image_path=broken)
    scored = scored_step([audio_only, bad_picture])
    rows = SampleLog(tmp_path / "run", every=1, count=2, media=MediaSettings()).log(1, scored.completions)
    assert rows[0]["image"] is None and rows[0]["audio"] is not None and rows[0]["data_type"] == "audio"
    assert rows[0]["media_errors"] == {}
    assert rows[1]["image"] is None and str(broken) in rows[1]["media_errors"]["image"]


def test_tensorboard_holds_text_image_and_audio_per_slot(records, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tensorboard"))
    log = SampleLog(tmp_path, every=2, count=2, media=MediaSettings(), writer=writer)
    for step in (1, 2, 3, 4):
        log.log(step, scored_step(records, step).completions)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "audio": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"samples/0/image", "samples/1/image"} <= set(tags["images"])
    assert {"samples/0/audio", "samples/1/audio"} <= set(tags["audio"])
    assert "samples/0/text_summary" in tags["tensors"]
    assert [e.step for e in events.Images("samples/0/image")] == [1, 2, 4]
    image = events.Images("samples/1/image")[0]
    assert (image.width, image.height) == load_image(records[1].image_path).size
    audio = events.Audio("samples/0/audio")[0]
    assert audio.sample_rate == 16_000 and audio.length_frames == len(load_audio(records[0].audio_path))
    text = events.Tensors("samples/0/text_summary")[0].tensor_proto.string_val[0].decode()
    assert records[0].id in text and f"gold **{records[0].answer}**" in text
    assert "    <think>the shape is red" in text  # the completion as a code block: its tags shown


def test_read_samples_names_the_file_line_and_field(tmp_path) -> None:
    (tmp_path / SAMPLES_FILE).write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl: line 1 has no field 'slot'"):
        read_samples(tmp_path)
    (tmp_path / SAMPLES_FILE).write_text("\n{oops\n")
    with pytest.raises(ValueError, match=r"samples.jsonl: line 2 is not JSON"):
        read_samples(tmp_path)
    shutil.rmtree(tmp_path)
    assert read_samples(tmp_path) == []
