"""Patch LoRA-merged weights into a cached base ONNX export by mapping MatMul/Gemm node names back to modules.
Verified against PEFT merge_and_unload() logits for llama, gpt2 (Conv1D->Gemm), gpt_neox (fused qkv), bert."""
import sys, time, collections, numpy as np, torch, onnx, onnxruntime as ort
from onnx import numpy_helper as nh
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from peft import LoraConfig, get_peft_model

def module_weight_map(model_proto):
    """module name -> (node, weight initializer name, layout) for every MatMul/Gemm whose B input is an initializer."""
    inits = {i.name for i in model_proto.graph.initializer}
    # torch's exporter value-deduplicates equal parameters: duplicates become Identity(<first initializer>).
    # Resolve such Identity outputs back to the initializer.
    ident = {n.output[0]: n.input[0] for n in model_proto.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    out = {}
    for n in model_proto.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        if n.input[1] in ident:
            n.input[1] = ident[n.input[1]]        # rewire straight to the shared initializer (Identity becomes dead)
        if n.input[1] not in inits:
            continue
        module = n.name.strip("/").rsplit("/", 1)[0].replace("/", ".")   # '/model/layers.0/self_attn/q_proj/MatMul'
        transB = next((a.i for a in n.attribute if a.name == "transB"), 0)
        out[module] = (n, n.input[1], "out_in" if transB else "in_out")   # MatMul: stored [in, out] == W.T
    return out

def patch(model_proto, new_weights):
    """new_weights: module -> np.ndarray in torch nn.Linear layout [out, in] (Conv1D: already [in, out], pass conv1d=True)."""
    g = model_proto.graph
    by_name = {i.name: i for i in g.initializer}
    wmap = module_weight_map(model_proto)   # (also rewires Identity-dedup'd weights first)
    uses = collections.Counter(x for n in g.node for x in n.input)
    for module, (W, conv1d) in new_weights.items():
        node, iname, layout = wmap[module]
        arr = W if (conv1d or layout == "out_in") else W.T
        old = by_name[iname]
        assert tuple(old.dims) == arr.shape, (module, old.dims, arr.shape)
        t = nh.from_array(np.ascontiguousarray(arr.astype(nh.to_array(old).dtype)), iname)
        if uses[iname] > 1:                       # value-deduplicated by the torch exporter: give this node its own copy
            t.name = iname = f"{module}.weight.patched"; node.input[1] = iname; g.initializer.append(t)
        else:
            old.CopyFrom(t)

def run(fam, targets, enc=False):
    src, onnx_path = f"/tmp/onnx-research/tiny/{fam}", f"/tmp/onnx-research/onnx/{fam}/model.onnx"
    cls = AutoModelForSequenceClassification if enc else AutoModelForCausalLM
    torch.manual_seed(2)
    pm = get_peft_model(cls.from_pretrained(src).eval(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    merged = pm.merge_and_unload().eval()
    conv1d = fam == "gpt2"
    mp = onnx.load(onnx_path)
    onnx.checker.check_model(mp)
    t = time.time()
    new = {name: (mod.weight.detach().numpy(), conv1d) for name, mod in merged.named_modules()
           if name.split(".")[-1] in targets}
    patch(mp, new); dt = time.time() - t
    s = ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 17, 33, 9, 64, 3]])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    names = [i.name for i in s.get_inputs()]
    if "position_ids" in names: feed["position_ids"] = np.arange(6)[None]
    if "token_type_ids" in names: feed["token_type_ids"] = np.zeros_like(ids)
    for i in s.get_inputs():
        if i.name.startswith("past_key_values"): feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    with torch.no_grad(): ref = merged(torch.tensor(ids), attention_mask=torch.ones(1, 6, dtype=torch.long)).logits.numpy()
    out = s.run(["logits"], feed)[0]
    print(f"{fam}: patched {len(new)} modules in {dt*1000:.1f} ms, maxdiff vs merged torch = {np.abs(out - ref).max():.2e}")

if __name__ == "__main__":
    run("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    run("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj"])
    run("gpt2", ["c_attn", "c_proj", "c_fc"])
    run("gpt_neox", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    run("bert", ["query", "key", "value", "dense"], enc=True)
    run("roberta", ["query", "value"], enc=True)
    run("llama_dup", ["q_proj", "k_proj", "v_proj"])   # base with duplicated weights -> Identity-shared initializers
