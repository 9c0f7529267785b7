"""combine's ties / dare_linear / dare_ties match PEFT's add_weighted_adapter(*_svd) at full rank."""

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from builders import FP32_TOLERANCE, load_model, pair_of, sample_inputs
from pass_builders import assert_pass_option_refused, bias_pair, compiled_logits, pass_records
from peft import PeftModel

from adaptrix.api.compile import compile_adapter, load
from adaptrix.ir.errors import UnsupportedError
from adaptrix.passes.combine import CombineOptions, combine
from adaptrix.passes.combine_sparse import merge_deltas


@torch.no_grad()
def peft_combined_logits(
    base, adapters, weights, combination_type, seed, monkeypatch, family="llama", **kwargs
):
    """Logits of PEFT's add_weighted_adapter, with torch seeded just before the merge loop.

    Injecting the new adapter initialises its layers from the global random stream, so the seed
    goes in after that (PEFT calls `_freeze_adapter` between the two), as a user would seed it.
    """
    model = PeftModel.from_pretrained(load_model(family, base), adapters[0], adapter_name="a0")
    for index, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(adapter, adapter_name=f"a{index}")
    freeze = peft_lora_model._freeze_adapter

    def freeze_then_seed(*args):
        freeze(*args)
        torch.manual_seed(seed)

    monkeypatch.setattr(peft_lora_model, "_freeze_adapter", freeze_then_seed)
    names = [f"a{index}" for index in range(len(adapters))]
    model.add_weighted_adapter(names, list(weights), "mix", combination_type=combination_type, **kwargs)
    model.set_adapter("mix")
    return model(**sample_inputs(family)).logits


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("ties", {"density": 0.5}),
        ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
        ("dare_linear", {"density": 0.6, "seed": 7}),
        ("dare_ties", {"density": 0.4, "seed": 3, "majority_sign_method": "total"}),
        ("dare_ties", {"density": 1.0}),
    ],
)
def test_matches_peft_add_weighted_adapter_svd_at_full_rank(lora_pair, tmp_path, monkeypatch, method, extra):
    base, first, second = lora_pair
    weights = (0.7, -0.4)
    spec = f"combine:method={method},weights=0.7,-0.4," + ",".join(f"{k}={v}" for k, v in extra.items())
    got = compiled_logits([first, second], base, tmp_path / "out", [spec])
    peft_kwargs = {k: v for k, v in extra.items() if k != "seed"}
    expected = peft_combined_logits(base, [first, second], weights, f"{method}_svd", extra.get("seed", 0),
                                    monkeypatch, svd_rank=6, **peft_kwargs)  # fmt: skip
    assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    if method.startswith("dare") and extra["density"] < 1:  # the match is the seed's, not luck
        other = peft_combined_logits(base, [first, second], weights, f"{method}_svd", extra["seed"] + 1,
                                     monkeypatch, svd_rank=6, **peft_kwargs)  # fmt: skip
        assert (got - other).abs().max() > 100 * FP32_TOLERANCE
    [record] = pass_records(tmp_path / "out")
    assert record["options"]["method"] == method and record["options"]["density"] == extra["density"]
    assert {entry["rank_after"] for entry in record["report"]["sites"]} == {6}


# PEFT merges a fused module (c_attn, qkv_proj, gate_up_proj, query_key_value) as one matrix, in
# the module's layout (GPT-2's Conv1D: [in, out]), and walks modules in the model's order (Phi-3
# declares o_proj before qkv_proj; embeddings first, lm_head last): dare's random stream follows it.
FUSED_CASES = [
    ("gpt2", {}),
    ("phi3", {}),
    ("gpt_neox", {}),
    ("t5", {}),  # an encoder-decoder: the encoder's layers, then the decoder's with cross-attention
    ("mt5", {}),  # gated: wi_0 (gate) before wi_1 (up), the role T5's wi has
    ("llama", {"target_modules": ["embed_tokens", "q_proj", "lm_head"], "save_embedding_layers": False}),
]


@pytest.mark.parametrize(("family", "lora"), FUSED_CASES, ids=[family for family, _ in FUSED_CASES])
@pytest.mark.parametrize(("method", "density", "seed"), [("ties", 0.5, 0), ("dare_ties", 0.6, 4)])
def test_fused_modules_and_model_order_match_peft(
    bases, peft_adapters, tmp_path, monkeypatch, family, lora, method, density, seed
):
    base = bases(family)
    first, second = pair_of(peft_adapters, family, **lora)
    spec = f"combine:method={method},weights=0.7,-0.4,density={density}" + (f",seed={seed}" if seed else "")
    got = compiled_logits([first, second], base, tmp_path / "out", [spec], family=family)
    expected = peft_combined_logits(base, [first, second], (0.7, -0.4), f"{method}_svd", seed, monkeypatch,
                                    family=family, svd_rank=6, density=density)  # fmt: skip
    assert (got - expected).abs().max() <= FP32_TOLERANCE


