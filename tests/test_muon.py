"""optimizer: muon: the LR rule by hand, the spectral condition measured on Muon's first update
(slopes, a fixed-dimension matrix included), the proxy equal to plain torch Muon + AdamW, bit-exact
resume through scale, and the commands end to end."""
import copy

import pytest
import torch
import yaml
from torch import nn

from mutransfer.engine import spectral
from mutransfer.engine.hparams import HParams
from mutransfer.engine.parametrize import parametrize
from mutransfer.run.coord import loglog_slope

from helpers import cli_in  # tests/ is on sys.path (pytest's rootdir-relative import)

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


def test_muon_rule_by_hand():
    assert spectral.muon_lr_scale(64, 256) == 2.0 and spectral.muon_lr_scale(256, 64) == 0.5
    assert spectral.torch_muon_factor((256, 64)) == 2.0 and spectral.torch_muon_factor((64, 256)) == 1.0
    assert spectral.torch_muon_factor((64, 256), "match_rms_adamw") == pytest.approx(0.2 * 16)


class Bottleneck(nn.Module):
    """inp (8 -> w), hidden (w -> w), squeeze (w -> 32, one fixed dimension), expand (32 -> w), out."""

    def __init__(self, width):
        super().__init__()
        self.inp, self.hidden = nn.Linear(8, width), nn.Linear(width, width)
        self.squeeze, self.expand = nn.Linear(width, 32), nn.Linear(32, width)
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        h = torch.relu(self.hidden(torch.relu(self.inp(x))))
        return self.out(torch.relu(self.expand(torch.relu(self.squeeze(h)))))


def _first_update_norms(width):
    hp = HParams(lr=0.02, adam_lr=1e-3, weight_decay=0.0)
    model, opt, plan = parametrize(lambda width: Bottleneck(width), width, 64, hp, "muon", seed=0,
                                   example=torch.randn(2, 8), muon_params=("squeeze.weight", "expand.weight"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), torch.randint(0, 4, (64,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return {n: float(torch.linalg.matrix_norm((p - before[n]).detach(), ord=2))
            for n, p in model.named_parameters() if p.dim() == 2}, plan


def test_first_muon_update_follows_the_spectral_condition():
    ws = [64, 128, 256, 512]
    norms = {w: _first_update_norms(w) for w in ws}
    plan = norms[64][1]
    assert {n: p.optimizer for n, p in plan.params.items() if p.optimizer == "muon"} == {
        "hidden.weight": "muon", "squeeze.weight": "muon", "expand.weight": "muon"}
    for name, want in (("hidden.weight", 0.0), ("squeeze.weight", -0.5), ("expand.weight", +0.5)):
        slope = loglog_slope(ws, [norms[w][0][name] for w in ws])
        assert slope == pytest.approx(want, abs=0.12), (name, slope)


def test_proxy_is_plain_torch_muon_plus_adamw():
    torch.manual_seed(0)
    hp = HParams(lr=0.02, adam_lr=3e-3, weight_decay=0.05, muon_momentum=0.9, ns_steps=4)
    model, opt, plan = parametrize(lambda width: Bottleneck(width), 64, 64, hp, "muon", seed=0,
                                   example=torch.randn(2, 8))
    ref = copy.deepcopy(model)
    hidden = [p for n, p in ref.named_parameters() if n == "hidden.weight"]
    rest = [p for n, p in ref.named_parameters() if n != "hidden.weight"]
    ref_opts = [torch.optim.Muon(hidden, lr=0.02, weight_decay=0.05, momentum=0.9, ns_steps=4),
                torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, foreach=True)]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        for m, step in ((model, lambda: opt.step()), (ref, lambda: [o.step() for o in ref_opts])):
            nn.functional.cross_entropy(m(x), y).backward()
            step()
        opt.zero_grad()
        for o in ref_opts:
            o.zero_grad()
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n


BASE = {"name": "mu", "model": {"factory": "builtin:gpt", "args": {"layers": 1, "heads": 2, "vocab": 256, "seq_len": 16}},
        "data": {"factory": "builtin:pysource", "args": {"seq_len": 16}},
        "widths": {"proxy": 16, "target": 32},
        "train": {"optimizer": "muon", "lr": 0.02, "adam_lr": 3e-3, "steps": 8, "batch_size": 4, "eval_batches": 1,
                  "weight_decay": 0.01},
        "search": {"trials": 2, "params": {"lr": {"low": 0.005, "high": 0.05, "log": True},
                                           "adam_lr": {"low": 1e-3, "high": 1e-2, "log": True}}}}


cli = cli_in

def test_muon_end_to_end_and_bit_exact_resume(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(BASE))
    assert cli(tmp_path, "tune", r).exit_code == 0
    hp = yaml.safe_load((tmp_path / "runs" / "mu" / "hparams.yaml").read_text())
    assert hp["optimizer"] == "muon" and "adam_lr" in hp["hparams"]
    res = cli(tmp_path, "scale", r, "--out", "full")
    assert res.exit_code == 0, res.output
    assert cli(tmp_path, "scale", r, "--out", "half", "--steps", "4").exit_code == 0
    assert cli(tmp_path, "scale", r, "--out", "half", "--steps", "8", "--resume").exit_code == 0
    import json
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "half" / "summary.json").read_text())
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    res = cli(tmp_path, "scale", r, "--dry-run")
    assert res.exit_code == 0 and "muon" in res.output
    res = cli(tmp_path, "coord-check", r, "--widths", "32,64,128,256", "--steps", "3", "--seeds", "1")
    assert res.exit_code == 0, res.output[-1500:]                       # muP with Muon passes ...
    res = cli(tmp_path, "coord-check", r, "--widths", "32,64,128,256", "--steps", "3", "--seeds", "1",
              "--parametrization", "sp")
    assert res.exit_code == 1, res.output[-1500:]                       # ... the SP control does not
    res = cli(tmp_path, "sweep", r, "--widths", "16,32", "--lrs", "0.01,0.02", "--steps", "3")
    assert res.exit_code == 3, res.output              # one seed: the transfer verdict is inconclusive (exit 3)
