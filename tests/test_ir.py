"""The IR's own rules: sites, immutability, low-rank arithmetic, and the merge kernel agreeing with it."""

import dataclasses

import pytest
import torch

from adaptrix.binders import BINDERS
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import AdapterIR, DoRA, LazyTensor, LowRank, Role, Site, SourceModel
from adaptrix.lowering.merge_math import merge_tensor

SOURCE = SourceModel("llama", 64, 2, 4, 2, 16, 128, 256)


def _low_rank(out=3000, inp=700, rank=5, scale=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)
    return LowRank(LazyTensor.of(a, "a"), LazyTensor.of(b, "b"), scale)


def test_sites_check_layers():
    assert str(Site(3, Role.ATTN_Q)) == "layer 3 attn_q"
    assert str(Site(None, Role.EMBED)) == "embed"
    with pytest.raises(ValueError, match="needs layer"):
        Site(None, Role.ATTN_Q)
    with pytest.raises(ValueError, match="takes no layer"):
        Site(0, Role.LM_HEAD)


def test_ir_values_are_frozen():
    op = _low_rank(8, 4, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.scale = 2.0
    ir = AdapterIR(((Site(0, Role.ATTN_Q), op),), SOURCE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ir.ops = ()


def test_low_rank_rejects_mismatched_factors():
    a = LazyTensor.of(torch.zeros(4, 8), "a")
    b = LazyTensor.of(torch.zeros(8, 3), "b")
    with pytest.raises(BadInputError, match="low-rank pair"):
        LowRank(a, b, 1.0)


def test_dora_must_be_alone_at_its_site():
    op = _low_rank(8, 4, 2)
    dora = DoRA(op, LazyTensor.of(torch.ones(8), "m"))
    site = Site(0, Role.ATTN_V)
    with pytest.raises(BadInputError, match="DoRA"):
        AdapterIR(((site, dora), (site, op)), SOURCE)


def test_lazy_tensor_refuses_non_finite_values():
    bad = torch.ones(5)
    bad[2] = float("nan")
    with pytest.raises(BadInputError, match="NaN or Inf"):
        LazyTensor.of(bad, "file.safetensors:x").load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_merge_kernel_equals_the_ir_delta_rounded_once(dtype):
    """The streaming kernel works in row blocks; its result must be W + delta() rounded once."""
    op = _low_rank()  # 3000 x 700: several row blocks
    weight = torch.randn(3000, 700).to(dtype)
    placement = BINDERS["llama"].resolve("model.layers.0.self_attn.q_proj")
    original = weight.clone()
    merged = merge_tensor(weight, "weight", placement, [[op]], SOURCE, dtype)
    assert torch.equal(weight, original), "the merge must not change its input"
    expected = (weight.to(torch.float32) + op.delta()).to(dtype)
    assert merged.dtype == dtype
    # fp32: summation order only; bf16: at most one ulp (2**-7 relative) where fp32 sums round apart.
    bound = 1e-5 if dtype == torch.float32 else 2**-7 * expected.float().abs() + 1e-6
    assert ((merged.float() - expected.float()).abs() <= bound).all()
    assert (merged.float() - weight.float()).abs().max() > 1.0  # the delta is really there
