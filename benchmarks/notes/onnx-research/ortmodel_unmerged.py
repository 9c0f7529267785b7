"""ORTModelForCausalLM on the unmerged (LoRA-input) graph: loads (LoRA inputs are hidden overridable initializers);
activating an adapter requires passing RunOptions, which optimum does not expose -> wrap session.run."""
import functools, torch, onnxruntime as ort
from transformers import AutoModelForCausalLM
from optimum.onnxruntime import ORTModelForCausalLM
D = "/tmp/onnx-research/unmerged/llama"
om = ORTModelForCausalLM.from_pretrained(D, use_io_binding=False)
ids = torch.tensor([[5, 17, 33, 9, 64, 3]])
print("no adapter:", om.generate(ids, max_new_tokens=8, do_sample=False)[0, 6:].tolist())
la = ort.LoraAdapter(); la.Load(f"{D}/adapter_a.onnx_adapter")
ro = ort.RunOptions(); ro.add_active_adapter(la)
orig = om.session.run
om.session.run = lambda output_names, input_feed, run_options=None: orig(output_names, input_feed, ro)
print("adapter a :", om.generate(ids, max_new_tokens=8, do_sample=False)[0, 6:].tolist())
# batched left padding sanity check on the plain export
base = ORTModelForCausalLM.from_pretrained("/tmp/onnx-research/onnx/llama")
hf = AutoModelForCausalLM.from_pretrained("/tmp/onnx-research/tiny/llama").eval()
b = torch.tensor([[0, 0, 5, 17, 33], [7, 8, 9, 10, 11]]); am = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
print("left-padded batch ORT==HF:", torch.equal(base.generate(b, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0),
                                               hf.generate(b, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)))
