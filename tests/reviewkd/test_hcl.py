"""HCL against values computed by hand, and against the literal formula of docs/METHOD.md section 1.3."""

import pytest
import torch
import torch.nn.functional as F

from reviewkd import hcl_loss


def literal_hcl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """docs/METHOD.md section 1.3 written out with no shortcuts."""
    loss = F.mse_loss(s, t)
    weight, total = 1.0, 1.0
    for k in (4, 2, 1):
        if k >= min(s.shape[-2:]):
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, k), F.adaptive_avg_pool2d(t, k))
        total += weight
    return loss / total


def test_two_by_two_uses_only_the_one_by_one_level() -> None:
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.zeros_like(s)
    # mse = 30/4 = 7.5; 1x1 pool = 2.5 -> 6.25 at weight 1/2; divided by 1.5
    assert hcl_loss([s], [t]).item() == pytest.approx((7.5 + 0.5 * 6.25) / 1.5)


def test_non_square_map() -> None:
    s = torch.arange(8.0).reshape(1, 1, 2, 4)
    t = torch.zeros_like(s)
    # min side 2: only k=1. mse = 140/8 = 17.5; mean 3.5 -> 12.25 at weight 1/2
    assert hcl_loss([s], [t]).item() == pytest.approx((17.5 + 0.5 * 12.25) / 1.5)


def test_three_by_six_skips_four_and_weights_two_then_one() -> None:
    s = torch.arange(18.0).reshape(1, 1, 3, 6)
    t = torch.zeros_like(s)
    mse = (torch.arange(18.0) ** 2).mean().item()
    # 2x2 adaptive pool of a 3x6 map: rows {0,1} and {1,2}, columns {0,1,2} and {3,4,5}
    grid = torch.arange(18.0).reshape(3, 6)
    pool2 = torch.tensor(
        [[grid[r0:r1, c0:c1].mean() for c0, c1 in ((0, 3), (3, 6))] for r0, r1 in ((0, 2), (1, 3))]
    )
    pool1 = grid.mean()
    expected = (mse + 0.5 * (pool2**2).mean().item() + 0.25 * pool1.item() ** 2) / 1.75
    assert hcl_loss([s], [t]).item() == pytest.approx(expected, rel=1e-6)


def test_pooled_level_is_plain_mse() -> None:
    s = torch.tensor([1.0, -2.0, 3.0]).reshape(1, 3, 1, 1)
    t = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1)
    assert hcl_loss([s], [t]).item() == pytest.approx((1 + 4 + 4) / 3)


def test_constant_difference_gives_that_difference_squared_at_every_level() -> None:
    s = torch.full((2, 3, 8, 8), 2.0)
    t = torch.zeros_like(s)
    assert hcl_loss([s], [t]).item() == pytest.approx(4.0)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 4, 6, 6), (1, 2, 5, 7), (3, 2, 16, 12), (2, 2, 1, 9)])
def test_matches_literal_formula_and_sums_levels(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(1)
    s1, t1 = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    s2, t2 = torch.randn(2, 5, 4, 4, generator=generator), torch.randn(2, 5, 4, 4, generator=generator)
    expected = literal_hcl(s1, t1) + literal_hcl(s2, t2)
    torch.testing.assert_close(hcl_loss([s1, s2], [t1, t2]), expected)


def test_gradient_matches_literal_formula() -> None:
    s = torch.randn(2, 3, 8, 12, requires_grad=True)
    t = torch.randn(2, 3, 8, 12)
    (grad,) = torch.autograd.grad(hcl_loss([s], [t]), s)
    (expected,) = torch.autograd.grad(literal_hcl(s, t), s)
    torch.testing.assert_close(grad, expected)


def test_mismatched_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        hcl_loss([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 2, 4, 5)])
    with pytest.raises(ValueError, match="levels"):
        hcl_loss([torch.zeros(1, 2, 4, 4)], [])
