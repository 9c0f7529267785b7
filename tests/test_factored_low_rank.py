"""The exact low-rank form of LoHa / LoKr ops: scale * B @ A is the op's dense delta.

Integer-valued factors and a power-of-two scale make every product and sum exact in float32, so
the form must equal `Factored.delta()` and a float64 reference bit for bit; random normal
factors check the same within float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from adaptrix.ir.factored_low_rank import form_rank, low_rank_form, with_low_rank_forms
from adaptrix.ir.values import Factored, LazyTensor, LowRank

OUT, IN = 12, 20  # LoKr: w1 [3, 4] and w2 [4, 5]
# Each LoKr factor set, with the inner rank of each product (w1a @ w1b: 2, w2a @ w2b: 3).
LOKR_SETS = {
    "w1,w2": ({"w1": (3, 4), "w2": (4, 5)}, 3 * 4),
    "w1,w2ab": ({"w1": (3, 4), "w2a": (4, 3), "w2b": (3, 5)}, 3 * 3),
    "w1ab,w2": ({"w1a": (3, 2), "w1b": (2, 4), "w2": (4, 5)}, 2 * 4),
    "w1ab,w2ab": ({"w1a": (3, 2), "w1b": (2, 4), "w2a": (4, 3), "w2b": (3, 5)}, 2 * 3),
}
LOHA = {"w1a": (OUT, 3), "w1b": (3, IN), "w2a": (OUT, 2), "w2b": (2, IN)}
ROWS = torch.tensor([7, 0, 5, 11, 2])  # some output rows, out of order (one role of a fused module)


def factors(shapes: dict[str, tuple[int, int]], integer: bool, seed: int = 0) -> dict[str, LazyTensor]:
    generator = torch.Generator().manual_seed(seed)
    made = {}
    for name, shape in sorted(shapes.items()):
        value = (torch.randint(-3, 4, shape, generator=generator).float() if integer
                 else torch.randn(shape, generator=generator))  # fmt: skip
        made[name] = LazyTensor.of(value, f"test:{name}")
    return made


def reference(op: Factored) -> torch.Tensor:
    """The delta from its definition, in float64."""
    w = {name: t.load().double() for name, t in op.factors.items()}
    part = {n: w[n] if n in w else w[f"{n}a"] @ w[f"{n}b"] for n in ("w1", "w2")}
    whole = torch.kron(part["w1"], part["w2"]) if op.kind == "lokr" else part["w1"] * part["w2"]
    whole = op.scale * whole
    return whole if op.rows is None else whole[op.rows]


def form_delta(form: LowRank) -> torch.Tensor:
    return form.scale * (form.b.load().double() @ form.a.load().double())


CASES = [("loha", LOHA, 6)] + [("lokr", shapes, rank) for shapes, rank in LOKR_SETS.values()]
IDS = ["loha"] + [f"lokr-{name}" for name in LOKR_SETS]


@pytest.mark.parametrize(("kind", "shapes", "rank"), CASES, ids=IDS)
@pytest.mark.parametrize("rows", [None, ROWS], ids=["all-rows", "some-rows"])
def test_form_is_the_dense_delta_exactly(kind, shapes, rank, rows):
    op = Factored(kind, factors(shapes, integer=True), 1.5, rows)
    form = low_rank_form(op)
    assert form.rank == form_rank(op) == rank
    assert form.shape == op.shape and form.scale == op.scale
    expected = reference(op)
    assert torch.equal(form_delta(form), expected)
    assert torch.equal(form.delta(), op.delta())


@pytest.mark.parametrize(("kind", "shapes", "rank"), CASES, ids=IDS)
def test_form_matches_random_factors(kind, shapes, rank):
    op = Factored(kind, factors(shapes, integer=False, seed=3), 1.7, ROWS)
    form = low_rank_form(op)
    expected = reference(op)
    error = (form_delta(form) - expected).abs().max() / expected.abs().max()
    assert error <= 1e-6, error


def test_lokr_picks_the_smallest_inner_size_per_factor():
    # A stored product wider than the factor (rank 6 > 4) is multiplied out; a whole factor taller
    # than wide [8, 2] keeps an identity on its narrow side.
    shapes = {"w1a": (3, 6), "w1b": (6, 4), "w2": (8, 2)}
    op = Factored("lokr", factors(shapes, integer=True), 1.0)
    assert form_rank(op) == 3 * 2
    assert torch.equal(form_delta(low_rank_form(op)), reference(op))


def test_roles_of_one_fused_module_share_one_a():
    whole = Factored("loha", factors(LOHA, integer=True), 2.0)
    first, second = whole.select_rows(torch.arange(0, 4)), whole.select_rows(torch.arange(4, OUT))
    plain = LowRank(LazyTensor.of(torch.ones(1, IN), "a"), LazyTensor.of(torch.ones(OUT, 1), "b"), 1.0)
    got = with_low_rank_forms([first, plain, second])
    assert got[1] is plain
    assert got[0].a is got[2].a and got[0].shape == (4, IN) and got[2].shape == (OUT - 4, IN)
    stacked = torch.cat([form_delta(got[0]), form_delta(got[2])])
    assert torch.equal(stacked, reference(whole))
