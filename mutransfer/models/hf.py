"""Hugging Face transformers models as factories, built from their configs (never downloaded).

    model:
      factory: "hf:gpt2"                      # hf:<model_type>, any type AutoConfig knows
      task: causal-lm                         # causal-lm | masked-lm | sequence-classification |
                                              #   image-classification | base   (default causal-lm)
      args: {n_layer: 2, vocab_size: 256, n_positions: 64}   # fixed config fields
      width_fields: {n_embd: 1, n_inner: 4}  # config field = multiplier x width
      round_to: 8                             # each width field rounded to the nearest multiple (>= 1x)
      heads_field: n_head                     # heads = width / head_dim (d_head fixed, heads grow) ...
      head_dim: 16
      kv_heads_field: num_key_value_heads     # ... and grouped-query attention: kv heads = heads / kv_groups
      kv_groups: 2
      attn_implementation: sdpa               # eager | sdpa (transformers' own choice when omitted)

Mixtures of experts (qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek_v3, gpt_oss, ...): give the experts'
size as a width field too (`moe_intermediate_size: 1`, or `intermediate_size` where that is the experts'
size), so each expert grows with width like a dense MLP; the experts' 3-D tensors are planned per expert
(shapes.py) and `output_router_logits: true` in `args` makes the model return its load-balancing
`aux_loss` for `train.aux_losses` (docs/moe.md).

Without heads_field the head count is whatever `args` (or the config's default) says: fixed, so
d_head grows with width and the model's 1/sqrt(d_head) attention is not muP (coord-check says so).
The depth is the architecture's own layer-count field (n_layer, num_hidden_layers), set in `args`.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import UserError

TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "base": "AutoModel",
}


def _transformers():
    try:
        import transformers

        from ..quiet import adopt_logger
        adopt_logger("transformers")      # its warnings counted into one line unless --verbose
    except ImportError:
        raise UserError("model.factory", "hf: factories need Hugging Face transformers: "
                        "pip install 'mutransfer[hf]'") from None
    return transformers


def width_value(mult: float, width: int, round_to: int) -> int:
    """mult x width rounded to the nearest multiple of round_to (at least round_to)."""
    return max(round_to, int(round(mult * width / round_to)) * round_to)


def config_fields(spec, width: int, fixed: dict[str, Any]) -> dict[str, Any]:
    """The config fields at `width`: the fixed ones, the width fields, the head counts."""
    fields = dict(fixed)
    for f, m in spec.width_fields.items():
        fields[f] = width_value(m, width, spec.round_to)
    if spec.heads_field:
        if width % spec.head_dim:
            raise UserError("model.head_dim", f"head_dim ({spec.head_dim}) must divide the width ({width})")
        heads = width // spec.head_dim
        fields[spec.heads_field] = heads
        if spec.kv_heads_field:
            if heads % spec.kv_groups:
                raise UserError("model.kv_groups", f"kv_groups ({spec.kv_groups}) must divide the head count "
                                f"({heads} at width {width})")
            fields[spec.kv_heads_field] = heads // spec.kv_groups
    return fields


def make_factory(spec) -> Callable[..., nn.Module]:
    """A `factory(width, **config_fields)` for the recipe's model spec (recipe.ModelSpec)."""
    tf = _transformers()
    model_type = spec.factory.split(":", 1)[1]
    try:
        default = tf.AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        raise UserError("model.factory", f"transformers knows no model type {model_type!r}") from None
    for where, names in (("model.args", spec.args), ("model.width_fields", spec.width_fields),
                         ("model.heads_field", [spec.heads_field] if spec.heads_field else []),
                         ("model.kv_heads_field", [spec.kv_heads_field] if spec.kv_heads_field else [])):
        for n in names:
            if not hasattr(default, n):
                raise UserError(f"{where}.{n}" if where.endswith("args") or where.endswith("fields") else where,
                                f"{n!r} is not a field of the {type(default).__name__}")
    auto = getattr(tf, TASKS[spec.task])
    kw = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}

    def factory(width: int, **fixed: Any) -> nn.Module:
        for n in fixed:     # model.args were checked above: anything else is the depth (model.depth_arg)
            if n not in spec.args and not hasattr(default, n):
                raise UserError("model.depth_arg", f"{n!r} is not a field of the {type(default).__name__}, so the "
                                "depth would be ignored; name its layer-count field (e.g. n_layer, num_hidden_layers)")
        fields = config_fields(spec, width, fixed)
        try:
            config = tf.AutoConfig.for_model(model_type, **fields)
            return auto.from_config(config, **kw)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers validates configs in many ways
            raise UserError("model", f"transformers could not build {model_type} at width {width} "
                            f"({', '.join(f'{k}={v}' for k, v in fields.items())}): {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None

    factory.__name__ = f"hf_{model_type}"
    return factory


def is_hf(spec_str: str) -> bool:
    return spec_str.startswith("hf:")

