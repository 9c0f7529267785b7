"""`adaptrix run`: try an ONNX or GGUF artifact without writing onnxruntime or llama.cpp code."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from adaptrix.artifacts import ADAPTERS_DIR, GGUF_MODEL
from adaptrix.cli.base import app, call, out
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@app.command("run")
def run_command(
    artifact: Annotated[Path, typer.Argument(help="ONNX (onnx-cpu / onnx-cuda) or GGUF artifact directory.")],
    prompt_ids: Annotated[
        list[str] | None,
        typer.Option("--prompt-ids", help="Token ids, comma-separated; repeat for more inputs."),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", help="Text, tokenized by the artifact's tokenizer; repeat for more."),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="--prompt as a user message in the tokenizer's chat template.")
    ] = False,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Decoders: ids to generate (16).")
    ] = None,
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="Unmerged: an adapter's name, or an .onnx_adapter file.")
    ] = None,
    routed: Annotated[
        bool,
        typer.Option("--route", help="Unmerged: run each prompt with the adapter adaptrix.route picks."),
    ] = False,
    route_examples: Annotated[
        Path | None,
        typer.Option(
            "--route-examples", help="With --route: pick by centroids calibrated on this JSON examples file."
        ),
    ] = None,
    provider: Annotated[str, typer.Option("--provider", help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", help="onnxruntime's intra-op threads.")] = None,
    eos: Annotated[bool, typer.Option("--stop-at-eos", help="Decoders: stop at EOS.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Run an ONNX or GGUF artifact: generated ids for decoders, the output rows for encoders."""
    from adaptrix.runtimes.onnx.session import open_onnx

    if bool(prompt_ids) == bool(prompt) or (chat and not prompt):
        call(lambda: _refuse_prompts(chat))
    if route_examples is not None and not routed:
        call(lambda: _refuse_examples(route_examples))
    if (artifact / GGUF_MODEL).is_file():
        options = {"threads": threads, "max_new_tokens": max_new_tokens, "adapter": adapter,
                   "stop_at_eos": eos}  # fmt: skip
        _run_gguf(artifact, prompt or [], prompt_ids or [], chat, options, as_json)
        return
    tokenizer = call(lambda: _tokenizer(artifact)) if prompt else None  # loaded once, for both ways
    if prompt:
        prompts = call(lambda: _encode(tokenizer, artifact, prompt, chat))
    else:
        prompts = call(lambda: [_parse_ids(text) for text in prompt_ids or ()])
    model = call(lambda: open_onnx(artifact, provider, threads))
    if routed:
        chosen = call(lambda: _routed(artifact, prompts, adapter, route_examples))
    else:
        chosen = [adapter] * len(prompts)
    results = []
    for ids, name in zip(prompts, chosen, strict=True):
        found = call(lambda ids=ids, name=name: _run_prompts(model, [ids], max_new_tokens, name, eos))
        results += [{**result, "adapter": name} if routed else result for result in found]
    if model.is_decoder and not prompt:
        tokenizer = call(lambda: _tokenizer(artifact))
    decode = model.is_decoder and tokenizer is not None
    for result in results if decode else ():
        ids = result["generated_ids"]
        result["text"] = call(lambda ids=ids: tokenizer.decode(ids, skip_special_tokens=True))
    if as_json:
        out.print_json(json.dumps({"task": model.task, "adapter": adapter, "results": results}))
        return
    for result in results:
        if model.is_decoder:
            lines = [",".join(map(str, result["generated_ids"])), *([result["text"]] if decode else [])]
        else:
            value = result[model.section["outputs"][0]]
            rows = value if value and isinstance(value[0], list) else [value]
            lines = [" ".join(f"{value:.6g}" for value in row) for row in rows]
        lines = [f"adapter: {result['adapter']}", *lines] if routed else lines
        for line in lines:
            out.print(line, markup=False, highlight=False, soft_wrap=True)


def _routed(artifact: Path, prompts: list[list[int]], adapter: str | None, examples) -> list[str]:
    """The adapter adaptrix.route picks for each prompt (the base, named by the manifest, loaded once).

    With `examples` (an examples file): by the centroids adaptrix.calibrate_route makes of it, once.
    """
    from adaptrix.api.route import base_model, read_router, route
    from adaptrix.api.route_centroids import calibrate_route

    if adapter is not None:
        raise BadInputError("--route picks the adapter itself", fix="give --route or --adapter, not both")
    router = read_router(artifact)
    if not (artifact / ADAPTERS_DIR).is_dir():
        raise BadInputError("routes per token in its graph already; --route picks one of an unmerged "
                            "artifact's adapters", path=artifact, fix="leave out --route")  # fmt: skip
    model = base_model(router)
    picker = router if examples is None else calibrate_route(router, examples, model)
    return [route(picker, ids, model) for ids in prompts]


