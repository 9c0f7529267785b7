"""--calibration: int4 / int8 blocks rounded by GPTQ, in MatMulNBits' own layout."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import prompts_file, sample_inputs
from onnx import TensorProto, helper
from test_onnx_parity import prefill, seeded_adapter, session
from test_onnx_unmerged import relative_error

from adaptrix.api.compile import compile_adapter
from adaptrix.ir.errors import AdaptrixError
from adaptrix.targets.onnx.gptq import gptq_blocks
from adaptrix.targets.onnx.quantize_schemes import gptq_arrays

pytestmark = pytest.mark.onnx_export


def decoded(codes, scales, zeros, block_size, k):
    """[K, N] weights the codes stand for: (code - zero) * scale per block."""
    n, blocks = scales.shape
    values = (codes.reshape(n, blocks, block_size).astype(np.float32) - zeros[..., None]) * scales[..., None]
    return values.reshape(n, -1)[:, :k].T


def matmul_nbits(arrays: dict, name: str, k: int, n: int, bits: int, block_size: int, x: np.ndarray):
    """onnxruntime's MatMulNBits on x with the arrays as its weight."""
    zero_points = [key for key in (f"{name}_zero_points",) if key in arrays]  # asymmetric int4 only
    inputs = ["x", f"{name}_Q{bits}", f"{name}_scales", *zero_points]
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block_size)  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(arrays[key], key) for key in inputs[1:]],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


def correlated(rng, tokens: int, k: int) -> np.ndarray:
    return (rng.standard_normal((tokens, k)) @ rng.standard_normal((k, k))).astype(np.float32)


