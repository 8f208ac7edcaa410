"""`mutransfer init`: write a first, commented, valid recipe by inspecting an architecture.

    mutransfer init hf:llama --width 64 --out llama.yaml
    mutransfer init mypkg.models:make --width 64

For `hf:<model_type>` the config class is read (never downloaded): the width field is the one
`hidden_size` names (its attribute_map), and every other integer field that grows with it is found
by building the config's defaults and comparing each with the hidden size (intermediate_size =
8/3 x hidden rounded up to 256 for Llama's SwiGLU, 4 x for GPT-2 and BERT); fields left to the model
(GPT-2's n_inner: None) are measured by building the model at two widths on the meta device and
seeing which dimensions move. The head count field, the key/value head field, the layer count field
and the vocabulary and position fields come from the attribute_map and the config's names. Dropout is
switched off; token ids the config holds (bos/eos/pad) are kept inside the vocabulary. The data
section points at a placeholder token file written beside the recipe (random ids: replace it).
Each decision is written as a comment above its line, with a NOTE for anything it could not decide.
The recipe is validated and its plan built (as `scale --dry-run` does) before it is written.

For `package.module:function` the factory's signature is read: its `width` keyword (or --width-arg),
a depth keyword, a vocabulary keyword; arguments without defaults are listed as NOTEs.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from ..atomic import write_text, write_via
from ..errors import UserError
from ..outputs_guard import check_output

MARK = "mutransfer init"
DEPTH_NAMES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "layers", "depth")
VOCAB_NAMES = ("vocab_size", "vocab", "n_vocab", "num_tokens")
POS_NAMES = ("max_position_embeddings", "n_positions", "n_ctx", "seq_len", "max_seq_len", "block_size")
TOKEN_ID_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
                  "cls_token_id")


@dataclass
class Draft:
    """The recipe being written: its data, a comment per key path, and the notes."""
    recipe: dict
    comments: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ hf configs

def _ratio(value: int, hidden: int) -> Optional[tuple[float, int, str]]:
    """(multiplier, round_to, why) when `value` is a simple multiple of `hidden` (exactly, or p/q x hidden
    rounded up to a power-of-two multiple, as Llama's 8/3 x d to 256), else None."""
    if value % hidden == 0 and 1 <= value // hidden <= 16:
        return float(value // hidden), 1, f"= {value // hidden} x {hidden} in the default config"
    for q in (3, 2):
        for p in range(1, 16 * q + 1):
            if math.gcd(p, q) != 1:
                continue
            for m in (8, 16, 32, 64, 128, 256, 512):
                if math.ceil(p * hidden / q / m) * m == value:
                    return (p / q, 8, f"= {p}/{q} x {hidden} rounded up to {m} in the default config "
                            f"({value}); rounded to 8 here, which keeps small proxies close to {p}/{q}")
    return None


def _measure_inner(tf, model_type: str, auto, fields: dict, hidden_f: str, heads_f: Optional[str],
                   head_dim: int, w: int) -> Optional[int]:
    """Multiplier k of a dimension k x width that only the model knows (GPT-2's n_inner: None -> 4 x),
    from the parameter shapes of the model built at two widths on the meta device."""
    import torch

    dims = []
    for width in (w, 2 * w):
        f = dict(fields, **{hidden_f: width})
        if heads_f:
            f[heads_f] = width // head_dim
        with torch.device("meta"):
            m = auto.from_config(tf.AutoConfig.for_model(model_type, **f))
        dims.append({d for p in m.parameters() for d in p.shape})
    for k in (8, 6, 4, 3, 2):      # the largest: attention's fused q,k,v (3 x width) is not the MLP
        if k * w in dims[0] and 2 * k * w in dims[1]:
            return k
    return None


def hf_draft(model_type: str, width: int, target: int, depth: int, vocab: int, seq_len: int,
             head_dim: Optional[int], kv_groups: int, name: str) -> Draft:
    from ..models import hf

    tf = hf._transformers()
    try:
        cfg = tf.AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        raise UserError("model", f"transformers knows no model type {model_type!r}") from None
    amap = dict(getattr(cfg, "attribute_map", {}) or {})
    d = cfg.to_dict()

    def real(n: str) -> Optional[str]:
        r = amap.get(n, n)
        return r if r in d else None

    hidden_f = real("hidden_size")
    if hidden_f is None or not isinstance(d.get(hidden_f), int):
        raise UserError("model", f"the {type(cfg).__name__} has no integer hidden_size field: write the recipe "
                        "by hand (docs/your-project.md)")
    hidden = d[hidden_f]
    c: dict[str, str] = {}
    notes: list[str] = []
    args: dict[str, Any] = {}
    width_fields: dict[str, float] = {hidden_f: 1}
    c["model.width_fields"] = (f"{hidden_f} is the width (the config's hidden_size); fields that grow with it "
                               "were found by comparing the default config's sizes with it")
    round_to = 1
    heads_f = real("num_attention_heads")
    kv_f = next((x for x in ("num_key_value_heads", "n_kv_heads", "num_kv_heads") if x in d), None)
    depth_f = next((real(n) for n in DEPTH_NAMES if real(n)), None)
    vocab_f = next((real(n) for n in VOCAB_NAMES if real(n)), None)
    pos_f = next((real(n) for n in POS_NAMES if real(n)), None)
    skip = {hidden_f, heads_f, kv_f, depth_f, vocab_f, pos_f, "head_dim"}
    for k, v in d.items():
        if k in skip or isinstance(v, bool) or not isinstance(v, int) or k.endswith("_id") or v <= hidden // 2:
            continue
        r = _ratio(v, hidden)
        if r is not None and any(s in k for s in ("intermediate", "inner", "ffn", "ff_", "mlp", "hidden")):
            width_fields[k] = r[0]
            round_to = max(round_to, r[1])
            c["model.width_fields"] += f"; {k} {r[2]}"
    if head_dim is None:
        dh = hidden // d[heads_f] if heads_f and d.get(heads_f) else 64
        head_dim = min(dh, max(8, 2 ** int(math.log2(max(1, width // 4)))))
        c["model.head_dim"] = (f"d_head fixed (heads grow with width: muP's 1/d_head attention holds); the default "
                               f"config has {dh}, the largest power of two giving the proxy {width} four heads or more "
                               f"is {head_dim}")
    try:
        from transformers.models.auto import modeling_auto as ma
        masked, causal = ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES, ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except (ImportError, AttributeError):
        masked, causal = {}, {model_type: ""}
    task = "masked-lm" if model_type in masked else ("causal-lm" if model_type in causal else "base")
    c["model.task"] = {"masked-lm": "an encoder (masked-LM head); the token data's targets are the next tokens: "
                       "write a data factory that masks for real masked-LM pretraining",
                       "causal-lm": "a decoder with a language-model head",
                       "base": "no LM head known for this type: the bare model"}[task]
    if task == "base":
        notes.append("task base: the model's output is its hidden state; set model.output and a loss that fits")
    auto = getattr(tf, hf.TASKS[task])
    if depth_f:
        args[depth_f] = depth
        c[f"model.args.{depth_f}"] = f"{depth_f} is the depth (layers); add a depths: section to transfer it too"
    else:
        notes.append("no layer-count field found: the depth is the config's default")
    if vocab_f:
        args[vocab_f] = vocab
        c[f"model.args.{vocab_f}"] = f"{vocab_f}: the vocabulary, which must match the token data (checked per batch)"
    if pos_f:
        args[pos_f] = seq_len
    for k, v in d.items():
        if ("dropout" in k or "pdrop" in k or k.endswith("drop_prob") or k.endswith("dropout_prob")) \
                and isinstance(v, float) and v > 0:
            args[k] = 0.0
    if any("drop" in k for k in args):
        c["model.args"] = "dropout off (tuning on a short proxy run is cleaner without it; set it back at will)"
    for k in TOKEN_ID_NAMES:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v >= vocab:
            args[k] = 0
            c.setdefault("model.args", "")
            c["model.args"] = (c["model.args"] + "; " if c["model.args"] else "") + \
                f"{k} {v} is outside the {vocab}-token vocabulary: 0 here"
    if "n_inner" in d and d.get("n_inner") is None and task != "base":
        k = _measure_inner(tf, model_type, auto, args, hidden_f, heads_f, head_dim, width)
        if k is not None:
            width_fields["n_inner"] = float(k)
            c["model.width_fields"] += f"; n_inner is None in the config and the model builds {k} x width: {k}"
    model: dict[str, Any] = {"factory": f"hf:{model_type}", "task": task, "args": args,
                             "width_fields": width_fields}
    if round_to > 1:
        model["round_to"] = round_to
    if heads_f:
        model["heads_field"], model["head_dim"] = heads_f, head_dim
        if kv_f:
            model["kv_heads_field"], model["kv_groups"] = kv_f, kv_groups
            c["model.kv_groups"] = (f"{kv_f}: key/value heads = heads / kv_groups (the default config has "
                                    f"{d[heads_f] // max(1, d[kv_f] or d[heads_f])}; --kv-groups sets it)")
    else:
        notes.append("no head-count field found: heads stay fixed, d_head grows with width (coord-check will say)")
    if task == "causal-lm":
        model.pop("task")          # the default
    return Draft(_recipe_body(name, model, width, target, seq_len, vocab), c, notes)


def _recipe_body(name: str, model: dict, width: int, target: int, seq_len: int, vocab: int,
                 data: Optional[dict] = None) -> dict:
    return {
        "name": name,
        "model": model,
        "data": data or {"factory": "builtin:tokens",
                         "args": {"path": f"data/{name}-placeholder.bin", "dtype": "uint16", "seq_len": seq_len,
                                  "val_fraction": 0.05}},
        "loss": "cross_entropy",
        "widths": {"proxy": width, "target": target},
        "train": {"optimizer": "adamw", "lr": 3.0e-3, "steps": 100, "batch_size": 16, "seed": 0,
                  "eval_batches": 4},
        "search": {"trials": 8, "params": {"lr": {"low": 3.0e-4, "high": 3.0e-2, "log": True}}},
    }


# ------------------------------------------------------------------------------ python factories

def factory_draft(spec: str, width: int, target: int, depth: int, vocab: int, seq_len: int, width_arg: str,
                  name: str) -> Draft:
    from ..run.user_code import resolve_factory

    fn = resolve_factory(spec, "factory", {})
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise UserError("factory", f"cannot read the signature of {spec!r}") from None
    ps = sig.parameters
    c: dict[str, str] = {}
    notes: list[str] = []
    if width_arg != "width" or "width" not in ps:
        raise UserError("--width-arg", f"{spec} must take the width as a keyword named `width` (mutransfer calls "
                        f"factory(width=...)); it takes {', '.join(ps) or 'nothing'}: wrap it, e.g. "
                        f"def make(width, **kw): return {getattr(fn, '__name__', 'f')}({width_arg}=width, **kw)")
    args: dict[str, Any] = {}
    model: dict[str, Any] = {"factory": spec}
    dep = next((n for n in DEPTH_NAMES if n in ps), None)
    if dep:
        args[dep] = depth
        if dep != "depth":
            model["depth_arg"] = dep
        c[f"model.args.{dep}"] = f"{dep} is the depth (a depths: section would transfer it too)"
    voc = next((n for n in VOCAB_NAMES if n in ps), None)
    if voc:
        args[voc] = vocab
    pos = next((n for n in POS_NAMES if n in ps), None)
    if pos:
        args[pos] = seq_len
    for n, p in ps.items():
        if n in ("width", dep, voc, pos) or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is inspect.Parameter.empty:
            notes.append(f"model.args.{n}: the factory requires it; fill it in")
    model["args"] = args
    data = None
    if voc is None:
        dim = next((n for n in ("in_dim", "d_in", "input_dim", "in_features") if n in ps), None)
        classes = next((n for n in ("out_dim", "d_out", "classes", "num_classes", "out_features") if n in ps), None)
        data = {"factory": "builtin:vectors", "args": {"dim": 32, "classes": 10}}
        if dim:
            args[dim] = 32
        if classes:
            args[classes] = 10
        notes.append("no vocabulary argument: synthetic vectors (dim 32, 10 classes) stand in; point data: at "
                     "your own data factory")
    c["model.args"] = "the factory's keywords this draft could name; its other defaults apply"
    return Draft(_recipe_body(name, model, width, target, seq_len, vocab, data), c, notes)


# ---------------------------------------------------------------------------------------- writing

def render(draft: Draft, spec: str) -> str:
    """The recipe as YAML with each decision's comment above its key, the notes at the top."""
    head = [f"# {MARK} {spec}: a first recipe. Every choice is explained above its line; check the NOTEs.",
            "# Then: mutransfer scale THIS.yaml --dry-run   (the plan), coord-check, tune, scale."]
    head += [f"# NOTE: {n}" for n in draft.notes]
    lines = []
    path: list[tuple[int, str]] = []
    for raw in yaml.safe_dump(draft.recipe, sort_keys=False, width=110).splitlines():
        indent = len(raw) - len(raw.lstrip(" "))
        key = raw.strip().split(":", 1)[0] if ":" in raw and not raw.strip().startswith("-") else None
        while path and path[-1][0] >= indent:
            path.pop()
        if key is not None:
            full = ".".join([p for _, p in path] + [key])
            if full in draft.comments:
                lines.append(" " * indent + "# " + draft.comments[full])
            path.append((indent, key))
        lines.append(raw)
    return "\n".join(head + lines) + "\n"


def _placeholder(path: Path, vocab: int, n: int = 1 << 16) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, vocab, n, dtype=np.uint16 if vocab <= 65536 else np.uint32)
    write_via(path, lambda tmp: data.tofile(tmp))


def init_command(spec: str, out: Optional[Path], width: int, target: Optional[int], depth: int, vocab: int,
                 seq_len: int, head_dim: Optional[int], kv_groups: int, width_arg: str, name: Optional[str],
                 say=print) -> Path:
    if width < 1 or (target is not None and target < width):
        raise UserError("--target" if target is not None else "--width", "need 1 <= --width <= --target")
    if vocab < 2 or vocab > 2**32:
        raise UserError("--vocab", f"must be between 2 and 2^32, got {vocab}")
    target = target or 4 * width
    name = name or ("hf-" + spec.split(":", 1)[1] if spec.startswith("hf:") else spec.split(":")[-1])
    out = Path(out) if out else Path(f"{name}.yaml")
    check_output(out, "--out", "init", suffix=".yaml")
    if spec.startswith("hf:"):
        draft = hf_draft(spec.split(":", 1)[1], width, target, depth, vocab, seq_len, head_dim, kv_groups, name)
    elif ":" in spec:
        draft = factory_draft(spec, width, target, depth, vocab, seq_len, width_arg, name)
    else:
        raise UserError("spec", f"{spec!r}: expected hf:<model_type> or package.module:function")
    text = render(draft, spec)
    # validated and planned exactly as `scale --dry-run` would, before anything is written
    from ..engine.hparams import HParams
    from ..report.explain import explain
    from ..run.recipe import parse_recipe

    recipe = parse_recipe(yaml.safe_load(text), str(out))
    recipe._path = out.resolve()
    data_file, made = None, False
    if recipe.data.factory == "builtin:tokens":
        data_file = Path(recipe.data.args["path"])        # data paths are relative to the working directory
        if not data_file.exists():
            check_output(data_file, "--out", "init")
            _placeholder(data_file, vocab)
            made = True
    try:
        explain(recipe, recipe.widths.target, HParams.from_train(recipe.train))
    except UserError as e:
        if made:
            data_file.unlink(missing_ok=True)
        raise UserError(e.where, f"the drafted recipe does not plan ({e.message}); write it by hand "
                        "(docs/your-project.md)") from None
    write_text(out, text)
    say(f"wrote {out}" + (f" (and a placeholder token file {data_file})" if data_file else ""))
    for n in draft.notes:
        say(f"note: {n}")
    return out
