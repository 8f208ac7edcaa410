"""THE training loop: schedules, accumulation, clipping, NaN stop, resume offset, callbacks, throughput."""
import contextlib
import math
import time

import pytest
import torch
from torch import nn

from mutransfer.run.train import TrainConfig, lr_factor, train


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _batches(n, bs, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 6, generator=g)
        out.append((x, x.sum(1, keepdim=True).sin()))
    return out


def test_lr_schedules():
    assert [lr_factor(s, 10, "constant", warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [lr_factor(s, 12, "cosine", warmup=2, min_ratio=0.1) for s in range(12)]
    assert cos[2] == pytest.approx(1.0) and all(a >= b for a, b in zip(cos[2:], cos[3:]))
    assert lr_factor(12, 12, "cosine", warmup=2, min_ratio=0.1) == pytest.approx(0.1)
    lin = [lr_factor(s, 10, "linear") for s in range(11)]
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5) and lin[10] == pytest.approx(0.0)


def test_schedule_scales_every_group_keeping_ratios():
    m = _mlp()
    opt = torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.4}, {"params": m[2].parameters(), "lr": 0.1}])
    seen = []

    class Rec:
        def on_step(self, s):
            seen.append([g["lr"] for g in s.optimizer.param_groups])

    train(m, opt, iter(_batches(4, 8)), TrainConfig(steps=4, loss="mse", schedule="linear", warmup=2),
          callbacks=[Rec()])
    assert [round(a / b, 9) for a, b in seen] == [4.0] * 4
    assert seen[0][1] == pytest.approx(0.05) and seen[1][1] == pytest.approx(0.1)


def test_grad_accumulation_equals_one_big_batch():
    big = _batches(1, 8)
    halves = [(big[0][0][:4], big[0][1][:4]), (big[0][0][4:], big[0][1][4:])]
    runs = []
    for data, accum in ((big, 1), (halves, 2)):
        m = _mlp()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        st = train(m, opt, iter(data), TrainConfig(steps=1, loss="mse", grad_accum=accum))
        runs.append((st.loss, [p.detach().clone() for p in m.parameters()]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_sync_wraps_all_but_the_last_micro_batch():
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(1)
        yield

    m = _mlp()
    train(m, torch.optim.SGD(m.parameters(), lr=0.1), iter(_batches(9, 4)),
          TrainConfig(steps=3, loss="mse", grad_accum=3), no_sync=no_sync)
    assert len(entered) == 3 * 2


def test_grad_clip_bounds_the_update():
    m = _mlp()
    before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
    train(m, torch.optim.SGD(m.parameters(), lr=1.0), iter(_batches(1, 8)),
          TrainConfig(steps=1, loss="mse", grad_clip=1e-3))
    after = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-3)


def test_nan_loss_stops_before_the_step_and_keeps_parameters():
    data = _batches(6, 4)
    data[3] = (data[3][0] * float("nan"), data[3][1])
    m = _mlp()
    snap = {}

    class Snap:
        def on_step(self, s):
            snap.update({k: v.clone() for k, v in s.model.state_dict().items()})

    st = train(m, torch.optim.Adam(m.parameters(), lr=1e-2), iter(data), TrainConfig(steps=6, loss="mse"),
               callbacks=[Snap()])
    assert st.diverged and st.step == 3 and "step 4" in st.reason and not math.isfinite(st.loss)
    for k, v in m.state_dict().items():
        assert torch.equal(v, snap[k])


def test_start_step_callbacks_and_validation_schedule():
    calls = []

    class Rec:
        def on_start(self, s):
            calls.append(("start", s.step))

        def on_step(self, s):
            calls.append(("step", s.step, s.val_loss is not None))

        def on_eval(self, s):
            calls.append(("eval", s.step))

        def on_end(self, s):
            calls.append(("end", s.step))

    m = _mlp()
    st = train(m, torch.optim.SGD(m.parameters(), lr=0.1), iter(_batches(10, 4)),
               TrainConfig(steps=10, loss="mse", start_step=5, eval_every=2), val_batches=_batches(2, 4, seed=1),
               callbacks=[Rec()])
    assert st.step == 10
    assert calls[0] == ("start", 5) and calls[-1] == ("end", 10)
    assert [c[1] for c in calls if c[0] == "eval"] == [6, 8, 10]
    assert [c for c in calls if c[0] == "step"] == [("step", 6, True), ("step", 7, False), ("step", 8, True),
                                                    ("step", 9, False), ("step", 10, True)]


def test_throughput_excludes_callback_time():
    class Slow:
        def on_step(self, s):
            time.sleep(0.15)

    m = _mlp()
    st = train(m, torch.optim.SGD(m.parameters(), lr=0.1), iter(_batches(4, 4)),
               TrainConfig(steps=4, loss="mse", log_every=4), callbacks=[Slow()])
    # 16 samples; counting the 0.45 s of sleeps between the steps would give < 36 samples/s
    assert st.samples_per_s > 100
    assert st.tokens_per_s == st.samples_per_s
