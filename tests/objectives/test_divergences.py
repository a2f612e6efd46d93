import math

import pytest
import torch

from ctopd.objectives.divergences import ABSENT, DIVERGENCES, divergence

from .reference import ref_divergence


def _logp(probs):
    return torch.log(torch.tensor([probs], dtype=torch.float64))


def test_reverse_and_forward_kl_match_hand_values():
    p, q = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
    # KL(p || q) = 0.5 ln 2 + 0 + 0.25 ln 0.5 = 0.25 ln 2; KL(q || p) = 0.25 ln 0.5 + 0.5 ln 2
    assert divergence(_logp(p), _logp(q), kind="reverse_kl").item() == pytest.approx(
        0.25 * math.log(2)
    )
    assert divergence(_logp(p), _logp(q), kind="forward_kl").item() == pytest.approx(
        0.25 * math.log(2)
    )
    assert divergence(_logp([0.9, 0.1]), _logp([0.5, 0.5]), kind="reverse_kl").item() == (
        pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    )


def test_tv_and_symmetric_jsd_match_hand_values():
    p, q = [1.0 - 1e-12, 1e-12], [1e-12, 1.0 - 1e-12]
    # Disjoint supports: TV = 1, JSD(0.5) = ln 2.
    assert divergence(_logp(p), _logp(q), kind="tv").item() == pytest.approx(1.0)
    assert divergence(_logp(p), _logp(q), kind="jsd").item() == pytest.approx(math.log(2), rel=1e-9)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("seed", range(3))
def test_divergences_match_definitions(kind, seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(4, 7, generator=gen, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(4, 7, generator=gen, dtype=torch.float64), -1)
    fast = divergence(s, t, kind=kind, beta=0.3)
    for row in range(4):
        expected = ref_divergence(s[row].exp(), t[row].exp(), kind, 0.3)
        assert fast[row].item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    assert (divergence(s, s, kind=kind, beta=0.3).abs() < 1e-12).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_absent_entry_adds_nothing_and_keeps_gradients_finite(kind):
    s = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64), -1)
    t = torch.log_softmax(torch.tensor([[0.3, 1.0, 2.0]], dtype=torch.float64), -1)
    scores = torch.tensor([[1.0, 2.0, 0.5, ABSENT]], dtype=torch.float64, requires_grad=True)
    padded_s = torch.log_softmax(scores, -1)
    padded_t = torch.log_softmax(torch.tensor([[0.3, 1.0, 2.0, ABSENT]], dtype=torch.float64), -1)
    value = divergence(padded_s, padded_t, kind=kind)
    assert value.item() == pytest.approx(divergence(s, t, kind=kind).item(), rel=1e-12)
    value.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[0, 3].item() == 0.0


def test_unknown_divergence_lists_valid_ones():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="reverse_kl, forward_kl, jsd, tv"):
        divergence(x, x, kind="hellinger")
