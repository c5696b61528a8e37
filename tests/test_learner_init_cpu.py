"""The learner's random initialisation (``learner.random_init``, benchmarks on config-only folders):
ZeRO-3 draws the very weights ZeRO-2 draws for the same seed — transformers' own initialisation,
not whatever memory ``deepspeed.zero.Init`` left in the partitions — on real DeepSpeed (gloo) ranks
in Ray actors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from avqa import load_records
from learner.group import LearnerGroup
from learner.types import Experience, LearnerSettings
from omni.inputs import load_processor
from omni.names import to_learner_name

SEED = 3  # not the default 0: the seed must reach the ZeRO-3 path too


@pytest.fixture(scope="module")
def config_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-Omni folder without weights: the learner has nothing to read, it must initialise."""
    from omni.fixtures.tiny import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-config-only"), weights=False)
    assert not list(folder.glob("*.safetensors"))
    return folder


@pytest.fixture(scope="module")
def experiences(config_only: Path, train_json: Path) -> list[Experience]:
    tokenizer = load_processor(config_only).tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    records = load_records(train_json)
    texts = ["<think>red and low</think><answer>A</answer>", "<answer>B</answer>"]
    return [
        Experience(records[i // 2], tokenizer.encode(texts[i % 2], add_special_tokens=False) + [end], advantage=(-1.0) ** i)
        for i in range(4)
    ]


def run(s: LearnerSettings, experiences: list[Experience]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The group's weights as initialised, then the metrics of one step on ``experiences``."""
    group = LearnerGroup(s, [{"num_cpus": 1}] * s.num_ranks)
    try:
        weights = dict(group.named_weights())
        return weights, group.train_step(experiences)
    finally:
        group.kill()


def test_zero3_random_init_draws_the_zero2_weights(ray_local, config_only, experiences) -> None:
    zero2 = LearnerSettings(
        model_path=config_only, num_ranks=1, zero_stage=2, random_init=True, seed=SEED, micro_batch_size=4,
        lr=1e-3, lr_schedule="constant", total_steps=2, beta=0.01, max_new_tokens=32, gradient_checkpointing=True,
    )
    # two ranks: each holds half of every partitioned parameter, so the values must reach rank 1's
    # shards too (one rank would partition nothing)
    zero3 = dataclasses.replace(zero2, zero_stage=3, num_ranks=2)
    w2, m2 = run(zero2, experiences)
    w3, m3 = run(zero3, experiences)

    # what transformers draws for this seed on this device (the CPU): the ZeRO-2 path's build
    from transformers import AutoConfig
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    torch.manual_seed(SEED)
    thinker = Thinker._from_config(AutoConfig.from_pretrained(str(config_only)).thinker_config, dtype=torch.float32)
    drawn = {name: p.detach() for name, p in thinker.named_parameters()}

    assert set(w2) == set(w3) and {to_learner_name(n) for n in w3} == set(drawn)
    unequal = [n for n in w3 if not torch.equal(w3[n], w2[n])]
    assert not unequal, f"ZeRO-3 random init differs from ZeRO-2's in {len(unequal)} of {len(w3)} tensors: {unequal[:5]}"
    assert all(torch.equal(w2[n], drawn[to_learner_name(n)]) for n in w2)
    # and that is transformers' initialisation, not zeros or leftovers: N(0, 0.02) matrices, unit norms
    std = float(thinker.config.get_text_config().initializer_range)
    up = w3["thinker.model.layers.0.mlp.up_proj.weight"]
    assert abs(float(up.std()) - std) < 0.1 * std and abs(float(up.mean())) < 0.1 * std
    assert torch.equal(w3["thinker.model.norm.weight"], torch.ones_like(w3["thinker.model.norm.weight"]))

    for m in (m2, m3):
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
        assert m["learner/step_skipped"] == 0 and m["learner/nonfinite_loss"] == 0
        assert m["kl"] == pytest.approx(0.0, abs=1e-9)  # the reference drew the policy's weights too
    # the same batch on the same weights: the same loss and gradient (two ranks sum their shares)
    assert m3["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
    assert m3["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)


def test_zero3_on_one_rank_is_warned_about_naming_the_keys() -> None:
    from orchestrator.config import load_config
    from orchestrator.plan import config_warnings

    warned = config_warnings(load_config(None, ["learner.zero_stage=3", "learner.num_ranks=1"]))
    assert len(warned) == 1
    assert "learner.zero_stage" in warned[0] and "learner.num_ranks" in warned[0]
    assert config_warnings(load_config(None, ["learner.zero_stage=3", "learner.num_ranks=2"])) == []
    assert config_warnings(load_config(None, ["learner.zero_stage=2", "learner.num_ranks=1"])) == []
    # the shipped configs choose their stage on purpose: none of them trips it. One carries a warning
    # on purpose, and only that one: the 7B full fine-tune fits one H200 only with bf16 optimizer
    # states, which lose most updates at its lr (its header and RESULTS.md section 10 say so)
    for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")):
        warned = config_warnings(load_config(path))
        if path.name == "omni7b_full_1gpu.yaml":
            assert len(warned) == 1 and warned[0].startswith("learner.optimizer_dtype is bfloat16"), warned
        else:
            assert warned == [], path.name
    lean = ["learner.dtype=bfloat16", "learner.optimizer_dtype=bfloat16", "learner.zero_stage=2"]
    assert config_warnings(load_config(None, [*lean, "learner.lr=1e-3"])) == []  # updates above bf16's step


@pytest.mark.parametrize("kind", ["foreach", "single-tensor"])
def test_adam_states_made_early_leave_the_updates_as_lazy_ones(kind: str) -> None:
    """learner.model.initialize_adam_states (moments allocated before the first step's activations)
    starts from exactly the state torch's lazy initialisation would: the same weights after three
    real updates, the same step counts and moments."""
    from learner.model import initialize_adam_states

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]
    models = []
    for early in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                                lr=1e-2, foreach=kind == "foreach")
        if early:
            assert initialize_adam_states(opt)
            assert all(float(opt.state[p]["step"]) == 0 and not opt.state[p]["exp_avg"].any() for p in params)
            assert all(torch.equal(p, w) for p, w in zip(params, start, strict=True))  # no weight moved
            assert not initialize_adam_states(opt)  # once only
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        models.append((params, opt))
    (lazy, lazy_opt), (early, early_opt) = models
    for a, b in zip(lazy, early, strict=True):
        assert not torch.equal(a, start[0] if a.ndim == 2 else start[1])  # the updates did move them
        assert torch.equal(a, b)
        assert float(lazy_opt.state[a]["step"]) == float(early_opt.state[b]["step"]) == 3
        assert torch.equal(lazy_opt.state[a]["exp_avg_sq"], early_opt.state[b]["exp_avg_sq"])
