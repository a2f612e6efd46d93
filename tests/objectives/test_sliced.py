"""sliced_loss's ``column_order``: the slice loss receives its rows with the columns in the
given order, from dense logits and from hidden states (the head's rows permuted once), with the
loss and every gradient of the plain computation on the permuted logits, padded rows excluded."""

from __future__ import annotations

import pytest
import torch

from ctopd.objectives.plan import RowSlice
from ctopd.objectives.sliced import sliced_loss
from ctopd.objectives.student_head import StudentHead, StudentHidden

BATCH, LENGTH, HIDDEN, IDS, PADDED = 2, 5, 4, 13, 3


def _slices():
    rows = [(b, p) for b in range(BATCH) for p in range(LENGTH)]
    out = []
    for start in range(0, len(rows), 3):  # several slices, the last one short
        part = rows[start : start + 3]
        out.append(
            RowSlice(
                batch=torch.tensor([b for b, _ in part]),
                pos=torch.tensor([p for _, p in part]),
                ids=torch.zeros(len(part), dtype=torch.long),
                chunk=torch.arange(len(part)),
                k0=0,
                k1=len(part),
            )
        )
    return out


def _order_dependent_loss(rows, row_slice):
    """Not invariant to a column permutation: column ``j`` weighted by ``j + 1``."""
    weights = torch.arange(1, rows.shape[1] + 1, dtype=rows.dtype)
    return (torch.log_softmax(rows, -1) * weights).sum(), {}


@pytest.mark.parametrize("from_hidden", [False, True])
def test_column_order_gives_the_loss_on_permuted_logits(from_hidden):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, LENGTH, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(IDS + PADDED, HIDDEN, generator=gen, dtype=torch.float64)
    bias = torch.randn(IDS + PADDED, generator=gen, dtype=torch.float64)
    order = torch.randperm(IDS, generator=gen)
    results = []
    for reference in (True, False):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        head = StudentHead(leaves[1], leaves[2], None, num_ids=IDS)
        if reference:
            logits = head(leaves[0])[..., order]
            loss = _order_dependent_loss(logits.reshape(-1, IDS), None)[0] * 0.5
        else:
            student = StudentHidden(leaves[0], head) if from_hidden else head(leaves[0])
            loss = sliced_loss(
                student, _slices(), _order_dependent_loss, {}, scale=0.5, column_order=order
            )
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for grad, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert not got_grads[1][IDS:].any() and not got_grads[2][IDS:].any()  # padded rows


def test_column_order_of_the_wrong_width_fails():
    logits = torch.randn(BATCH, LENGTH, IDS, requires_grad=True)
    with pytest.raises(ValueError, match="column_order has shape"):
        sliced_loss(logits, _slices(), _order_dependent_loss, {}, column_order=torch.arange(4))
