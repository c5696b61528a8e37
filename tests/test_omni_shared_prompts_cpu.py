"""Shared prompts: each distinct prompt runs once and its completions continue from its cache.

The shared path must give the same log-probs and the same gradients as running every
prompt + completion as its own sequence; it is only a cheaper way to compute them.
"""

from __future__ import annotations

import random

import pytest
import torch

from avqa import load_records
from omni.forward import completion_logprobs
from omni.inputs import (
    add_positions,
    collate,
    collate_shared,
    encode_prompt,
    load_processor,
    prepare_prompt,
)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, train_json):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    processor = load_processor(tiny_checkpoint)
    records = load_records(train_json)[:3]
    # prompts of different lengths, so the batch is padded and attention needs its mask
    systems = [None, "You are a careful listener and a careful observer.", "Answer briefly."]
    features = {
        r.id: add_positions(model, encode_prompt(processor, prepare_prompt(r, processor, system_prompt=system)))
        for r, system in zip(records, systems, strict=True)
    }
    assert len({f.input_ids.numel() for f in features.values()}) == 3
    return model, processor, records, features


def batch_rows(processor, records, features, seed: int = 0):
    """Three questions with 1, 3 and 2 completions of different lengths, one ending early on <|im_end|>."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    words = [i for i in tok.encode("<think>hmm the tone is low and the shape is red</think><answer>B</answer>")]
    rng = random.Random(seed)
    keys, prompts, completions = [], [], []
    for record, count in zip(records, (1, 3, 2), strict=True):
        for k in range(count):
            ids = [rng.choice(words) for _ in range(rng.randint(3, 12))]
            if k == 1:
                ids = ids[:2] + [end] + ids[2:]  # tokens after the end of the turn are masked out
            keys.append(record.id)
            prompts.append(features[record.id])
            completions.append(ids)
    pad, eos = tok.pad_token_id, [end]
    media = [tok.convert_tokens_to_ids(t) for t in ("<|IMAGE|>", "<|AUDIO|>")]
    full = collate(prompts, completions, pad_id=pad, eos_ids=eos, forbidden_ids=media)
    shared = collate_shared(prompts, keys, completions, pad_id=pad, eos_ids=eos, forbidden_ids=media)
    return full, shared


def test_shared_batch_holds_each_prompt_once(setup) -> None:
    model, processor, records, features = setup
    full, shared = batch_rows(processor, records, features)
    assert shared.inputs["input_ids"].shape[0] == 3 and full.inputs["input_ids"].shape[0] == 6
    assert shared.prompt_rows.tolist() == [0, 1, 1, 1, 2, 2]
    assert torch.equal(shared.completion_ids, full.completion_ids)
    assert torch.equal(shared.completion_mask, full.completion_mask)
    # the image and audio encoders see three prompts, not six
    assert shared.inputs["input_features"].shape[0] == 3
    # work through the model: each distinct prompt once plus every completion's own tokens
    prompts = sum(f.input_ids.numel() for f in features.values())
    completions = float(full.completion_mask.sum())
    assert float(shared.input_tokens.sum()) == pytest.approx(prompts + completions)
    assert float(full.input_tokens.sum()) == pytest.approx(
        sum(features[r.id].input_ids.numel() * n for r, n in zip(records, (1, 3, 2), strict=True)) + completions
    )


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_shared_prompts_give_the_same_logprobs_and_gradients(setup, checkpointing: bool) -> None:
    """Under gradient checkpointing every layer's forward runs again in the backward pass: the
    shared path's caches must give that recompute the same keys (else the gradients differ or
    torch refuses the recompute)."""
    model, processor, records, features = setup
    full, shared = batch_rows(processor, records, features, seed=1)
    model.train()
    results = []
    for batch, checkpoint in ((full, False), (shared, checkpointing)):
        if checkpoint:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            model.zero_grad()
            logp = completion_logprobs(model, batch)
            # an advantage-weighted sum, like the policy loss: every row and token counts differently
            weights = torch.linspace(-1.0, 1.0, logp.shape[0])[:, None]
            (logp * weights).sum().backward()
        finally:
            model.gradient_checkpointing_disable()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), grads))
    (logp_full, grads_full), (logp_shared, grads_shared) = results
    assert logp_full.abs().sum() > 0
    torch.testing.assert_close(logp_shared, logp_full, atol=2e-5, rtol=1e-4)
    assert grads_full.keys() == grads_shared.keys()
    # the audio and vision towers get their gradient through the shared prompt pass too
    assert any(n.startswith("audio_tower.") for n in grads_shared)
    assert any(n.startswith("visual.") for n in grads_shared)
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_shared[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_collate_shared_refuses_mismatched_lengths(setup) -> None:
    _, processor, records, features = setup
    prompt = features[records[0].id]
    with pytest.raises(ValueError, match="2 prompts, 1 keys, 2 completions"):
        collate_shared([prompt, prompt], ["a"], [[1], [2]], pad_id=0, eos_ids=[1])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_the_chunked_head_gives_the_same_logprobs_views_and_gradients(setup, checkpointing: bool) -> None:
    """learner.fused_head: the completions go through the head in chunks and their logits are not
    kept for the backward (omni/head.py). The loss's log-probs, the entropy, the sampling
    distribution's log-probs and its masked targets, and every gradient equal the plain path's;
    chunks smaller than a completion exercise the chunk seams."""
    from omni.sampling import SamplingDistribution

    model, processor, records, features = setup
    _, shared = batch_rows(processor, records, features, seed=2)
    dist = SamplingDistribution(temperature=0.7, top_k=50, top_p=0.9)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    results = []
    try:
        for fused in (False, True):
            model.zero_grad()
            entropy, sampling, outside = [], [], []
            logp = completion_logprobs(model, shared, distribution=dist, chunk=4, entropy=entropy,
                                       sampling=sampling, outside=outside, fused=fused)
            weights = torch.linspace(-1.0, 1.0, logp.shape[0])[:, None]
            (logp * weights).sum().backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((logp.detach(), entropy[0], sampling[0], outside[0], grads))
    finally:
        model.gradient_checkpointing_disable()
    (lp, ent, samp, out, grads), (lp_f, ent_f, samp_f, out_f, grads_f) = results
    assert lp.abs().sum() > 0 and ent.abs().sum() > 0
    torch.testing.assert_close(lp_f, lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent_f, ent, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(samp_f, samp, atol=2e-5, rtol=1e-5)
    assert torch.equal(out_f, out)
    assert grads.keys() == grads_f.keys() and "lm_head.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_f[name], grad, atol=1e-6, rtol=1e-4, msg=name)
