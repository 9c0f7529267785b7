"""merge.py's quantized-base case: the 1.1B fixture base quantized to NF4 by transformers, cached.

The base is loaded in bfloat16 and quantized by bitsandbytes on CPU (nf4, double quantization,
compute dtype bfloat16: the usual QLoRA setup), then saved with save_pretrained in 1 GB shards,
once, beside the fixture's base (minutes: bitsandbytes quantizes on the CPU).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import _measure as m

NAME = "base-nf4"
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype="bfloat16")  # fmt: skip
HERE = Path(__file__).resolve().parent


def build(base: Path | str, dest: Path | str) -> None:
    """Quantize `base` to NF4 with bitsandbytes and save it under `dest` (runs in a measured child)."""
    import torch
    import transformers as tf

    torch.set_num_threads(2)
    config = tf.BitsAndBytesConfig(**NF4)
    model = tf.AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.bfloat16)
    model.save_pretrained(dest, max_shard_size="1GB")


def ensure_nf4(fixture: Path) -> Path:
    """The fixture's base quantized to NF4 (fixture/base-nf4), built in a child process if missing."""
    final = fixture / NAME
    if (final / "config.json").is_file():
        print(f"quantized base: reusing {final}")
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{NAME}-", dir=fixture))
    log = fixture.parent / f"{fixture.name}-{NAME}-build.log"
    print(f"quantized base: quantizing the base to NF4 into {tmp} (one time, minutes)")
    code = f"import sys; sys.path.append({str(HERE)!r}); import _quantized_base as q; q.build(*sys.argv[1:])"
    s = m.run_measured([sys.executable, "-c", code, str(fixture / "base"), str(tmp)], log)
    if s.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"quantizing the base failed (rc={s.returncode}):\n{m.log_tail(log)}")
    tmp.rename(final)
    print(f"quantized base: built in {s.wall_s:.0f} s, peak RSS {s.peak_rss_mb:.0f} MB, "
          f"{m.dir_size_mb(final):.0f} MB")  # fmt: skip
    return final
