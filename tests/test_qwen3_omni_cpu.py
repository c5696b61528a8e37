"""The second model family: a tiny random Qwen3-Omni thinker (a mixture of experts with deepstack
vision) through what Qwen2.5-Omni goes through — the family read from the folder, vLLM (CPU) and
the learner's transformers thinker on every input type (the same prompt tokens, the same
log-probs, one copy each and shared prompts), the weight push with its experts, the checkpoint,
the towers' one-call attention, LoRA's targets, the released checkpoint's per-expert tensors, and
the released 30B-A3B layout's shape. The recipe learning on it: tests/test_demo_qwen3_learns_cpu.py.

One engine serves the module (its start is most of the cost).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_learner_group_cpu import settings

from avqa import DATA_TYPES, load_records
from learner.group import LearnerGroup
from learner.types import Experience
from omni.family import QWEN2_5_OMNI, QWEN3_OMNI, family_of
from omni.forward import completion_logprobs, unused_tower_term
from omni.inputs import (
    add_positions,
    collate,
    collate_shared,
    encode_prompt,
    load_processor,
    media_token_ids,
    prepare_prompt,
)
from orchestrator.weight_sync import WeightSync
from rollout.engine import RolloutEngine
from rollout.pool import EnginePool
from rollout.types import EngineSettings, SamplingSettings

SAMPLING = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=10, seed=3)
GREEDY = SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=10, seed=0, ignore_eos=True)
ROUNDING = 1e-4  # float32 on both sides: what is left is summation order
PLACEHOLDERS = {"image": "<|image_pad|>", "audio": "<|audio_pad|>", "video": "<|video_pad|>"}


def start_engine(ray, model: Path, index: int):
    settings = EngineSettings(model_path=model, max_model_len=1024, enforce_eager=True)
    return ray.remote(RolloutEngine).options(num_cpus=1).remote(settings, index)


@pytest.fixture(scope="module")
def engine(ray_local, qwen3_checkpoint: Path):
    actor = start_engine(ray_local, qwen3_checkpoint, 0)
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def thinker(qwen3_checkpoint: Path):
    model = QWEN3_OMNI.thinker_type().from_pretrained(str(qwen3_checkpoint), dtype=torch.float32)
    return model.eval(), load_processor(qwen3_checkpoint)


def test_the_family_is_read_from_the_checkpoint(qwen3_checkpoint, tiny_checkpoint, tmp_path) -> None:
    assert family_of(qwen3_checkpoint) is QWEN3_OMNI and family_of(tiny_checkpoint) is QWEN2_5_OMNI
    config = json.loads((qwen3_checkpoint / "config.json").read_text())
    assert family_of(config["thinker_config"]) is QWEN3_OMNI  # a thinker's own config too
    assert QWEN3_OMNI.vllm_architecture in config["architectures"]
    text = config["thinker_config"]["text_config"]
    assert text["rope_parameters"]["mrope_interleaved"] is True and text["num_experts"] == 4
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is no model family .*qwen3_omni_moe"):
        family_of(tmp_path / "config.json")


def test_the_30b_layout_is_the_released_thinker(tmp_path) -> None:
    from omni.fixtures.tiny_qwen3 import QWEN3_LAYOUTS, build_tiny_qwen3_checkpoint
    from omni.sizes import model_shape

    folder = build_tiny_qwen3_checkpoint(tmp_path / "30b", sizes=QWEN3_LAYOUTS["30b-a3b"], weights=False)
    assert not list(folder.glob("*.safetensors"))
    shape = model_shape(folder)
    # Qwen3OmniMoeThinkerForConditionalGeneration on the meta device: 31.7 B, 30.2 B of them the
    # language model (48 layers of 128 experts of 768, 8 a token), towers 1.19 B
    assert shape.parameters == 31_719_205_488 and shape.towers == 1_186_558_576
    assert shape.shapes["model.layers.0.mlp.experts.gate_up_proj"] == (128, 1536, 2048)
    assert shape.shapes["model.layers.0.self_attn.q_proj.weight"] == (4096, 2048)  # head 128 × 32, not 2048 / 32
    assert len([n for n in shape.shapes if n.startswith("visual.merger_list.") and n.endswith("mlp.0.weight")]) == 3
    tok = load_processor(folder).tokenizer
    assert len(tok) == 152064 and tok.convert_tokens_to_ids("<|audio_pad|>") != tok.unk_token_id
    # a LoRA count is of linear layers only: the routers (mlp.gate, a bare [128, 2048] matrix) are not one
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert shape.lora_parameters(64, attention, towers=False) == 48 * 64 * (2048 + 4096 + 2 * (2048 + 512) + 4096 + 2048)
    assert shape.lora_parameters(64, (*attention, "gate"), towers=False) == shape.lora_parameters(64, attention, towers=False)


def test_every_type_gives_vllm_and_the_learner_the_same_tokens_and_log_probs(ray_local, engine, thinker, mixed) -> None:
    model, processor = thinker
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    results = ray_local.get(engine.generate.remote(mixed, 2, SAMPLING))
    prompts, keys, completions, sampler, types = [], [], [], [], []
    for record, result in zip(mixed, results, strict=True):
        assert result.ok, f"{record.data_type}: {result.error}"
        features = encode_prompt(processor, prepare_prompt(record, processor))
        assert result.prompt_token_ids == features.input_ids.tolist(), record.data_type
        holds = {m: vocab[t] in result.prompt_token_ids for m, t in PLACEHOLDERS.items()}
        assert holds == {m: m in record.modalities for m in holds}, (record.data_type, holds)
        add_positions(model, features)
        for completion in result.completions:
            prompts.append(features)
            keys.append(record.id)
            completions.append(completion.token_ids)
            sampler.append(completion.logprobs)
            types.append(record.data_type)
    common = dict(pad_id=tok.pad_token_id, eos_ids=[tok.convert_tokens_to_ids("<|im_end|>")], forbidden_ids=media_token_ids(tok))
    assert set(media_token_ids(tok)) >= {vocab[t] for t in PLACEHOLDERS.values()}
    distribution = SAMPLING.distribution(media_token_ids(tok))
    for batch in (collate(prompts, completions, **common), collate_shared(prompts, keys, completions, **common)):
        sampling: list[torch.Tensor] = []
        with torch.no_grad():
            completion_logprobs(model, batch, distribution=distribution, sampling=sampling)
        worst: dict[str, float] = {}
        for row, ref in enumerate(sampler):
            n = int(batch.completion_mask[row].sum())
            gap = float((sampling[0][row, :n] - torch.tensor(ref[:n])).abs().max())
            worst[types[row]] = max(worst.get(types[row], 0.0), gap)
        assert max(worst.values()) < ROUNDING, worst  # video with its sound too: both sides agree on its positions


def test_the_towers_one_call_attention_and_idle_towers_on_the_mixture(qwen3_checkpoint, thinker, mixed) -> None:
    """Qwen3-Omni's towers take the same one-call attention (a video's frames are separate spans of
    the vision tower): the same loss and tower gradients as span by span, one call a layer."""
    from transformers import AttentionInterface

    from learner.model import build_thinker
    from learner.types import LearnerSettings
    from omni.tower_attention import NAME, varlen_attention

    _, processor = thinker
    record = mixed[list(DATA_TYPES).index("video_audio")]
    features = add_positions(thinker[0], encode_prompt(processor, prepare_prompt(record, processor)))
    tok = processor.tokenizer
    batch = collate([features], [tok.encode("<answer>A</answer>")], pad_id=tok.pad_token_id, eos_ids=[])
    grads, losses, calls = {}, {}, []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q"))
        return varlen_attention(*args, **kwargs)

    for mode in ("varlen", "per_window"):
        model = build_thinker(LearnerSettings(model_path=qwen3_checkpoint, tower_attention=mode), torch.device("cpu"), torch.float32)
        AttentionInterface.register(NAME, counting)
        try:
            loss = completion_logprobs(model, batch).sum()
        finally:
            AttentionInterface.register(NAME, varlen_attention)
        loss.backward()
        losses[mode] = loss.item()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and n.startswith(("visual.", "audio_tower."))}
    config = model.config
    assert len(calls) == config.vision_config.depth + config.audio_config.encoder_layers  # varlen only, one a layer
    frames = int(features.video_grid_thw[0, 0])
    spans = [len(cu) - 1 for cu in calls]  # the audio tower's layer first, then the vision blocks'
    assert frames > 1 and spans[-config.vision_config.depth :] == [frames] * config.vision_config.depth, spans
    assert losses["varlen"] == pytest.approx(losses["per_window"], abs=1e-5)
    assert grads["varlen"].keys() == grads["per_window"].keys() and any(n.startswith("visual.merger_list.") for n in grads["varlen"])
    for name, grad in grads["varlen"].items():
        torch.testing.assert_close(grad, grads["per_window"][name], atol=1e-5, rtol=1e-4, msg=name)
    # a rank whose batch holds no picture still gives every vision parameter a gradient, the
    # deepstack mergers included: exactly zero
    model.zero_grad()
    term = unused_tower_term(model, {"input_ids": batch.inputs["input_ids"], "input_features": batch.inputs["input_features"]})
    term.backward()
    vision = {n: p.grad for n, p in model.named_parameters() if n.startswith("visual.")}
    assert all(g is not None and not g.any() for g in vision.values()), [n for n, g in vision.items() if g is None]
    assert term.item() == 0.0


def test_lora_names_the_experts_when_its_targets_miss(qwen3_checkpoint) -> None:
    from learner.lora import target_modules
    from learner.types import LoraSettings

    model = QWEN3_OMNI.thinker_type().from_pretrained(str(qwen3_checkpoint))
    chosen = target_modules(model, LoraSettings(rank=4, targets=("q_proj", "o_proj")))
    assert chosen == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    with pytest.raises(ValueError, match=r"\['down_proj', 'gate_proj', 'up_proj'\] name no linear layer.*mixtures of experts"):
        target_modules(model, LoraSettings(rank=4))  # the default targets: attention and MLP projections


def test_the_released_per_expert_tensors_load_as_transformers_fuses_them(qwen3_checkpoint, tmp_path) -> None:
    """The released checkpoint stores each expert's projections apart; transformers fuses them at
    load, and the learner's ZeRO-3 load (learner.model.checkpoint_tensor) must give the same."""
    import shutil

    from safetensors.torch import load_file, save_file

    from learner.model import checkpoint_tensor

    fused = load_file(str(qwen3_checkpoint / "model.safetensors"))
    released: dict[str, torch.Tensor] = {}
    for name, tensor in fused.items():
        stem, _, kind = name.rpartition(".experts.")
        if kind == "gate_up_proj":
            for e, rows in enumerate(tensor):
                gate, up = rows.chunk(2, dim=0)
                released[f"{stem}.experts.{e}.gate_proj.weight"] = gate.clone()
                released[f"{stem}.experts.{e}.up_proj.weight"] = up.clone()
        elif kind == "down_proj":
            for e, matrix in enumerate(tensor):
                released[f"{stem}.experts.{e}.down_proj.weight"] = matrix.clone()
        else:
            released[name] = tensor
    folder = tmp_path / "released"
    shutil.copytree(qwen3_checkpoint, folder)
    save_file(released, str(folder / "model.safetensors"))
    loaded = QWEN3_OMNI.thinker_type().from_pretrained(str(folder), dtype=torch.float32)
    present = {n.removeprefix("thinker."): n for n in released}
    for name, param in loaded.named_parameters():
        ours = checkpoint_tensor(name, present, lambda n: released["thinker." + n], folder)
        assert torch.equal(ours, param.detach()), name
    with pytest.raises(KeyError, match="no weight for parameter model.layers.0.mlp.experts.nothing"):
        checkpoint_tensor("model.layers.0.mlp.experts.nothing", present, lambda n: released[n], folder)


