"""Built-in data (deterministic given the seed; pysource split by file) and models (shapes, options)."""
import sysconfig
from pathlib import Path

import pytest
import torch

from mutransfer import UserError
from mutransfer.data import images, pysource, text, vectors
from mutransfer.data.bytes import _is_val, _pysource_bytes, _stdlib_files
from mutransfer.models import cnn, gpt, mlp

SMALL = 300_000   # bytes of stdlib source read by these tests


def take(it, n=3):
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.mark.parametrize("make", [
    lambda seed, split="train": pysource(batch_size=4, seed=seed, split=split, seq_len=16, max_bytes=SMALL),
    lambda seed, split="train": vectors(batch_size=4, seed=seed, split=split, dim=6),
    lambda seed, split="train": images(batch_size=4, seed=seed, split=split, size=8),
], ids=["pysource", "vectors", "images"])
def test_streams_are_determined_by_the_seed(make):
    assert same(take(make(0)), take(make(0)))
    assert not same(take(make(0)), take(make(1)))
    assert not same(take(make(0)), take(make(0, "val")))


def test_pysource_splits_by_file():
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in _stdlib_files()]
    val = [r for r in rel if _is_val(r, 0.1)]
    train = [r for r in rel if not _is_val(r, 0.1)]
    assert val and train and not set(val) & set(train)
    assert 0.05 < len(val) / len(rel) < 0.15
    # each split's byte buffer starts with its own first file: whole files, never cut across splits
    for split, files in (("train", train), ("val", val)):
        buf = bytes(_pysource_bytes(split, SMALL, 0.1)[:200].tolist())
        first = (root / files[0]).read_bytes()[:200]
        assert buf[: len(first)] == first[: len(buf)]


def test_pysource_formats():
    x, y = next(pysource(batch_size=3, seed=0, seq_len=12, max_bytes=SMALL))
    assert x.shape == y.shape == (3, 12) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])                 # next-byte targets
    x, y = next(pysource(batch_size=3, seed=0, format="window", context=5, max_bytes=SMALL))
    assert x.shape == (3, 5) and y.shape == (3,)
    with pytest.raises(UserError, match="format"):
        next(pysource(batch_size=3, seed=0, format="columns", max_bytes=SMALL))


def test_text_source(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a" * 900 + b"z" * 100)                   # the last 10 % is the validation split
    a = take(text(batch_size=2, seed=5, path=str(f), seq_len=8))
    assert same(a, take(text(batch_size=2, seed=5, path=str(f), seq_len=8)))
    xt, _ = next(text(batch_size=64, seed=5, path=str(f), seq_len=8))
    xv, _ = next(text(batch_size=64, seed=5, split="val", path=str(f), seq_len=8))
    assert torch.all(xt == ord("a")) and torch.all(xv == ord("z"))
    with pytest.raises(UserError, match="not found"):
        next(text(batch_size=2, seed=0, path=str(tmp_path / "missing.txt")))
    with pytest.raises(UserError, match="path"):
        next(text(batch_size=2, seed=0))


def test_vectors_teacher_is_fixed_and_tasks():
    x, y = next(vectors(batch_size=64, seed=0, dim=6, classes=5))
    assert x.shape == (64, 6) and y.shape == (64,) and 0 <= y.min() and y.max() < 5
    assert len(set(y.tolist())) > 1
    _, y2 = next(vectors(batch_size=64, seed=0, dim=6, classes=5, teacher_seed=99))
    assert not torch.equal(y, y2)                            # another teacher labels the same inputs
    x, y = next(vectors(batch_size=8, seed=0, dim=6, classes=3, task="regression"))
    assert y.shape == (8, 3) and y.dtype == torch.float32
    with pytest.raises(UserError, match="task"):
        next(vectors(batch_size=8, seed=0, task="ranking"))


def test_models_fit_their_data():
    x, y = next(pysource(batch_size=2, seed=0, seq_len=16, max_bytes=SMALL))
    assert gpt(width=32, layers=1, heads=2, vocab=256, seq_len=16)(x).shape == (2, 16, 256)
    assert gpt(width=32, layers=1, head_dim=8, vocab=256, seq_len=16)(x).shape == (2, 16, 256)
    x, y = next(pysource(batch_size=2, seed=0, format="window", context=4, max_bytes=SMALL))
    assert mlp(width=16, vocab=256, context=4, out_dim=256)(x).shape == (2, 256)
    x, y = next(vectors(batch_size=2, seed=0, dim=6, classes=3))
    assert mlp(width=16, in_dim=6, out_dim=3, depth=3, activation="gelu")(x).shape == (2, 3)
    x, y = next(images(batch_size=2, seed=0, size=8, channels=3, classes=4))
    assert cnn(width=8, in_channels=3, classes=4)(x).shape == (2, 4)


def test_gpt_options():
    m = gpt(width=64, layers=1, heads=4, attn_mult=2.0)
    assert m.blocks[0].attn.scale == pytest.approx(2.0 / 16)        # attn_mult / d_head, not 1/sqrt
    m = gpt(width=64, layers=1, head_dim=8)
    assert m.blocks[0].attn.heads == 8                              # heads grow with width
    assert gpt(width=64, layers=1, tied=True).head.weight is not None
    with pytest.raises(UserError, match="either heads or head_dim"):
        gpt(width=64, heads=4, head_dim=16)
    with pytest.raises(UserError, match="head_dim"):
        gpt(width=64, head_dim=12)
    with pytest.raises(ValueError, match="seq_len"):
        gpt(width=32, layers=1, heads=2, seq_len=4)(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(UserError, match="activation"):
        mlp(width=8, activation="swish")
