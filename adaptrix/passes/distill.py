"""distill: carry a LoRA adapter to another base of its shape by training it against the adapted source.

Where the bases differ too much for any map of the weights (two independently trained models,
whose hidden coordinates and attention share nothing an adapter could be mapped through), what
can still be carried is what the adapter does. distill takes the user's prompts for the adapter's
task, lets the source carrying the adapter continue each one greedily (`generate` tokens), and
trains the adapter's LoRA factors on the base so that the base's next-token distributions at
those answer positions match the adapted source's (KL divergence, the source as teacher; the
method of Trans-LoRA, Wang et al. 2024, without its synthetic-data generator). It starts from
the adapter as carried so far (chain `refit` or `project` before it), keeps each module's rank
and scale, and trains A and B with AdamW for `steps` steps on batches of `batch` sequences,
through PEFT's own LoRA modules on the base (so a fused module, GPT-2's c_attn or Phi-3's
qkv_proj, is trained as PEFT trains it: one LoRA pair, whose A its roles then share). It is not
exact and it uses data: the report gives the divergence and the top-1 agreement with the teacher
before and after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptrix.calibration.models import add_pairs, load_auto
from adaptrix.calibration.peft_bridge import peft_student, trained_ops
from adaptrix.calibration.prompts import batches, calibration, is_causal, read_prompts
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import AdapterIR
from adaptrix.passes.base import PassResult, rebuild
from adaptrix.passes.project import source_base
from adaptrix.passes.refit import check_same_shape

__all__ = ["DistillOptions", "distill"]


@dataclass(frozen=True, slots=True)
class DistillOptions:
    """The options of distill.

    source: the directory of the base the adapter was made for. prompts: a file of prompts for the
    adapter's task (JSON token-id lists, or text lines for the base's tokenizer). generate: greedy
    tokens the adapted source adds to each prompt (the answer positions trained on). steps, lr,
    batch: AdamW steps (warm-up, then cosine decay), peak learning rate, sequences per step. seed: the
    order of the batches.
    """

    source: str = ""
    prompts: str = ""
    generate: int = 16
    steps: int = 300
    lr: float = 5e-3
    batch: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        """Require source and prompts, generate, steps and batch >= 1, lr > 0."""
        if not self.source or not self.prompts:
            raise ValueError("options source=DIR (the adapter's own base) and prompts=FILE are required")
        for name in ("generate", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"option lr={self.lr} must be > 0")


def distill(ir: AdapterIR, options: DistillOptions, base: Checkpoint) -> PassResult:
    """Train every LoRA op on the base against the adapted source (see the module docstring).

    Usage: `--pass distill:source=SRC_BASE,prompts=FILE[,generate=16,steps=300,lr=0.005,batch=64,
    seed=0]`. Report: the calibration's sequence and answer-token counts, and `kl` (mean KL
    divergence from the teacher per answer position, nats) and `agreement` (share of answer
    positions whose top-1 token is the teacher's) before and after training.
    """
    check_same_shape(ir, base, "distill")
    source = source_base(options.source, ir.source)
    prompts = read_prompts(options.prompts, base.path, base.source.vocab_size)
    with torch.inference_mode(False), torch.no_grad():
        teacher = add_pairs(load_auto(source.path), ir, source)
        if not is_causal(teacher):
            raise UnsupportedError(
                f"distill trains on a decoder's answers, and {source.path} is not a causal LM",
                fix="use --pass refit for encoders",
            )
        sequences = calibration(teacher, prompts, options.generate)
        data = [
            (ids, _answer_log_probs(teacher, ids, options.generate))
            for ids in batches(sequences, options.batch)
        ]
        del teacher
    student, state = peft_student(ir, base)
    before = _measure(student, data, options.generate)
    _train(student, data, options)
    after = _measure(student, data, options.generate)
    ops = trained_ops(student, state, base)
    report = {
        "sequences": len(sequences),
        "answer_tokens": len(sequences) * options.generate,
        "steps": options.steps,
        "kl": {"before": before[0], "after": after[0]},
        "agreement": {"before": before[1], "after": after[1]},
    }
    return PassResult(rebuild(ir, ops), True, report)


def _answer_log_probs(model: torch.nn.Module, ids: torch.Tensor, generate: int) -> torch.Tensor:
    """Log-probabilities [batch, generate, vocab] the model gives each answer token's position."""
    logits = model(input_ids=ids).logits[:, -generate - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def _kl(student_log_probs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per position."""
    return (teacher.exp() * (teacher - student_log_probs)).sum(-1).mean()


def _measure(model: torch.nn.Module, data: list, generate: int) -> tuple[float, float]:
    """(mean KL per answer position, top-1 agreement with the teacher) over the calibration."""
    kl, agree, count = 0.0, 0, 0
    with torch.inference_mode(False), torch.no_grad():
        for ids, teacher in data:
            got = _answer_log_probs(model, ids, generate)
            positions = teacher.shape[0] * teacher.shape[1]
            kl += float(_kl(got, teacher)) * positions
            agree += int((got.argmax(-1) == teacher.argmax(-1)).sum())
            count += positions
    return round(kl / count, 6), round(agree / count, 6)


def _train(model: torch.nn.Module, data: list, options: DistillOptions) -> None:
    """AdamW, warm-up then cosine decay; each epoch visits the batches in a seeded order."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    warmup = max(1, options.steps // 10)

    def factor(step: int) -> float:  # linear warm-up over a tenth of the steps, then a cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, options.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(options.seed)
    order: list[int] = []
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(options.steps):
            if not order:
                order = torch.randperm(len(data), generator=generator).tolist()
            ids, teacher = data[order.pop()]
            loss = _kl(_answer_log_probs(model, ids, options.generate), teacher)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
