"""The gguf benchmark's inputs: the merge fixture's base with a Llama tokenizer, and llama.cpp's converter.

llama.cpp's `convert_hf_to_gguf.py` and Adaptrix's gguf target both carry the tokenizer into the
GGUF metadata, so the base needs one; merge.py's fixture has none (random weights). This writes a
synthetic Llama-2-style fast tokenizer (BPE with byte fallback, sentencepiece-style "▁" spaces, the
shape llama.cpp reads through its LlamaHfVocab) of exactly the model's vocabulary size next to
hard links of the fixture's weights. The converter comes from the source package (sdist) of the
installed llama-cpp-python, which vendors llama.cpp: it is downloaded once into the cache with pip.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

__all__ = ["base_with_tokenizer", "converter", "converter_env", "write_llama_tokenizer"]

SPACE = "\u2581"  # sentencepiece's word boundary
ALPHABET = SPACE + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-"
SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "requirements/")
# convert_hf_to_gguf.py imports sentencepiece for every Llama model (before looking for tokenizer.model):
# the range is the one in llama.cpp's requirements-convert_legacy_llama.txt.
CONVERTER_DEPS = {"sentencepiece": "sentencepiece>=0.1.98,<0.3.0"}


def _pieces(count: int) -> list[str]:
    """count distinct pieces: the alphabet, then every pair, then triples (each a pair + a character)."""
    singles = list(ALPHABET)
    pairs = ["".join(p) for p in itertools.product(ALPHABET, repeat=2)]
    triples = (p + c for p in pairs for c in ALPHABET)
    return list(itertools.islice(itertools.chain(singles, pairs, triples), count))


def write_llama_tokenizer(dest: Path, vocab_size: int) -> None:
    """Write tokenizer.json + tokenizer_config.json: a Llama-2-style BPE tokenizer of vocab_size tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    head = SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size < len(head) + len(ALPHABET):
        raise ValueError(f"vocab_size {vocab_size} < {len(head) + len(ALPHABET)} (specials, bytes, alphabet)")
    pieces = _pieces(vocab_size - len(head))
    vocab = {tok: i for i, tok in enumerate(head + pieces)}
    merges = [(p[:-1], p[-1]) for p in pieces if len(p) > 1]
    model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    tok.add_special_tokens(SPECIALS)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
              "legacy": False, "model_max_length": 2048,
              "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def base_with_tokenizer(base: Path, dest: Path, vocab_size: int) -> Path:
    """dest: hard links (copies across file systems) of base's files plus a tokenizer; built once."""
    if (dest / "tokenizer.json").is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{dest.name}-", dir=dest.parent))
    for f in sorted(p for p in base.iterdir() if p.is_file()):
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    write_llama_tokenizer(tmp, vocab_size)
    os.rename(tmp, dest)
    return dest


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (its sdist vendors the matching llama.cpp)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python (built from its sdist)")


def _sdist(cache: Path, version: str) -> Path:
    """The llama-cpp-python sdist of version in cache, downloaded with pip when missing."""
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (cache / name).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", str(cache)]  # fmt: skip
        print(f"converter: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    if not (cache / name).is_file():
        sys.exit(f"pip download did not leave {name} in {cache}")
    return cache / name


def converter(cache: Path) -> Path:
    """Path of convert_hf_to_gguf.py from the installed llama-cpp-python's sdist (extracted once)."""
    version = llama_cpp_version()
    root = cache / f"llama.cpp-{version}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdist = _sdist(cache, version)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{root.name}-", dir=cache))
    with tarfile.open(sdist) as tar:
        members = [t for t in tar.getmembers() if t.name.startswith(prefix) and (t.isfile() or t.isdir())
                   and t.name[len(prefix):].startswith(CONVERTER_FILES)]  # fmt: skip
        for t in members:
            t.name = t.name[len(prefix) :]
        tar.extractall(tmp, members=members, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"{sdist} has no {prefix}convert_hf_to_gguf.py")
    os.rename(tmp, root)
    return script


def converter_env(cache: Path) -> dict:
    """Environment for the converter: missing requirements of the converter from the cache.

    A requirement that this Python lacks is installed once with pip into cache/converter-deps (never
    into the environment) and put on the child's PYTHONPATH. The converter imports the gguf-py of its
    own llama.cpp (its default): the installed gguf 0.19.0 from PyPI lacks what it calls
    (gguf.LazyChunkedTensor), so NO_LOCAL_GGUF stays unset.
    """
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    missing = [spec for mod, spec in CONVERTER_DEPS.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return env
    deps = cache / "converter-deps"
    if not all((deps / mod).is_dir() for mod, spec in CONVERTER_DEPS.items() if spec in missing):
        cmd = [sys.executable, "-m", "pip", "install", "--target", str(deps), "--no-deps", *missing]
        print(f"converter: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deps), env.get("PYTHONPATH")]))
    return env
