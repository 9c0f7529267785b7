"""--pass route: several adapters routed per token as PEFT's Arrow, in hooks bundles and ONNX."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import adaptrix
from adaptrix import attach
from adaptrix.api.compile import compile_adapter
from adaptrix.api.inspect import inspect_adapter
from adaptrix.api.route import read_router, route
from adaptrix.cli import app
from adaptrix.ir.errors import AdaptrixError
from adaptrix.runtimes.hooks import load_bundle
from tests.builders import load_model, sample_inputs
from tests.route_builders import arrow_adapters, arrow_logits, domain_adapters, domain_prompts, padded_adapter

FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def routed(bases, tmp_path_factory):
    """Per family: its base and three routable adapters."""
    made = {}

    def get(family: str):
        if family not in made:
            base = bases(family)
            made[family] = base, arrow_adapters(family, base, tmp_path_factory.mktemp(f"arrow-{family}"))
        return made[family]

    return get


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_routed_hooks_bundle_equals_peft_arrow(routed, tmp_path, family, top_k):
    base, adapters = routed(family)
    out = tmp_path / "routed"
    compile_adapter(
        adapters, base, "hooks", out, passes=[f"route:method=arrow,top_k={top_k},temperature=0.7"]
    )
    inputs = sample_inputs(family)
    model = load_model(family, base)
    with torch.no_grad(), attach(model, out):
        got = model(**inputs).logits
    expected = arrow_logits(family, base, adapters, inputs, top_k, temperature=0.7)
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["route"] == {"adapters": ["task0", "task1", "task2"], "method": "arrow", "top_k": top_k,
                                 "temperature": 0.7}  # fmt: skip
    [record] = manifest["passes"]
    assert set(record["report"]["overlap"]) == {"task0|task1", "task0|task2", "task1|task2"}


def test_adapters_of_different_ranks_route_as_their_deltas(routed, tmp_path):
    """One adapter zero-padded to rank 6: the same deltas and prototypes, so PEFT's logits (rank 4)."""
    base, adapters = routed("llama")
    mixed = [padded_adapter(adapters[0], tmp_path / "task0"), *adapters[1:]]
    inputs = sample_inputs("llama")
    for top_k in (1, 2):
        out = tmp_path / f"mixed{top_k}"
        compile_adapter(mixed, base, "hooks", out, passes=[f"route:top_k={top_k}"])
        model = load_model("llama", base)
        with torch.no_grad(), attach(model, out):
            got = model(**inputs).logits
        assert (got - arrow_logits("llama", base, adapters, inputs, top_k)).abs().max() <= FP32_TOLERANCE


def test_routing_matters(routed, tmp_path):
    """top_k 1 and 3 differ, and top_k 1 is not any single adapter: the router is doing something."""
    base, adapters = routed("llama")
    inputs = sample_inputs("llama")
    logits = {}
    for top_k in (1, 3):
        out = tmp_path / f"k{top_k}"
        compile_adapter(adapters, base, "hooks", out, passes=[f"route:top_k={top_k}"])
        model = load_model("llama", base)
        with torch.no_grad(), attach(model, out):
            logits[top_k] = model(**inputs).logits
    assert (logits[1] - logits[3]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("route:method=mole", "method='mole'"),
        ("route:top_k=4", "top_k=4 is more than the 3 adapters"),
        ("route:top_k=0", "top_k=0"),
        ("route:temperature=0", "temperature=0.0"),
        ("route:use_gks=true", "GenKnowSub\\) is not supported"),
        ("route:rng_seed=3", "unknown option 'rng_seed'"),
    ],
)
def test_bad_route_options_are_refused(routed, tmp_path, spec, words):
    base, adapters = routed("llama")
    with pytest.raises(AdaptrixError, match=words.replace("(", r"\(")):
        compile_adapter(adapters, base, "hooks", tmp_path / "out", passes=[spec])


def test_routed_ir_goes_to_routing_targets_only(routed, tmp_path):
    base, adapters = routed("llama")
    with pytest.raises(AdaptrixError, match="cannot route between adapters"):
        compile_adapter(adapters, base, "merged", tmp_path / "merged", passes=["route:top_k=1"])
    with pytest.raises(AdaptrixError, match="already routed"):
        compile_adapter(
            adapters, base, "hooks", tmp_path / "x", passes=["route:top_k=1", "reduce-rank:rank=2"]
        )


