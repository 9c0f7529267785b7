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
share theirs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from adaptrix.passes.refit import add_pairs
from adaptrix.passes.refit_data import batches, read_prompts
from adaptrix.runtime.fit import find_module
from adaptrix.toolchain.checkpoint import Checkpoint
from adaptrix.toolchain.errors import BadInputError, UnsupportedError
from adaptrix.toolchain.ir import AdapterIR, LowRank
from adaptrix.toolchain.parity_run import load_auto

__all__ = ["DAMPING", "calibration_hessians", "gptq_blocks"]

DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default percdamp)


def calibration_hessians(
    base: Checkpoint, ir: AdapterIR, prompts: Path, modules: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """{initializer: the mean of x x^T over the calibration tokens} for `modules` (initializer: module)."""
    if any(not isinstance(op, LowRank) for _, op in ir):
        raise UnsupportedError("--calibration measures the merged model with LoRA ops only",
                               fix="leave out --calibration (round-to-nearest blocks)")  # fmt: skip
    ids = read_prompts(str(prompts), base.path, base.source.vocab_size)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def read(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return read

    with torch.inference_mode(False), torch.no_grad():
        model = add_pairs(load_auto(base.path), ir, base)
        removers = []
        for name in sorted(set(modules.values())):
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
    return {init: (sums[name] / counts[name]).numpy() for init, name in modules.items() if name in sums}


def gptq_blocks(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """(codes [N, K'] uint8, scales [N, blocks] float32, zero points [N, blocks] uint8) of a [K, N] weight.

    K' is K padded to whole blocks (padded rows quantize to 0). Codes decode as (code - zero) *
    scale; a symmetric scheme's zero is 2^(bits-1).
    """
    k, n = weight.shape
    blocks = -(-k // block_size)
    w = np.zeros((n, blocks * block_size), np.float64)
    w[:, :k] = weight.T
    h = np.eye(blocks * block_size)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPING * np.mean(np.diag(h)) * np.eye(len(h))
    inverse = np.linalg.inv(h)
    upper = np.linalg.cholesky(inverse).T  # H^-1 = U^T U, U upper triangular
    codes = np.zeros(w.shape, np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.uint8)
    top = (1 << bits) - 1
    for i in range(w.shape[1]):
        b = i // block_size
        if i % block_size == 0:
            scales[:, b], zeros[:, b] = _block_parameters(w[:, i : i + block_size], bits, symmetric)
        scale, zero = scales[:, b].astype(np.float64), zeros[:, b].astype(np.float64)
        code = np.clip(np.rint(w[:, i] / scale) + zero, 0, top)
        codes[:, i] = code
        error = (w[:, i] - (code - zero) * scale) / upper[i, i]
        w[:, i + 1 :] -= np.outer(error, upper[i, i + 1 :])
    return codes, scales, zeros


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
