"""Train 4 LoRAs with a recipe on a base, then measure oracle, own-picks by position, PEFT Arrow top-1."""
import sys, json, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]; sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT), str(Path(__file__).parent)]
import numpy as np, torch
torch.set_num_threads(1)
import importlib
data = importlib.import_module(sys.argv[3] if len(sys.argv) > 3 else "_routing_data")
DOMAINS, TASKS = data.DOMAINS, data.TASKS
from _transfer_models import fit as _fit, load
import _routing_models as rm
rm.TASKS = TASKS
from _routing_models import correct
import diag

def fit(model, batches, steps, lr, seed, wd):
    return _fit(model, batches, steps, lr, seed, weight_decay=wd)

def train(base, out, task, r, seed):
    from peft import LoraConfig, get_peft_model
    if (out / "adapter_model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r["rank"], lora_alpha=r["alpha"], lora_dropout=0.0, target_modules=r["modules"], task_type="CAUSAL_LM")
    model = get_peft_model(load(base), cfg)
    if r.get("a_init") in ("data", "data_sv"):
        from adaptrix.api.route import module_inputs
        base_model = load(base)
        ids = torch.from_numpy(task.batch(np.random.default_rng(seed + 100), 256)[0])
        names = [n for n, m in base_model.named_modules() if n.split(".")[-1] in r["modules"]]
        with torch.inference_mode():
            X = module_inputs(base_model, names, ids)
        A0 = {}
        for n, x in X.items():
            _, sv, vh = torch.linalg.svd(x, full_matrices=False)
            A0[n] = vh[: r["rank"]] * ((sv[: r["rank"]] / sv[0])[:, None] ** r.get("a_pow", 1) if r["a_init"] == "data_sv" else 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                if r.get("a_init") in ("data", "data_sv"):
                    p.copy_(A0[n.split("base_model.model.")[1].split(".lora_A")[0]])
                p.mul_(r.get("a_scale", 1.0))
                if r.get("freeze_a"):
                    p.requires_grad_(False)
    t = time.time()
    losses = fit(model, lambda rng: task.batch(rng, r["batch"]), r["steps"], r["lr"], seed, r.get("wd", 0.0))
    model.save_pretrained(out)
    print(task.name, "losses", losses, f"{time.time()-t:.0f}s", flush=True)
    return out

def main():
    recipe = json.loads(sys.argv[2])
    base = Path(recipe.pop("base"))
    out = Path("/tmp/arrow/runs") / sys.argv[1]
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(recipe))
    adapters = {}
    for i, d in enumerate(DOMAINS):
        seed = recipe["seed"] + (i if recipe.get("seed_per_domain") else 0)
        adapters[d] = train(base, out / d, TASKS[d], recipe, seed)
    from peft import PeftModel
    orc = []
    for d in DOMAINS:
        m = PeftModel.from_pretrained(load(base), adapters[d]).eval()
        orc.append(correct(m, TASKS[d]).mean())
    print("oracle", np.round(orc, 2), f"mixed {np.mean(orc):.3f}", flush=True)
    diag.main(base, adapters, seeds=None)
    import _routing_score as score
    score.TASKS = TASKS
    for exact in (False, True):
        res = score.peft_arrow(base, adapters, 1, exact=exact)
        print(f"ARROW top1 exact={exact}", {d: round(float(v.mean()), 2) for d, v in res.items()}, f"mixed {np.mean([v.mean() for v in res.values()]):.3f}", flush=True)

main()
