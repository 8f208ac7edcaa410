"""`mutransfer predict`: the power-law fit and its interval (synthetic losses with known E, A, α), the
refusals (a ladder too short to fit: exit 2, nothing written), a tiny CPU ladder through the shared
loop (its seed-0 rung is exactly `scale` at that width), the prediction in the hparams file, `scale`'s
check at the end (ok, and a miss printed plainly), and the prediction surviving a resumed ladder, a
resumed `scale` and a re-tune that lands on the same values."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mutransfer.cli import app
from mutransfer.errors import UserError
from mutransfer.report.predict_fit import check, check_ladder, curve, fit_ladder
from mutransfer.run.hparams_file import read_hparams_file, write_hparams_file

runner = CliRunner()

RECIPE = {
    "name": "tinyp",
    "model": {"factory": "builtin:gpt", "args": {"layers": 1, "heads": 2, "vocab": 256, "seq_len": 16}},
    "data": {"factory": "builtin:pysource", "args": {"seq_len": 16}},
    "widths": {"proxy": 16, "target": 128},
    "train": {"optimizer": "adamw", "lr": 1.0e-2, "steps": 8, "batch_size": 8, "eval_batches": 2, "log_every": 4},
}
LADDER = "16,32,64"


# ------------------------------------------------------------------------------------------ the fit

def test_fit_recovers_known_E_A_alpha_within_its_interval():
    E, A, alpha = 1.8, 40.0, 0.35
    rng = np.random.default_rng(3)
    xs = np.array([1e4, 2e4, 4e4, 8e4, 1.6e5])
    losses = [[E + A * x ** -alpha + rng.normal(0, 0.002) for _ in range(3)] for x in xs]
    p = fit_ladder(xs, losses, targets=[2e6], boot=500)
    iv = p.intervals
    assert iv["E"][0] <= E <= iv["E"][1] and iv["alpha"][0] <= alpha <= iv["alpha"][1] and iv["A"][0] <= A <= iv["A"][1]
    assert abs(p.fit.alpha - alpha) < 0.05 and abs(p.fit.E - E) < 0.05          # and not only by being wide
    t = p.targets[0]
    truth = E + A * 2e6 ** -alpha
    assert t["low"] <= truth <= t["high"] and t["high"] - t["low"] < 0.03
    assert p.method == "seeds" and 0.001 < p.noise < 0.004


def test_noiseless_three_widths_are_fitted_exactly():
    xs = [64, 128, 256]
    f = lambda x: 2.1 + 4.0 * x ** -0.45                        # noqa: E731
    p = fit_ladder(xs, [[f(x), f(x)] for x in xs], targets=[1024])
    assert p.fit.E == pytest.approx(2.1, abs=1e-5) and p.fit.alpha == pytest.approx(0.45, abs=1e-5)
    assert p.targets[0]["loss"] == pytest.approx(f(1024), abs=1e-6)
    assert curve(p.fit, [64])[0] == pytest.approx(f(64), abs=1e-8)


def test_one_seed_uses_the_residuals_and_a_rising_ladder_is_a_flat_fit():
    xs = [1, 2, 4, 8, 16]
    p = fit_ladder(xs, [[3 + 1 / x + 0.01 * (-1) ** i] for i, x in enumerate(xs)], targets=[64], boot=300)
    assert p.method == "residuals" and p.targets[0]["low"] < p.targets[0]["loss"] < p.targets[0]["high"]
    up = fit_ladder([1, 2, 4], [[1.0, 1.01], [1.1, 1.11], [1.2, 1.21]], targets=[8], boot=200)
    assert up.fit.A == 0                                      # A >= 0: wider is never predicted worse by the law


@pytest.mark.parametrize("xs,losses,what", [
    ([64], [[2.0, 2.1]], "too short"),
    ([64, 128], [[2.0, 2.1], [1.9, 1.95]], "too short"),
    ([64, 64, 128], [[2.0], [2.1], [1.9]], "too short"),
    ([64, 128, 256], [[2.0], [1.9], [1.85]], "1 seed"),
    ([64, 128, 256], [[2.0, 2.0], [float("nan"), 1.9], [1.8, 1.8]], "not finite"),
])
def test_ladders_that_cannot_be_fitted_are_refused(xs, losses, what):
    with pytest.raises(UserError, match=what):
        check_ladder(xs, losses)


def test_check_inside_outside_and_not_comparable():
    pred = {"targets": {"1024": {"loss": 2.30, "low": 2.29, "high": 2.31, "steps": 200, "batch_size": 64}},
            "level": 0.95,
            "hparams": {"lr": 0.01}, "proxy_width": 64, "depth": None}
    kw = dict(width=1024, steps=200, hparams={"lr": 0.01}, base_width=64)
    ok = check(2.305, pred, **kw)
    assert ok["status"] == "ok" and ok["inside"] and ok["error_pct"] == pytest.approx(100 * 0.005 / 2.30)
    hi = check(2.40, pred, **kw)
    assert hi["status"] == "missed" and hi["message"].startswith("PREDICTION MISSED") and "coord-check" in hi["message"]
    lo = check(2.20, pred, **kw)
    assert lo["status"] == "missed" and "below" in lo["message"] and "wider ladder" in lo["message"]
    assert check(2.30, pred, **{**kw, "steps": 100})["status"] == "skipped"
    assert "batch size 64 (this run: 128)" in check(2.30, pred, **kw, batch_size=128)["message"]
    assert check(2.30, pred, **kw, batch_size=64)["status"] == "ok"
    assert "hyperparameter" in check(2.30, pred, **{**kw, "hparams": {"lr": 0.02}})["message"]
    assert "not 2048" in check(2.30, pred, **{**kw, "width": 2048})["message"]
    assert check(2.30, None, **kw)["status"] == "skipped"


# ------------------------------------------------------------------------------------ the command

def _hp(path: Path, lr: float = 1e-2) -> Path:
    return write_hparams_file(path, recipe="tiny.yaml", proxy_width=16, optimizer="adamw", hparams={"lr": lr},
                              best_value=None, study="tiny", storage="none", steps=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    (d / "tiny.yaml").write_text(yaml.safe_dump(RECIPE))
    _hp(d / "runs" / "tinyp" / "hparams.yaml")
    return d


def predict(d: Path, *args):
    import os
    cwd = os.getcwd()
    os.chdir(d)
    try:
        return runner.invoke(app, ["predict", "tiny.yaml", "--device", "cpu", *map(str, args)])
    finally:
        os.chdir(cwd)


def scale(d: Path, *args):
    import os
    cwd = os.getcwd()
    os.chdir(d)
    try:
        return runner.invoke(app, ["scale", "tiny.yaml", "--device", "cpu", *map(str, args)])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def ladder(tiny):
    r = predict(tiny, "--widths", LADDER, "--json", "pred.json")
    assert r.exit_code == 0, r.output
    return r.output


def test_predict_writes_the_prediction_into_the_hparams_file(tiny, ladder):
    hp = read_hparams_file(tiny / "runs" / "tinyp" / "hparams.yaml")
    p = hp["prediction"]
    assert hp["hparams"] == {"lr": 1e-2} and p["proxy_width"] == 16
    assert all(r["steps"] == 8 and r["batch_size"] == 8 for r in [*p["ladder"], *p["targets"].values()])
    assert [r["width"] for r in p["ladder"]] == [16, 32, 64] and all(len(r["losses"]) == 2 for r in p["ladder"])
    t = p["targets"]["128"]
    assert t["low"] <= t["loss"] <= t["high"] and 0 < t["ladder_cost"] < 1
    assert "predicted width 128" in ladder and "% of this run" in ladder
    assert json.loads((tiny / "pred.json").read_text())["targets"]["128"]["loss"] == t["loss"]
    png = tiny / "runs" / "tinyp" / "predict" / "prediction.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and b"mutransfer prediction plot" in png.read_bytes()


def test_the_seed_0_rung_is_exactly_scale_at_that_width(tiny, ladder):
    r = scale(tiny, "--width", 32, "--out", "scale32")
    assert r.exit_code == 0, r.output
    s = json.loads((tiny / "scale32" / "summary.json").read_text())
    p = read_hparams_file(tiny / "runs" / "tinyp" / "hparams.yaml")["prediction"]
    assert p["ladder"][1]["width"] == 32 and p["ladder"][1]["losses"][0] == s["val_loss"]
    assert s["prediction"]["status"] == "skipped" and "not 32" in s["prediction"]["message"]


@pytest.mark.parametrize("args,what", [
    (["--widths", "16,32"], "too short"),
    (["--widths", "16"], "too short"),
    (["--widths", "16,32,64", "--seeds", "1"], "1 seed"),
    (["--widths", "16,32,128"], "not below the target"),
    (["--budget", "0.0001"], "--budget"),
    (["--fit-on", "depth"], "--fit-on"),
])
def test_bad_ladders_are_one_line_exit_2_and_write_nothing(tiny, ladder, args, what):
    hp = tiny / "runs" / "tinyp" / "hparams.yaml"
    before = hp.read_bytes()
    r = predict(tiny, *args)
    assert r.exit_code == 2 and what in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert hp.read_bytes() == before


def test_default_ladder_is_chosen_within_the_budget(tiny, ladder):
    r = predict(tiny, "--budget", "0.9", "--seeds", "2", "--plot", "default.png")
    assert r.exit_code == 0, r.output
    p = read_hparams_file(tiny / "runs" / "tinyp" / "hparams.yaml")["prediction"]
    ws = [x["width"] for x in p["ladder"]]
    assert len(ws) == 3 and ws == sorted(ws) and ws[-1] <= 64 and all(b == 2 * a for a, b in zip(ws, ws[1:]))
    assert p["targets"]["128"]["ladder_cost"] <= 0.9
    assert predict(tiny, "--widths", LADDER).exit_code == 0            # back to the fixture's ladder


def test_fit_on_compute_refits_the_cached_ladder(tiny, ladder, tmp_path):
    hp = tmp_path / "hp.yaml"
    hp.write_text((tiny / "runs" / "tinyp" / "hparams.yaml").read_text())
    r = predict(tiny, "--widths", LADDER, "--fit-on", "compute", "--hparams", hp, "--plot", tmp_path / "c.png")
    assert r.exit_code == 0 and "6 of 6 runs cached" in r.output, r.output
    p = read_hparams_file(hp)["prediction"]
    assert p["fit_on"] == "compute" and all(r["x"] == r["flops"] > r["params"] for r in p["ladder"])
    assert p["ladder"][0]["losses"] == read_hparams_file(tiny / "runs" / "tinyp" / "hparams.yaml")[
        "prediction"]["ladder"][0]["losses"]


def test_prediction_survives_a_resumed_ladder(tiny, ladder):
    hp = tiny / "runs" / "tinyp" / "hparams.yaml"
    before = read_hparams_file(hp)["prediction"]
    cache = next((tiny / "runs" / "tinyp" / "predict").glob("*/w64-s1-n8-b8.json"))
    cache.unlink()                                  # as if killed before the last run finished
    r = predict(tiny, "--widths", LADDER)
    assert r.exit_code == 0 and "5 of 6 runs cached" in r.output, r.output
    after = read_hparams_file(hp)["prediction"]
    assert after["ladder"] == before["ladder"] and after["targets"] == before["targets"]   # bit for bit on CPU


def test_prediction_survives_a_retune_with_the_same_values_only(tiny, ladder, tmp_path):
    hp = tmp_path / "hp.yaml"
    hp.write_text((tiny / "runs" / "tinyp" / "hparams.yaml").read_text())
    _hp(hp)                                          # tune finishing again (resumed) with the same best
    assert "prediction" in read_hparams_file(hp)
    write_hparams_file(hp, recipe="tiny.yaml", proxy_width=16, optimizer="adamw", hparams={"lr": 1e-2},
                       best_value=None, study="tiny", storage="none", steps=8, extra={"horizon": {"exponent": -0.5}})
    assert "prediction" not in read_hparams_file(hp)  # a newly measured horizon rule: the ladder trained without it
    hp.write_text((tiny / "runs" / "tinyp" / "hparams.yaml").read_text())
    _hp(hp, lr=2e-2)                                 # another best: the old ladder does not apply
    assert "prediction" not in read_hparams_file(hp)


def test_scale_checks_the_prediction_and_survives_resume(tiny, ladder):
    r = scale(tiny, "--steps", 4, "--out", "s128", "--checkpoint-every", 4)
    assert r.exit_code == 0, r.output
    s = json.loads((tiny / "s128" / "summary.json").read_text())
    assert s["prediction"]["status"] == "skipped" and "8 steps" in s["prediction"]["message"]
    r = scale(tiny, "--out", "s128", "--resume")     # on to train.steps (8), from the checkpoint at 4
    assert r.exit_code == 0 and "resuming from" in r.output, r.output
    s = json.loads((tiny / "s128" / "summary.json").read_text())
    pred = read_hparams_file(tiny / "runs" / "tinyp" / "hparams.yaml")["prediction"]["targets"]["128"]
    c = s["prediction"]
    assert c["status"] in ("ok", "missed") and c["predicted"] == pred["loss"] and c["measured"] == s["val_loss"]
    assert c["inside"] == (pred["low"] <= s["val_loss"] <= pred["high"])
    assert (tiny / "s128" / "prediction.png").exists()


def test_a_miss_is_printed_plainly(tiny, ladder, tmp_path):
    hp = tmp_path / "hp.yaml"
    d = yaml.safe_load((tiny / "runs" / "tinyp" / "hparams.yaml").read_text())
    d["prediction"]["targets"]["128"].update(loss=0.5, low=0.45, high=0.55)    # far below anything 8 steps reach
    hp.write_text(yaml.safe_dump(d))
    r = scale(tiny, "--hparams", hp, "--out", tmp_path / "miss")
    assert r.exit_code == 0, r.output
    assert r.output.count("PREDICTION MISSED") == 2 and "above the 95% interval" in r.output
    assert json.loads((tmp_path / "miss" / "summary.json").read_text())["prediction"]["status"] == "missed"
