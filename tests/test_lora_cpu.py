"""LoRA on the learner (learner.lora): the adapters, the reference with them off, the merged
weights the engines and checkpoints get, peft's folder, and a LoRA learner group that trains,
pushes, saves and resumes exactly; real peft, transformers, DeepSpeed, Ray and vLLM on the CPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_learner_group_cpu import settings

from avqa import load_records
from learner.group import LearnerGroup
from learner.lora import (
    ADAPTER,
    adapters_off,
    add_adapters,
    export_weights,
    lora_layers,
    merged,
    write_adapter,
)
from learner.types import Experience, LoraSettings
from omni.inputs import load_processor
from orchestrator.weight_sync import WeightSync
from rollout.engine import RolloutEngine
from rollout.pool import EnginePool
from rollout.types import EngineSettings, SamplingSettings

LORA = LoraSettings(rank=4, alpha=8.0)


def thinker(path: Path) -> torch.nn.Module:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    return Thinker.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_merge_switch_off_and_load_in_peft(tiny_checkpoint: Path, tmp_path: Path) -> None:
    base = thinker(tiny_checkpoint)
    model = thinker(tiny_checkpoint)
    trainable = add_adapters(model, LORA, seed=0)
    layers = lora_layers(model)
    # the language model's seven projections in every layer, nothing in the towers
    assert layers and all(name.startswith("model.layers.") for name in layers)
    assert {name.rsplit(".", 1)[-1] for name in layers} == set(LORA.targets)
    assert trainable == sum(4 * (layer.in_features + layer.out_features) for layer in layers.values())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), logits(base, ids))  # B starts at zero: the starting model
    generator = torch.Generator().manual_seed(1)
    for layer in layers.values():  # a trained adapter's B
        layer.lora_B[ADAPTER].weight.data.normal_(0.0, 0.05, generator=generator)
    adapted = logits(model, ids)
    assert (adapted - logits(base, ids)).abs().max() > 1e-3
    with adapters_off(layers.values()):  # the reference: the starting model's function, exactly
        assert torch.equal(logits(model, ids), logits(base, ids))
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # switched back on
    assert torch.equal(logits(model, ids), adapted)

    # the merged weights, under the plain thinker's names and in its order, load into it
    exported = export_weights(model)
    plain = thinker(tiny_checkpoint)
    assert [w.name for w in exported] == [n for n, _ in plain.named_parameters()]
    plain.load_state_dict({w.name: merged(w, torch.float32) for w in exported}, strict=False)
    assert (logits(plain, ids) - adapted).abs().max() < 1e-5

    # peft's folder, loaded by peft over the starting model
    from peft import PeftModel

    folder = write_adapter(model, tmp_path)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    loaded = PeftModel.from_pretrained(thinker(tiny_checkpoint), str(folder)).eval()
    assert (logits(loaded, ids) - adapted).abs().max() < 1e-6


def test_targets_are_checked_and_towers_are_opt_in(tiny_checkpoint: Path) -> None:
    from learner.types import DEFAULT_LORA_TARGETS
    from orchestrator import config

    assert config.DEFAULT_LORA_TARGETS == DEFAULT_LORA_TARGETS == LORA.targets  # the config's default is the learner's
    with pytest.raises(ValueError, match=r"\['qproj'\] name no linear layer of the language model"):
        add_adapters(thinker(tiny_checkpoint), LoraSettings(rank=2, targets=("q_proj", "qproj")), seed=0)
    model = thinker(tiny_checkpoint)
    add_adapters(model, LoraSettings(rank=2, targets=("gate_proj", "fc1"), towers=True), seed=0)
    tops = {name.split(".")[0] for name in lora_layers(model)}
    assert tops == {"model", "visual", "audio_tower"}  # visual mlp.gate_proj, audio fc1, the LM's gate_proj


def test_a_lora_group_trains_pushes_saves_and_resumes_exactly(
    ray_local, tiny_checkpoint: Path, train_json: Path, tmp_path: Path
) -> None:
    """Two ranks (ZeRO-2) with adapters: the reference stays the starting model while the policy
    moves; the engine given the merged weights samples with the learner's log-probs (float noise)
    and like an engine started from the saved checkpoint; the checkpoint is the plain thinker plus
    peft's folder; a group rebuilt from the starting model and the train state takes the next
    step to the same weights as the group that never stopped."""
    records = load_records(train_json)[:3]
    tokenizer = load_processor(tiny_checkpoint).tokenizer
    good = tokenizer.encode("<think>x</think><answer>A</answer><|im_end|>", add_special_tokens=False)
    bad = tokenizer.encode("<answer>B</answer><|im_end|>", add_special_tokens=False)
    batch = [Experience(r, ids, advantage=a) for r in records for ids, a in ((good, 1.0), (bad, -1.0))]
    s = settings(tiny_checkpoint, num_ranks=2, lr=0.05, top_p=1.0, lora=LORA)
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=10, seed=3)
    learner = LearnerGroup(s, [{"num_cpus": 1}] * 2)
    engines = []
    try:
        start = learner.compute_logprobs(batch)
        assert learner.compute_logprobs(batch, reference=True) == start
        first = learner.train_step(batch)
        assert first["kl"] == 0.0
        learner.train_step(batch)
        moved = learner.compute_logprobs(batch)
        assert max(abs(a - b) for x, y in zip(moved, start, strict=True) for a, b in zip(x, y, strict=True)) > 1e-2
        reference = learner.compute_logprobs(batch, reference=True)
        for got, want in zip(reference, start, strict=True):
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-6

        engines.append(ray_local.remote(RolloutEngine).options(num_cpus=1).remote(
            EngineSettings(model_path=tiny_checkpoint, max_model_len=1024, enforce_eager=True), 0))
        pool = EnginePool(engines[:1])
        sync = WeightSync(learner, pool, backend="gloo", bucket_bytes=256 << 10, timeout_s=120)
        sync.push()
        sampled = pool.generate(records, 2, sampling)
        drawn = [Experience(r, c.token_ids, 0.0) for r, res in zip(records, sampled, strict=True) for c in res.completions]
        ours = learner.compute_logprobs(drawn, sampling=True)
        theirs = [c.logprobs for res in sampled for c in res.completions]
        gap = max(abs(a - b) for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=True))
        assert gap < 1e-4, f"vLLM with the merged weights vs the learner: {gap}"

        saved = tmp_path / "ckpt"
        learner.save(str(saved), {"step": 2})
        with safe_open(str(saved / "model.safetensors"), framework="pt") as fh, \
                safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as src:
            assert sorted(fh.keys()) == sorted(src.keys())  # noqa: SIM118 - the plain thinker's names
        assert (saved / "adapter" / "adapter_model.safetensors").is_file()
        engines.append(ray_local.remote(RolloutEngine).options(num_cpus=1).remote(
            EngineSettings(model_path=saved, max_model_len=1024, enforce_eager=True), 1))
        greedy = dataclasses.replace(sampling, temperature=0.0)
        pushed, fresh = pool.generate(records, 1, greedy), ray_local.get(engines[1].generate.remote(records, 1, greedy))
        assert [r.completions[0].token_ids for r in pushed] == [r.completions[0].token_ids for r in fresh]

        learner.train_step(batch)
        straight = dict(learner.named_weights())
    finally:
        learner.kill()
        for engine in engines:
            ray_local.kill(engine)
    resumed = LearnerGroup(s, [{"num_cpus": 1}] * 2)
    try:
        assert resumed.load_train_state(str(saved))["step"] == 2
        resumed.train_step(batch)
        again = dict(resumed.named_weights())
    finally:
        resumed.kill()
    assert again.keys() == straight.keys()
    worst = max(float((again[n] - straight[n]).abs().max()) for n in straight)
    assert worst < 1e-7, f"resumed vs straight after step 3: {worst}"
