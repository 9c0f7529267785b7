"""ONNX artifacts run with adaptrix.open_onnx: greedy ids and logits equal PEFT's; misfits are refused."""

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from builders import load_model, make_adapter, sample_inputs
from onnx_builders import write_onnx_adapter
from peft import PeftModel
from typer.testing import CliRunner

from adaptrix.api.compile import compile_adapter
from adaptrix.cli import app
from adaptrix.ir.errors import BadInputError
from adaptrix.runtimes.onnx.session import open_onnx

pytestmark = pytest.mark.onnx_export

runner = CliRunner()
TOLERANCE = 5e-4  # max |logits diff| against PEFT, float32
NEW_TOKENS = 10
DECODERS = ("llama", "gpt2")
ATTENTION_ONLY = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
# (artifact, adapter given to the artifact, adapter PEFT loads: None is the bare base)
VARIANTS = {
    "merged": ("merged", None, "one"),
    "unmerged-one": ("unmerged", "one", "one"),
    "unmerged-two": ("unmerged", "two", "two"),
    "unmerged-none": ("unmerged", None, None),
}


@dataclass(frozen=True)
class Built:
    family: str
    base: Path
    adapters: dict[str, Path]
    merged: Path
    unmerged: Path

    def artifact(self, kind: str) -> Path:
        return self.merged if kind == "merged" else self.unmerged

    def adapter_file(self, name: str) -> Path:
        return self.unmerged / "adapters" / f"{name}.onnx_adapter"


def build(family: str, base: Path, tmp: Path) -> Built:
    """Adapter `one` (rank 4, every usual module) and `two` (rank 2, attention only), compiled both ways."""
    one = make_adapter(family, base, tmp / "one")
    two = make_adapter(family, base, tmp / "two", seed=3, r=2, target_modules=ATTENTION_ONLY[family])
    merged = compile_adapter(one, base, "onnx-cpu", tmp / "merged").out
    unmerged = compile_adapter([one, two], base, "onnx-cpu", tmp / "unmerged", unmerged=True).out
    return Built(family, base, {"one": one, "two": two}, merged, unmerged)


@pytest.fixture(scope="module")
def built(bases, tmp_path_factory):
    """The artifacts of one family, built on first use and shared by this module's tests."""
    made = {}

    def get(family: str) -> Built:
        if family not in made:
            made[family] = build(family, bases(family), tmp_path_factory.mktemp(f"onnx-run-{family}"))
        return made[family]

    return get


@pytest.fixture(scope="module")
def opened(built):
    """Opened sessions, shared: (family, kind) -> OnnxArtifact."""
    sessions = {}

    def get(family: str, kind: str):
        if (family, kind) not in sessions:
            sessions[family, kind] = open_onnx(built(family).artifact(kind))
        return sessions[family, kind]

    return get


def peft_model(built: Built, adapter: str | None):
    model = load_model(built.family, built.base)
    return model if adapter is None else PeftModel.from_pretrained(model, built.adapters[adapter]).eval()


@torch.no_grad()
def peft_generate(built: Built, adapter: str | None, prompt: list[int]) -> list[int]:
    """transformers' greedy generate for exactly NEW_TOKENS tokens (no EOS stop, like ours by default)."""
    model = peft_model(built, adapter)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         do_sample=False)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def prompt(family: str) -> list[int]:
    return sample_inputs(family)["input_ids"][0].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", DECODERS)
def test_generate_matches_peft(family, variant, built, opened):
    kind, ours, theirs = VARIANTS[variant]
    expected = peft_generate(built(family), theirs, prompt(family))
    assert opened(family, kind).generate(prompt(family), NEW_TOKENS, adapter=ours) == expected


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_logits_match_peft_with_left_padding(family, variant, built, opened):
    kind, ours, theirs = VARIANTS[variant]
    ids = sample_inputs(family)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    expected = peft_model(built(family), theirs)(input_ids=ids, attention_mask=mask, position_ids=positions)
    found = opened(family, kind).logits(ids.numpy(), mask.numpy(), adapter=ours)
    assert found.shape == tuple(expected.logits.shape) and found.dtype == np.float32
    kept = mask.bool().numpy()
    assert np.abs(found[kept] - expected.logits.numpy()[kept]).max() <= TOLERANCE


