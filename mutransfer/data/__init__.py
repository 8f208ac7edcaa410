"""Built-in data sources, reachable as builtin:NAME. Each is called as
NAME(batch_size=..., seed=..., split="train"|"val", **args) and returns an infinite iterator of
(inputs, targets)."""
from .bytes import pysource, text
from .synthetic import images, vectors
from .tokenized import tokens

BUILTIN_DATA = {"pysource": pysource, "text": text, "vectors": vectors, "images": images, "tokens": tokens}
