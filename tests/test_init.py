"""`mutransfer init` (commands/init.py): recipes drafted from four transformers architectures plan
exactly as the hand-written ones in recipes/, pass the dry run as written, explain their choices;
a package factory gets a draft too; and the shipped hf recipes print no third-party warning."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import cli_in

pytest.importorskip("transformers")

from mutransfer.engine.hparams import HParams  # noqa: E402
from mutransfer.report.explain import explain  # noqa: E402
from mutransfer.run.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _plan(path: Path, cwd: Path) -> dict:
    import os

    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = load_recipe(path)
        plan, _, _ = explain(r, r.widths.target, HParams.from_train(r.train))
    finally:
        os.chdir(old)
    d = plan.to_json()
    return {"params": d["params"], "readout": d["readout_multipliers"], "width": d["width"],
            "base": d["base_width"]}


@pytest.mark.parametrize("arch,flags", [("gpt2", []), ("llama", ["--kv-groups", "2"]),
                                        ("qwen2", ["--kv-groups", "2"]), ("bert", [])])
def test_init_plans_equal_the_hand_written_recipes(tmp_path, arch, flags):
    res = cli_in(tmp_path, "init", f"hf:{arch}", "--out", "drafted.yaml", *flags)
    assert res.exit_code == 0, res.output
    text = (tmp_path / "drafted.yaml").read_text()
    assert text.startswith("# mutransfer init") and "is the width" in text and "d_head fixed" in text
    assert _plan(tmp_path / "drafted.yaml", tmp_path) == _plan(ROOT / "recipes" / f"hf-{arch}.yaml", tmp_path)
    res = cli_in(tmp_path, "scale", "drafted.yaml", "--dry-run")           # as written
    assert res.exit_code == 0 and "target:" in res.output, res.output


def test_the_draft_explains_the_width_fields_it_found(tmp_path):
    assert cli_in(tmp_path, "init", "hf:llama", "--out", "l.yaml").exit_code == 0
    text = (tmp_path / "l.yaml").read_text()
    assert "intermediate_size = 8/3 x 4096" in text and "num_hidden_layers is the depth" in text
    assert (tmp_path / "data" / "hf-llama-placeholder.bin").stat().st_size == 2 * 65536
    # run again: the recipe it wrote is its own (overwritten); a file it did not write is refused
    assert cli_in(tmp_path, "init", "hf:llama", "--out", "l.yaml").exit_code == 0
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    res = cli_in(tmp_path, "init", "hf:llama", "--out", "mine.yaml")
    assert res.exit_code == 2 and "--out" in res.output
    assert (tmp_path / "mine.yaml").read_text() == "name: mine\n"


def test_an_unknown_model_type_is_one_line(tmp_path):
    res = cli_in(tmp_path, "init", "hf:no-such-arch", "--out", "x.yaml")
    assert res.exit_code == 2 and "no-such-arch" in res.output and not (tmp_path / "x.yaml").exists()


def test_a_package_factory_gets_a_draft_that_plans(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    (tmp_path / "p23_initfac.py").write_text(
        "import torch\n"
        "def make(width, depth=2, vocab=256, seq_len=64):\n"
        "    layers = [torch.nn.Embedding(vocab, width)]\n"
        "    for _ in range(depth):\n"
        "        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]\n"
        "    return torch.nn.Sequential(*layers, torch.nn.Linear(width, vocab))\n")
    res = cli_in(tmp_path, "init", "p23_initfac:make", "--out", "f.yaml")
    assert res.exit_code == 0, res.output
    d = yaml.safe_load((tmp_path / "f.yaml").read_text())
    assert d["model"]["args"] == {"depth": 2, "vocab": 256, "seq_len": 64}
    assert d["data"]["factory"] == "builtin:tokens"
    res = cli_in(tmp_path, "init", "p23_initfac:make", "--out", "g.yaml", "--width-arg", "d_model")
    assert res.exit_code == 2 and "--width-arg" in res.output


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "bert"])
def test_the_shipped_hf_recipes_print_no_third_party_warning(tmp_path, arch, capfd):
    res = cli_in(tmp_path, "scale", ROOT / "recipes" / f"hf-{arch}.yaml", "--dry-run")
    assert res.exit_code == 0, res.output
    err = capfd.readouterr()
    assert "third-party" not in res.output + err.err + err.out
    assert "bos_token_id" not in res.output + err.err + err.out


def test_third_party_warnings_are_one_line_unless_verbose():
    import io
    import logging
    import warnings

    from mutransfer import quiet

    ours = str(Path(quiet.__file__))
    for verbose in (False, True):
        seen, out = [], io.StringIO()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, *a, **k: seen.append(str(m))
            with quiet.collected(verbose, out=out):
                warnings.warn_explicit("lib says", UserWarning, "/x/lib/python3/site-packages/somelib/m.py", 1)
                warnings.warn_explicit("tool says", UserWarning, ours, 1)
                warnings.warn_explicit("user says", UserWarning, "/home/me/proj/factory.py", 1)
                quiet.adopt_logger("transformers")
                logging.getLogger("transformers.configuration_utils").warning("bos_token_id out of range")
        if verbose:
            assert seen == ["lib says", "tool says", "user says"] and out.getvalue() == ""
        else:
            assert seen == ["tool says", "user says"]                       # ours and the user's: shown
            line = out.getvalue().strip()
            assert line == ("note: 2 third-party warnings (1 from somelib, 1 from transformers); "
                            "--verbose shows them")
    assert not any(type(h).__name__ == "_Counting" for h in logging.getLogger("transformers").handlers)
