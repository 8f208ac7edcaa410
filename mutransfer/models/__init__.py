"""Built-in models, reachable from recipes as builtin:NAME. Each is called as NAME(width=..., **args)."""
from .cnn import cnn
from .gpt import gpt
from .mlp import mlp

BUILTIN_MODELS = {"mlp": mlp, "gpt": gpt, "cnn": cnn}
