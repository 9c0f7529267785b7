"""Inject LoRA side branches (named inputs with zero-rank defaults) into the optimum llama export,
write a PEFT adapter as .onnx_adapter, and check against PEFT logits via raw ORT and via onnxruntime-genai Adapters."""
import os, shutil, json, numpy as np, torch, onnx, onnxruntime as ort
from onnx import helper as h, TensorProto as TP, numpy_helper as nh
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

SRC, BASE_ONNX, OUT = "/tmp/onnx-research/tiny/llama", "/tmp/onnx-research/onnx/llama", "/tmp/onnx-research/unmerged/llama"
TARGETS = ("q_proj", "v_proj", "down_proj")
shutil.rmtree(OUT, ignore_errors=True); shutil.copytree(BASE_ONNX, OUT)

m = onnx.load(f"{OUT}/model.onnx")
g = m.graph
inits = {i.name: i for i in g.initializer}
new_nodes, lora_names = [], []
for n in g.node:
    new_nodes.append(n)
    if n.op_type != "MatMul" or not any(f"/{t}/" in n.name for t in TARGETS): continue
    # '/model/layers.0/self_attn/q_proj/MatMul' -> 'model.layers.0.self_attn.q_proj'
    module = n.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
    x, w = n.input; d_in, d_out = inits[w].dims
    a, b = f"{module}.lora_A", f"{module}.lora_B"
    y = n.output[0]; base_y = y + "_base"; n.output[0] = base_y
    new_nodes += [h.make_node("MatMul", [x, a], [y + "_xa"], name=f"/{module.replace('.', '/')}/lora_A/MatMul"),
                  h.make_node("MatMul", [y + "_xa", b], [y + "_xab"], name=f"/{module.replace('.', '/')}/lora_B/MatMul"),
                  h.make_node("Add", [base_y, y + "_xab"], [y], name=f"/{module.replace('.', '/')}/lora/Add")]
    g.input.extend([h.make_tensor_value_info(a, TP.FLOAT, [d_in, "lora_rank"]),
                    h.make_tensor_value_info(b, TP.FLOAT, ["lora_rank", d_out])])
    g.initializer.extend([nh.from_array(np.zeros((d_in, 0), np.float32), a), nh.from_array(np.zeros((0, d_out), np.float32), b)])
    lora_names.append(module)
del g.node[:]; g.node.extend(new_nodes)
onnx.checker.check_model(m)
onnx.save(m, f"{OUT}/model.onnx")
print("lora modules:", lora_names)

# PEFT adapter with non-zero B
torch.manual_seed(1)
base = AutoModelForCausalLM.from_pretrained(SRC).eval()
ids = np.array([[5, 17, 33, 9, 64, 3]])
with torch.no_grad(): base_logits = base(torch.tensor(ids)).logits.numpy()
pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False)).eval()
with torch.no_grad(): lora_logits = pm(torch.tensor(ids)).logits.numpy()
params = {}
for mod in lora_names:
    lm = pm.base_model.model.get_submodule(mod)
    A = lm.lora_A["default"].weight.detach().numpy()          # [r, in]
    B = lm.lora_B["default"].weight.detach().numpy()          # [out, r]
    s = lm.scaling["default"]
    params[f"{mod}.lora_A"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(A.T))          # [in, r]
    params[f"{mod}.lora_B"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(B.T * s))      # [r, out], scaling folded
af = ort.AdapterFormat(); af.set_adapter_version(1); af.set_model_version(1)
af.set_parameters(params); af.export_adapter(f"{OUT}/adapter_a.onnx_adapter")

so = ort.SessionOptions(); so.log_severity_level = 3
sess = ort.InferenceSession(f"{OUT}/model.onnx", so, providers=["CPUExecutionProvider"])
print("visible inputs:", [i.name for i in sess.get_inputs()])
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None]}
for l in range(2):
    for kv in ("key", "value"): feed[f"past_key_values.{l}.{kv}"] = np.zeros((1, 2, 0, 8), np.float32)
print("no adapter vs base:", np.abs(sess.run(["logits"], feed)[0] - base_logits).max())
la = ort.LoraAdapter(); la.Load(f"{OUT}/adapter_a.onnx_adapter")
ro = ort.RunOptions(); ro.add_active_adapter(la)
print("adapter vs PEFT:", np.abs(sess.run(["logits"], feed, ro)[0] - lora_logits).max())

# onnxruntime-genai with adapters
import sys; sys.path.insert(0, "/tmp/onnx-research"); from og_run import write_genai_config
import onnxruntime_genai as og
write_genai_config(OUT, "llama")
model = og.Model(OUT); adapters = og.Adapters(model); adapters.load(f"{OUT}/adapter_a.onnx_adapter", "a")
def og_greedy(active):
    p = og.GeneratorParams(model); p.set_search_options(max_length=14, do_sample=False)
    gen = og.Generator(model, p)
    if active: gen.set_active_adapter(adapters, active)
    gen.append_tokens(np.array(ids, dtype=np.int32)); out = []
    while not gen.is_done(): gen.generate_next_token(); out.append(int(gen.get_next_tokens()[0]))
    return out
am = torch.ones(1, 6, dtype=torch.long)
with torch.no_grad():
    ref_l = pm.generate(input_ids=torch.tensor(ids), attention_mask=am, max_new_tokens=8, do_sample=False)[0, 6:].tolist()
    with pm.disable_adapter(): ref_b = pm.generate(input_ids=torch.tensor(ids), attention_mask=am, max_new_tokens=8, do_sample=False)[0, 6:].tolist()
print("og base   :", og_greedy(None), "hf", ref_b)
print("og adapter:", og_greedy("a"), "peft", ref_l)
