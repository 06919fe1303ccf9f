"""In-epsilon fraction per site and temperature for a counting decoder (held-out queries)."""
import sys, time, torch, numpy as np
import nbfeatures as nbf
from nbfeatures import zoo
from nbfeatures.data.counting import Counting
from nbfeatures.inversion import load_decoder, sample

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
folder = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else str(zoo.path("counting") / "inversion")
task, model, dec = Counting(), nbf.load_model("counting"), load_decoder(folder)
sites = sys.argv[3].split(",") if len(sys.argv) > 3 else list(dec.cfg.sites)
ids, colon, count = task.sample(10, seed=7)
t0 = time.perf_counter()
for site in sites:
    res = {0.5: [], 1.0: [], 2.0: []}
    for b in range(10):
        q, p = ids[b, : int(colon[b]) + 2], int(colon[b])
        s = sample(dec, model, site, query=q, position=p, temperatures=(0.5, 1.0, 2.0), n_per_temperature=16, seed=b)
        for t in res:
            res[t].append(float(s.inside[s.temperature == t].float().mean()))
    print(f"{site:28s}", "  ".join(f"T={t}: {np.mean(v):.3f}" for t, v in res.items()), flush=True)
print(f"{time.perf_counter() - t0:.0f} s")
