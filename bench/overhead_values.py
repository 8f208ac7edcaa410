"""Where the eager 607M muP/plain gap comes from: forward+backward time of the muP and the plain
GPT-2048 with their own weights, with identical weights, and after 20 training steps each (own LRs),
then with the plain-trained weights copied into the muP model. CUDA only; run from the repo root:
`python bench/overhead_values.py` (results in docs/results.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import statistics

import torch

from mutransfer.engine.hparams import HParams
from mutransfer.engine.parametrize import build_model, make_optimizer
from mutransfer.run import experiment
from mutransfer.run.recipe import load_recipe
from mutransfer.run.train import loss_fn

r = load_recipe('bench/gpt-2048.yaml'); hp = HParams.from_train(r.train)
mup = experiment.build(r, 2048, hp, device='cuda')
torch.manual_seed(0)
pm = build_model(experiment.model_factory(r), 2048, r.model.args, 'cuda')
popt = make_optimizer([{"params": list(pm.parameters()), "weight_decay": 0.0}], 'adamw', hp, torch.device('cuda'))
it = experiment.data_stream(r, 'train', 0); x, y = next(it); x, y = x.cuda(), y.cuda()
def ev(fn, n=5):
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
def fb(m):
    def f():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = m(x)
        loss_fn('cross_entropy', out, y).backward()
        m.zero_grad(set_to_none=True)
    return f
def compare(tag):
    res = {'mup': [], 'plain': []}
    for rep in range(8):
        order = [('mup', mup.model), ('plain', pm)][:: 1 if rep % 2 == 0 else -1]
        for name, m in order:
            res[name].append(ev(fb(m)))
    a, b = statistics.median(res['mup']), statistics.median(res['plain'])
    print(f'{tag}: fwd+bwd mup {a:.2f} ms, plain {b:.2f} ms, ratio {a/b:.4f}')
for m in (mup.model, pm):
    fb(m)()
compare('own init (muP init vs PyTorch default init)')
pm.load_state_dict(mup.model.state_dict())
compare('identical weights (muP init copied into plain)')
# train each with its own optimizer for 20 steps, then compare fwd+bwd with the trained weights
for name, m, o in (('mup', mup.model, mup.optimizer), ('plain', pm, popt)):
    for _ in range(20):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = m(x)
        loss_fn('cross_entropy', out, y).backward(); o.step(); o.zero_grad(set_to_none=True)
compare('after 20 steps each (own LRs)')
sd = {k: v.clone() for k, v in pm.state_dict().items()}
mup.model.load_state_dict(sd)
compare('identical weights (plain-trained copied into muP)')
