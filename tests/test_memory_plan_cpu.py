"""`echoink plan`'s memory estimate (orchestrator/memory.py) against what was measured.

Every colocated run recorded on the H200 (benchmarks/records/colocated_*.json: the run's config and
its medians) is estimated again here from the released layout's shape and its own config: the
learner's allocation peak and the GPU's memory with both roles awake must be within 10 % of the
measured values, and the host's where it was measured. A change to the learner's memory (a new
buffer, a lever) that the estimate does not follow fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni.fixtures.tiny import LAYOUTS, build_tiny_checkpoint
from omni.sizes import model_shape
from orchestrator.config import RunConfig, load_config
from orchestrator.memory import check_fits, estimate

REPO = Path(__file__).resolve().parent.parent
RECORDS = sorted(p for p in (REPO / "benchmarks" / "records").glob("colocated_*.json") if "config" in json.loads(p.read_text()))
H200_GIB = 139.8  # the card the records were measured on (torch's total_memory)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from omni.fixtures.tiny_qwen3 import QWEN3_LAYOUTS, build_tiny_qwen3_checkpoint

    root = tmp_path_factory.mktemp("layouts")
    shapes = {name: model_shape(build_tiny_checkpoint(root / name, sizes=LAYOUTS[name], weights=False)) for name in ("3b", "7b")}
    shapes["qwen3_30b_a3b"] = model_shape(build_tiny_qwen3_checkpoint(root / "q3", sizes=QWEN3_LAYOUTS["30b-a3b"], weights=False))
    return shapes


def layout_of(record: Path) -> str:
    """The released layout a record's run used, from its name (colocated_<layout>_…)."""
    return "qwen3_30b_a3b" if "qwen3_30b_a3b" in record.stem else "7b" if "_7b" in record.stem else "3b"


def test_the_released_layouts_count_what_the_learner_counted(shapes) -> None:
    # the learner's own counts on the H200 (RESULTS.md section 9): the thinkers and LoRA rank 64
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert shapes["3b"].parameters == 4_703_464_448 and shapes["7b"].parameters == 8_931_813_888
    assert shapes["3b"].lora_parameters(64, targets, towers=False) == 119_734_272
    assert shapes["7b"].lora_parameters(64, targets, towers=False) == 161_480_704
    assert shapes["7b"].lora_parameters(64, targets, towers=True) > 161_480_704


def test_the_shape_counts_the_real_model(tiny_checkpoint) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    model = Thinker.from_pretrained(str(tiny_checkpoint), local_files_only=True)
    shape = model_shape(tiny_checkpoint)
    assert shape.shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shape.towers == sum(p.numel() for n, p in model.named_parameters() if n.startswith(("audio_tower.", "visual.")))


def recorded(path: Path) -> tuple[RunConfig, dict]:
    record = json.loads(path.read_text())
    tree = record["config"]
    tree["rewards"]["weights"] = {"accuracy": 1.0}  # the benchmark's coin reward is registered by its script
    # runs recorded before learner.fused_optimizer existed ran torch's foreach AdamW
    tree["learner"].setdefault("fused_optimizer", False)
    return RunConfig.model_validate(tree), record["medians"]


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_the_estimate_is_within_ten_percent_of_each_measured_run(shapes, path: Path) -> None:
    config, measured = recorded(path)
    plan = estimate(config, shapes[layout_of(path)], colocated=True, gpu_gib=H200_GIB)
    step = plan.learner_peak
    awake = plan.both_awake
    assert step == pytest.approx(measured["memory/learner_peak_gb"], rel=0.10)
    assert awake == pytest.approx(measured["memory/gpu_used_awake_gb"], rel=0.10)
    if "memory/host_used_gb" in measured:
        if config.learner.offload_optimizer:  # what the host estimate is for: the states it holds
            assert plan.host_total == pytest.approx(measured["memory/host_used_gb"], rel=0.10)
        else:  # the processes alone: a bound (8.6 GiB an actor, measured beside offloaded states)
            assert measured["memory/host_used_gb"] <= plan.host_total


