"""Build decode-study variants from a merged fp32 onnx-cpu artifact, streaming one weight at a time.

python variants.py SRC OUT [--bits 4] [--block 32] [--acc 4] [--head/--no-head] [--gather] [--gqa] [--rotary]
"""
import argparse, collections, math, shutil, sys, time
from pathlib import Path
import numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto
from adaptrix.targets.onnx.external import read_initializer, write_model, external_location

def quantize_nbits(model, folder, values, bits, block, acc, head=True, sym=True):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    dead = set()
    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in inits: continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type != TensorProto.FLOAT: continue
        if not head and "lm_head" in node.name: continue
        w = np.ascontiguousarray(read_initializer(init, folder), dtype=np.float32)
        k, n = w.shape
        nb = (k + block - 1) // block
        if k % block: w = np.pad(w, ((0, nb * block - k), (0, 0)))
        packed = np.zeros((n, nb, block * bits // 8), dtype=np.uint8)
        scales = np.zeros((n, nb), dtype=np.float32)
        zp = np.zeros((n, (nb * bits + 7) // 8), dtype=np.uint8)
        (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, w, scales, zp, block, n, k, sym)
        qn, sn = init.name + f"_Q{bits}", init.name + "_scales"
        for name, arr in ((qn, packed), (sn, scales)):
            t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
            g.initializer.append(t); values[name] = arr
        ins = [node.input[0], qn, sn]
        if not sym:
            t = onnx.TensorProto(name=init.name + "_zp", data_type=TensorProto.UINT8, dims=zp.shape); g.initializer.append(t); values[t.name] = zp; ins.append(t.name)
        node.op_type, node.domain = "MatMulNBits", "com.microsoft"
        del node.input[:]; node.input.extend(ins); del node.attribute[:]
        node.attribute.extend([helper.make_attribute(a, v) for a, v in (("K", k), ("N", n), ("bits", bits), ("block_size", block)) ] + ([helper.make_attribute("accuracy_level", acc)] if acc else []))
        dead.add(init.name)
    keep = [i for i in g.initializer if i.name not in dead]
    del g.initializer[:]; g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

def quantize_int8(model, folder, values, per_channel=False, reduce_range=False, head=True):
    """Streaming dynamic int8: DynamicQuantizeMatMul with symmetric int8 weights."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    dead = set()
    qmax = 63 if reduce_range else 127
    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in inits: continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type != TensorProto.FLOAT: continue
        if not head and "lm_head" in node.name: continue
        w = np.asarray(read_initializer(init, folder), dtype=np.float32)
        amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
        scale = (np.maximum(amax, 1e-12) / qmax).astype(np.float32)
        q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
        scale = np.asarray(scale, dtype=np.float32).reshape(-1) if per_channel else np.asarray(scale, dtype=np.float32)
        qn, sn, zn = init.name + "_quantized", init.name + "_scale", init.name + "_zero_point"
        for name, arr in ((qn, q), (sn, scale), (zn, np.zeros(scale.shape, np.int8))):
            t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
            if arr.nbytes < 1024: t.raw_data = arr.tobytes()
            else: values[name] = arr
            g.initializer.append(t)
        node.op_type, node.domain = "DynamicQuantizeMatMul", "com.microsoft"
        ins = [node.input[0], qn, sn, zn]
        del node.input[:]; node.input.extend(ins)
        dead.add(init.name)
    keep = [i for i in g.initializer if i.name not in dead]
    del g.initializer[:]; g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

def quantize_gather(model, folder, block):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    for node in g.node:
        if node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            init = inits[node.input[0]]
            data = np.asarray(read_initializer(init, folder), dtype=np.float32)
            q, s, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(data, 1, block, True)
            qt = helper.make_tensor(init.name + "_Q4", TensorProto.INT4, data.shape, q.tobytes(), True)
            st = numpy_helper.from_array(s, init.name + "_scales")
            g.initializer.extend([qt, st])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            ins = [qt.name, node.input[1], st.name]
            node.op_type, node.domain = "GatherBlockQuantized", "com.microsoft"
            del node.input[:]; node.input.extend(ins); del node.attribute[:]
            node.attribute.extend([helper.make_attribute("gather_axis", axis), helper.make_attribute("quantize_axis", 1), helper.make_attribute("block_size", block)])
            keep = [i for i in g.initializer if i.name != init.name]
            del g.initializer[:]; g.initializer.extend(keep)
            print("gather quantized", init.name, data.shape)

def rope_caches(config_path, max_pos):
    import json, torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = AutoConfig.from_pretrained(config_path)
    rope_type = (getattr(cfg, "rope_scaling", None) or {}).get("rope_type", "default")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq.float())
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy(), cfg

def fuse_gqa(model, values, config_dir):
    g = model.graph
    inputs = {i.name: i for i in g.input}
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    past = inputs["past_key_values.0.key"].type.tensor_type.shape.dim
    kv_heads, head_dim = past[1].dim_value, past[3].dim_value
    by_name = {n.name: n for n in g.node}
    cfg_max = None
    cos, sin, cfg = rope_caches(config_dir, 0 or 1)
    max_pos = cfg.max_position_embeddings
    cos, sin, cfg = rope_caches(config_dir, max_pos)
    heads = cfg.num_attention_heads
    for name, arr in (("adaptrix/cos_cache", cos), ("adaptrix/sin_cache", sin)):
        g.initializer.append(onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape)); values[name] = np.ascontiguousarray(arr)
    one = numpy_helper.from_array(np.array([1], dtype=np.int64), "adaptrix/one")
    g.initializer.append(one)
    pre = [
        helper.make_node("ReduceSum", ["attention_mask", "adaptrix/one"], ["adaptrix/mask_sum"], keepdims=0, name="adaptrix/mask_sum"),
        helper.make_node("Sub", ["adaptrix/mask_sum", "adaptrix/one"], ["adaptrix/seqlens_k64"], name="adaptrix/seqlens_sub"),
        helper.make_node("Cast", ["adaptrix/seqlens_k64"], ["adaptrix/seqlens_k"], to=TensorProto.INT32, name="adaptrix/seqlens_cast"),
        helper.make_node("Shape", ["attention_mask"], ["adaptrix/mask_shape"], start=1, end=2, name="adaptrix/mask_shape"),
        helper.make_node("Cast", ["adaptrix/mask_shape"], ["adaptrix/total_len"], to=TensorProto.INT32, name="adaptrix/total_cast"),
    ]
    producer = {o: n for n in g.node for o in n.output}
    new_nodes = []
    for i in range(layers):
        p = f"/model/layers.{i}/self_attn"
        q, k, v, o = (by_name[f"{p}/{m}_proj/MatMul"] for m in "qkvo")
        attn = f"{p}/GroupQueryAttention_output_0"
        gqa = helper.make_node("GroupQueryAttention",
            [q.output[0], k.output[0], v.output[0], f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "adaptrix/seqlens_k", "adaptrix/total_len", "adaptrix/cos_cache", "adaptrix/sin_cache"],
            [attn, f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft", name=f"{p}/GroupQueryAttention",
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, local_window_size=-1)
        for out in (f"present.{i}.key", f"present.{i}.value"):
            old = producer[out]; old.output[list(old.output).index(out)] = out + "/unfused"
        o.input[0] = attn
        new_nodes.append((o, gqa))
    # insert each GQA right before its o_proj, the preamble first
    order = list(pre)
    gqa_for = {id(o): gqa for o, gqa in new_nodes}
    for n in g.node:
        if id(n) in gqa_for: order.append(gqa_for[id(n)])
        order.append(n)
    del g.node[:]; g.node.extend(order)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

def fuse_gqa_exact(model, values, config_dir, mask="/model/Expand_output_0"):
    """GQA keeping the graph's semantics: rotary from position_ids, padding + causal mask as attention_bias."""
    g = model.graph
    inputs = {i.name: i for i in g.input}
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    past = inputs["past_key_values.0.key"].type.tensor_type.shape.dim
    kv_heads = past[1].dim_value
    by_name = {n.name: n for n in g.node}
    cfg0 = rope_caches(config_dir, 1)[2]
    cos, sin, cfg = rope_caches(config_dir, cfg0.max_position_embeddings)
    heads = cfg.num_attention_heads
    for name, arr in (("adaptrix/cos_cache", cos), ("adaptrix/sin_cache", sin)):
        g.initializer.append(onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape)); values[name] = np.ascontiguousarray(arr)
    g.initializer.extend([numpy_helper.from_array(np.array([1], dtype=np.int64), "adaptrix/one"),
                          numpy_helper.from_array(np.array(0.0, dtype=np.float32), "adaptrix/zero_f"),
                          numpy_helper.from_array(np.array(np.finfo(np.float32).min, dtype=np.float32), "adaptrix/min_f")])
    pre = [
        helper.make_node("Shape", ["attention_mask"], ["adaptrix/batch"], start=0, end=1, name="adaptrix/batch"),
        helper.make_node("Shape", ["attention_mask"], ["adaptrix/total64"], start=1, end=2, name="adaptrix/total"),
        helper.make_node("Sub", ["adaptrix/total64", "adaptrix/one"], ["adaptrix/last64"], name="adaptrix/last"),
        helper.make_node("Expand", ["adaptrix/last64", "adaptrix/batch"], ["adaptrix/seqlens64"], name="adaptrix/seqlens_expand"),
        helper.make_node("Cast", ["adaptrix/seqlens64"], ["adaptrix/seqlens_k"], to=TensorProto.INT32, name="adaptrix/seqlens_cast"),
        helper.make_node("Cast", ["adaptrix/total64"], ["adaptrix/total_len"], to=TensorProto.INT32, name="adaptrix/total_cast"),
        helper.make_node("Where", [mask, "adaptrix/zero_f", "adaptrix/min_f"], ["adaptrix/attention_bias"], name="adaptrix/bias"),
    ]
    producer = {o: n for n in g.node for o in n.output}
    gqa_for = {}
    for i in range(layers):
        p = f"/model/layers.{i}/self_attn"
        q, k, v, o = (by_name[f"{p}/{m}_proj/MatMul"] for m in "qkvo")
        rq = helper.make_node("RotaryEmbedding", [q.output[0], "position_ids", "adaptrix/cos_cache", "adaptrix/sin_cache"], [f"{p}/q_rotary"], domain="com.microsoft", name=f"{p}/q_rotary", num_heads=heads, interleaved=0)
        rk = helper.make_node("RotaryEmbedding", [k.output[0], "position_ids", "adaptrix/cos_cache", "adaptrix/sin_cache"], [f"{p}/k_rotary"], domain="com.microsoft", name=f"{p}/k_rotary", num_heads=kv_heads, interleaved=0)
        attn = f"{p}/GroupQueryAttention_output_0"
        gqa = helper.make_node("GroupQueryAttention",
            [f"{p}/q_rotary", f"{p}/k_rotary", v.output[0], f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "adaptrix/seqlens_k", "adaptrix/total_len", "", "", "", "adaptrix/attention_bias"],
            [attn, f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft", name=f"{p}/GroupQueryAttention",
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=0, local_window_size=-1)
        for out in (f"present.{i}.key", f"present.{i}.value"):
            old = producer[out]; old.output[list(old.output).index(out)] = out + "/unfused"
        o.input[0] = attn
        gqa_for[id(o)] = [rq, rk, gqa]
    mask_at = next(j for j, n in enumerate(g.node) if mask in n.output)
    order = []
    for j, n in enumerate(g.node):
        order.extend(gqa_for.get(id(n), []))
        order.append(n)
        if j == mask_at: order.extend(pre)
    del g.node[:]; g.node.extend(order)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

def prune(model):
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n); needed.update(x for x in n.input if x)
    keep.reverse()
    removed = len(g.node) - len(keep)
    del g.node[:]; g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]; g.initializer.extend(inits)
    return removed

def rotary_fusion(model):
    from onnxruntime.transformers.optimizer import optimize_model
    om = optimize_model(model, model_type="bert", num_heads=32, hidden_size=2048, opt_level=0)
    return om.model

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path); ap.add_argument("out", type=Path)
    ap.add_argument("--bits", type=int, default=0); ap.add_argument("--block", type=int, default=32); ap.add_argument("--acc", type=int, default=4)
    ap.add_argument("--no-head", action="store_true"); ap.add_argument("--gather", action="store_true"); ap.add_argument("--gqa", action="store_true"); ap.add_argument("--rotary", action="store_true")
    ap.add_argument("--asym", action="store_true"); ap.add_argument("--skipln", action="store_true"); ap.add_argument("--exact", action="store_true"); ap.add_argument("--int8", action="store_true"); ap.add_argument("--per-channel", action="store_true"); ap.add_argument("--reduce-range", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    model = onnx.load(a.src / "model.onnx", load_external_data=False)
    values = {}
    n0 = len(model.graph.node)
    if a.gqa: fuse_gqa(model, values, a.src)
    if a.exact: fuse_gqa_exact(model, values, a.src)
    if a.rotary: model = rotary_fusion(model)
    if a.skipln:
        from onnxruntime.transformers.onnx_model import OnnxModel
        from onnxruntime.transformers.fusion_simplified_layernorm import FusionSimplifiedLayerNormalization, FusionSkipSimplifiedLayerNormalization
        om = OnnxModel(model)
        FusionSimplifiedLayerNormalization(om).apply()
        FusionSkipSimplifiedLayerNormalization(om).apply()
        om.prune_graph()
        model = om.model
    print("pruned", prune(model), "of", n0, "nodes")
    if a.int8: quantize_int8(model, a.src, values, per_channel=a.per_channel, reduce_range=a.reduce_range)
    if a.bits: quantize_nbits(model, a.src, values, a.bits, a.block, a.acc, head=not a.no_head, sym=not a.asym)
    if a.gather: quantize_gather(model, a.src, 32 if a.block < 32 else a.block)
    a.out.mkdir(parents=True, exist_ok=True)
    write_model(model, a.src, values, a.out, "model.onnx_data")
    print(f"wrote {a.out} in {time.perf_counter() - t0:.1f} s; nodes {len(model.graph.node)}; ops", collections.Counter(n.op_type for n in model.graph.node).most_common(8))

main()