@pytest.mark.parametrize(
    ("scheme", "bits", "k"), [("int4", 4, 64), ("int4", 4, 40), ("int4-sym", 4, 64), ("int8", 8, 64)]
)
def test_packed_codes_are_what_onnxruntime_computes_with(scheme, bits, k):
    """The arrays decode, through onnxruntime's kernel, to the weights GPTQ chose (K not whole blocks too)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, 24)).astype(np.float32)
    x = correlated(rng, 50, k)
    hessian = x.T.astype(np.float64) @ x / len(x)
    arrays = gptq_arrays(scheme, weight, "w", 32, hessian)
    codes, scales, zeros = gptq_blocks(weight, hessian, bits, 32, scheme in ("int8", "int4-sym"))
    expected = x @ decoded(codes, scales, zeros, 32, k)
    got = matmul_nbits(arrays, "w", k, 24, bits, 32, x[:7])
    # onnxruntime's accuracy level 0 default: float activations; the packing is exact or far off
    assert np.abs(got - expected[:7]).max() <= 1e-3 * np.abs(expected).max()


def straightforward_gptq(weight, hessian, block_size):
    """The paper's loop without lazy updates: every column's error fed onto all later columns at once."""
    from adaptrix.targets.onnx.gptq import FactorCache, _block_parameters

    k, n = weight.shape
    w = weight.T.copy()
    upper = FactorCache().upper(hessian, k)
    codes = np.zeros((n, k), np.uint8)
    for i in range(k):
        if i % block_size == 0:
            scale, zero = _block_parameters(w[:, i : i + block_size], 4, False)
        code = np.clip(np.rint(w[:, i] / scale) + zero, 0, 15)
        codes[:, i] = code
        error = (w[:, i] - (code - zero.astype(np.float32)) * scale) / upper[i, i]
        w[:, i + 1 :] -= np.outer(error, upper[i, i + 1 :])
    return codes


def test_lazy_updates_give_the_straightforward_result():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((320, 16)).astype(np.float32)  # three spans of 128 columns, the last partial
    x = correlated(rng, 600, 320)
    hessian = x.T.astype(np.float64) @ x / len(x)
    codes = gptq_blocks(weight, hessian, 4, 32, False)[0]
    assert np.mean(codes == straightforward_gptq(weight, hessian, 32)) > 0.999  # float summation order only


def test_identity_statistics_give_round_to_nearest_and_correlated_ones_less_output_error():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    x = correlated(rng, 400, 64)
    hessian = x.T.astype(np.float64) @ x / len(x)
    nearest = gptq_blocks(weight, np.eye(64), 4, 32, False)
    blocks = weight.T.reshape(32, 2, 32)
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = ((high - low) / 15).astype(np.float32)
    zero = np.clip(np.rint(-low / scale), 0, 15)
    rounded = np.clip(np.rint(blocks / scale[..., None]) + zero[..., None], 0, 15)
    assert np.array_equal(nearest[0].reshape(32, 2, 32), rounded.astype(np.uint8))  # H = I: no feedback
    errors = {}
    for name, codes in (("nearest", nearest), ("gptq", gptq_blocks(weight, hessian, 4, 32, False))):
        errors[name] = np.linalg.norm(x @ (weight - decoded(*codes, 32, 64)))
    assert errors["gptq"] < 0.8 * errors["nearest"], errors


@pytest.fixture(scope="module")
def calibrated(bases, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gptq")
    base = bases("llama")
    adapter = seeded_adapter("llama", base, tmp / "adapter")
    prompts_file(tmp / "calibration.json", 32, length=16, seed=5)
    return base, adapter, tmp


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_calibrated_blocks_stay_nearer_float32_than_rounded_ones(scheme, calibrated):
    base, adapter, tmp = calibrated
    outs = {}
    for name, extra in (("fp32", {}), ("nearest", {"quantize": scheme}),
                        ("gptq", {"quantize": scheme, "calibration": tmp / "calibration.json"})):  # fmt: skip
        outs[name] = compile_adapter(
            adapter, base, "onnx-cpu", tmp / f"{scheme}-{name}", **extra, force=True
        ).out
    section = json.loads((outs["gptq"] / "manifest.json").read_text())["onnx"]
    assert section["quantized"]["rounding"] == "gptq"
    assert section["quantized"]["gptq_weights"] == section["quantized"]["weights"] > 0
    assert (
        section["calibration"]["file"] == "calibration.json" and len(section["calibration"]["sha256"]) == 64
    )
    inputs = sample_inputs("llama")
    reference = prefill(session(outs["fp32"]), inputs)
    errors = {
        name: relative_error(prefill(session(outs[name]), inputs), reference) for name in ("nearest", "gptq")
    }
    assert errors["gptq"] < errors["nearest"], errors


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"calibration": "CAL"}, "--quantize is None"),
        ({"quantize": "int8-dynamic", "calibration": "CAL"}, "--quantize is int8-dynamic"),
        ({"quantize": "int4-sym", "calibration": "CAL"}, "--quantize is int4-sym"),
        ({"quantize": "int4", "calibration": "CAL", "unmerged": True}, "merged model's weights"),
        ({"quantize": "int4", "calibration": "MISSING"}, "no such file"),
    ],
)
def test_calibration_misuse_is_a_clear_error(options, match, calibrated):
    base, adapter, tmp = calibrated
    paths = {"CAL": tmp / "calibration.json", "MISSING": tmp / "none.json"}
    options = {key: paths.get(value, value) for key, value in options.items()}
    with pytest.raises(AdaptrixError, match=match):
        compile_adapter(adapter, base, "onnx-cpu", tmp / "refused", **options)
    assert not (tmp / "refused").exists()
    with pytest.raises(AdaptrixError, match="--calibration does not apply to --target merged"):
        compile_adapter(adapter, base, "merged", tmp / "refused", calibration=paths["CAL"])


def test_calibration_refuses_bottleneck_adapters(bases, tmp_path):
    from hub_builders import SeqBnConfig, save_hub

    base = bases("llama")
    adapter, _ = save_hub("llama", base, SeqBnConfig(reduction_factor=4), tmp_path / "hub")
    (tmp_path / "calibration.json").write_text("[[5, 6, 7, 8]]")
    options = {"quantize": "int4", "calibration": tmp_path / "calibration.json"}
    with pytest.raises(AdaptrixError, match="not bottlenecks"):
        compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
