"""channel_axis: the proof behind bn_through_shape_* (where a channel axis goes through a reshape).

The soundness property is checked against numpy: whenever `regroup` claims the channel axis lands
on axis b, every element on index c of axis b carries channel c.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from bnfold.rules.channel_axis import Tracked, keeps_prefix, regroup, resolve_target

RESHAPE = helper.make_node("Reshape", ["a", "s"], ["b"], name="reshape")


@pytest.mark.parametrize(
    "target, dims, allowzero, expected",
    [
        ([0, 0, -1], (2, 5, 4, 6), 0, [2, 5, 24]),
        ([2, -1, 24], (2, 5, 4, 6), 0, [2, 5, 24]),
        ([0, 0, -1], (None, 5, 4, 6), 0, [None, 5, None]),
        ([0, 5], (0, 5), 1, [0, 5]),
        ([0, 3], (2, 3), 1, [0, 3]),
    ],
    ids=["copy_rest", "minus1_middle", "symbolic_batch", "allowzero_keeps_0", "allowzero_literal"],
)
def test_channel_axis_resolve_target_values(target, dims, allowzero, expected):
    assert resolve_target(target, dims, allowzero) == expected


@pytest.mark.parametrize(
    "out, expected_axis",
    [((2, 5, 24), 1), ((2, 5, 2, 12), 1), ((10, 24), None), ((2, 20, 6), None), ((1, 2, 5, 24), 2), ((2, 5, 24, 1), 1)],
    ids=["merge_spatial", "split_spatial", "merge_batch", "merge_rows", "leading_one", "trailing_one"],
)
def test_channel_axis_regroup_examples(out, expected_axis):
    found = regroup(RESHAPE, Tracked((2, 5, 4, 6), 1), out)
    if expected_axis is None:
        assert "mixes axis 1 (length 5)" in found
    else:
        assert found == Tracked(out, expected_axis)


def test_channel_axis_regroup_unknown_inner_kept():
    assert "is not static after axis 1" in regroup(RESHAPE, Tracked((2, 5, None), 1), (2, 5, 7))


def test_channel_axis_keeps_prefix_copies():
    assert keeps_prefix([0, 0, -1], Tracked((None, 5, None, None), 1), 0)
    assert keeps_prefix([0, 5, -1], Tracked((None, 5, None), 1), 0)
    assert not keeps_prefix([0, 0, -1], Tracked((None, 5, None), 1), 1)  # allowzero: 0 is a length
    assert not keeps_prefix([-1, 5, 7], Tracked((None, 5, None), 1), 0)


@st.composite
def regroupings(draw):
    """A static shape, an axis in it, and another shape with the same element count."""
    dims = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    axis = draw(st.integers(0, len(dims) - 1))
    factors = [p for d in dims for p in _prime_factors(d)]
    factors = draw(st.permutations(factors))
    cuts = sorted(draw(st.sets(st.integers(0, len(factors)), max_size=4)))
    bounds = [0, *cuts, len(factors)]
    out = [int(np.prod(factors[a:b], dtype=np.int64)) for a, b in zip(bounds, bounds[1:])]
    return tuple(dims), axis, tuple(out)


def _prime_factors(n):
    return {1: [], 2: [2], 3: [3], 4: [2, 2]}[n]


@settings(max_examples=300, deadline=None)
@given(regroupings())
def test_channel_axis_regroup_claims_are_numerically_true(case):
    dims, axis, out = case
    found = regroup(RESHAPE, Tracked(dims, axis), out)
    if isinstance(found, str):
        return
    channel = np.indices(dims)[axis].reshape(out)
    index_on_b = np.indices(out)[found.axis]
    assert out[found.axis] == dims[axis]
    assert np.array_equal(channel, index_on_b)
