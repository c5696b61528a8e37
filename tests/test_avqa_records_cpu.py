"""Record loading and validation: every error names the file, the record and the field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import avqa
from avqa import LoadReport, RecordError, load_records


def good_record(i: int = 0) -> dict:
    return {
        "problem_id": i,
        "problem": "Which instrument is playing?",
        "data_type": "image_audio",
        "problem_type": "multiple choice",
        "options": ["A. Piano", "B. Violin", "C. Drum", "D. Flute"],
        "solution": "<answer>C</answer>",
        "path": {"image": f"images/{i}.jpg", "audio": f"audios/{i}.wav"},
        "data_source": "AVQA",
    }


@pytest.fixture
def dataset(tmp_path: Path, train_json: Path):
    """A folder with media for ids 0..3 and a writer for a JSON file of given records."""
    src_img = next((train_json.parent / "images").iterdir())
    src_wav = next((train_json.parent / "audios").iterdir())
    (tmp_path / "images").mkdir()
    (tmp_path / "audios").mkdir()
    for i in range(4):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(src_img.read_bytes())
        (tmp_path / "audios" / f"{i}.wav").write_bytes(src_wav.read_bytes())

    def write(records: list, name: str = "data.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(records), encoding="utf-8")
        return path

    return tmp_path, write


def test_loads_the_released_layout(train_json: Path) -> None:
    records = load_records(train_json)
    raw = json.loads(train_json.read_text())
    assert len(records) == len(raw) == 24
    first = records[0]
    assert first.id == str(raw[0]["problem_id"])
    assert first.question == raw[0]["problem"]
    assert list(first.options) == raw[0]["options"]
    assert f"<answer>{first.answer}</answer>" == raw[0]["solution"]
    assert first.image_path == (train_json.parent / raw[0]["path"]["image"]).resolve()
    assert first.audio_path.is_absolute() and first.audio_path.is_file()
    assert first.letters == ("A", "B", "C", "D")


TYPE_PATHS = {
    "image_audio": {"image": "images/0.jpg", "audio": "audios/0.wav"},
    "video_audio": {"video": "videos/0.mp4"},
    "video": {"video": "videos/0.mp4"},
    "audio": {"audio": "audios/0.wav"},
    "image": {"image": "images/0.jpg"},
    "text": None,
}


def test_every_data_type_loads_with_its_media_and_round_trips(dataset) -> None:
    root, write = dataset
    (root / "videos").mkdir()
    (root / "videos" / "0.mp4").write_bytes(b"not decoded here: loading checks the file exists")
    raws = []
    for i, (kind, paths) in enumerate(TYPE_PATHS.items()):
        raw = {**good_record(i), "data_type": kind}
        del raw["path"]
        if paths is not None:
            raw["path"] = paths
        raws.append(raw)
    raws.append({**good_record(9), "data_type": "text", "path": {}})  # an empty path object is no media too
    path = write(raws)
    records = load_records(path)
    assert [r.data_type for r in records] == [*TYPE_PATHS, "text"]
    by_type = {r.data_type: r for r in records[:-1]}
    assert by_type["video_audio"].video_path == (root / "videos" / "0.mp4").resolve()
    assert by_type["video_audio"].audio_path is None and by_type["video_audio"].image_path is None
    assert by_type["video_audio"].modalities == ("video", "audio")  # the sound comes from the video
    assert by_type["audio"].modalities == ("audio",) and by_type["audio"].image_path is None
    assert by_type["text"].modalities == () and by_type["text"].media_path("video") is None
    for record, raw in zip(records[:-1], raws, strict=False):
        assert record.to_json(root) == raw  # the layout written is the layout read


def test_a_record_built_in_code_obeys_its_data_type(tmp_path: Path) -> None:
    common = dict(id="7", question="q", options=("A. x", "B. y"), answer="A")
    with pytest.raises(ValueError, match=r"data_type 'video' needs 'video'; takes no 'image'"):
        avqa.Record(**common, image_path=tmp_path / "a.jpg", data_type="video")
    with pytest.raises(ValueError, match="unknown data_type 'movie'"):
        avqa.Record(**common, data_type="movie")
    assert avqa.Record(**common, data_type="text").modalities == ()


def test_jsonl_and_saved_dataset_match_json(tmp_path: Path, train_json: Path) -> None:
    import datasets

    raw = json.loads(train_json.read_text())
    jsonl = train_json.parent / "copy.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in raw) + "\n")
    saved = train_json.parent / "saved"
    datasets.Dataset.from_list(raw).save_to_disk(str(saved))
    try:
        base = load_records(train_json)
        from_jsonl = load_records(jsonl)
        from_saved = load_records(saved, media_root=train_json.parent)
        key = [(r.id, r.question, r.options, r.answer, r.image_path, r.audio_path) for r in base]
        assert [(r.id, r.question, r.options, r.answer, r.image_path, r.audio_path) for r in from_jsonl] == key
        assert [(r.id, r.question, r.options, r.answer, r.image_path, r.audio_path) for r in from_saved] == key
    finally:
        jsonl.unlink()


def _mutate(path: tuple, value) -> dict:
    rec = good_record(1)
    target = rec
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return rec


CASES = [
    # (mutation path, new value, field named in the error, words in the reason)
    (("problem",), KeyError, "problem", "Field required"),
    (("problem_id",), KeyError, "problem_id", "Field required"),
    (("options",), "A. Piano", "options", "valid list"),
    (("problem",), 42, "problem", "valid string"),
    (("problem_id",), 1.5, "problem_id", ""),
    (("data_type",), "3d", "data_type", "image_audio"),
    # a data_type whose media do not match the path object: the missing or extra medium is named
    (("data_type",), "video", "path.video", "data_type 'video' needs 'video'; takes no 'audio' or 'image'"),
    (("data_type",), "image", "path.audio", "data_type 'image' takes no 'audio' (it reads: image)"),
    (("data_type",), "text", "path.audio", "takes no 'audio' or 'image' (it reads: no media)"),
    (("problem_type",), "free-form", "problem_type", "multiple choice"),
    (("options",), ["A. Piano"], "options", "at least 2 options"),
    (("options",), ["A. Piano", "C. Drum", "B. Violin"], "options[1]", "lettered 'B."),
    (("options",), ["Piano", "Violin"], "options[0]", "lettered 'A."),
    (("options",), ["A. Piano", "B. "], "options[1]", "no text"),
    (("solution",), "C", "solution", "<answer>X</answer>"),
    (("solution",), "<answer>E</answer>", "solution", "not among the options"),
    (("solution",), "<answer>?</answer>", "solution", "no option letter"),
    (("path", "image"), "/etc/passwd", "path.image", "absolute path"),
    (("path", "audio"), "../../outside.wav", "path.audio", "outside the dataset folder"),
    (("path", "audio"), "audios/missing.wav", "path.audio", "does not exist"),
    (("path", "image"), "images", "path.image", "is not a file"),
    (("path",), {"image": "images/1.jpg"}, "path.audio", "data_type 'image_audio' needs 'audio'"),
    (("path",), KeyError, "path.audio", "data_type 'image_audio' needs 'audio' and 'image'"),
    (("path",), {"image": "images/1.jpg", "audio": "audios/1.wav", "video": "v.mp4"}, "path.video", "takes no 'video'"),
    (("path", "image"), 7, "path.image", "valid string"),
    (("data_source",), KeyError, "data_source", "Field required"),
]


@pytest.mark.parametrize(("where", "value", "field", "reason"), CASES)
def test_each_invalid_field_is_named(dataset, where, value, field, reason) -> None:
    root, write = dataset
    path = write([good_record(0), _mutate(where, value)])
    with pytest.raises(RecordError) as info:
        load_records(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.file == str(path) and err.index == 1 and err.field == field
    message = str(err)
    assert str(path) in message and "record 1" in message and f"field '{field}'" in message
    assert reason in message
    if where != ("problem_id",):
        assert "(id 1)" in message


def test_symlink_out_of_the_dataset_folder_is_refused(dataset, tmp_path_factory) -> None:
    root, write = dataset
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.wav"
    outside.write_bytes((root / "audios" / "0.wav").read_bytes())
    os.symlink(outside, root / "audios" / "link.wav")
    rec = good_record(1)
    rec["path"]["audio"] = "audios/link.wav"
    with pytest.raises(RecordError, match="outside the dataset folder") as info:
        load_records(write([rec]))
    assert info.value.field == "path.audio"


def test_duplicate_ids_are_refused(dataset) -> None:
    _, write = dataset
    with pytest.raises(RecordError, match="duplicate id") as info:
        load_records(write([good_record(2), good_record(2)]))
    assert info.value.index == 1 and info.value.field == "problem_id"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b'[{"problem_id": 0,', "invalid JSON at line 1"),
        (b'{"problem_id": 0}', "expected a JSON array"),
        (b"\xff\xfe[\x00]", "not UTF-8"),
    ],
)
def test_broken_files_are_named(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(RecordError, match=reason) as info:
        load_records(path)
    assert info.value.file == str(path) and info.value.field == "<file>"


def test_a_record_that_is_not_an_object(dataset) -> None:
    _, write = dataset
    with pytest.raises(RecordError, match="expected a JSON object, got list"):
        load_records(write([good_record(0), [1, 2]]))


def test_collect_mode_keeps_good_records_and_reports_bad(dataset) -> None:
    _, write = dataset
    bad_solution = good_record(1)
    bad_solution["solution"] = "<answer>Z</answer>"
    missing = good_record(2)
    missing["path"]["image"] = "images/none.jpg"
    path = write([good_record(0), bad_solution, missing, good_record(3)])
    report = LoadReport()
    records = load_records(path, report=report)
    assert [r.id for r in records] == ["0", "3"]
    assert report.total == 4 and report.skipped == 2
    assert [(e.index, e.field) for e in report.errors] == [(1, "solution"), (2, "path.image")]
    assert "2 skipped" in report.summary()
    assert report.errors[0].to_dict()["id"] == 1


def test_multi_answer_gold_letters(dataset) -> None:
    _, write = dataset
    a = good_record(0)
    a["solution"] = "<answer>A,C</answer>"
    b = good_record(1)
    b["solution"] = "<answer> BD </answer>"
    records = load_records(write([a, b]))
    assert records[0].gold_letters == frozenset("AC")
    assert records[1].gold_letters == frozenset("BD") and records[1].answer == "BD"


def test_string_ids_and_extra_fields_are_kept(dataset) -> None:
    _, write = dataset
    rec = good_record(0)
    rec["problem_id"] = "avqa-17"
    rec["video_id"] = 99
    (record,) = load_records(write([rec]))
    assert record.id == "avqa-17" and record.extra == {"video_id": 99}
    assert avqa.parse_answer_letters("a") == frozenset()
