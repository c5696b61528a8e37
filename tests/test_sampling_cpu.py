"""The sampling distribution (omni/sampling.py): one definition for vLLM and the learner.

- its log-probs against a float64 reference written from vLLM's rules, and against vLLM's own
  top-k / top-p masking function (the one its CPU sampler calls);
- the tempered part (the loss's) differentiable, with the gradient of log-softmax(z / T);
- a temperature-0 training config refused before anything starts, naming ``sampling.temperature``,
  while greedy evaluation (``eval.mode``) keeps decoding at temperature 0.

The end-to-end comparison with a real vLLM engine is in `tests/test_rollout_engine_cpu.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from omni.forward import completion_logprobs
from omni.sampling import (
    POSITIONS_PER_SORT,
    SUPPRESS_BIAS,
    SamplingDistribution,
    distribution_logprobs,
    kept_tokens,
)
from orchestrator.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parent.parent
VOCAB = 600
SUPPRESSED = (3, 77, 599)
DISTRIBUTIONS = [
    SamplingDistribution(),
    SamplingDistribution(temperature=0.7, top_k=50, suppressed=SUPPRESSED),
    SamplingDistribution(temperature=0.7, top_p=0.9, suppressed=SUPPRESSED),
    SamplingDistribution(temperature=1.3, top_k=20, top_p=0.8),
    SamplingDistribution(temperature=1.0, top_p=0.95, suppressed=SUPPRESSED),  # the config's default
    SamplingDistribution(temperature=0.5, top_k=VOCAB),  # k ≥ the vocabulary: off
]
IDS = ["plain", "T0.7-k50", "T0.7-p0.9", "T1.3-k20-p0.8", "T1-p0.95", "k=vocab"]


def reference(logits: np.ndarray, targets: np.ndarray, dist: SamplingDistribution) -> tuple[np.ndarray, np.ndarray]:
    """float64, one row at a time, straight from vLLM's rules (sampler.py, topk_topp_sampler.py):
    bias, / T, top-k by value (ties kept), top-p on the renormalised rest (ascending cumulative
    sum ≤ 1 − p masked, the largest kept), log-softmax; a masked target is scored in kept ∪ {it}.
    Returns the log-probs and whether each target was masked."""
    rows = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    out, masked = [], []
    for z, t in zip(rows, targets.reshape(-1), strict=True):
        z = z.copy()
        z[list(dist.suppressed)] += SUPPRESS_BIAS
        z = z / dist.temperature
        keep = np.ones(z.shape, dtype=bool)
        if 0 < dist.top_k < z.size:
            keep = z >= np.sort(z)[::-1][dist.top_k - 1]
        if dist.top_p < 1.0:
            kept = np.where(keep, z, -np.inf)
            p = np.exp(kept - kept.max())
            p /= p.sum()
            order = np.argsort(p, kind="stable")
            drop = np.cumsum(p[order]) <= 1 - dist.top_p
            drop[-1] = False
            keep[order[drop]] = False
        masked.append(not keep[t])
        keep[t] = True
        kept = z[keep]
        out.append(z[t] - (kept.max() + math.log(np.exp(kept - kept.max()).sum())))
    return np.array(out).reshape(targets.shape), np.array(masked).reshape(targets.shape)


def random_case(seed: int, batch: int = 3, positions: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a peaked, LLM-like shape (a few large, a long tail) and targets drawn from them,
    with some from the far tail, which every truncation here masks."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, positions, VOCAB, generator=g) * 2.5
    logits[..., :8] += 4.0
    targets = torch.multinomial(logits.reshape(-1, VOCAB).softmax(-1), 1, generator=g).view(batch, positions)
    targets[torch.isin(targets, torch.tensor(SUPPRESSED))] = 8  # an engine never samples those
    targets[0, :5] = logits[0, :5].argmin(dim=-1)  # the least likely token: outside any kept set
    assert not torch.isin(targets, torch.tensor(SUPPRESSED)).any()
    return logits, targets


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=IDS)
def test_logprobs_equal_a_float64_reference(dist: SamplingDistribution) -> None:
    logits, targets = random_case(seed=1)
    assert logits.shape[0] * logits.shape[1] > 2 * POSITIONS_PER_SORT  # several chunks of positions
    outside: list[torch.Tensor] = []
    got = distribution_logprobs(logits, targets, dist, outside=outside)
    want, masked = reference(logits.numpy(), targets.numpy(), dist)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    np.testing.assert_array_equal(outside[0].numpy(), masked)
    assert np.abs(got.numpy() - want).max() < 2e-5
    assert torch.isfinite(got).all()
    if dist.truncates(VOCAB):
        assert masked[0, :5].all(), "the far-tail targets lie outside the kept set"
        # renormalised over fewer tokens, every target is likelier than without the truncation
        tempered = distribution_logprobs(logits, targets, dist, truncated=False)
        assert (got > tempered).all() and (got - tempered).mean() > 0.01
    else:
        assert not masked.any()


@pytest.mark.parametrize("dist", DISTRIBUTIONS[1:4], ids=IDS[1:4])
def test_the_kept_set_is_what_vllm_keeps(dist: SamplingDistribution) -> None:
    """vLLM's own steps (sampler.py: float32, the logit bias, / T; its CPU sampler's
    apply_top_k_top_p, which for top-k alone goes through apply_top_k_only; log-softmax) keep the
    same tokens and give the same log-probs."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    logits, targets = random_case(seed=2)
    rows = logits.reshape(-1, VOCAB)
    z = rows.float().clone()
    z[:, list(dist.suppressed)] += SUPPRESS_BIAS  # LogitBiasLogitsProcessor.apply
    z.div_(torch.full((rows.shape[0], 1), dist.temperature))  # Sampler.apply_temperature
    k = torch.full((rows.shape[0],), dist.top_k if dist.top_k > 0 else VOCAB, dtype=torch.int32)
    p = torch.full((rows.shape[0],), dist.top_p, dtype=torch.float32)
    processed = apply_top_k_top_p_pytorch(
        z.clone(), k if dist.top_k > 0 else None, p if dist.top_p < 1 else None, allow_cpu_sync=True
    )
    keep = kept_tokens(z, dist)
    assert keep is not None
    assert torch.equal(keep, torch.isfinite(processed))
    vllm_logprobs = processed.log_softmax(dim=-1, dtype=torch.float32)
    inside = keep.gather(-1, targets.reshape(-1, 1)).squeeze(-1)
    ours = distribution_logprobs(logits, targets, dist).reshape(-1)
    theirs = vllm_logprobs.gather(-1, targets.reshape(-1, 1)).squeeze(-1)
    assert inside.sum() > 100
    assert (ours[inside] - theirs[inside]).abs().max() < 1e-5


