"""Bad recipes through the CLI (`mutransfer scale RECIPE --dry-run --json OUT`): exit code 2, one short
line naming the field, no traceback, nothing written."""
import copy
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from mutransfer.cli import app

GOOD = {
    "name": "t",
    "model": {"factory": "builtin:gpt", "args": {"layers": 1, "heads": 4, "vocab": 32, "seq_len": 8}},
    "data": {"factory": "builtin:vectors", "args": {"dim": 4}},
    "loss": "cross_entropy",
    "widths": {"proxy": 16, "target": 64},
    "train": {"optimizer": "adamw", "lr": 1e-3, "steps": 10, "batch_size": 4},
}


def run(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["scale", str(path), "--dry-run", "--json", str(out)])
    return res, out


def with_change(change):
    r = copy.deepcopy(GOOD)
    change(r)
    return yaml.safe_dump(r)


def set_in(path, value):
    def change(r):
        d = r
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return change


def delete(path):
    def change(r):
        d = r
        *head, last = path
        for k in head:
            d = d[k]
        del d[last]
    return change


def assert_user_error(res, out, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit)
    text = res.stderr.strip()
    assert "Traceback" not in res.output
    assert len(text.splitlines()) == 1 and len(text) < 300, text
    assert text.startswith("error: ")
    for n in needles:
        assert n in text, (n, text)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    return text


CASES = {
    "unknown top-level key": (set_in(["epochs"], 3), ["epochs", "unknown key"]),
    "unknown nested key": (set_in(["train", "lrr"], 0.1), ["train.lrr", "unknown key"]),
    "wrong type": (set_in(["train", "lr"], "fast"), ["train.lr", "number"]),
    "wrong type int": (set_in(["widths", "proxy"], "wide"), ["widths.proxy", "integer"]),
    "missing field": (delete(["train", "lr"]), ["train.lr", "missing"]),
    "zero width": (set_in(["widths", "proxy"], 0), ["widths.proxy", "greater than 0"]),
    "negative width": (set_in(["widths", "target"], -8), ["widths.target"]),
    "proxy above target": (set_in(["widths", "proxy"], 128), ["widths", "above target"]),
    "negative lr": (set_in(["train", "lr"], -1e-3), ["train.lr", "greater than 0"]),
    "infinite lr": (set_in(["train", "lr"], float("inf")), ["train.lr", "finite"]),
    "boolean as a number": (set_in(["train", "steps"], True), ["train.steps", "number"]),
    "unknown loss": (set_in(["loss"], "hinge"), ["loss", "cross_entropy"]),
    "unknown optimizer": (set_in(["train", "optimizer"], "lion"), ["train.optimizer", "adamw"]),
    "unknown multiplier": (set_in(["train", "multipliers"], {"middle_lr": 2}), ["train.multipliers", "middle_lr"]),
    "bad layout": (set_in(["layouts"], {"w*": "diagonal"}), ["layouts.w*"]),
    "heads do not divide": (set_in(["model", "args", "heads"], 3), ["model.args.heads", "divide"]),
    "unknown model arg": (set_in(["model", "args", "depth"], 3), ["model.args", "depth"]),
    "unknown builtin": (set_in(["model", "factory"], "builtin:resnet"), ["model.factory", "resnet"]),
    "factory not a path": (set_in(["model", "factory"], "gpt"), ["model.factory"]),
    "missing module": (set_in(["model", "factory"], "no_such_module_xyz:f"), ["model.factory", "no_such_module_xyz"]),
    "missing function": (set_in(["model", "factory"], "math:no_such_fn"), ["model.factory", "no_such_fn"]),
    "not callable": (set_in(["model", "factory"], "math:pi"), ["model.factory", "not callable"]),
    "factory without width": (set_in(["model", "factory"], "math:sqrt"), ["model.factory", "width"]),
    "unknown data builtin": (set_in(["data", "factory"], "builtin:imagenet"), ["data.factory", "imagenet"]),
    "bad name": (set_in(["name"], "a b/c"), ["name"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe(tmp_path, case):
    change, needles = CASES[case]
    res, out = run(tmp_path, with_change(change))
    assert_user_error(res, out, *needles)


def test_unreadable_yaml_names_the_line(tmp_path):
    res, out = run(tmp_path, "name: t\nmodel: {factory: builtin:gpt\nwidths: [1, 2\n")
    text = assert_user_error(res, out, "r.yaml:", "unreadable YAML")
    assert "r.yaml:3" in text or "r.yaml:2" in text


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(tmp_path, text):
    res, out = run(tmp_path, text)
    assert_user_error(res, out, "must be a YAML mapping")


def test_binary_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage\x00")
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["scale", str(path), "--dry-run", "--json", str(out)])
    assert_user_error(res, out, "r.yaml")


def test_missing_recipe_file(tmp_path):
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["scale", str(tmp_path / "nope.yaml"), "--dry-run", "--json", str(out)])
    assert_user_error(res, out, "nope.yaml", "not found")


def test_user_factories_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "userfactories_abc.py").write_text(textwrap.dedent("""
        from torch import nn
        CONST = 3
        def no_width(depth=2):
            return nn.Linear(2, 2)
        def not_module(width):
            return [width]
        def explodes(width):
            raise RuntimeError("boom")
        def good(width, depth=2):
            return nn.Sequential(nn.Linear(4, width), *[nn.Linear(width, width) for _ in range(depth)],
                                 nn.Linear(width, 3))
    """))
    monkeypatch.chdir(tmp_path)
    for fn, needles in {
        "no_width": ["model.factory", "width"],
        "CONST": ["model.factory", "not callable"],
        "not_module": ["model.factory", "not a torch.nn.Module"],
        "explodes": ["model", "RuntimeError: boom"],
    }.items():
        res, out = run(tmp_path, with_change(set_in(["model"], {"factory": f"userfactories_abc:{fn}"})))
        assert_user_error(res, out, *needles)
    r = copy.deepcopy(GOOD)
    r["model"] = {"factory": "userfactories_abc:good", "args": {"depth": 1}}
    r["data"]["args"] = {"dim": 4, "classes": 3}
    res, out = run(tmp_path, yaml.safe_dump(r))
    assert res.exit_code == 0, res.output
    assert out.exists()
