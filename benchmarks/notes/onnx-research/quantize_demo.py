"""int8 dynamic quantization and int4 MatMulNBits on the tiny optimum llama export (+ unmerged LoRA graph).
int4 needs the `onnx-ir` package (not a declared dependency of onnxruntime 1.32)."""
import os, shutil, time, collections, numpy as np, onnx, onnxruntime as ort
from onnxruntime.quantization import quantize_dynamic, QuantType
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, DefaultWeightOnlyQuantConfig

def feed_for(sess, T=6):
    ids = np.array([[5, 17, 33, 9, 64, 3]])
    f = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(T)[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"): f[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return f

def ops(path): return dict(collections.Counter(n.op_type for n in onnx.load(path).graph.node if n.op_type in
                       ("MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "Gemm")))

def lora_nodes(path):
    """Nodes whose weight is a graph input (LoRA A/B with zero-rank defaults) must NOT be quantized,
    otherwise the quantizer folds them into constants and adapters can no longer override them."""
    g = onnx.load(path, load_external_data=False).graph
    ins = {i.name for i in g.input}
    return [n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and any(x in ins for x in n.input[1:])]

def quant_int8(src_dir, dst_dir):
    shutil.copytree(src_dir, dst_dir, dirs_exist_ok=True)
    quantize_dynamic(f"{src_dir}/model.onnx", f"{dst_dir}/model.onnx", weight_type=QuantType.QInt8,
                     per_channel=False, op_types_to_quantize=["MatMul", "Gemm"],
                     nodes_to_exclude=lora_nodes(f"{src_dir}/model.onnx"))

def quant_int4(src_dir, dst_dir, block_size=32, symmetric=True, accuracy_level=None):
    shutil.copytree(src_dir, dst_dir, dirs_exist_ok=True)
    m = onnx.load(f"{src_dir}/model.onnx")
    q = MatMulNBitsQuantizer(m, bits=4, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                             op_types_to_quantize=("MatMul",), nodes_to_exclude=lora_nodes(f"{src_dir}/model.onnx"))
    q.process()
    q.model.save_model_to_file(f"{dst_dir}/model.onnx", use_external_data_format=False)

if __name__ == "__main__":
    base = "/tmp/onnx-research/onnx/llama"; so = ort.SessionOptions(); so.log_severity_level = 3
    ref_s = ort.InferenceSession(f"{base}/model.onnx", so); ref = ref_s.run(["logits"], feed_for(ref_s))[0]
    for name, fn in [("int8", quant_int8), ("int4_b32", lambda a, b: quant_int4(a, b, 32)),
                     ("int4_b16", lambda a, b: quant_int4(a, b, 16)), ("int4_b128", lambda a, b: quant_int4(a, b, 128))]:
        dst = f"/tmp/onnx-research/quant/llama_{name}"; shutil.rmtree(dst, ignore_errors=True)
        t = time.time(); fn(base, dst); dt = time.time() - t
        s = ort.InferenceSession(f"{dst}/model.onnx", so)
        out = s.run(["logits"], feed_for(s))[0]
        print(f"{name}: {dt:.2f}s ops={ops(dst + '/model.onnx')} maxdiff={np.abs(out - ref).max():.3f} "
              f"argmax-agree={np.mean(out.argmax(-1) == ref.argmax(-1)):.2f} size={os.path.getsize(dst + '/model.onnx')}")
    # ORTModelForCausalLM on the int4 dir
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    om = ORTModelForCausalLM.from_pretrained("/tmp/onnx-research/quant/llama_int4_b32")
    print("ORTModelForCausalLM int4 generate:", om.generate(torch.tensor([[5, 17, 33]]), max_new_tokens=4, do_sample=False)[0].tolist())
    # unmerged graph: LoRA A/B are graph inputs with initializer defaults
    um = "/tmp/onnx-research/unmerged/llama"
    for name, fn in [("int8", quant_int8), ("int4", quant_int4)]:
        dst = f"/tmp/onnx-research/quant/unmerged_{name}"; shutil.rmtree(dst, ignore_errors=True)
        try:
            fn(um, dst)
            m = onnx.load(f"{dst}/model.onnx")
            lnodes = [(n.op_type, n.input[1]) for n in m.graph.node if "lora_A" in n.name][:2]
            s = ort.InferenceSession(f"{dst}/model.onnx", so)
            la = ort.LoraAdapter(); la.Load(f"{um}/adapter_a.onnx_adapter"); ro = ort.RunOptions(); ro.add_active_adapter(la)
            out = s.run(["logits"], feed_for(s), ro)[0]
            fp = ort.InferenceSession(f"{um}/model.onnx", so).run(["logits"], feed_for(s), ro)[0]
            print(f"unmerged {name}: lora nodes {lnodes}; ran with adapter, overridable={len(s.get_overridable_initializers())}, "
                  f"maxdiff vs fp32 unmerged+adapter={np.abs(out - fp).max():.3f}")
        except Exception as e:
            print(f"unmerged {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
