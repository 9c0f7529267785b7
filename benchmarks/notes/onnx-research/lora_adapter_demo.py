"""Hand-built ONNX graph y = x@W + (x@A)@B where A,B are graph inputs with zero-rank initializer defaults,
run (1) with no adapter, (2) with an .onnx_adapter active via RunOptions.add_active_adapter."""
import numpy as np, onnx, onnxruntime as ort
from onnx import helper as h, TensorProto as TP, numpy_helper as nh

D_IN, D_OUT, R = 32, 16, 4
rng = np.random.default_rng(0)
W = rng.standard_normal((D_IN, D_OUT)).astype(np.float32)
x = rng.standard_normal((2, 3, D_IN)).astype(np.float32)

A_name, B_name = "lora.layers.0.q_proj.lora_A", "lora.layers.0.q_proj.lora_B"
graph = h.make_graph(
    [h.make_node("MatMul", ["x", "W"], ["base"], name="/base/MatMul"),
     h.make_node("MatMul", ["x", A_name], ["xa"], name="/lora/MatMul_A"),
     h.make_node("MatMul", ["xa", B_name], ["xab"], name="/lora/MatMul_B"),
     h.make_node("Add", ["base", "xab"], ["y"], name="/lora/Add")],
    "lora_demo",
    inputs=[h.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", D_IN]),
            # LoRA params: graph inputs with a symbolic rank dim ...
            h.make_tensor_value_info(A_name, TP.FLOAT, [D_IN, "lora_rank"]),
            h.make_tensor_value_info(B_name, TP.FLOAT, ["lora_rank", D_OUT])],
    outputs=[h.make_tensor_value_info("y", TP.FLOAT, ["batch", "seq", D_OUT])],
    initializer=[nh.from_array(W, "W"),
                 # ... AND initializers of the same name with zero rank: defaults when no adapter is active
                 nh.from_array(np.zeros((D_IN, 0), np.float32), A_name),
                 nh.from_array(np.zeros((0, D_OUT), np.float32), B_name)],
)
model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
model.ir_version = 10
onnx.checker.check_model(model)
onnx.save(model, "/tmp/onnx-research/lora_demo.onnx")

sess = ort.InferenceSession("/tmp/onnx-research/lora_demo.onnx", providers=["CPUExecutionProvider"])
print("session inputs:", [(i.name, i.shape) for i in sess.get_inputs()])
print("overridable initializers:", [i.name for i in sess.get_overridable_initializers()])

y0 = sess.run(None, {"x": x})[0]
print("no adapter: maxdiff vs x@W =", np.abs(y0 - x @ W).max())

# write adapter file
A = rng.standard_normal((D_IN, R)).astype(np.float32); B = rng.standard_normal((R, D_OUT)).astype(np.float32)
af = ort.AdapterFormat()
af.set_adapter_version(1); af.set_model_version(1)
af.set_parameters({A_name: ort.OrtValue.ortvalue_from_numpy(A), B_name: ort.OrtValue.ortvalue_from_numpy(B)})
af.export_adapter("/tmp/onnx-research/demo.onnx_adapter")

rd = ort.AdapterFormat.read_adapter("/tmp/onnx-research/demo.onnx_adapter")
print("read back: versions", rd.get_format_version(), rd.get_adapter_version(), rd.get_model_version(),
      {k: v.shape() for k, v in rd.get_parameters().items()})

lora = ort.LoraAdapter(); lora.Load("/tmp/onnx-research/demo.onnx_adapter")
ro = ort.RunOptions(); ro.add_active_adapter(lora)
y1 = sess.run(None, {"x": x}, ro)[0]
print("adapter active: maxdiff vs x@W + x@A@B =", np.abs(y1 - (x @ W + x @ A @ B)).max())
print("back to plain RunOptions:", np.abs(sess.run(None, {"x": x})[0] - x @ W).max())
# feeding params directly as inputs also works (alternative to adapter files)
y2 = sess.run(None, {"x": x, A_name: A, B_name: B})[0]
print("direct feed: maxdiff", np.abs(y2 - y1).max())
# pitfall probes
try:
    sess.run(None, {"x": x, A_name: A, B_name: B}, ro); print("adapter + same-name feed: allowed")
except Exception as e: print("adapter + same-name feed:", str(e)[:150])
bad = ort.AdapterFormat(); bad.set_parameters({"W_not_an_input": ort.OrtValue.ortvalue_from_numpy(A)})
bad.export_adapter("/tmp/onnx-research/bad.onnx_adapter"); lb = ort.LoraAdapter(); lb.Load("/tmp/onnx-research/bad.onnx_adapter")
ro2 = ort.RunOptions(); ro2.add_active_adapter(lb)
try: sess.run(None, {"x": x}, ro2); print("unknown param name: silently ignored")
except Exception as e: print("unknown param name:", str(e)[:150])
two = ort.RunOptions(); two.add_active_adapter(lora); two.add_active_adapter(lora)
try: sess.run(None, {"x": x}, two); print("same adapter twice: ok")
except Exception as e: print("same adapter twice:", str(e)[:150])
