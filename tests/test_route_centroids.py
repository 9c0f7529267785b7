"""Calibrated request-level routing: per-adapter centroids of the base's hidden states (calibrate_route)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import adaptrix
from adaptrix.api.compile import compile_adapter
from adaptrix.api.route import read_router
from adaptrix.cli import app
from adaptrix.ir.errors import AdaptrixError
from tests.builders import load_model, needs_onnx_export
from tests.route_builders import arrow_adapters, domain_prompts


@pytest.fixture(scope="module")
def routed(bases, tmp_path_factory):
    """Three random adapters (their prototypes know nothing of the domains) in one routed bundle."""
    base = bases("llama")
    root = tmp_path_factory.mktemp("centroids")
    out = root / "routed"
    compile_adapter(arrow_adapters("llama", base, root), base, "hooks", out, passes=["route:top_k=1"])
    return base, out


def test_calibrated_route_sends_each_domain_to_the_adapter_its_examples_named(routed):
    base, out = routed
    model = load_model("llama", base)
    # domain d's examples calibrate adapter task(2 - d): the mapping comes from the examples alone
    examples = {f"task{2 - d}": domain_prompts(d, count=8, length=16, seed=1).tolist() for d in range(3)}
    centroids = adaptrix.calibrate_route(out, examples, model)
    assert centroids.adapters == read_router(out).adapters == ("task0", "task1", "task2")
    for domain in range(3):
        for prompt in domain_prompts(domain, count=8, length=16, seed=7):
            assert adaptrix.route(centroids, prompt, model) == f"task{2 - domain}"
    # without a model: the base the manifest names
    assert adaptrix.route(centroids, domain_prompts(1, length=16, seed=9)[0]) == "task1"


def test_calibrate_route_reads_an_examples_file_and_refuses_bad_ones(routed, tmp_path):
    base, out = routed
    model = load_model("llama", base)
    good = {f"task{d}": domain_prompts(d, count=2, seed=1).tolist() for d in range(3)}
    path = tmp_path / "examples.json"
    path.write_text(json.dumps(good))
    features = (model.config.num_hidden_layers + 1) * model.config.hidden_size  # embeddings + each layer
    assert adaptrix.calibrate_route(out, path, model).vectors.shape == (3, features)
    bad = [
        ({k: v for k, v in good.items() if k != "task1"}, "no examples for \\['task1'\\]"),
        ({**good, "task9": good["task0"]}, "unknown adapters \\['task9'\\]"),
        ({**good, "task1": [[]]}, "'task1': expected a non-empty list of prompts"),
        ({**good, "task1": [[3, -1]]}, "'task1': expected a non-empty list of prompts"),
        ({**good, "task1": [[3, model.config.vocab_size]]}, "outside the base's vocabulary"),
        ([1, 2], "expected an object"),
    ]
    for content, message in bad:
        path.write_text(json.dumps(content))
        with pytest.raises(AdaptrixError, match=message):
            adaptrix.calibrate_route(out, path, model)


def test_run_route_examples_picks_by_the_calibrated_centroids(bases, tmp_path):
    """`adaptrix run --route --route-examples FILE`: each prompt's adapter as the examples file maps them."""
    needs_onnx_export()
    base = bases("llama")
    out = tmp_path / "unmerged"
    compile_adapter(arrow_adapters("llama", base, tmp_path), base, "onnx-cpu", out, unmerged=True)
    examples = tmp_path / "examples.json"  # domain d's examples calibrate adapter task(2 - d)
    examples.write_text(json.dumps({f"task{2 - d}": domain_prompts(d, count=8, length=16, seed=1).tolist()
                                    for d in range(3)}))  # fmt: skip
    prompts = [domain_prompts(d, length=16, seed=7)[0].tolist() for d in range(3)]
    given = [arg for prompt in prompts for arg in ("--prompt-ids", ",".join(map(str, prompt)))]
    run = [*given, "--max-new-tokens", "1", "--json"]
    result = CliRunner().invoke(app, ["run", str(out), *run, "--route", "--route-examples", str(examples)])
    assert result.exit_code == 0, result.output
    assert [r["adapter"] for r in json.loads(result.stdout)["results"]] == ["task2", "task1", "task0"]
    examples.write_text(json.dumps({"task0": [[1, 2]]}))
    bad = CliRunner().invoke(app, ["run", str(out), *run, "--route", "--route-examples", str(examples)])
    assert bad.exit_code == 2 and "no examples for ['task1', 'task2']" in bad.output
    assert len(bad.output.strip().splitlines()) == 1, bad.output
    alone = CliRunner().invoke(app, ["run", str(out), *run, "--route-examples", str(examples)])
    assert alone.exit_code == 2 and "--route-examples calibrates --route" in alone.output
