"""Width inference on the meta device: fans, roles, layouts, tied weights and mismatches across widths."""
import pytest
import torch
from torch import nn

from mutransfer import UserError
from mutransfer.engine.shapes import build_meta, fans, infer_shapes
from mutransfer.models import cnn, gpt, mlp


def roles(shapes):
    return {n: (s.role, s.fan_in, s.fan_out) for n, s in shapes.params.items()}


def test_gpt_roles_and_fans():
    s = infer_shapes(gpt, dict(layers=1, heads=2, vocab=50, seq_len=8), 32, 128)
    r = roles(s)
    assert r["tok.weight"] == ("input", 1, 128)            # one-hot inputs: fan_in 1
    assert r["pos.weight"] == ("input", 1, 128)
    assert r["blocks.0.attn.qkv.weight"] == ("hidden", 128, 384)
    assert r["blocks.0.fc_out.weight"] == ("hidden", 512, 128)
    assert r["blocks.0.attn.qkv.bias"] == ("vector", 1, 384)
    assert r["blocks.0.ln1.weight"] == ("vector", 1, 128)
    assert r["head.weight"] == ("output", 128, 50)
    assert s.params["tok.weight"].base_shape == (50, 32) and s.params["tok.weight"].shape == (50, 128)
    assert s.tied_readouts == {} and s.unknown == []


def test_mlp_roles_and_fixed_output_bias():
    r = roles(infer_shapes(mlp, dict(in_dim=5, out_dim=3, depth=3), 16, 64))
    assert r["inp.weight"] == ("input", 5, 64)
    assert r["hidden.1.weight"] == ("hidden", 64, 64)
    assert r["out.weight"] == ("output", 64, 3)
    assert r["out.bias"] == ("fixed", 1, 3)               # nothing grows
    assert r["inp.bias"] == ("vector", 1, 64)


def test_conv_fans_include_the_kernel():
    r = roles(infer_shapes(cnn, dict(in_channels=3, classes=7, blocks=1), 8, 32))
    assert r["stem.weight"] == ("input", 3 * 9, 32)       # (out, in*kernel)
    assert r["blocks.0.conv.weight"] == ("hidden", 32 * 9, 32)
    assert r["blocks.0.norm.weight"] == ("vector", 1, 32)  # GroupNorm gain
    assert r["head.weight"] == ("output", 32, 7)


def test_same_width_still_sees_what_grows():
    """At width == base_width the roles come from a third build at twice the width."""
    s = infer_shapes(mlp, dict(in_dim=5, out_dim=3), 16, 16)
    assert roles(s)["hidden.0.weight"] == ("hidden", 16, 16)
    assert roles(s)["out.weight"] == ("output", 16, 3)


def test_fans_by_layout():
    assert fans((10, 4), "out_in") == (4, 10)
    assert fans((10, 4, 3, 3), "out_in") == (36, 10)
    assert fans((4, 10), "in_out") == (4, 10)
    assert fans((4, 10, 3), "in_out") == (12, 10)          # ConvTranspose: (in, out, k)
    assert fans((1000, 64), "embedding") == (1, 64)
    assert fans((64,), "vector") == (1, 64)
    assert fans((), "fixed") == (1, 1)


class Unequal(nn.Module):
    """Hidden widths w and 3w: fan ratios are not 1."""

    def __init__(self, width):
        super().__init__()
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(width, 3 * width)
        self.c = nn.Linear(3 * width, width)
        self.d = nn.Linear(width, 2)


def test_unequal_hidden_widths():
    r = roles(infer_shapes(lambda width: Unequal(width), {}, 8, 32))
    assert r["b.weight"] == ("hidden", 32, 96)
    assert r["c.weight"] == ("hidden", 96, 32)


