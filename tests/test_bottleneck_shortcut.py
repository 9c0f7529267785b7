"""The runtime's shortcut for norm-free bottlenecks equals AdapterHub's full formula, option by option."""

import itertools
from types import SimpleNamespace

import pytest
import torch

from adaptrix.runtimes.hooks.activations import activation
from adaptrix.runtimes.hooks.bottleneck import BottleneckEntry, BottleneckHook, _branch_only

OPTIONS = list(itertools.product([False, True], [False, True], [False, True], [True, False, "post_add"]))


def hook_for(parallel, before, after, residual, hidden=8, size=3):
    entry = BottleneckEntry(
        name="b", sites=("layer 0 mlp_down",), block="mlp", modules={}, probe={}, act="relu", size=size,
        parallel=parallel, scale=0.7, original_ln_before=before, original_ln_after=after,
        residual_before_ln=residual, adapter_residual_before_ln=True, ln_eps={}, tensors={},
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    hook = object.__new__(BottleneckHook)
    hook.entry, hook.norm, hook.act = entry, None, activation("relu")
    hook.handle = SimpleNamespace(_scale=1.0)
    hook.t = {"down": torch.randn(size, hidden, generator=generator),
              "up": torch.randn(hidden, size, generator=generator)}  # fmt: skip
    return hook


@pytest.mark.parametrize(("parallel", "before", "after", "residual"), OPTIONS)
def test_shortcut_is_the_full_formula_where_it_applies(parallel, before, after, residual):
    hook = hook_for(parallel, before, after, residual)
    h, r = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    hook.t = {name: value.double() for name, value in hook.t.items()}
    if residual == "post_add" and not before and not parallel:
        with pytest.raises(TypeError):  # AdapterHub's own formula has no residual there either
            hook.final(h, r)
        return
    full = hook.final(h, r) - (h + r)
    kind = _branch_only(hook.entry)
    if kind is None:
        assert (full - hook.branch(h + r)).abs().max() > 1e-3  # the shortcut would be wrong here
        return
    shortcut = hook.branch({"h": h, "r": r, "h+r": h + r}[kind])
    assert torch.allclose(full, shortcut, rtol=0, atol=1e-12)


def test_the_usual_configs_take_the_shortcut():
    assert _branch_only(hook_for(False, True, True, True).entry) == "h+r"  # SeqBn / DoubleSeqBn
    assert _branch_only(hook_for(True, False, True, True).entry) == "r"  # ParBn
