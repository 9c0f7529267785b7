"""Routed hooks: modules that read one input share one product of scores and codes, as PEFT's Arrow."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adaptrix import attach
from adaptrix.api.compile import compile_adapter
from tests.builders import FP32_TOLERANCE, load_model, sample_inputs
from tests.route_builders import arrow_adapters, arrow_logits


@pytest.fixture(scope="module")
def llama(bases, tmp_path_factory):
    """The llama base, three routable adapters, the routed artifacts (top_k 1, 2), one adapter's bundle."""
    base = bases("llama")
    tmp = tmp_path_factory.mktemp("route-hooks")
    adapters = arrow_adapters("llama", base, tmp)
    routed = {}
    for top_k in (1, 2):
        routed[top_k] = tmp / f"routed{top_k}"
        spec = f"route:top_k={top_k},temperature=0.7"
        compile_adapter(adapters, base, "hooks", routed[top_k], passes=[spec])
    single = tmp / "single"
    compile_adapter(adapters[0], base, "hooks", single)
    return base, adapters, routed, single


def route_hooks(model) -> dict[str, object]:
    """The routed hook on each module, by module name."""
    found = {}
    for name, module in model.named_modules():
        for hook in module._forward_hooks.values():
            if type(hook).__name__ == "RouteHook":
                found[name] = hook
    return found


def groups(model) -> set[frozenset[str]]:
    """The modules whose routed hooks share one group, per group of more than one."""
    by_group: dict[int, set[str]] = {}
    for name, hook in route_hooks(model).items():
        if hook.group.sharing:
            by_group.setdefault(id(hook.group), set()).add(name)
    return {frozenset(names) for names in by_group.values()}


def with_pre_hook(model, layer: int, hook):
    """Register `hook` as a forward pre-hook on a layer's k_proj (PEFT's Arrow wrapper or the plain one)."""
    found = [m for n, m in model.named_modules() if n.endswith(f"layers.{layer}.self_attn.k_proj")]
    return found[0].register_forward_pre_hook(hook)


def test_routed_modules_that_read_one_input_share_a_group(llama):
    base, _, routed, _ = llama
    model = load_model("llama", base)
    with attach(model, routed[1]):
        found = groups(model)
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    expected = {frozenset(f"model.layers.{i}.{part}" for part in parts)
                for i in range(2) for parts in (attn, ("mlp.gate_proj", "mlp.up_proj"))}  # fmt: skip
    assert found == expected


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_shared_products_equal_each_modules_own_and_keep_no_activations(llama, top_k, mode):
    base, adapters, routed, _ = llama
    inputs = sample_inputs("llama")
    model = load_model("llama", base)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with attach(model, routed[top_k]):
        with context():
            shared = model(**inputs).logits
        hooks = route_hooks(model)
        assert all(hook.group.x is None and hook.group.mix is None for hook in hooks.values())
        for hook in hooks.values():
            hook.group.sharing = False
        with context():
            alone = model(**inputs).logits
    assert (shared - alone).abs().max() <= 1e-6
    expected = arrow_logits("llama", base, adapters, inputs, top_k, temperature=0.7)
    assert (shared - expected).abs().max() <= FP32_TOLERANCE


def test_a_member_reading_another_tensor_stops_its_groups_sharing(llama):
    base, adapters, routed, _ = llama
    inputs = sample_inputs("llama")
    model = load_model("llama", base)
    with_pre_hook(model, 0, lambda module, args: (args[0] * 1.5,))  # k reads a new tensor
    with torch.no_grad(), attach(model, routed[1]):
        got = model(**inputs).logits
        names = set().union(*groups(model))
    assert "model.layers.0.self_attn.k_proj" not in names
    assert "model.layers.1.self_attn.k_proj" in names  # other groups still share
    reference = _arrow_model(base, adapters, top_k=1)
    with_pre_hook(reference, 0, lambda module, args: (args[0] * 1.5,))
    with torch.no_grad():
        expected = reference(**inputs).logits
    assert (got - expected).abs().max() <= FP32_TOLERANCE


def test_an_input_changed_in_place_is_not_taken_from_the_shared_product(llama):
    base, adapters, routed, _ = llama
    inputs = sample_inputs("llama")
    model, reference = load_model("llama", base), _arrow_model(base, adapters, top_k=1)
    for target in (model, reference):
        with_pre_hook(target, 0, lambda module, args: [args[0].mul_(1.5), None][1])  # q read it before
    with torch.no_grad(), attach(model, routed[1]):
        got = model(**inputs).logits
    with torch.no_grad():
        expected = reference(**inputs).logits
        bare = load_model("llama", base)(**inputs).logits
    assert (expected - bare).abs().max() > 100 * FP32_TOLERANCE
    assert (got - expected).abs().max() <= FP32_TOLERANCE


class _Count(TorchDispatchMode):
    """Counts the torch ops dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _decode_ops(model, bundle=None) -> int:
    """Torch ops of one decode step (one token on an 8-token cache), with `bundle` attached."""
    ids = sample_inputs("llama", batch=1)["input_ids"]
    with torch.inference_mode():
        handle = attach(model, bundle) if bundle is not None else None
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        with _Count() as count:
            model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
        if handle is not None:
            handle.detach()
    return count.ops


def test_a_routed_decode_step_adds_at_most_twice_the_ops_of_one_adapter(llama):
    """A small model's decode step costs per torch op: three adapters at top_k 1 stay within 2x in ops."""
    base, _, routed, single = llama
    model = load_model("llama", base)
    bare = _decode_ops(model)
    one, mixed = _decode_ops(model, single) - bare, _decode_ops(model, routed[1]) - bare
    assert 0 < mixed <= 2 * one, (mixed, one)


def _arrow_model(base, adapters, top_k: int):
    """PEFT's Arrow model over the adapters (temperature 0.7, as the artifacts)."""
    from peft import ArrowConfig, create_arrow_model

    config = ArrowConfig(top_k=top_k, router_temperature=0.7, rng_seed=0)
    return create_arrow_model(load_model("llama", base), [str(p) for p in adapters], config).eval()