class Raw(nn.Module):
    """Raw parameters: an (in, out) matrix used as x @ W and an embedding table used by indexing."""

    def __init__(self, width, vocab=20, out=3):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, width))
        self.w = nn.Parameter(torch.randn(width, width))
        self.w_out = nn.Parameter(torch.randn(width, out))
        self.gain = nn.Parameter(torch.ones(width))
        self.temp = nn.Parameter(torch.tensor(1.0))

    def forward(self, idx):
        h = self.table[idx] * self.gain
        return torch.relu(h @ self.w) @ self.w_out * self.temp


def test_raw_parameters_are_guessed_and_listed_in_a_warning():
    with pytest.warns(UserWarning, match="no known module") as rec:
        s = infer_shapes(lambda width: Raw(width), {}, 8, 32)
    msg = str(rec[0].message)
    assert "table" in msg and "w_out" in msg
    assert set(s.unknown) == {"table", "w", "w_out", "gain", "temp"}
    r = roles(s)
    # guessed as (out, in): the table looks like an output matrix, w_out like an input -- both wrong
    assert r["table"][0] == "output" and r["w_out"][0] == "input"
    assert r["gain"] == ("vector", 1, 32) and r["temp"][0] == "fixed"


def test_layouts_override_raw_parameters():
    lay = {"table": "embedding", "w*": "in_out"}
    s = infer_shapes(lambda width: Raw(width), {}, 8, 32, layouts=lay, warn=False)
    r = roles(s)
    assert r["table"] == ("input", 1, 32)
    assert r["w"] == ("hidden", 32, 32)
    assert r["w_out"] == ("output", 32, 3)
    assert s.unknown == ["gain", "temp"]
    assert s.params["table"].kind == "embedding"


def test_tied_embedding_and_readout_follow_the_embedding():
    s = infer_shapes(gpt, dict(layers=1, heads=2, vocab=50, seq_len=8, tied=True), 32, 64)
    assert "head.weight" not in s.params                     # one tensor, one entry
    assert s.tied_readouts == {"head": "tok.weight"}
    assert roles(s)["tok.weight"] == ("input", 1, 64)


class DepthGrows(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(width // 16))


class RankChanges(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(width) if width < 32 else torch.zeros(width, 2))


def test_names_that_differ_across_widths_are_a_clear_error():
    with pytest.raises(UserError, match="parameter names differ between widths 16 and 64") as e:
        infer_shapes(lambda width: DepthGrows(width), {}, 16, 64)
    assert e.value.where == "model.factory" and "depth" in e.value.message


def test_shapes_that_change_rank_across_widths_are_a_clear_error():
    with pytest.raises(UserError, match="rank 1 at width 16 but 2 at 64"):
        infer_shapes(lambda width: RankChanges(width), {}, 16, 64)


def test_factory_failures_become_user_errors():
    with pytest.raises(UserError) as e:
        build_meta(lambda width: 3, 8, {})
    assert e.value.where == "model.factory" and "not a torch.nn.Module" in e.value.message
    with pytest.raises(UserError) as e:
        build_meta(mlp, 8, {"nonsense": 1})
    assert e.value.where == "model.args"
    with pytest.raises(UserError) as e:
        build_meta(gpt, 30, {"heads": 4})
    assert e.value.where == "model.args.heads" and "divide" in e.value.message


def test_nothing_is_allocated():
    s = infer_shapes(gpt, dict(layers=2, heads=8, vocab=256, seq_len=64), 64, 8192)
    assert s.params["blocks.0.fc.weight"].shape == (4 * 8192, 8192)
    m = build_meta(gpt, 8192, dict(layers=1, heads=8))
    assert all(p.device.type == "meta" for p in m.parameters())


def test_a_factory_that_ignores_width_is_an_error():
    with pytest.raises(UserError, match="no parameter changes shape between widths 16 and 64"):
        infer_shapes(lambda width: nn.Linear(8, 8), {}, 16, 64)
    with pytest.raises(UserError, match="widths 16 and 32"):          # same width: compared with 2x
        infer_shapes(lambda width: nn.Linear(8, 8), {}, 16, 16)
