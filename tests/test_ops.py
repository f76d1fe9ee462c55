"""Properties of the steering math (workbench.ops), against the textbook
definition of each op (the oracles below)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench import ops

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def add_vector(hidden, vector):
    return hidden + vector


def cap_projection(hidden, direction, low, high):
    proj = ops.projection(hidden, direction)
    return hidden + (torch.clamp(proj, min=low, max=high) - proj) * direction


def scale_component(hidden, direction, scale):
    return hidden + (scale - 1.0) * ops.projection(hidden, direction) * direction


def cap_only(hidden, direction, low, high):
    return ops.apply_layer_ops(hidden, None, direction, low, high, None, 1.0)


def ablation_only(hidden, direction, scale):
    return ops.apply_layer_ops(hidden, None, None, None, None, direction, scale)


def sample(seed: int, tokens: int = 5, hidden: int = 16):
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(tokens, hidden, generator=g, dtype=torch.float64) * 10
    direction = torch.randn(hidden, generator=g, dtype=torch.float64)
    return hidden_states, direction / direction.norm(), torch.randn(hidden, generator=g, dtype=torch.float64)


@settings(max_examples=100, deadline=None)
@given(seed=seeds, low=st.floats(-20, 20), width=st.floats(0, 20))
def test_cap_keeps_projection_within_bounds_and_orthogonal_part(seed, low, width):
    hidden, direction, _ = sample(seed)
    capped = cap_only(hidden, direction, low, low + width)
    proj = ops.projection(capped, direction)
    assert (proj >= low - 1e-9).all() and (proj <= low + width + 1e-9).all()
    orthogonal = lambda h: h - ops.projection(h, direction) * direction  # noqa: E731
    assert torch.allclose(orthogonal(capped), orthogonal(hidden))


@settings(max_examples=100, deadline=None)
@given(seed=seeds)
def test_ablation_scale_one_is_identity_and_zero_removes(seed):
    hidden, direction, _ = sample(seed)
    assert torch.equal(ablation_only(hidden, direction, 1.0), hidden)
    removed = ablation_only(hidden, direction, 0.0)
    assert torch.allclose(ops.projection(removed, direction), torch.zeros(5, 1, dtype=torch.float64), atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(seed=seeds, scale=st.floats(-5, 5))
def test_ablation_scales_the_projection(seed, scale):
    hidden, direction, _ = sample(seed)
    scaled = ablation_only(hidden, direction, scale)
    assert torch.allclose(ops.projection(scaled, direction), scale * ops.projection(hidden, direction))


@settings(max_examples=100, deadline=None)
@given(seed=seeds)
def test_add_then_subtract_is_identity(seed):
    hidden, _, vector = sample(seed)
    added = ops.apply_layer_ops(hidden, vector, None, None, None, None, 1.0)
    assert torch.equal(added, add_vector(hidden, vector))
    assert torch.allclose(ops.apply_layer_ops(added, -vector, None, None, None, None, 1.0), hidden)


def test_neutral_parameters_are_exact_identities_per_token():
    """The worker's neutral table row (zero vectors, open bounds, scale 1) must
    leave a token bit-identical, mixed with steered tokens in one batch."""
    hidden = torch.randn(3, 8) * 100
    direction = torch.nn.functional.normalize(torch.randn(8), dim=0)
    zeros = torch.zeros(8)
    add = torch.stack([zeros, torch.ones(8), zeros])
    cap_dir = torch.stack([zeros, direction, zeros])
    cap_min = torch.tensor([[-torch.inf], [-1.0], [-torch.inf]])
    cap_max = torch.tensor([[torch.inf], [1.0], [torch.inf]])
    abl_dir = torch.stack([zeros, direction, zeros])
    abl_scale = torch.tensor([[1.0], [0.5], [1.0]])
    out = ops.apply_layer_ops(hidden, add, cap_dir, cap_min, cap_max, abl_dir, abl_scale)
    assert torch.equal(out[0], hidden[0]) and torch.equal(out[2], hidden[2])
    assert not torch.equal(out[1], hidden[1])


def test_ops_apply_in_order_add_cap_ablate():
    hidden = torch.tensor([[0.0, 0.0]])
    direction = torch.tensor([1.0, 0.0])
    out = ops.apply_layer_ops(hidden, torch.tensor([10.0, 1.0]), direction, None, 4.0, direction, 0.5)
    # add -> (10, 1); cap x to 4 -> (4, 1); halve x -> (2, 1)
    assert torch.equal(out, torch.tensor([[2.0, 1.0]]))


def test_position_masks_select_rows():
    generated = torch.from_numpy(ops.row_codes(np.arange(3), prompt_length=2))
    codes = ops.TARGET_CODES
    assert ops.position_mask(codes["all"], generated).squeeze(1).tolist() == [True, True, True]
    assert ops.position_mask(codes["prompt"], generated).squeeze(1).tolist() == [True, True, False]
    assert ops.position_mask(codes["generated"], generated).squeeze(1).tolist() == [False, False, True]
    assert not ops.position_mask(codes["user"], generated).any()  # no chat, no roles
    hidden = torch.zeros(3, 2)
    masks = (ops.position_mask(codes["generated"], generated), None, None)
    out = ops.apply_layer_ops(hidden, torch.ones(2), None, None, None, None, 1.0, masks=masks)
    assert out.tolist() == [[0, 0], [0, 0], [1, 1]]


def test_role_and_message_targets_select_their_rows():
    """Messages cover the prompt; generated rows are the assistant's and in no prompt message."""
    messages = [
        (0, 3, ops.TARGET_CODES["system"]),
        (3, 5, ops.TARGET_CODES["user"]),
        (5, 7, ops.TARGET_CODES["assistant"]),
        (7, 9, ops.TARGET_CODES["user"]),
    ]
    codes = torch.from_numpy(ops.row_codes(np.arange(11), prompt_length=9, messages=messages))

    def rows(positions) -> list[int]:
        return ops.position_mask(ops.target_code(positions), codes).squeeze(1).nonzero().squeeze(1).tolist()

    assert rows("user") == [3, 4, 7, 8]
    assert rows("system") == [0, 1, 2]
    assert rows("assistant") == [5, 6, 9, 10]
    assert rows(3) == [7, 8] and rows(0) == [0, 1, 2]
    assert rows("prompt") == list(range(9)) and rows("generated") == [9, 10]
    # A chunk of the prompt starting mid-message gets the same codes as the whole sequence.
    chunk = ops.row_codes(np.arange(4, 8), prompt_length=9, messages=messages)
    assert (chunk == codes[4:8].numpy()).all()


