"""`builtin:tokens`: pre-tokenized corpora as training data, read where they lie, never whole.

    data:
      factory: builtin:tokens
      args:
        path: "data/fineweb_train_*.bin"   # one file, a glob of shards, or a folder
        dtype: uint16                      # flat binaries (nanoGPT-style): uint8 | uint16 | uint32 | int32 | int64
        seq_len: 256
        val_path: "data/fineweb_val_*.bin" # or: val_fraction: 0.01 (the end of the stream is held out)

Sources, by file name:
  *.bin (any name not below)  a flat array of `dtype`, memory-mapped (np.memmap). An llm.c / modded-nanogpt
                              header (256 int32, magic 20240520) is recognised and skipped; `offset:` skips
                              a header of your own (bytes).
  *.npy                       a 1-D integer array, memory-mapped.
  *.parquet, *.arrow          a column of token ids (`column:`, default the first integer or list-of-integer
                              column), read with pyarrow (`pip install "mutransfer[tokens]"`).
  a `datasets.save_to_disk` folder (state.json / dataset_dict.json): its Arrow files, read with pyarrow
                              (the `datasets` package is not needed); a DatasetDict's validation/val/test
                              split is the validation data unless val_path says otherwise.
  *.txt, *.md, *.text         text, tokenized by `tokenizer:` — `bytes` (the default: the file itself,
                              memory-mapped as uint8), a tokenizer.json (the `tokenizers` package) or a
                              local folder of a transformers tokenizer (AutoTokenizer, local files only).
                              A real tokenizer's output is cached once as a flat binary (`cache:`, default
                              a .mutransfer-tokens/ folder beside the text) and memory-mapped from then on.

The stream: the files are concatenated in name order. Training and validation are separate files
(val_path) or disjoint ranges of the stream (the last val_fraction is validation): no window reaches
across the cut, so no token is in both. Each split is cut into non-overlapping windows of seq_len + 1
tokens (consecutive windows share one token, the last target of one being the first input of the next),
visited in a seeded random order, every window once per epoch. Batch k depends only on (seed, split, k):
the position saved in a checkpoint is k, and `scale --resume` continues bit-exactly without replaying.

The vocabulary: `vocab_size` (default: the model's `vocab_size` argument, when it has one) is checked
up front on corpora up to 2^26 tokens and on every batch always; a token id at or above it is one line
naming the file.
"""
from __future__ import annotations

import glob as globmod
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..atomic import write_via
from ..errors import UserError

SPLITS = ("train", "val")
DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")
TEXT = (".txt", ".md", ".text")
TABLE = (".parquet", ".arrow")
KNOWN = (".bin", ".npy") + TABLE + TEXT
LLMC_MAGIC = 20240520          # llm.c / modded-nanogpt shards: 256 int32 header, tokens uint16
SCAN_LIMIT = 2**26             # vocabulary scanned up front on corpora up to this many tokens
PERMUTE_LIMIT = 2**22          # windows permuted exactly up to this many per split; beyond, an affine bijection


# ------------------------------------------------------------------------------------------- files

def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _is_datasets_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def find_files(path: str, field: str) -> list[Path]:
    """The files `path` names: itself, the glob's matches or a folder's known files, in name order."""
    if not path:
        raise UserError(field, "needs a path: a file, a glob of shards or a folder")
    if _has_glob(path):
        out = [Path(p) for p in sorted(globmod.glob(path)) if Path(p).is_file()]
        if not out:
            raise UserError(field, f"no file matches {path!r}")
        return out
    p = Path(path)
    if p.is_file():
        return [p]
    if _is_datasets_dir(p):
        return [p]
    if p.is_dir():
        out = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in KNOWN)
        if not out:
            raise UserError(field, f"{path} holds no token files ({', '.join(KNOWN)})")
        return out
    raise UserError(field, f"not found: {path}")


def _pyarrow(field: str, what: str):
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(field, f"{what} needs pyarrow: pip install 'mutransfer[tokens]'") from None
    return pyarrow


