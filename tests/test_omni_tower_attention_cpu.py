"""The towers' attention in one call per layer (omni/tower_attention.py, learner.tower_attention):
the same outputs and gradients as transformers' call per window, on the tiny thinker."""

from __future__ import annotations

import copy

import pytest
import torch

from omni.tower_attention import NAME, block_diagonal_mask, set_tower_attention, varlen_attention


@pytest.fixture(scope="module")
def thinkers(tiny_checkpoint):
    from transformers import AutoConfig
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    # the tiny vision tower's one layer attends over whole pictures: add a windowed layer before it
    config = AutoConfig.from_pretrained(str(tiny_checkpoint), local_files_only=True).thinker_config
    config.vision_config.depth = 2
    config.vision_config.fullatt_block_indexes = [1]
    torch.manual_seed(0)
    per_window = Thinker._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    varlen = set_tower_attention(copy.deepcopy(per_window), "varlen")
    return per_window, varlen


def test_the_mask_joins_positions_of_one_span_only() -> None:
    mask = block_diagonal_mask(torch.tensor([0, 2, 5, 6]), 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:2, :2] = expected[2:5, 2:5] = expected[5:, 5:] = True
    assert torch.equal(mask, expected)


def test_only_the_towers_switch(thinkers) -> None:
    per_window, varlen = thinkers
    assert varlen.visual.blocks[0].attn.config._attn_implementation == NAME
    assert varlen.audio_tower.layers[0].self_attn.config._attn_implementation == NAME
    assert varlen.model.config._attn_implementation == "sdpa"
    assert per_window.visual.config._attn_implementation == "sdpa"
    back = set_tower_attention(copy.deepcopy(varlen), "per_window")  # what bench_learner's before arm does
    assert back.visual.config._attn_implementation == back.audio_tower.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="expected varlen or per_window"):
        set_tower_attention(back, "flash")


def _grads(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None}


def test_pictures_and_video_frames_match_the_per_window_path(thinkers) -> None:
    per_window, varlen = thinkers
    vc = per_window.config.vision_config
    # a picture of 4 windows, a two-frame clip of uneven windows (a part-window at the edge)
    grid = torch.tensor([[1, 16, 16], [2, 8, 12]])
    torch.manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size**2)
    outs = []
    for model in (per_window, varlen):
        model.zero_grad(set_to_none=True)
        out = torch.cat(list(model.get_image_features(pixels, grid, return_dict=True).pooler_output))
        out.square().mean().backward()
        outs.append((out.detach(), _grads(model, "visual.")))
    (a, ga), (b, gb) = outs
    assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6, rtol=1e-3), name


def test_clips_of_uneven_length_match_the_per_window_path(thinkers) -> None:
    per_window, varlen = thinkers
    ac = per_window.config.audio_config
    torch.manual_seed(1)
    features = torch.randn(2, ac.num_mel_bins, 700)
    mask = torch.ones(2, 700, dtype=torch.long)
    mask[1, 450:] = 0  # the second clip ends mid-chunk
    outs = []
    for model in (per_window, varlen):
        model.zero_grad(set_to_none=True)
        out = model.get_audio_features(features, mask, return_dict=True).last_hidden_state
        out.square().mean().backward()
        outs.append((out.detach(), _grads(model, "audio_tower.")))
    (a, ga), (b, gb) = outs
    assert a.shape[0] > 100 and torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6, rtol=1e-3), name


def test_one_call_per_layer(thinkers) -> None:
    """The point of it: a tower layer attends once, however many windows (counted through the
    registered interface, which transformers looks up on every call)."""
    from transformers import AttentionInterface

    _, varlen = thinkers
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q"))
        return varlen_attention(*args, **kwargs)

    AttentionInterface.register(NAME, counting)
    try:
        vc = varlen.config.vision_config
        grid = torch.tensor([[1, 16, 16]])
        with torch.no_grad():
            varlen.get_image_features(torch.randn(256, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2),
                                      grid, return_dict=True)
    finally:
        AttentionInterface.register(NAME, varlen_attention)
    assert len(calls) == vc.depth
    assert all(cu is not None for cu in calls)
    assert [len(cu) - 1 for cu in calls] == [4, 1]  # the windowed layer saw all four windows at once


def test_a_call_it_cannot_serve_fails_clearly() -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="dropout"):
        varlen_attention(None, q, q, q, dropout=0.1)
    with pytest.raises(ValueError, match="both ways"):
        varlen_attention(None, q, q, q, is_causal=True)