def test_the_tempered_logprobs_carry_the_gradient_of_log_softmax() -> None:
    """The loss's view: log-softmax(z / T) over the whole vocabulary, no bias, no truncation."""
    dist = SamplingDistribution(temperature=0.7, top_k=50, suppressed=SUPPRESSED)
    logits, targets = random_case(seed=3, batch=2, positions=6)
    logits.requires_grad_(True)
    logp = distribution_logprobs(logits, targets, dist, truncated=False)
    logp.sum().backward()
    z = logits.detach().double() / dist.temperature
    want_logp = z.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    want_grad = (torch.nn.functional.one_hot(targets, VOCAB).double() - z.softmax(-1)) / dist.temperature
    assert (logp.detach().double() - want_logp).abs().max() < 1e-5
    assert (logits.grad.double() - want_grad).abs().max() < 1e-6
    # the truncated view is a comparison only: no gradient
    assert not distribution_logprobs(logits, targets, dist).requires_grad


def test_the_learner_forward_gives_both_views_in_chunks(tiny_checkpoint: Path, train_json: Path) -> None:
    """omni.forward.completion_logprobs on the tiny thinker: the tempered log-probs (returned, with
    gradient) and the sampling distribution's (through ``sampling``) equal the pure function on
    the thinker's own logits, at any chunk size, and padding never counts as outside."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from avqa import load_records
    from omni.inputs import (
        add_positions,
        collate,
        encode_prompt,
        load_processor,
        media_token_ids,
        prepare_prompt,
    )

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    processor = load_processor(tiny_checkpoint)
    tok = processor.tokenizer
    media = media_token_ids(tok)
    dist = SamplingDistribution(temperature=0.7, top_k=50, top_p=0.9, suppressed=tuple(media))
    records = load_records(train_json)[:2]
    prompts = [add_positions(model, encode_prompt(processor, prepare_prompt(r, processor))) for r in records]
    g = torch.Generator().manual_seed(5)
    allowed = torch.tensor([t for t in range(len(tok) - 40) if t not in media])
    completions = [allowed[torch.randint(len(allowed), (n,), generator=g)].tolist() for n in (9, 6)]
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    batch = collate(prompts, completions, pad_id=tok.pad_token_id, eos_ids=eos)
    mask = batch.completion_mask
    assert (mask.sum(dim=1) < batch.completion_len).any()  # one completion is padded
    with torch.no_grad():
        logits = model(**batch.inputs, use_cache=False).logits[:, -batch.completion_len - 1 : -1]
    want_sampling = distribution_logprobs(logits, batch.completion_ids, dist) * mask
    want_tempered = distribution_logprobs(logits, batch.completion_ids, dist, truncated=False) * mask
    assert (want_sampling - want_tempered).abs().max() > 0.05  # the two views differ here
    for chunk in (1, 4, 1024):
        sampling: list[torch.Tensor] = []
        outside: list[torch.Tensor] = []
        tempered = completion_logprobs(model, batch, distribution=dist, chunk=chunk, sampling=sampling, outside=outside)
        assert tempered.requires_grad and not sampling[0].requires_grad
        assert (tempered.detach() - want_tempered).abs().max() < 1e-5
        assert (sampling[0] - want_sampling).abs().max() < 1e-5
        assert not (outside[0] & (mask == 0)).any()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 0.0}, "temperature 0"),
        ({"temperature": 0.005}, "at least 0.01"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_a_distribution_that_cannot_be_sampled_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingDistribution(**fields)


@pytest.mark.parametrize("value", ["0", "0.0", "0.001"])
def test_a_training_config_at_temperature_0_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"sampling\.temperature") as caught:
        load_config(REPO / "configs" / "tiny_cpu.yaml", overrides=[f"sampling.temperature={value}"])
    assert "eval.mode: greedy" in str(caught.value)  # and where greedy decoding lives
    with pytest.raises(ConfigError, match=r"sampling\.top_k"):
        load_config(overrides=["sampling.top_k=-2"])


def test_the_config_refuses_what_the_distribution_refuses_and_loads_without_torch() -> None:
    import os
    import subprocess
    import sys

    from omni.sampling import MIN_TEMPERATURE
    from orchestrator import config

    assert config.MIN_TEMPERATURE == MIN_TEMPERATURE
    load_config(overrides=[f"sampling.temperature={MIN_TEMPERATURE}"])  # the least accepted
    code = (
        "import sys; from orchestrator.config import load_config; "
        "load_config('configs/echoink_r1_7b.yaml', overrides=['sampling.temperature=0.7']); "
        "assert 'torch' not in sys.modules, 'loading a config imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_greedy_evaluation_still_decodes_at_temperature_0() -> None:
    from orchestrator.settings import eval_settings, learner_settings, sampling_settings

    config = load_config(REPO / "configs" / "echoink_r1_7b.yaml")
    greedy = eval_settings(config).decoding()
    assert (config.eval.mode, greedy.temperature, greedy.top_k, greedy.top_p) == ("greedy", 0.0, -1, 1.0)
    # the learner's distribution is the engines' (top-k 50, top-p 0.95 in the reference preset)
    learner, rollout = learner_settings(config, 1), sampling_settings(config)
    assert (learner.temperature, learner.top_k, learner.top_p) == (rollout.temperature, rollout.top_k, rollout.top_p)
    assert rollout.distribution() == SamplingDistribution(1.0, 50, 0.95)
    with pytest.raises(ValueError, match="temperature 0"):
        greedy.distribution()  # greedy decoding has no distribution for a learner to compare with


def test_every_shipped_config_and_recipe_loads() -> None:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    recipes = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
    assert configs and recipes
    for path in configs:
        config = load_config(path)
        assert config.sampling.temperature >= 0.01, path
    for recipe in recipes:
        load_config(REPO / "configs" / "tiny_cpu.yaml", recipe=recipe)
    assert RunConfig().sampling.temperature == 1.0