def test_the_random_stream_moves_with_the_seed(lora_pair):
    base, first, second = lora_pair
    irs = [load(first, base), load(second, base)]

    def deltas(seed):
        result = combine(irs, CombineOptions(method="dare_linear", density=0.5, seed=seed))
        return [op.delta() for _, op in result.ir]

    same, again, other = deltas(1), deltas(1), deltas(2)
    assert all(torch.equal(x, y) for x, y in zip(same, again, strict=True))
    assert any(not torch.allclose(x, y) for x, y in zip(same, other, strict=True))


def test_at_the_matrix_rank_the_refactoring_loses_nothing(lora_pair):
    base, first, second = lora_pair
    irs = [load(first, base), load(second, base)]
    result = combine(irs, CombineOptions(method="ties", weights=(1.0, 0.5), density=0.5, rank=64))
    by_site = [irs[0].by_site(), irs[1].by_site()]
    for (site, op), entry in zip(result.ir, result.report["sites"], strict=True):
        deltas = [found[site][0].delta() for found in by_site]
        merged = merge_deltas("ties", deltas, [1.0, 0.5], 0.5, "total", torch.Generator())
        assert (op.delta() - merged).abs().max() < 1e-5 and entry["relative_error"] < 1e-6
        assert entry["density_kept"] <= 1.0 and entry["site"] == str(site)


def test_ties_formula_on_a_small_case():
    deltas = [torch.tensor([[3.0, -1.0], [0.5, 2.0]]), torch.tensor([[-1.0, -2.0], [4.0, 0.1]])]
    merged = merge_deltas("ties", deltas, [1.0, 1.0], 0.5, "total", torch.Generator())
    # pruned: [[3, 0], [0, 2]] and [[0, -2], [4, 0]]; every kept entry agrees with its elected sign
    assert torch.equal(merged, torch.tensor([[3.0, -2.0], [4.0, 2.0]]))
    by_count = merge_deltas("ties", [deltas[0], -deltas[0], deltas[0]], [1.0] * 3, 1.0, "frequency",
                            torch.Generator())  # fmt: skip
    assert torch.equal(by_count, deltas[0])


def test_bias_deltas_are_refused_naming_the_site(bases, peft_adapters, tmp_path):
    base = bases("gpt2")
    first, second = bias_pair(peft_adapters)
    words = r"^pass combine: .*method=ties merges LoRA deltas only, not a Bias"
    spec = "combine:method=ties,density=0.5"
    with pytest.raises(UnsupportedError, match=words):
        compile_adapter([first, second], base, "merged", tmp_path / "out", passes=[spec])


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("combine:method=ties", "pass combine: option density is required with method=ties"),
        ("combine:method=ties,density=0", "pass combine: option density=0.0 must be in (0, 1]"),
        ("combine:method=dare_ties,density=1.5", "pass combine: option density=1.5 must be in (0, 1]"),
        ("combine:method=cat,density=0.5", "density goes with method=ties|dare_linear|dare_ties only"),
        ("combine:method=dare_linear", "option density is required with method=dare_linear"),
        ("combine:method=ties,density=0.5,seed=3", "option seed goes with method=dare_linear or dare_ties"),
        ("combine:method=dare_linear,density=0.5,majority_sign_method=total",
         "option majority_sign_method goes with method=ties or dare_ties"),
        ("combine:method=ties,density=0.5,majority_sign_method=mean",
         "option majority_sign_method='mean' is not one of total, frequency"),
        ("combine:method=cat,rank=3", "option rank goes with method=svd or ties"),
        ("combine:method=svd", "option rank is required with method=svd"),
        ("combine:method=ties,density=0.5,rank=0", "option rank=0 must be at least 1"),
    ],
)  # fmt: skip
def test_bad_options_exit_2_with_one_line_naming_pass_and_option(lora_pair, tmp_path, spec, words):
    base, first, second = lora_pair
    args = ["compile", first, second, "--base", base, "--pass", spec]
    assert_pass_option_refused(args, tmp_path / "o", words)