def _refuse_examples(examples: Path) -> None:
    raise BadInputError("--route-examples calibrates --route", path=examples,
                        fix="add --route, or leave out --route-examples")  # fmt: skip


def _run_prompts(model, prompts: list[list[int]], max_new_tokens: int | None, adapter, eos) -> list[dict]:
    """Per prompt: the generated ids (decoders) or the graph's first output (encoders)."""
    if not model.is_decoder and (max_new_tokens is not None or eos):
        raise BadInputError(f"{model.task} models do not generate: --max-new-tokens and --stop-at-eos "
                            "apply to decoders")  # fmt: skip
    if not model.is_decoder:
        name = model.section["outputs"][0]
        return [{"prompt_ids": ids, name: model.logits([ids], adapter=adapter)[0].tolist()}
                for ids in prompts]  # fmt: skip
    count = 16 if max_new_tokens is None else max_new_tokens
    return [{"prompt_ids": ids, "generated_ids": model.generate(ids, count, adapter=adapter, stop_at_eos=eos)}
            for ids in prompts]  # fmt: skip


def _run_gguf(
    artifact: Path, texts: list[str], ids_text: list[str], chat: bool, options: dict, as_json
) -> None:
    """A GGUF artifact, run by llama.cpp: greedy ids, and their text by the GGUF's own tokenizer."""
    from adaptrix.runtimes.gguf import open_gguf

    model = call(lambda: open_gguf(artifact, options.pop("threads")))
    count = options.pop("max_new_tokens")
    if texts:
        encode = model.chat if chat else model.tokenize
        prompts = [call(lambda text=text: encode(text)) for text in texts]
    else:
        prompts = [call(lambda text=text: _parse_ids(text)) for text in ids_text]
    results = []
    for ids in prompts:
        generated = call(lambda ids=ids: model.generate(ids, 16 if count is None else count, **options))
        results.append({"prompt_ids": ids, "generated_ids": generated, "text": model.detokenize(generated)})
    if as_json:
        out.print_json(json.dumps({"task": model.task, "adapter": options["adapter"], "results": results}))
        return
    for result in results:
        for line in (",".join(map(str, result["generated_ids"])), result["text"]):
            out.print(line, markup=False, highlight=False, soft_wrap=True)


def _refuse_prompts(chat: bool) -> None:
    if chat:
        raise BadInputError("--chat applies to --prompt", fix="give the text with --prompt")
    raise BadInputError("give the inputs either as --prompt TEXT or as --prompt-ids 1,2,3 (one of them)")


def _encode(tokenizer, artifact: Path, texts: list[str], chat: bool) -> list[list[int]]:
    """Each text as token ids of the artifact's own tokenizer (with `chat`, in its chat template)."""
    if tokenizer is None:
        raise BadInputError("has no tokenizer transformers can load, so --prompt cannot be tokenized",
                            path=artifact, fix="pass token ids with --prompt-ids")  # fmt: skip
    if chat and not getattr(tokenizer, "chat_template", None):
        raise BadInputError("has a tokenizer without a chat template", path=artifact,
                            fix="drop --chat, or compile from a base whose tokenizer has one")  # fmt: skip
    ids = []
    for text in texts:
        if chat:
            message = [{"role": "user", "content": text}]
            encoded = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True)
            encoded = encoded["input_ids"] if isinstance(encoded, dict) else encoded
        else:
            encoded = tokenizer(text)["input_ids"]
        if not encoded:
            raise BadInputError(f"--prompt {text[:40]!r} has no tokens", fix="give a non-empty text")
        ids.append([int(i) for i in encoded])
    return ids


def _parse_ids(text: str) -> list[int]:
    """Comma-separated token ids as a list of ints."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise BadInputError(f"--prompt-ids {text!r} is not a list of token ids",
                            fix="pass integers separated by commas, e.g. 1,2,3") from None  # fmt: skip


def _tokenizer(artifact: Path):
    """The artifact's tokenizer, when it holds tokenizer files transformers can load.

    Never the artifact's own Python (`auto_map`): transformers would ask on stdout whether to run
    it; with trust_remote_code=False it uses its own class or refuses, and the ids stay undecoded.
    """
    if not any((artifact / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(artifact, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        text = " ".join(str(exc).split())
        if _asks_for_code(artifact / "tokenizer_config.json"):
            text = "tokenizer_config.json names Python of its own (auto_map), which Adaptrix never runs"
        logging.getLogger(__name__).warning("not decoding: %s has no usable tokenizer: %s", artifact, text)
        return None


def _asks_for_code(config: Path) -> bool:
    """Whether a tokenizer config names Python of its own (`auto_map`)."""
    if not config.is_file():
        return False
    try:
        return isinstance(value := read_json(config, what="tokenizer config"), dict) and "auto_map" in value
    except BadInputError:
        return False
