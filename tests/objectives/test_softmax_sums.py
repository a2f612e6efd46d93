"""softmax_sums: values against plain sums of the softmax, and its hand-written backward against
finite differences (float64, small sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctopd.objectives.softmax_sums import TokenGroups, softmax_sums, sorted_ranges

ROWS, VOCAB = 5, 11


def problem(seed: int, *, subsets: bool):
    """Random queries over two orders (a strict subset of the ids each), token groups, ids."""
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(VOCAB)[: VOCAB - 2], rng.permutation(VOCAB)[: VOCAB - 1]]
    if subsets:
        row_sets = [np.array([0, 2, 3]), np.array([1, 4])]
    else:
        row_sets = [None]
        orders = orders[:1]
    ranges, reference, query = [], [], 0
    for rows, order in zip(row_sets, orders):
        count = ROWS if rows is None else rows.size
        row = np.repeat(np.arange(count), 3)
        lo = rng.integers(0, order.size + 1, row.size)
        hi = np.minimum(lo + rng.integers(0, 6, row.size), order.size)
        lo[0], hi[0] = 0, order.size  # a whole order
        lo[1] = hi[1]  # an empty range
        positions = np.arange(query, query + row.size)
        query += row.size
        ranges.append(sorted_ranges(rows, order, VOCAB, positions, row, lo, hi, "cpu"))
        for q, r, a, b in zip(positions, row, lo, hi):
            slice_row = r if rows is None else rows[r]
            reference.append((q, int(slice_row), order[a:b]))
    groups = [
        TokenGroups(
            target=torch.tensor([0, 2]),
            rows=torch.tensor([0, 3]),
            tokens=torch.tensor([1, 4, 5, 9]),
            columns=torch.tensor([0, 2, 0, 1]),
        ),
        TokenGroups(
            target=torch.tensor([1]),
            rows=torch.tensor([4]),
            tokens=torch.tensor([7]),
            columns=torch.tensor([2]),
        ),
    ]
    ids = torch.as_tensor(rng.integers(0, VOCAB, ROWS))
    return ranges, query, reference, groups, ids


@pytest.mark.parametrize("subsets", [False, True])
def test_values_match_plain_softmax_sums(subsets):
    ranges, count, reference, groups, ids = problem(0, subsets=subsets)
    logits = (
        torch.randn(ROWS, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        * 4
    )
    tokens, masses, cells = softmax_sums(logits, ids, ranges, count, groups, (3, 3))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(tokens, torch.log_softmax(logits, -1)[torch.arange(ROWS), ids])
    expected = torch.zeros(count, dtype=torch.float64)
    for q, row, tokens_in in reference:
        expected[q] = p[row, torch.as_tensor(tokens_in, dtype=torch.long)].sum()
    torch.testing.assert_close(masses, expected, rtol=1e-12, atol=1e-15)
    assert masses[1] == 0  # the empty range reads 0
    want = torch.zeros(3, 3, dtype=torch.float64)
    for group in groups:
        for target, row in zip(group.target.tolist(), group.rows.tolist()):
            for token, column in zip(group.tokens.tolist(), group.columns.tolist()):
                want[target, column] += p[row, token]
    torch.testing.assert_close(cells, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("subsets", [False, True])
def test_gradcheck(subsets):
    ranges, count, _, groups, ids = problem(2, subsets=subsets)
    logits = torch.randn(
        ROWS, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    ).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: softmax_sums(z, ids, ranges, count, groups, (3, 3)),
        (logits,),
        eps=1e-6,
        atol=1e-8,
    )


@pytest.mark.parametrize("used", ["tokens", "masses", "cells"])
def test_gradcheck_one_output(used):
    """Outputs the loss does not read get no gradient (``None``) in backward."""
    ranges, count, _, groups, ids = problem(4, subsets=True)
    logits = torch.randn(
        ROWS, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    ).requires_grad_()
    index = ["tokens", "masses", "cells"].index(used)
    assert torch.autograd.gradcheck(
        lambda z: softmax_sums(z, ids, ranges, count, groups, (3, 3))[index],
        (logits,),
        eps=1e-6,
        atol=1e-8,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_range_masses_across_blocks_match_plain_sums(dtype):
    """Ranges inside one block, across two, across many, empty and whole, at a vocabulary that
    is not a multiple of the block."""
    from ctopd.objectives.softmax_sums import BLOCK, range_masses

    rng = np.random.default_rng(7)
    size = 5 * BLOCK + 37
    probs = torch.softmax(
        torch.randn(4, size, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 3,
        -1,
    )
    lo = rng.integers(0, size + 1, 200)
    hi = np.minimum(lo + rng.integers(0, 3 * BLOCK, 200), size)
    lo[:3], hi[:3] = [0, size, BLOCK - 1], [size, size, BLOCK + 1]
    row = rng.integers(0, 4, 200)
    got = range_masses(
        probs.to(dtype), torch.as_tensor(row), torch.as_tensor(lo), torch.as_tensor(hi)
    )
    want = torch.tensor(
        [float(probs[r, a:b].sum()) for r, a, b in zip(row, lo, hi)], dtype=torch.float64
    )
    tolerance = (
        dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-9)
    )
    torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("extra", [0, 3])
def test_logits_already_in_sorted_order_match_a_gather(extra):
    """Logits whose columns were put in an order beforehand (a student head's rows permuted
    once): ranges over ``0..N-1`` read in place (``in_order``) give the masses, token log-probs,
    cells and gradient that the same queries give over the unpermuted logits through a gather,
    with the order covering all columns (``extra=0``: a range may end at ``V``) or not."""
    rng = np.random.default_rng(11)
    vocab = 600 + extra  # > 2 blocks
    order = rng.permutation(vocab)[: vocab - extra]
    columns = np.concatenate([order, np.setdiff1d(np.arange(vocab), order)])  # sorted first
    positions = np.empty(vocab, dtype=np.int64)
    positions[columns] = np.arange(vocab)
    rows = 4
    row = np.repeat(np.arange(rows), 6)
    lo = rng.integers(0, order.size + 1, row.size)
    hi = np.minimum(lo + rng.integers(0, 400, row.size), order.size)
    lo[0], hi[0] = 0, order.size  # a whole order, ending at V when extra == 0
    lo[1] = hi[1] = order.size  # an empty range at the end
    query = np.arange(row.size)
    ids = torch.as_tensor(rng.integers(0, vocab, rows))
    tokens = np.array([1, 5, 17, 300])
    group_columns = torch.tensor([0, 1, 0, 1])

    def run(permuted: bool):
        logits = torch.randn(
            rows, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(12)
        ).requires_grad_()
        index = positions if permuted else np.arange(vocab)
        inputs = logits[:, torch.as_tensor(columns)] if permuted else logits
        ranges = sorted_ranges(None, index[order], vocab, query, row, lo, hi, "cpu")
        assert ranges.in_order == permuted
        groups = [
            TokenGroups(
                target=torch.tensor([0, 1]),
                rows=torch.tensor([0, 2]),
                tokens=torch.as_tensor(index[tokens]),
                columns=group_columns,
            )
        ]
        out = softmax_sums(inputs, torch.as_tensor(index[ids]), [ranges], row.size, groups, (2, 2))
        weights = [
            torch.randn(o.shape, generator=torch.Generator().manual_seed(13), dtype=o.dtype)
            for o in out
        ]
        sum((o * w).sum() for o, w in zip(out, weights)).backward()
        return [o.detach() for o in out], logits.grad

    (want, want_grad), (got, got_grad) = run(False), run(True)
    assert want[1][0] > 0.5 and want[1][1] == 0
    for value, expected in zip(got, want):
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)


def test_range_masses_read_a_column_slice_in_place():
    """Rows that are the first ``N`` columns of wider rows (not contiguous) read as a copy."""
    from ctopd.objectives.softmax_sums import BLOCK, range_masses

    rng = np.random.default_rng(9)
    wide = torch.rand(3, 3 * BLOCK + 50, dtype=torch.float64)
    size = 2 * BLOCK + 7
    lo = rng.integers(0, size + 1, 50)
    hi = np.minimum(lo + rng.integers(0, 2 * BLOCK, 50), size)
    row = torch.as_tensor(rng.integers(0, 3, 50))
    lo_t, hi_t = torch.as_tensor(lo), torch.as_tensor(hi)
    got = range_masses(wide[:, :size], row, lo_t, hi_t)
    want = range_masses(wide[:, :size].contiguous(), row, lo_t, hi_t)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    assert got.abs().sum() > 0
