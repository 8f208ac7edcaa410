"""builtin:tokens (data/tokens.py): flat binaries in shards, .npy, parquet, Arrow / save_to_disk folders
and text files as training data: contiguous windows, train and validation that never share a token, a
position that resumes exactly, and token ids checked against the model's vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mutransfer.data import tokenized as T
from mutransfer.errors import UserError

from helpers import cli_in


@pytest.fixture(autouse=True)
def _fresh():
    T.clear_cache()
    yield
    T.clear_cache()


def _shards(folder: Path, n: int = 3000, parts: int = 2, dtype=np.uint16) -> np.ndarray:
    """Token i is i (position-coded): any window tells where in the stream it came from."""
    a = np.arange(n, dtype=dtype)
    for i, part in enumerate(np.array_split(a, parts)):
        part.tofile(folder / f"shard_{i:03d}.bin")
    return a


def _all(stream, batches: int):
    return [next(stream) for _ in range(batches)]


def test_shards_give_contiguous_windows_and_train_never_meets_validation(tmp_path):
    _shards(tmp_path)
    kw = dict(path=str(tmp_path / "shard_*.bin"), dtype="uint16", seq_len=16, val_fraction=0.2)
    cut = int(3000 * 0.8)
    seen_train, seen_val = set(), set()
    for x, y in _all(T.tokens(8, seed=1, split="train", **kw), 40):
        assert torch.equal(x[:, 1:], y[:, :-1])                        # targets are the next tokens
        assert torch.equal(y - x, torch.ones_like(x))                   # contiguous, across the shard cut too
        seen_train |= set(x.flatten().tolist()) | set(y.flatten().tolist())
    for x, y in _all(T.tokens(8, seed=1, split="val", **kw), 8):
        seen_val |= set(x.flatten().tolist()) | set(y.flatten().tolist())
    assert max(seen_train) < cut <= min(seen_val) and not seen_train & seen_val
    assert 1500 in seen_train and len(seen_train) > 2000                # both shards, most windows


def test_every_window_once_per_epoch_and_no_two_windows_overlap_beyond_one_token(tmp_path):
    _shards(tmp_path, n=16 * 20 + 1, parts=1)
    s = T.tokens(4, path=str(tmp_path / "shard_000.bin"), seq_len=16, val_fraction=0.01)
    assert s.windows == 19                      # (cut - 1) // 16
    starts = [x[:, 0].tolist() for x, _ in _all(s, 5)][:5]
    flat = sum(starts, [])[:19]
    assert sorted(flat) == [16 * i for i in range(19)]


def test_the_position_resumes_exactly_without_replaying(tmp_path):
    _shards(tmp_path)
    kw = dict(path=str(tmp_path), seq_len=8, val_fraction=0.1)
    a = T.tokens(4, seed=3, **kw)
    ref = _all(a, 30)
    b = T.tokens(4, seed=3, **kw)
    b.load_state_dict({"batch": 17})
    for want, got in zip(ref[17:], _all(b, 13)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert a.state_dict()["batch"] == 30
    other = T.tokens(4, seed=4, **kw)
    assert not torch.equal(next(other)[0], ref[0][0])                   # the seed decides the order


def test_npy_and_separate_validation_files(tmp_path):
    np.save(tmp_path / "train.npy", np.arange(500, dtype=np.int32))
    np.save(tmp_path / "val.npy", np.arange(1000, 1200, dtype=np.int64))
    x, _ = next(T.tokens(2, path=str(tmp_path / "train.npy"), val_path=str(tmp_path / "val.npy"), seq_len=8))
    assert int(x.max()) < 500
    x, _ = next(T.tokens(2, split="val", path=str(tmp_path / "train.npy"), val_path=str(tmp_path / "val.npy"),
                         seq_len=8))
    assert int(x.min()) >= 1000 and x.dtype == torch.int64


def test_parquet_and_arrow_columns_of_token_ids(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [list(range(i * 100, i * 100 + 100)) for i in range(6)]
    pq.write_table(pa.table({"text": [str(d[0]) for d in docs], "input_ids": docs}), tmp_path / "c.parquet")
    x, y = next(T.tokens(4, path=str(tmp_path / "c.parquet"), seq_len=10, val_fraction=0.2))
    assert torch.equal(y - x, torch.ones_like(x)) and int(x.max()) < 480
    # a datasets.save_to_disk DatasetDict: Arrow streams under train/ and validation/, read by pyarrow
    for split, lo in (("train", 0), ("validation", 5000)):
        (tmp_path / "ds" / split).mkdir(parents=True)
        t = pa.table({"ids": pa.array(np.arange(lo, lo + 400, dtype=np.int32))})
        with pa.OSFile(str(tmp_path / "ds" / split / "data-00000-of-00001.arrow"), "wb") as f:
            with pa.ipc.new_stream(f, t.schema) as w:
                w.write_table(t)
        (tmp_path / "ds" / split / "state.json").write_text(
            json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    x, _ = next(T.tokens(2, path=str(tmp_path / "ds"), seq_len=8))
    v, _ = next(T.tokens(2, split="val", path=str(tmp_path / "ds"), seq_len=8))
    assert int(x.max()) < 400 and int(v.min()) >= 5000
    with pytest.raises(UserError, match="column"):
        T.tokens(2, path=str(tmp_path / "c.parquet"), column="text", seq_len=8)


def test_text_by_bytes_and_by_a_tokenizer_json_cached_once(tmp_path):
    text = "the cat sat on the mat\n" * 200
    (tmp_path / "corpus.txt").write_text(text)
    x, y = next(T.tokens(2, path=str(tmp_path / "corpus.txt"), seq_len=12))
    assert bytes(x[0].tolist() + [y[0, -1].item()]).decode() in text * 2
    tok = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    tk = tok.Tokenizer(tok.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tok.pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    kw = dict(path=str(tmp_path / "corpus.txt"), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=6,
              vocab_size=6)
    x, _ = next(T.tokens(2, **kw))
    assert set(x.flatten().tolist()) <= {1, 2, 3, 4, 5}
    cached = list((tmp_path / ".mutransfer-tokens").glob("*.bin"))
    assert len(cached) == 1 and cached[0].stat().st_size == 4 * 6 * 200
    mtime = cached[0].stat().st_mtime_ns
    T.clear_cache()
    next(T.tokens(2, **kw))
    assert cached[0].stat().st_mtime_ns == mtime          # read from the cache, not tokenized again


def test_a_token_id_above_the_vocabulary_names_the_file(tmp_path):
    a = np.arange(600, dtype=np.uint16) % 200
    a[450] = 300
    a[:300].tofile(tmp_path / "a.bin")
    a[300:].tofile(tmp_path / "b.bin")
    with pytest.raises(UserError) as e:
        T.tokens(2, path=str(tmp_path / "*.bin"), seq_len=8, vocab_size=256)
    assert "b.bin" in e.value.message and "300" in e.value.message and "position 150" in e.value.message


def test_bad_arguments_are_one_line_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match="whole number"):
        T.tokens(2, path=str(tmp_path / "odd.bin"), dtype="uint16")
    with pytest.raises(UserError, match="no file matches"):
        T.tokens(2, path=str(tmp_path / "none_*.bin"))
    with pytest.raises(UserError, match="dtype"):
        T.tokens(2, path=str(tmp_path / "odd.bin"), dtype="float32")
    (tmp_path / "small.bin").write_bytes(b"\x01\x00" * 10)
    with pytest.raises(UserError, match="too few"):
        T.tokens(2, path=str(tmp_path / "small.bin"), seq_len=64)


# --------------------------------------------------------------------------- through the commands

def _recipe(folder: Path, data_args: dict, name: str = "tok") -> Path:
    r = {"name": name,
         "model": {"factory": "builtin:gpt", "args": {"layers": 1, "heads": 2, "vocab": 256, "seq_len": 16}},
         "data": {"factory": "builtin:tokens", "args": {"seq_len": 16, **data_args}},
         "widths": {"proxy": 16, "target": 32},
         "train": {"optimizer": "adamw", "lr": 1e-2, "steps": 8, "batch_size": 4, "eval_batches": 1,
                   "log_every": 2},
         "search": {"trials": 2, "sampler_seed": 0, "heartbeat": 1,
                    "params": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}}}
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_uint16_shards_tune_then_scale_and_resume_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        rng.integers(0, 256, 4000, dtype=np.uint16).tofile(tmp_path / f"train_{i}.bin")
    r = _recipe(tmp_path, {"path": "train_*.bin", "dtype": "uint16", "val_fraction": 0.1})
    res = cli_in(tmp_path, "tune", r, "--device", "cpu", "--parallel-trials", "1", "--trials", "1")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "tok" / "hparams.yaml").is_file()
    full, part = tmp_path / "full", tmp_path / "part"
    res = cli_in(tmp_path, "scale", r, "--device", "cpu", "--out", full, "--steps", 8, "--checkpoint-every", 4)
    assert res.exit_code == 0, res.output
    res = cli_in(tmp_path, "scale", r, "--device", "cpu", "--out", part, "--steps", 8, "--checkpoint-every", 4)
    assert res.exit_code == 0, res.output
    # as if killed after step 4: the last checkpoint and the summary are gone
    (part / "checkpoints" / "step-00000008.pt").unlink()
    (part / "summary.json").unlink()
    res = cli_in(tmp_path, "scale", r, "--device", "cpu", "--out", part, "--steps", 8, "--checkpoint-every", 4,
                 "--resume")
    assert res.exit_code == 0 and "resuming from" in res.output, res.output
    assert _metrics(part)[-1]["loss"] == _metrics(full)[-1]["loss"]
    assert _metrics(part)[-1]["val_loss"] == _metrics(full)[-1]["val_loss"]


def test_parquet_and_bytes_text_train_through_scale(tmp_path):
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    r = _recipe(tmp_path, {"path": "corpus.txt"}, name="txt")
    res = cli_in(tmp_path, "scale", r, "--device", "cpu", "--steps", 4)
    assert res.exit_code == 0, res.output
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"tokens": [[(i + j) % 256 for j in range(256)] for i in range(40)]}), tmp_path / "t.parquet")
    r = _recipe(tmp_path, {"path": "t.parquet"}, name="pq")
    res = cli_in(tmp_path, "scale", r, "--device", "cpu", "--steps", 4)
    assert res.exit_code == 0, res.output


def test_a_token_above_the_models_vocabulary_exits_2_with_one_line(tmp_path):
    a = np.arange(3000, dtype=np.uint16) % 256
    a[2000] = 999
    a.tofile(tmp_path / "big.bin")
    r = _recipe(tmp_path, {"path": "big.bin"}, name="big")
    res = cli_in(tmp_path, "scale", r, "--device", "cpu", "--steps", 2)
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and "big.bin" in line and "999" in line and "256" in line
    assert not (tmp_path / "runs").exists()