def test_route_picks_each_domains_adapter(bases, tmp_path):
    base = bases("llama")
    adapters = domain_adapters("llama", base, tmp_path)
    out = tmp_path / "routed"
    compile_adapter(adapters, base, "hooks", out, passes=["route:top_k=1"])
    model = load_model("llama", base)
    router = read_router(out)
    assert router.adapters == ("domain0", "domain1", "domain2")
    for domain in range(3):
        for prompt in domain_prompts(domain, seed=7):
            assert route(router, prompt, model) == f"domain{domain}"
    assert adaptrix.route(out, domain_prompts(1, seed=9)[0]) == "domain1"  # the base named by the manifest
    bundles = []
    for adapter in adapters:  # one hooks bundle per adapter, as an engine serving one per request has
        bundles.append(tmp_path / "bundles" / adapter.name)
        compile_adapter(adapter, base, "hooks", bundles[-1])
    listed = read_router(bundles)
    assert listed.adapters == router.adapters and listed.top_k == 1
    for name in router.prototypes:  # the same prototypes as the routed bundle's, up to sign
        assert torch.allclose(listed.prototypes[name].abs(), router.prototypes[name].abs(), atol=1e-5)
    for domain in range(3):
        assert route(bundles, domain_prompts(domain, seed=7)[0], model) == f"domain{domain}"


def test_route_refuses_a_batch_and_a_single_adapter_bundle(routed, peft_adapters, tmp_path):
    base, adapters = routed("llama")
    out = tmp_path / "routed"
    compile_adapter(adapters, base, "hooks", out, passes=["route:top_k=1"])
    with pytest.raises(AdaptrixError, match="one prompt"):
        route(out, torch.ones(2, 4, dtype=torch.long))
    single = tmp_path / "single"
    compile_adapter(adapters[0], base, "hooks", single)
    with pytest.raises(AdaptrixError, match="nothing to route between"):
        route(single, [3, 4, 5])


def test_inspect_shows_the_prototypes_overlap(routed, tmp_path):
    base, adapters = routed("llama")
    out = tmp_path / "routed"
    compile_adapter(adapters, base, "hooks", out, passes=["route:top_k=2"])
    summary = inspect_adapter(out)
    overlap = summary["route"]["overlap"]
    assert set(overlap) == {"task0|task1", "task0|task2", "task1|task2"}
    assert all(0.0 <= value < 0.9 for value in overlap.values())  # random adapters: far from parallel
    assert summary["route"]["modules"] == 14 and {row["op"] for row in summary["rows"]} == {"route"}
    assert summary["parameters"] > 0
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "prototypes: task0|task1" in " ".join(shown.output.split())
    same = tmp_path / "same"
    compile_adapter(
        [adapters[0], _copy(adapters[0], tmp_path / "twin")], base, "hooks", same, passes=["route"]
    )
    assert inspect_adapter(same)["route"]["overlap"] == {"task0|twin": 1.0}


def _copy(adapter, path):
    """A copy of an adapter directory under another name."""
    shutil.copytree(adapter, path)
    return path


def test_parity_checks_a_routed_artifact_against_peft_arrow(routed, tmp_path):
    base, adapters = routed("llama")
    out = tmp_path / "routed"
    compile_adapter(adapters, base, "hooks", out, passes=["route:top_k=1"])
    args = ["parity", str(adapters[0]), "--base", str(base), "--artifact", f"hooks={out}", "--json"]
    checked = CliRunner().invoke(app, args)
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["reference"] == "peft-arrow" and report["backends"][0]["max_abs"] <= FP32_TOLERANCE
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["route"]["top_k"] = 2  # the reference now routes otherwise than the bundle
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert CliRunner().invoke(app, args).exit_code == 1
    refused = CliRunner().invoke(app, [*args[:-1], "--targets", "merged"])
    assert refused.exit_code == 2 and "checked against PEFT's Arrow model" in refused.output


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("top_k", 4, "top_k: 4 is more than the 3 adapters"),
        ("temperature", 0, "expected a number above 0"),
        ("method", "mole", "expected 'arrow'"),
        ("adapters", ["a"], "two adapter names or more"),
    ],
)
def test_a_malformed_route_entry_is_refused_in_one_line(routed, tmp_path, field, value, words):
    base, adapters = routed("llama")
    out = tmp_path / "routed"
    compile_adapter(adapters, base, "hooks", out, passes=["route:top_k=1"])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bundle"]["modules"][0]["route"][field] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AdaptrixError, match=words):
        load_bundle(out)
