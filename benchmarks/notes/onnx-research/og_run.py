"""Write genai_config.json for an optimum decoder export and run greedy og generation; compare to transformers."""
import json, sys, os, shutil, time, numpy as np, torch
import onnxruntime_genai as og
from transformers import AutoModelForCausalLM, AutoConfig

def write_genai_config(onnx_dir, model_type, context_length=None, filename="model.onnx", provider=None, og_type=None):
    cfg = AutoConfig.from_pretrained(onnx_dir)
    nh = cfg.num_attention_heads
    import onnx
    g = onnx.load(os.path.join(onnx_dir, filename), load_external_data=False).graph
    in_names = {i.name for i in g.input}
    kv = next(i for i in g.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "attention_mask" in in_names: inputs["attention_mask"] = "attention_mask"
    if "position_ids" in in_names: inputs["position_ids"] = "position_ids"
    eos = cfg.eos_token_id
    so = {"log_id": "onnxruntime-genai", "provider_options": [] if provider is None else [{provider: {}}]}
    ctx = context_length or cfg.max_position_embeddings
    genai = {
        "model": {
            "bos_token_id": cfg.bos_token_id, "eos_token_id": eos,
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else (eos if isinstance(eos, int) else eos[0]),
            "context_length": ctx, "vocab_size": cfg.vocab_size,
            "type": og_type or model_type,
            "decoder": {
                "session_options": so, "filename": filename,
                "head_size": kv[3].dim_value, "hidden_size": cfg.hidden_size,
                "num_attention_heads": nh, "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": kv[1].dim_value,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": ctx, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }
    json.dump(genai, open(os.path.join(onnx_dir, "genai_config.json"), "w"), indent=2)
    return genai

if __name__ == "__main__":
    fam = sys.argv[1]; og_type = sys.argv[2] if len(sys.argv) > 2 else None
    d = f"/tmp/onnx-research/og/{fam}"
    shutil.rmtree(d, ignore_errors=True); shutil.copytree(f"/tmp/onnx-research/onnx/{fam}", d)
    write_genai_config(d, AutoConfig.from_pretrained(d).model_type, og_type=og_type)
    prompt = [5, 17, 33, 9, 64, 3]; N = 8
    t = time.time()
    model = og.Model(d)
    p = og.GeneratorParams(model); p.set_search_options(max_length=len(prompt) + N, do_sample=False)
    gen = og.Generator(model, p); gen.append_tokens(np.array([prompt], dtype=np.int32))
    toks = []
    while not gen.is_done():
        gen.generate_next_token(); toks.append(int(gen.get_next_tokens()[0]))
    hf = AutoModelForCausalLM.from_pretrained(f"/tmp/onnx-research/tiny/{fam}").eval()
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=N, do_sample=False)[0, len(prompt):].tolist()
    print(f"{fam}: og={toks} hf={ref} equal={toks == ref[:len(toks)] and len(toks)==len(ref)} ({time.time()-t:.2f}s)")