def test_a_config_that_cannot_fit_names_its_largest_item_and_a_lever(shapes) -> None:
    seven = load_config(REPO / "configs" / "omni7b_1gpu.yaml", ["learner.lora.rank=0", "learner.lr=1e-6"])
    with pytest.raises(ValueError, match=r"largest item is master weights \+ Adam moments .*set learner\.") as caught:
        check_fits(seven, shapes["7b"], colocated=True, gpu_gib=H200_GIB, host_gib=125.0)
    # the lever it names does make it fit (what the H200 ran: offload with bf16 states, section 10)
    fix = str(caught.value).split("set ", 1)[1].split("\n", 1)[0].split()
    fixed = load_config(REPO / "configs" / "omni7b_1gpu.yaml", ["learner.lora.rank=0", "learner.lr=1e-6", *fix])
    assert check_fits(fixed, shapes["7b"], colocated=True, gpu_gib=H200_GIB, host_gib=125.0).fits
    # the 3B full fine-tune on an 80 GB card: ZeRO-Offload alone (measured: 50.8 GiB learner peak)
    three = load_config(REPO / "configs" / "omni3b_80gb.yaml", ["learner.lora.rank=0"])
    with pytest.raises(ValueError, match=r"set learner\.offload_optimizer=True"):
        check_fits(three, shapes["3b"], colocated=True, gpu_gib=80.0, host_gib=125.0)
    # the shipped configs fit the cards they are written for
    for name, gib in (("omni3b_1gpu", H200_GIB), ("omni7b_1gpu", H200_GIB), ("omni3b_80gb", 80.0), ("omni7b_lora_80gb", 80.0)):
        config = load_config(REPO / "configs" / f"{name}.yaml", [])
        assert check_fits(config, shapes["7b" if "7b" in name else "3b"], colocated=True, gpu_gib=gib).fits, name


def test_the_levers_are_refused_where_they_mean_nothing() -> None:
    with pytest.raises(ValueError, match="needs learner.dtype bfloat16"):
        load_config(None, ["learner.optimizer_dtype=bfloat16", "learner.dtype=float32"])
    with pytest.raises(ValueError, match="under ZeRO-3 it is already partitioned"):
        load_config(None, ["learner.reference_device=cpu", "learner.zero_stage=3"])


def test_deepspeed_config_carries_the_levers() -> None:
    import torch

    from learner.model import deepspeed_config
    from learner.types import LearnerSettings

    plain = deepspeed_config(LearnerSettings(model_path=Path("m")), dtype=torch.bfloat16, cuda=True)
    assert "offload_optimizer" not in plain["zero_optimization"] and plain["optimizer"]["params"]["torch_adam"]
    lean = deepspeed_config(LearnerSettings(model_path=Path("m"), offload_optimizer=True, optimizer_dtype="bfloat16"),
                            dtype=torch.bfloat16, cuda=True)
    assert lean["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert not lean["optimizer"]["params"]["torch_adam"]  # DeepSpeed's CPU Adam
    assert lean["bf16"] == {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}


def test_echoink_plan_prints_the_memory_per_role(shapes, tmp_path, capsys) -> None:
    from echoink.cli import main

    folder = build_tiny_checkpoint(tmp_path / "3b", sizes=LAYOUTS["3b"], weights=False)
    args = ["plan", "--config", str(REPO / "configs" / "omni3b_80gb.yaml"), "--gpus", "1", "--questions", "4000",
            "--gpu-memory", "80", "--host-memory", "125", "--set", f"model_path={folder}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "memory (GiB" in out and "learner GPU, learner step (engine asleep)" in out
    assert "LoRA adapters" in out and "engine (vLLM)" in out and "levers: LoRA rank 64" in out
    assert "does not fit" not in out
