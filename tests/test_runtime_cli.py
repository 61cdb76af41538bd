"""qrun: output, timings on stderr, perplexity mode, and one-line exit-2 errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from tiny_models import make_tiny_checkpoint  # noqa: E402

from qformat.convert import convert  # noqa: E402
from qformat.runtime.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def qbin(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("cli"), arch="llama", tied=True, seed=2)
    out = folder.parent / "cli.qbin"
    convert(folder, out, "int8", progress=False, clip_search=False)
    return out


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_generates_and_reports_speed(qbin, capsys):
    code, out, err = run([qbin, "-p", "The capital of France is", "-n", "8", "--threads", "1"], capsys)
    assert code == 0 and out.strip()
    assert "prefill:" in err and "tokens/s" in err
    code, out, err = run([qbin, "-p", "The capital", "-n", "4", "--quiet"], capsys)
    assert code == 0 and err == ""


def test_prompt_from_file_and_stdin(qbin, tmp_path, capsys, monkeypatch):
    f = tmp_path / "p.txt"
    f.write_text("The capital of France is")
    code, from_file, _ = run([qbin, "--prompt-file", f, "-n", "6", "-q"], capsys)
    assert code == 0
    code, from_arg, _ = run([qbin, "-p", "The capital of France is", "-n", "6", "-q"], capsys)
    assert from_file == from_arg
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital of France is"))
    code, from_stdin, _ = run([qbin, "-n", "6", "-q"], capsys)
    assert code == 0 and from_stdin == from_arg


def test_chat_multi_turn_from_stdin(qbin, capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nHow are you?\n"))
    code, out, err = run([qbin, "--chat", "--system", "Be brief.", "-n", "4"], capsys)
    assert code == 0
    assert err.count("prefill:") == 2  # one report per turn


def test_perplexity_mode(qbin, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"The number {i} follows {i - 1}." for i in range(400)))
    code, out, err = run([qbin, "--ppl", text, "--windows", "1", "--window", "128", "--reference", qbin, "-q"], capsys)
    assert code == 0
    assert "perplexity:" in out
    assert "kl divergence vs reference: 0.000000" in out  # a model against itself
    assert "top-1 agreement vs reference: 1.0000" in out


def corrupt(src, dst, offset):
    data = bytearray(src.read_bytes())
    data[offset] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("case", ["not_qbin", "corrupt_header", "missing", "too_long", "unknown_option",
                                  "empty_prompt", "cuda", "both_prompts", "bad_threads", "reference_alone"])
def test_bad_input_is_one_line_and_exit_2(qbin, tmp_path, capsys, case):
    if case == "cuda":
        from qformat.kernels.cuda.module import gpu_status

        if gpu_status()[0]:
            pytest.skip("a GPU is here: --device cuda is not bad input")
    other = tmp_path / "x.txt"
    other.write_text("hello")
    argv = {
        "not_qbin": [other, "-p", "hi"],
        "corrupt_header": [corrupt(qbin, tmp_path / "c.qbin", 40), "-p", "hi"],
        "missing": [tmp_path / "nope.qbin", "-p", "hi"],
        "too_long": [qbin, "-p", "word " * 50, "--context", "8"],
        "unknown_option": [qbin, "--frobnicate"],
        "empty_prompt": [qbin, "-p", "   "],
        "cuda": [qbin, "-p", "hi", "--device", "cuda"],
        "both_prompts": [qbin, "-p", "hi", "--prompt-file", other],
        "bad_threads": [qbin, "-p", "hi", "--threads", "0"],
        "reference_alone": [qbin, "-p", "hi", "--reference", qbin],
    }[case]
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qrun: "), err
    assert "Traceback" not in err


def test_console_script_subprocess(qbin):
    """The installed entry point itself: a real process, exit status 2 and a single line."""
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "qformat.runtime.cli", str(qbin), "--nope"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_json_schema_option(qbin, tmp_path, capsys):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    code, out, _ = run([qbin, "-p", "Count:", "-n", "30", "-t", "1", "--seed", "1", "--json-schema", f, "-q"], capsys)
    assert code == 0
    value = json.loads(out)
    assert set(value) == {"n"} and 0 <= value["n"] <= 99
    f.write_text('{"type": "nonsense"}')
    code, _, err = run([qbin, "-p", "x", "--json-schema", f], capsys)
    assert code == 2 and "JSON schema" in err and "nonsense" in err
    f.write_text("[1,")
    code, _, err = run([qbin, "-p", "x", "--json-schema", f], capsys)
    assert code == 2 and "--json-schema" in err and "not JSON" in err
