"""Diagnostics of Arrow on the routing study's adapters."""
import sys, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]; sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT), str(Path(__file__).parent)]
import numpy as np, torch
from safetensors.torch import load_file
torch.set_num_threads(1)
from _routing_data import DOMAINS, TASKS
from _transfer_models import load, LORA_MODULES

def lora_weights(path):
    sd = load_file(str(Path(path) / "adapter_model.safetensors"))
    out = {}
    for k, v in sd.items():
        if "lora_A" in k:
            mod = k.split("base_model.model.")[1].split(".lora_A")[0]
            out.setdefault(mod, {})["A"] = v.float()
        if "lora_B" in k:
            mod = k.split("base_model.model.")[1].split(".lora_B")[0]
            out.setdefault(mod, {})["B"] = v.float()
    return out

def init_A(base, rank, seed, modules, init=None):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    kw = {} if init is None else {"init_lora_weights": init}
    m = get_peft_model(load(base), LoraConfig(r=rank, lora_alpha=2*rank, target_modules=modules, task_type="CAUSAL_LM", **kw))
    return {n.split("base_model.model.")[1].split(".lora_A")[0]: p.detach().clone().float() for n, p in m.named_parameters() if "lora_A" in n}

def top_v(M):
    return torch.linalg.svd(M).Vh[0]

def main(base, adapters, seeds=None, position_classes=None):
    W = {d: lora_weights(p) for d, p in adapters.items()}
    mods = sorted(W[DOMAINS[0]])
    protos = {m: torch.stack([top_v(W[d][m]["B"] @ W[d][m]["A"]) for d in DOMAINS]) for m in mods}
    model = load(base)
    from adaptrix.api.route import module_inputs
    X, pos = {}, {}
    for d in DOMAINS:
        prompts, answers = TASKS[d].scored()
        ids = torch.from_numpy(np.concatenate([prompts, answers], 1))
        with torch.inference_mode():
            X[d] = module_inputs(model, mods, ids)
        pos[d] = np.tile(np.arange(ids.shape[1]), ids.shape[0])
    n_pos = ids.shape[1]
    print("module | own-pick per domain | mean pairwise |cos| protos | |cos(proto, mean x)| | winner share")
    tot_by_pos = np.zeros(n_pos); cnt = 0
    for m in mods:
        P = protos[m]
        C = (P @ P.T).abs(); pair = (C.sum() - C.trace()) / 12
        allx = torch.cat([X[d][m] for d in DOMAINS]); mu = allx.mean(0); mu = mu / mu.norm()
        cm = (P @ mu).abs()
        own = []; winners = np.zeros(4)
        for i, d in enumerate(DOMAINS):
            pick = (X[d][m] @ P.T).abs().argmax(-1).numpy()
            own.append((pick == i).mean()); winners += np.bincount(pick, minlength=4)
            tot_by_pos += np.bincount(pos[d], weights=(pick == i), minlength=n_pos); cnt += 1
        xn = allx / allx.norm(dim=1, keepdim=True)
        meancos = (xn @ mu).abs().mean()
        print(f"{m:32s} own {' '.join(f'{o:.2f}' for o in own)} | pair {pair:.2f} | mu {' '.join(f'{c:.2f}' for c in cm)} | x.mu {meancos:.2f} | win {' '.join(f'{w/winners.sum():.2f}' for w in winners)}")
    print("own-pick by position (0 = bos, then the prompt, then the answer tokens as inputs):", np.round(tot_by_pos / (cnt * 64), 2))
    if seeds is not None:
        rank = W[DOMAINS[0]][mods[0]]["A"].shape[0]
        tm = sorted({m.split(".")[-1] for m in mods})
        for d in DOMAINS:
            A0 = init_A(base, rank, seeds[d], tm)
            ci, cl, ni, nl = [], [], [], []
            for m in mods:
                A, B = W[d][m]["A"], W[d][m]["B"]
                v = top_v(B @ A)
                ci.append(abs(float(v @ top_v(B @ A0[m])))); cl.append(abs(float(v @ top_v(B @ (A - A0[m])))))
                ni.append(float((B @ A0[m]).norm())); nl.append(float((B @ (A - A0[m])).norm()))
            print(f"{d}: |cos(proto, top of B A0)| {np.mean(ci):.2f}, |cos(proto, top of B (A-A0))| {np.mean(cl):.2f}; ||B A0|| {np.mean(ni):.3f} vs ||B (A-A0)|| {np.mean(nl):.3f}")

if __name__ == "__main__":
    cache = Path(sys.argv[1])
    base = next(cache.glob("base-*"))
    adapters = {d: next(cache.glob(f"lora-{d}-*")) for d in DOMAINS}
    main(base, adapters, seeds={d: 1 for d in DOMAINS})