@settings(max_examples=200, deadline=None)
@given(
    seed=seeds,
    low=st.floats(-20, 20),
    width=st.floats(0, 20),
    scale=st.floats(-3, 3),
    ops_used=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    targets=st.tuples(*(st.sampled_from(sorted(ops.TARGET_CODES)) for _ in range(3))),
)
def test_one_pass_evaluation_equals_the_ops_applied_in_turn(seed, low, width, scale, ops_used, targets):
    """``apply_layer_ops`` evaluates add, cap and ablation in one pass; it must
    equal applying the three ops one after another, row masks included."""
    hidden, cap_dir, add = sample(seed)
    abl_dir = torch.nn.functional.normalize(cap_dir + torch.roll(cap_dir, 1), dim=0)  # overlaps the cap direction
    generated = torch.from_numpy(ops.row_codes(np.array([0, 1, 5, 6, 2]), prompt_length=5))
    masks = tuple(ops.position_mask(ops.TARGET_CODES[t], generated) for t in targets)
    use_add, use_cap, use_abl = ops_used
    fused = ops.apply_layer_ops(
        hidden,
        add if use_add else None,
        cap_dir if use_cap else None,
        low,
        low + width,
        abl_dir if use_abl else None,
        scale,
        masks=masks,
    )
    expected = hidden
    if use_add:
        expected = torch.where(masks[0], add_vector(expected, add), expected)
    if use_cap:
        expected = torch.where(masks[1], cap_projection(expected, cap_dir, low, low + width), expected)
    if use_abl:
        expected = torch.where(masks[2], scale_component(expected, abl_dir, scale), expected)
    assert torch.allclose(fused, expected, atol=1e-9, rtol=1e-9)