def _column_ids(table, column: Optional[str], where: str, field: str) -> np.ndarray:
    """A table's column of token ids (integers, or lists of integers flattened) as a 1-D array."""
    pa = _pyarrow(field, "reading Arrow data")
    names = table.column_names

    def ok(t) -> bool:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            t = t.value_type
        return pa.types.is_integer(t)

    if column is None:
        column = next((n for n in names if ok(table.schema.field(n).type)), None)
        if column is None:
            raise UserError("data.args.column", f"{where} has no column of integer token ids (columns: {names})")
    elif column not in names:
        raise UserError("data.args.column", f"{where} has no column {column!r} (columns: {names})")
    col = table.column(column)
    if not ok(col.type):
        raise UserError("data.args.column", f"{where}: column {column!r} holds {col.type}, not token ids")
    parts = []
    for chunk in col.chunks:
        if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            chunk = pa.compute.list_flatten(chunk)
        parts.append(chunk.to_numpy(zero_copy_only=False))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _read_arrow(f: Path, column: Optional[str], field: str) -> np.ndarray:
    pa = _pyarrow(field, f"{f.name}")
    try:
        with pa.memory_map(str(f), "r") as src:
            try:
                table = pa.ipc.open_file(src).read_all()
            except pa.ArrowInvalid:
                src.seek(0)
                table = pa.ipc.open_stream(src).read_all()     # datasets' save_to_disk writes streams
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(field, f"{f}: unreadable Arrow file ({e})") from None
    return _column_ids(table, column, str(f), field)


def _datasets_files(p: Path, split: Optional[str]) -> list[Path]:
    """The Arrow files of a save_to_disk folder (a Dataset, or one split of a DatasetDict)."""
    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        want = ["train"] if split == "train" else ["validation", "val", "test"]
        name = next((s for s in want if s in splits), None)
        if name is None:
            return []
        p = p / name
    state = json.loads((p / "state.json").read_text())
    return [p / d["filename"] for d in state.get("_data_files", [])]


def _tokenize_cached(f: Path, tokenizer: str, cache: Optional[str]) -> Path:
    """A text file tokenized by a tokenizer on disk, written once as a flat binary (uint32) beside it."""
    tok_path = Path(tokenizer)
    if not tok_path.exists():
        raise UserError("data.args.tokenizer", f"no tokenizer at {tokenizer} (a tokenizer.json, a local "
                        "transformers tokenizer folder, or bytes); nothing is downloaded")
    tok_id = hashlib.sha1()
    for t in ([tok_path] if tok_path.is_file() else sorted(x for x in tok_path.iterdir() if x.is_file())):
        tok_id.update(t.read_bytes())
    st = f.stat()
    key = hashlib.sha1(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tok_id.hexdigest()}".encode()).hexdigest()[:16]
    folder = Path(cache) if cache else f.resolve().parent / ".mutransfer-tokens"
    out = folder / f"{f.stem}-{key}.u32.bin"
    if out.is_file():
        return out
    if tok_path.is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("data.args.tokenizer", "a tokenizer.json needs the tokenizers package") from None
        tk = Tokenizer.from_file(str(tok_path))

        def encode(lines: list[str]) -> list[list[int]]:
            return [e.ids for e in tk.encode_batch(lines, add_special_tokens=False)]
    else:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError("data.args.tokenizer", "a tokenizer folder needs transformers") from None
        try:
            tk = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is the user's folder
            raise UserError("data.args.tokenizer", f"cannot load the tokenizer in {tok_path}: {e}") from None

        def encode(lines: list[str]) -> list[list[int]]:
            return tk(lines, add_special_tokens=False)["input_ids"]
    folder.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(f, encoding="utf-8", errors="replace") as src, open(tmp, "wb") as dst:
            while True:
                lines = src.readlines(1 << 20)
                if not lines:
                    break
                for ids in encode(lines):
                    np.asarray(ids, dtype=np.uint32).tofile(dst)

    write_via(out, write)
    return out