def test_pushed_weights_experts_included_equal_the_saved_checkpoint(ray_local, engine, qwen3_checkpoint, train_json, tmp_path) -> None:
    """Two ZeRO-3 ranks (the checkpoint read name for name into partitions; the routers' balance loss
    on) train, push over gloo in
    small buckets (a layer's fused expert tensors in different ones: the engine loads them all in one
    reload), save; a fresh engine on the saved folder samples what the pushed engine samples."""
    records = load_records(train_json)[:3]
    tokenizer = load_processor(qwen3_checkpoint).tokenizer
    good = tokenizer.encode("<think>x</think><answer>A</answer><|im_end|>", add_special_tokens=False)
    bad = tokenizer.encode("<answer>B</answer><|im_end|>", add_special_tokens=False)
    # with the experts' balance loss on (learner.router_aux_loss_coef): it rides on the same step
    learner = LearnerGroup(settings(qwen3_checkpoint, num_ranks=2, zero_stage=3, lr=0.05, router_aux_loss_coef=0.5),
                           [{"num_cpus": 1}] * 2)
    fresh = None
    try:
        pool = EnginePool([engine])
        sync = WeightSync(learner, pool, backend="gloo", bucket_bytes=256 << 10, timeout_s=120)
        assert any(".mlp.experts.gate_up_proj" in t.name for s in sync.specs for t in s.tensors)
        before = pool.generate(records, 1, GREEDY)
        batch = [Experience(r, ids, advantage=a) for r in records for ids, a in ((good, 1.0), (bad, -1.0))]
        for _ in range(3):
            metrics = learner.train_step(batch)
        assert metrics["grad_norm"] > 0 and math.isfinite(metrics["loss"])
        assert 2 <= metrics["learner/router_balance_loss"] <= 4  # the tiny layout: 2 of 4 experts a token
        report = sync.push()
        assert report.tensors == sum(len(s.tensors) for s in sync.specs) and len(sync.specs) > 1
        after = pool.generate(records, 1, GREEDY)
        learner.save(str(tmp_path / "saved"))
        assert family_of(tmp_path / "saved") is QWEN3_OMNI
        fresh = start_engine(ray_local, tmp_path / "saved", 1)
        expected = ray_local.get(fresh.generate.remote(records, 1, GREEDY))
        tokens = lambda results: [r.completions[0].token_ids for r in results]  # noqa: E731
        assert tokens(after) != tokens(before)
        assert tokens(after) == tokens(expected)
        for got, want in zip(after, expected, strict=True):
            assert max(abs(a - b) for a, b in zip(got.completions[0].logprobs, want.completions[0].logprobs, strict=True)) < 1e-5
    finally:
        learner.kill()
        if fresh is not None:
            ray_local.kill(fresh)


