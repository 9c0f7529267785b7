"""Own-pick with ideal prototypes from the inputs themselves: what |<x, v>| top-1 can do at best-ish."""
import sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]; sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT), str(Path(__file__).parent)]
import numpy as np, torch, importlib
torch.set_num_threads(1)
data = importlib.import_module(sys.argv[2] if len(sys.argv) > 2 else "_routing_data")
from _transfer_models import load
from adaptrix.api.route import module_inputs
base = Path(sys.argv[1])
model = load(base)
mods = [n for n, m in model.named_modules() if n.split(".")[-1] in ("q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj")]
X = {}
for d in data.DOMAINS:
    p, a = data.TASKS[d].scored()
    ids = torch.from_numpy(np.concatenate([p, a], 1))
    with torch.inference_mode():
        X[d] = module_inputs(model, mods, ids)
    n = ids.shape[1]
kinds = {"top sv of X_d": lambda xs, allx: torch.linalg.svd(xs, full_matrices=False).Vh[0],
         "mean_d - mean": lambda xs, allx: xs.mean(0) - allx.mean(0)}
for kind, f in kinds.items():
    bypos = np.zeros(n); per_mod = []
    for m in mods:
        allx = torch.cat([X[d][m] for d in data.DOMAINS])
        P = torch.stack([f(X[d][m], allx) for d in data.DOMAINS]); P = P / P.norm(dim=1, keepdim=True)
        own = 0
        for i, d in enumerate(data.DOMAINS):
            hit = ((X[d][m] @ P.T).abs().argmax(-1) == i).numpy()
            bypos += hit.reshape(-1, n).mean(0); own += hit.mean() / 4
        per_mod.append(own)
    print(kind, "per module", np.round(per_mod, 2))
    print(kind, "by position", np.round(bypos / (4 * len(mods)), 2))
