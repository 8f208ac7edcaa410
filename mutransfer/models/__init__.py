"""Built-in models, reachable from recipes as builtin:NAME. Each is called as NAME(width=..., **args)."""
from .cnn import cnn
from .gpt import gpt
from .mlp import mlp
from .moe import moe_gpt
from .resmlp import resmlp

BUILTIN_MODELS = {"mlp": mlp, "gpt": gpt, "cnn": cnn, "resmlp": resmlp, "moe-gpt": moe_gpt}
# the keyword each built-in takes its depth by (recipes' `depths:`)
BUILTIN_DEPTH_ARGS = {"gpt": "layers", "resmlp": "depth", "mlp": "depth", "cnn": "blocks", "moe-gpt": "layers"}