def _read(f: Path, dtype: str, offset: int, column: Optional[str], tokenizer: str, cache: Optional[str],
          field: str) -> np.ndarray:
    """One file as a 1-D integer array (memory-mapped where the format allows)."""
    suf = f.suffix.lower()
    try:
        if suf == ".npy":
            a = np.load(f, mmap_mode="r", allow_pickle=False)
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise UserError(field, f"{f}: a .npy of tokens must be 1-D integers, got {a.dtype} {a.shape}")
            return a
        if suf == ".parquet":
            pq = _pyarrow(field, f"{f.name}").parquet
            try:
                table = pq.read_table(f, columns=[column] if column else None)
            except Exception as e:  # noqa: BLE001 - pyarrow's errors for a bad or missing column
                raise UserError(field, f"{f}: unreadable parquet ({type(e).__name__}: {e})") from None
            return _column_ids(table, column, str(f), field)
        if suf == ".arrow":
            return _read_arrow(f, column, field)
        if suf in TEXT:
            if tokenizer == "bytes":
                return np.memmap(f, dtype=np.uint8, mode="r") if f.stat().st_size else np.zeros(0, np.uint8)
            return np.memmap(_tokenize_cached(f, tokenizer, cache), dtype=np.uint32, mode="r")
        dt = np.dtype(dtype)
        skip = offset
        if skip == 0 and f.stat().st_size >= 1024:
            head = np.fromfile(f, dtype=np.int32, count=3)
            if head[0] == LLMC_MAGIC:               # llm.c shard: header then head[2] uint16 tokens
                return np.memmap(f, dtype=np.uint16, mode="r", offset=1024, shape=(int(head[2]),))
        size = f.stat().st_size - skip
        if size < 0 or size % dt.itemsize:
            raise UserError(field, f"{f}: {size} bytes after offset {skip} is not a whole number of {dtype}")
        if size == 0:
            return np.zeros(0, dt)
        return np.memmap(f, dtype=dt, mode="r", offset=skip, shape=(size // dt.itemsize,))
    except OSError as e:
        raise UserError(field, f"cannot read {f}: {e}") from None


class Corpus:
    """Files concatenated in order: window(start, n) reads n tokens from global position start."""

    def __init__(self, arrays: list[np.ndarray], names: list[str]):
        self.arrays = [a for a in arrays if len(a)]
        self.names = [n for a, n in zip(arrays, names) if len(a)]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.total = int(self.starts[-1])

    def window(self, start: int, n: int) -> np.ndarray:
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        out, pos = [], start
        while n > 0:
            a = self.arrays[i]
            lo = pos - int(self.starts[i])
            take = min(n, len(a) - lo)
            out.append(np.asarray(a[lo:lo + take]).astype(np.int64))
            n, pos, i = n - take, pos + take, i + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def file_at(self, pos: int) -> str:
        return self.names[int(np.searchsorted(self.starts, pos, side="right")) - 1]

    def check_vocab(self, vocab: int, lo: int, hi: int) -> None:
        """Every token in [lo, hi) below `vocab` (chunked: never the whole file in memory)."""
        for a, name, s in zip(self.arrays, self.names, self.starts[:-1]):
            a_lo, a_hi = max(lo - int(s), 0), min(hi - int(s), len(a))
            for c in range(a_lo, a_hi, 1 << 22):
                chunk = np.asarray(a[c:min(c + (1 << 22), a_hi)])
                if chunk.size and int(chunk.max()) >= vocab:
                    at = c + int(np.argmax(chunk >= vocab))
                    _too_big(name, int(a[at]), at, vocab)


def _too_big(name: str, token: int, at: int, vocab: int):
    raise UserError("data.args.vocab_size", f"{name}: token id {token} at position {at} is not below the "
                    f"vocabulary size {vocab} (the model's vocab_size, or data.args.vocab_size)")


@lru_cache(maxsize=16)
def _corpora(path: str, val_path: Optional[str], dtype: str, offset: int, column: Optional[str],
             tokenizer: str, cache: Optional[str], stamp: tuple = ()) -> tuple[Corpus, Optional[Corpus]]:
    # stamp: (name, size, mtime) of every file, so that a file rewritten in place is read again
    def load(spec: str, field: str, split: Optional[str]) -> Optional[Corpus]:
        files = find_files(spec, field)
        arrays, names = [], []
        for f in files:
            if _is_datasets_dir(f):
                parts = _datasets_files(f, split)
                if not parts and split != "train":
                    return None           # no validation split in the DatasetDict: the fraction instead
                for part in parts:
                    arrays.append(_read_arrow(part, column, field))
                    names.append(str(part))
            else:
                arrays.append(_read(f, dtype, offset, column, tokenizer, cache, field))
                names.append(str(f))
        return Corpus(arrays, names)

    train = load(path, "data.args.path", "train")
    if val_path:
        val = load(val_path, "data.args.val_path", "val")
    elif len(find_files(path, "data.args.path")) == 1 and _is_datasets_dir(Path(path)):
        val = load(path, "data.args.path", "val")
    else:
        val = None
    return train, val


# ------------------------------------------------------------------------------------- the stream

def _permutation(n: int, seed: int, split: str, epoch: int):
    """A seeded bijection of range(n) for this epoch: index -> window."""
    rng = np.random.default_rng([seed, SPLITS.index(split), epoch])
    if n <= PERMUTE_LIMIT:
        return rng.permutation(n)
    a = int(rng.integers(1, n))
    while np.gcd(a, n) != 1:
        a += 1
    b = int(rng.integers(0, n))
    return _Affine(a, b, n)


class _Affine:
    def __init__(self, a: int, b: int, n: int):
        self.a, self.b, self.n = a, b, n

    def __getitem__(self, i: int) -> int:
        return (self.a * int(i) + self.b) % self.n


class TokenStream:
    """Infinite batches of windows; batch k is a pure function of (seed, split, k): state_dict is k."""

    def __init__(self, corpus: Corpus, lo: int, hi: int, seq_len: int, batch_size: int, seed: int, split: str,
                 fmt: str, vocab: Optional[int]):
        self.corpus, self.lo, self.seq_len, self.batch_size = corpus, lo, seq_len, batch_size
        self.seed, self.split, self.fmt, self.vocab = seed, split, fmt, vocab
        self.windows = (hi - lo - 1) // seq_len
        if self.windows < 1:
            raise UserError("data.args", f"the {split} split has {hi - lo} tokens, too few for one window of "
                            f"seq_len + 1 = {seq_len + 1}")
        self.k = 0
        self._epoch, self._perm = -1, None

    def __iter__(self):
        return self

    def _index(self, j: int) -> int:
        epoch, i = divmod(j, self.windows)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, _permutation(self.windows, self.seed, self.split, epoch)
        return int(self._perm[i])

    def window_starts(self, k: int) -> list[int]:
        """The global positions of batch k's windows (each window is seq_len + 1 tokens from there)."""
        return [self.lo + self._index(k * self.batch_size + b) * self.seq_len for b in range(self.batch_size)]

    def __next__(self):
        starts = self.window_starts(self.k)
        w = np.stack([self.corpus.window(s, self.seq_len + 1) for s in starts])
        if self.vocab is not None and w.size and int(w.max()) >= self.vocab:
            r, c = np.argwhere(w >= self.vocab)[0]
            pos = starts[r] + int(c)
            name = self.corpus.file_at(pos)
            _too_big(name, int(w[r, c]), pos - int(self.corpus.starts[self.corpus.names.index(name)]), self.vocab)
        self.k += 1
        t = torch.from_numpy(w)
        if self.fmt == "sequence":
            return t[:, :-1].contiguous(), t[:, 1:].contiguous()
        return t[:, :-1].contiguous(), t[:, -1].contiguous()

    def state_dict(self) -> dict:
        return {"batch": self.k, "seed": self.seed, "split": self.split}

    def load_state_dict(self, d: dict) -> None:
        self.k = int(d["batch"])


def tokens(batch_size: int, seed: int = 0, split: str = "train", path: str = "", val_path: Optional[str] = None,
           val_fraction: float = 0.05, dtype: str = "uint16", offset: int = 0, seq_len: int = 64,
           column: Optional[str] = None, tokenizer: str = "bytes", cache: Optional[str] = None,
           vocab_size: Optional[int] = None, format: str = "sequence") -> Iterator:
    """Windows of a tokenized corpus (module docstring)."""
    if split not in SPLITS:
        raise UserError("data", f"unknown split {split!r}")
    if dtype not in DTYPES:
        raise UserError("data.args.dtype", f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if format not in ("sequence", "window"):
        raise UserError("data.args.format", f"unknown format {format!r}; expected sequence or window")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise UserError("data.args.seq_len", f"must be an integer >= 1, got {seq_len!r}")
    if not 0 <= val_fraction < 1 or (val_path is None and val_fraction == 0):
        raise UserError("data.args.val_fraction", f"must be in (0, 1) without val_path, got {val_fraction!r}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise UserError("data.args.vocab_size", f"must be an integer >= 1, got {vocab_size!r}")
    stamp = tuple((str(f), st.st_size, st.st_mtime_ns) for spec in (path, val_path) if spec
                  for f in find_files(spec, "data.args.path") for st in [f.stat()])
    train, val = _corpora(path, val_path, dtype, int(offset), column, tokenizer,
                          str(Path(cache).resolve()) if cache else None, stamp)
    if val is not None:
        corpus, lo, hi = (train, 0, train.total) if split == "train" else (val, 0, val.total)
    else:
        cut = int(train.total * (1 - val_fraction))
        corpus, (lo, hi) = train, ((0, cut) if split == "train" else (cut, train.total))
    if vocab_size is not None and hi - lo <= SCAN_LIMIT:
        _scanned(id(corpus), corpus, vocab_size, lo, hi)
    return TokenStream(corpus, lo, hi, seq_len, batch_size, seed, split, format, vocab_size)


_SCANNED: set = set()


def _scanned(key: int, corpus: Corpus, vocab: int, lo: int, hi: int) -> None:
    if (key, vocab, lo, hi) not in _SCANNED:
        corpus.check_vocab(vocab, lo, hi)
        _SCANNED.add((key, vocab, lo, hi))


def clear_cache() -> None:
    """Forget the opened corpora (tests rewrite files in place)."""
    _corpora.cache_clear()
    _SCANNED.clear()