def test_steps_with_the_cache_equal_one_pass(opened):
    model = opened("llama", "unmerged")
    ids = np.array(sample_inputs("llama", batch=1, length=9)["input_ids"])
    whole = model.logits(ids, adapter="two")
    first, past = model.step(ids[:, :5], adapter="two")
    rest, past = model.step(ids[:, 5:], past, attention_mask=np.ones((1, 9), np.int64), adapter="two")
    assert past["past_key_values.0.key"].shape == (1, 2, 9, 8)
    assert np.abs(np.concatenate([first, rest], axis=1) - whole).max() <= 1e-5


@torch.no_grad()
def test_encoder_logits_match_peft(bases, tmp_path_factory):
    made = build("bert", bases("bert"), tmp_path_factory.mktemp("onnx-run-bert"))
    inputs = sample_inputs("bert")
    model = open_onnx(made.unmerged)
    for adapter in ("one", "two", None):
        expected = peft_model(made, adapter)(**inputs).logits.numpy()
        found = model.logits(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), adapter=adapter)
        assert found.shape == expected.shape and np.abs(found - expected).max() <= TOLERANCE
    ids = inputs["input_ids"][0].tolist()
    result = runner.invoke(app, ["run", str(made.unmerged), "--prompt-ids", ",".join(map(str, ids)),
                                 "--prompt-ids", "5,6,7", "--adapter", "two"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [[float(v) for v in line.split()] for line in result.stdout.splitlines()]
    assert np.abs(np.array(rows[0]) - model.logits([ids], adapter="two")[0]).max() <= 1e-5
    assert len(rows) == 2 and len(rows[1]) == 3  # one row of 3 labels per input
    refused = runner.invoke(app, ["run", str(made.unmerged), "--prompt-ids", "5,6", "--max-new-tokens", "2"])
    assert refused.exit_code == 2 and "do not generate" in refused.output
    with pytest.raises(BadInputError, match="no KV cache"):
        model.generate([5, 6], 2)


def cli_ids(*args: str) -> list[int]:
    result = runner.invoke(app, ["run", *args, "--max-new-tokens", str(NEW_TOKENS), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"][0]["generated_ids"]


@pytest.mark.parametrize("family", DECODERS)
def test_cli_run_prints_the_same_ids(family, built):
    made, ids = built(family), ",".join(map(str, prompt(family)))
    expected = {name: peft_generate(made, name, prompt(family)) for name in ("one", "two", None)}
    assert cli_ids(str(made.merged), "--prompt-ids", ids) == expected["one"]
    assert cli_ids(str(made.unmerged), "--prompt-ids", ids) == expected[None]
    assert cli_ids(str(made.unmerged), "--prompt-ids", ids, "--adapter", "one") == expected["one"]
    by_file = str(made.adapter_file("two"))
    assert cli_ids(str(made.unmerged), "--prompt-ids", ids, "--adapter", by_file) == expected["two"]
    text = runner.invoke(app, ["run", str(made.merged), "--prompt-ids", ids, "--max-new-tokens", "3"])
    assert text.exit_code == 0 and text.stdout.strip() == ",".join(map(str, expected["one"][:3]))


def test_cli_decodes_text_when_the_artifact_has_a_tokenizer(built, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    artifact = shutil.copytree(built("llama").merged, tmp_path / "with-tokenizer")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(artifact)
    result = runner.invoke(app, ["run", str(artifact), "--prompt-ids", "5,6,7", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    ids, text = result.stdout.strip().splitlines()
    assert text == " ".join(f"w{i}" for i in ids.split(","))


def _words(artifact, chat_template: str | None = None) -> None:
    """A word-level tokenizer for the tiny vocabulary: w0 .. w127, split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(artifact)


def test_cli_run_prompt_generates_pefts_tokens_and_prints_their_text(built, tmp_path):
    made = built("llama")
    artifact = shutil.copytree(made.merged, tmp_path / "with-tokenizer")
    _words(artifact, "{% for m in messages %}w1 {{ m['content'] }} {% endfor %}w2")
    expected = peft_generate(made, "one", [5, 6, 7])
    result = runner.invoke(app, ["run", str(artifact), "--prompt", "w5 w6 w7", "--max-new-tokens",
                                 str(NEW_TOKENS), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["results"][0]
    assert found["prompt_ids"] == [5, 6, 7] and found["generated_ids"] == expected
    assert found["text"] == " ".join(f"w{i}" for i in expected)
    plain = runner.invoke(app, ["run", str(artifact), "--prompt", "w5 w6 w7", "--max-new-tokens", "3"])
    assert plain.stdout.strip().splitlines()[-1] == " ".join(f"w{i}" for i in expected[:3])
    chat = runner.invoke(app, ["run", str(artifact), "--prompt", "w5 w6", "--chat", "--json",
                               "--max-new-tokens", str(NEW_TOKENS)])  # fmt: skip
    assert chat.exit_code == 0, chat.output
    chatted = json.loads(chat.stdout)["results"][0]
    assert chatted["prompt_ids"] == [1, 5, 6, 2]
    assert chatted["generated_ids"] == peft_generate(made, "one", [1, 5, 6, 2])


def test_cli_run_prompt_refusals(built, tmp_path):
    bare = built("llama").merged
    for args, message in (
        (["--prompt", "w5"], "has no tokenizer transformers can load"),
        (["--prompt", "w5", "--prompt-ids", "5"], "either as --prompt TEXT or as --prompt-ids"),
        ([], "either as --prompt TEXT or as --prompt-ids"),
        (["--prompt-ids", "5", "--chat"], "--chat applies to --prompt"),
    ):
        result = runner.invoke(app, ["run", str(bare), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    artifact = shutil.copytree(bare, tmp_path / "no-template")
    _words(artifact)
    result = runner.invoke(app, ["run", str(artifact), "--prompt", "w5", "--chat"])
    assert result.exit_code == 2 and "without a chat template" in result.output


def _wrong_shape(params):
    name = next(k for k in params if k.endswith("q_proj.lora_A"))
    params[name] = np.zeros((33, 4), np.float32)
    return name, r"expected shape \[32, rank\], found \[33, 4\]"


def _ranks_differ(params):
    name = next(k for k in params if k.endswith("q_proj.lora_B"))
    params[name] = np.ascontiguousarray(params[name][:3])
    return name, "expected one rank, found 4 and 3"


def _unknown_name(params):
    params["model.layers.7.self_attn.q_proj.lora_A"] = params.pop(next(iter(params)))
    return "model.layers.7.self_attn.q_proj.lora_A", "found a name it does not have"


def _wrong_dtype(params):
    for name in params:
        params[name] = params[name].astype(np.float16)
    return next(iter(sorted(params))), "expected float32, found float16"


def _missing_half(params):
    name = next(k for k in params if k.endswith("v_proj.lora_B"))
    del params[name]
    return name, "found missing"


MISFITS = [_wrong_shape, _ranks_differ, _unknown_name, _wrong_dtype, _missing_half]


@pytest.mark.parametrize("misfit", MISFITS, ids=[f.__name__.strip("_") for f in MISFITS])
def test_misfit_adapter_files_are_refused(misfit, built, opened, tmp_path):
    made = built("llama")
    read = ort.AdapterFormat.read_adapter(str(made.adapter_file("one")))
    params = {name: value.numpy() for name, value in read.get_parameters().items()}
    named, message = misfit(params)
    file = write_onnx_adapter(tmp_path / "misfit.onnx_adapter", params, read.get_model_version())
    with pytest.raises(BadInputError, match=message) as error:
        opened("llama", "unmerged").load_adapter(file)
    assert error.value.line().startswith(f"{file}: parameter") and named in error.value.line()
    result = runner.invoke(app, ["run", str(made.unmerged), "--prompt-ids", "5,6", "--adapter", str(file)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and str(file) in result.output


def test_adapter_for_another_base_is_refused(bases, built, tmp_path):
    other = build("llama", bases("llama", "seed-5", seed=5), tmp_path)
    file = other.adapter_file("one")
    artifact = built("llama").unmerged
    result = runner.invoke(app, ["run", str(artifact), "--prompt-ids", "5,6", "--adapter", str(file)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: {file}: was compiled for another base")


def test_adapters_on_a_merged_artifact_are_refused(built, opened):
    with pytest.raises(BadInputError, match="compiled merged: it has no LoRA inputs"):
        opened("llama", "merged").generate([5, 6], 2, adapter=built("llama").adapter_file("one"))


def test_unknown_adapter_name_is_refused(opened):
    with pytest.raises(BadInputError, match=r"no adapter named 'three'.*\['one', 'two'\]"):
        opened("llama", "unmerged").load_adapter("three")


def test_bad_token_ids_are_refused(built, opened):
    with pytest.raises(BadInputError, match=r"token ids must lie in \[0, 128\)"):
        opened("gpt2", "merged").generate([5, 128], 2)
    with pytest.raises(BadInputError, match="positions, the model has 64"):
        opened("gpt2", "merged").generate([5, 6], 63)
    result = runner.invoke(app, ["run", str(built("gpt2").merged), "--prompt-ids", "5,x"])
    assert result.exit_code == 2 and "is not a list of token ids" in result.output


def _not_a_directory(artifact: Path, tmp: Path):
    return artifact / "model.onnx", "is not a directory"


def _no_manifest(artifact: Path, tmp: Path):
    return tmp, "no manifest.json: not an adaptrix artifact"


def _another_target(artifact: Path, tmp: Path):
    manifest = json.loads((artifact / "manifest.json").read_text())
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "target": "merged"}))
    return tmp / "manifest.json", "target 'merged' is not an ONNX target"


def _model_missing(artifact: Path, tmp: Path):
    shutil.copy(artifact / "manifest.json", tmp)
    return tmp, "model.onnx is missing"


NOT_ARTIFACTS = [_not_a_directory, _no_manifest, _another_target, _model_missing]


@pytest.mark.parametrize("make", NOT_ARTIFACTS, ids=[f.__name__.strip("_") for f in NOT_ARTIFACTS])
def test_what_is_not_an_onnx_artifact_is_refused(make, built, tmp_path):
    named, message = make(built("llama").merged, tmp_path)
    result = runner.invoke(app, ["run", str(named.parent if named.name == "manifest.json" else named),
                                 "--prompt-ids", "5"])  # fmt: skip
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert message in result.output and str(named) in result.output


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is there")
def test_cuda_without_onnxruntime_gpu_is_refused(built):
    with pytest.raises(BadInputError, match=r"has no CUDAExecutionProvider.*install onnxruntime-gpu"):
        open_onnx(built("llama").merged, "cuda")


def test_the_session_imports_no_compiler(built):
    code = (
        "import sys\n"
        "from adaptrix.runtimes.onnx.session import open_onnx\n"
        f"model = open_onnx({str(built('llama').unmerged)!r})\n"
        "model.generate([5, 6, 7], 3, adapter='one')\n"
        "heavy = {'torch', 'transformers', 'peft', 'optimum', 'onnx', 'typer', 'safetensors'}\n"
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_stop_at_eos_reads_the_generation_config(built, tmp_path):
    artifact = shutil.copytree(built("llama").unmerged, tmp_path / "eos")
    expected = peft_generate(built("llama"), None, prompt("llama"))
    config = json.loads((artifact / "generation_config.json").read_text())
    (artifact / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [expected[2]]}))
    model = open_onnx(artifact)
    stop = expected.index(expected[2]) + 1
    assert model.generate(prompt("llama"), NEW_TOKENS, stop_at_eos=True) == expected[:stop]
    assert model.generate(prompt("llama"), NEW_TOKENS) == expected


def test_manifest_and_graph_must_agree_on_lora_inputs(built, tmp_path):
    artifact = shutil.copytree(built("llama").unmerged, tmp_path / "edited")
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["onnx"]["lora"]["inputs"]["lm_head.lora_A"] = {"shape": [32, "rank"], "module": "lm_head"}
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInputError, match=r"lists LoRA input lm_head\.lora_A, which model\.onnx lacks"):
        open_onnx(artifact)
