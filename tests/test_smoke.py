"""A fast end-to-end smoke test of the engine: parametrize a GPT and train it a few steps."""
import math

from mutransfer import HParams, parametrize
from mutransfer.data import pysource
from mutransfer.models import gpt
from mutransfer.run.train import TrainConfig, train


def test_gpt_trains_a_few_steps():
    args = dict(layers=1, heads=2, vocab=256, seq_len=16)
    model, opt, plan = parametrize(gpt, width=64, base_width=32, hparams=HParams(lr=3e-3), args=args)
    state = train(model, opt, pysource(batch_size=8, seed=0, seq_len=16), TrainConfig(steps=20))
    assert math.isfinite(state.loss)
    assert state.loss < state.first_loss