def test_the_balance_loss_is_transformers_own_and_reaches_the_routers(qwen3_checkpoint, tiny_checkpoint, thinker, mixed) -> None:
    """learner.router_aux_loss_coef's term: the routers' logits captured from the forward give
    transformers' own aux_loss of the same forward, and its gradient reaches every router."""
    from omni.router import RouterCapture, routers

    model, processor = thinker
    record = mixed[list(DATA_TYPES).index("image_audio")]
    features = add_positions(model, encode_prompt(processor, prepare_prompt(record, processor)))
    inputs = collate([features], [processor.tokenizer.encode("<answer>A</answer>")], pad_id=0, eos_ids=[]).inputs
    with RouterCapture(model) as capture:
        out = model(**inputs, output_router_logits=True)
    ours = capture.balance_loss()
    assert ours.item() == pytest.approx(out.aux_loss.item(), rel=1e-6)
    top_k, experts = model.config.text_config.num_experts_per_tok, model.config.text_config.num_experts
    assert top_k <= ours.item() <= experts  # top-k when balanced, the experts' count when one takes all
    ours.backward()
    gates = routers(model)
    assert len(gates) == model.config.text_config.num_hidden_layers
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in gates)
    model.zero_grad()
    dense = QWEN2_5_OMNI.thinker_type().from_pretrained(str(tiny_checkpoint))
    assert routers(dense) == []
    with pytest.raises(ValueError, match="no mixture-of-experts routers"):
        RouterCapture(dense)


