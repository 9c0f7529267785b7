"""GPTQ for the blocked schemes (int4, int8): weights rounded with the error fed forward, on calibration data.

Round-to-nearest quantizes each weight alone. GPTQ (Frantar et al. 2022) quantizes a weight's
input rows one at a time and moves each row's rounding error onto the rows not yet quantized, in
the proportions that keep the layer's output on the calibration inputs closest:
min ||X W - X Q||^2, through the inverse of H = X^T X. The blocks are MatMulNBits' own (a scale,
and for int4 a zero point, per `block_size` input rows of each output column, taken when GPTQ
reaches the block's first row, from the weights as the error feedback has left them), so the
graph and its speed do not change; only the rounding does.

H comes from the model the graph computes: the base with the adapter's low-rank deltas added, in
float32 PyTorch, run over the user's calibration prompts; one H per module input (q, k and v
share one, gate and up another; float32 sums, a float64 factorisation per input).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from adaptrix.artifacts import find_module
from adaptrix.calibration.inputs import STAGES, input_group
from adaptrix.calibration.models import add_pairs, load_auto
from adaptrix.calibration.prompts import batches
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR, LowRank

__all__ = ["DAMPING", "FactorCache", "calibration_hessians", "gptq_blocks"]

DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default percdamp)
_SPAN = 128  # columns per lazy update (GPTQ's reference block), rounded to whole quantization blocks


def calibration_hessians(
    base: Checkpoint, ir: AdapterIR, ids: list[list[int]], modules: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """{initializer: the mean of x x^T over the calibration tokens} for `modules` (initializer: module)."""
    if any(not isinstance(op, LowRank) for _, op in ir):
        raise UnsupportedError("--calibration measures the merged model with LoRA ops only",
                               fix="leave out --calibration (round-to-nearest blocks)")  # fmt: skip
    readers = _shared_inputs(base, set(modules.values()))  # module -> the module whose input it reads
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def read(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return read

    with torch.inference_mode(False), torch.no_grad():
        model = add_pairs(load_auto(base.path), ir, base)
        removers = []
        for name in sorted(set(readers.values())):
            module = find_module(model, name)
            if module is None:
                raise BadInputError(f"--calibration: the loaded model has no module {name}")
            removers.append(module.register_forward_pre_hook(hook(name)))
        try:
            for batch in batches(ids):
                model(input_ids=batch)
        finally:
            for remover in removers:
                remover.remove()
        del model
    means = {name: (total / counts[name]).numpy() for name, total in sums.items()}  # float32
    return {init: means[readers[name]] for init, name in modules.items() if readers[name] in means}


def _shared_inputs(base: Checkpoint, names: set[str]) -> dict[str, str]:
    """Each module -> the first module of its layer that reads the same input (q, k, v; gate, up)."""
    groups: dict[tuple, list[str]] = {}
    for name in sorted(names):
        placement = base.binder.resolve(name)
        roles = placement.module.roles if placement is not None else ()
        if placement is None or not roles or any(role not in STAGES for role in roles):
            groups[(name,)] = [name]
            continue
        groups.setdefault(input_group(placement, base.source.num_layers), []).append(name)
    return {name: group[0] for group in groups.values() for name in group}


def gptq_blocks(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    factors: FactorCache | None = None,
):
    """(codes [N, K'] uint8, scales [N, blocks] float32, zero points [N, blocks] uint8) of a [K, N] weight.

    K' is K padded to whole blocks (padded rows quantize to 0). Codes decode as (code - zero) *
    scale; a symmetric scheme's zero is 2^(bits-1). The error feedback is applied lazily, as in
    GPTQ's reference: column by column inside a span of whole blocks, then onto the later columns
    in one product per span (the same result as feeding every column forward at once). Weights
    quantized one after another share `factors`, so those reading one input factorise H once.
    """
    k, n = weight.shape
    blocks = -(-k // block_size)
    w = np.zeros((n, blocks * block_size), np.float32)
    w[:, :k] = weight.T
    upper = (factors or FactorCache()).upper(hessian, blocks * block_size)
    dead = np.zeros(w.shape[1], bool)
    dead[:k] = np.diag(hessian) == 0
    w[:, dead] = 0.0
    codes = np.zeros(w.shape, np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.uint8)
    span = block_size * max(1, _SPAN // block_size)
    for start in range(0, w.shape[1], span):
        end = min(start + span, w.shape[1])
        part, errors = w[:, start:end].copy(), np.zeros((n, end - start), np.float32)
        for i in range(end - start):
            column = start + i
            if column % block_size == 0:
                b = column // block_size
                scales[:, b], zeros[:, b] = _block_parameters(part[:, i : i + block_size], bits, symmetric)
            b = column // block_size
            scale, zero = scales[:, b], zeros[:, b].astype(np.float32)
            code = np.clip(np.rint(part[:, i] / scale) + zero, 0, (1 << bits) - 1)
            codes[:, column] = code
            errors[:, i] = (part[:, i] - (code - zero) * scale) / upper[column, column]
            part[:, i + 1 :] -= np.outer(errors[:, i], upper[column, column + 1 : end])
        w[:, end:] -= errors @ upper[start:end, end:]
    return codes, scales, zeros


class FactorCache:
    """The last H's inverse factor: consecutive weights reading one input (q, k, v) factorise it once."""

    def __init__(self) -> None:
        self._hessian: np.ndarray | None = None
        self._upper: np.ndarray | None = None

    def upper(self, hessian: np.ndarray, size: int) -> np.ndarray:
        """U, upper triangular, U^T U = (H + damping)^-1; H padded to `size` (dead inputs: diagonal 1)."""
        if self._hessian is hessian and self._upper.shape[0] == size:
            return self._upper
        k = hessian.shape[0]
        h = torch.eye(size, dtype=torch.float64)
        h[:k, :k] = torch.from_numpy(hessian)
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        h += DAMPING * torch.mean(torch.diag(h)) * torch.eye(size, dtype=torch.float64)
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
            upper = torch.linalg.cholesky(inverse, upper=True).to(torch.float32).numpy()
        except torch.linalg.LinAlgError:
            raise BadInputError("--calibration: a weight's input statistics are not positive definite",
                                fix="give more (and more varied) calibration prompts") from None  # fmt: skip
        self._hessian, self._upper = hessian, upper
        return upper


def _block_parameters(block: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row of a [N, block] slice: its range, 0 included (as onnxruntime's kernel)."""
    top = (1 << bits) - 1
    if symmetric:
        amax = np.abs(block).max(axis=1)
        scale = np.where(amax > 0, amax / (top // 2), 1.0)
        return scale.astype(np.float32), np.full(len(block), 1 << (bits - 1), np.uint8)
    low, high = np.minimum(block.min(axis=1), 0.0), np.maximum(block.max(axis=1), 0.0)
    scale = np.where(high > low, (high - low) / top, 1.0)
    zero = np.clip(np.rint(-low / scale), 0, top)
    return scale.astype(np.float32), zero.astype(np.uint8)