def test_a_dense_thinker_refuses_the_balance_loss_before_any_actor_starts(tiny_checkpoint, qwen3_checkpoint) -> None:
    from orchestrator.config import load_config
    from orchestrator.plan import check_family

    with pytest.raises(ValueError, match=r"router_aux_loss_coef is 0.1, but .* is a Qwen2.5-Omni thinker"):
        check_family(load_config(None, [f"model_path={tiny_checkpoint}", "learner.router_aux_loss_coef=0.1"]))
    check_family(load_config(None, [f"model_path={qwen3_checkpoint}", "learner.router_aux_loss_coef=0.1"]))
    check_family(load_config(None, [f"model_path={tiny_checkpoint}"]))  # off: nothing to refuse


def test_the_receiver_repacks_whole_expert_layers_only() -> None:
    """Which layers a CPU reload rewrote, from the pushed names (rollout/receive.py): fused or per
    expert; a push with half of a layer's experts is refused rather than repacked twice later."""
    from rollout.receive import repack_reloaded_experts

    nothing = torch.nn.Module()  # no experts kernel to call: what counts is the names' reading
    fused = [f"thinker.model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    per_expert = [f"thinker.model.layers.2.mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")]
    assert repack_reloaded_experts(nothing, [*fused, *per_expert, "thinker.audio_tower.layers.0.fc1.weight"]) == 0
    with pytest.raises(RuntimeError, match=r"only part of the experts of language-model layer\(s\) \[1\]"):
        repack_reloaded_experts(nothing, [*fused[:2], fused[2]])
