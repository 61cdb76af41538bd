"""The fuzzers of tests/fuzz/ in short seeded passes (the long runs: README, Reliability), every
input they ever found replayed, and the limits those findings led to."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qbin_testutil import rewrite_header, write_sample
from qformat import QbinError, QbinReader
from qformat.config import TokenizerInfo
from qformat.runtime.chat import render_chat
from qformat.runtime.tokenizer import Tokenizer

FUZZ = Path(__file__).resolve().parent / "fuzz"
pytest.importorskip("atheris")
sys.path.insert(0, str(FUZZ))
from fuzz import Targets  # noqa: E402
from seeds import TEMPLATES  # noqa: E402


def assert_ran_to_the_end(stderr: str, runs: int) -> None:
    # libFuzzer stops at the first check past -runs, and a unit it reduces on the way can count one
    # more (a CI run executed 1001 units for --runs 1000)
    done = re.search(r"Done (\d+) runs", stderr)
    assert done and int(done.group(1)) >= runs, stderr[-2000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    built = subprocess.run([sys.executable, str(FUZZ / "fuzz.py"), "reader", "--seeds-only", "--work", str(work)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return work


@pytest.mark.parametrize("target, runs", [("reader", 3000), ("tokenizer", 3000), ("template", 3000), ("gguf", 500)])
def test_short_fuzz_pass_finds_nothing(work, target, runs):
    run = subprocess.run([sys.executable, str(FUZZ / "fuzz.py"), target, "--runs", str(runs), "--seed", "1",
                          "--work", str(work)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_ran_to_the_end(run.stderr, runs)


def test_a_parent_past_the_memory_limit_is_not_the_fuzzers_finding(work):
    # Linux carries a parent's peak RSS into the fuzzer through fork and exec, and libFuzzer's
    # limit reads that peak: this suite's own process passes 1 GB before it gets here
    parent = ("import subprocess, sys, numpy as np\n"
              "held = np.ones(1200 << 17)\n"  # 1.2 GB, touched
              f"sys.exit(subprocess.run([sys.executable, {str(FUZZ / 'fuzz.py')!r}, 'template', '--runs', '1000', "
              f"'--work', {str(work)!r}]).returncode)\n")
    run = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "out-of-memory" not in run.stderr
    assert_ran_to_the_end(run.stderr, 1000)


def test_every_input_found_replays_cleanly(tmp_path):
    targets = Targets(tmp_path)
    found = sorted((FUZZ / "regressions").glob("*/*"))
    assert found
    for path in found:
        getattr(targets, path.parent.name)(path.read_bytes())


def test_group_size_past_32_bits_is_refused(tmp_path):
    base, _ = write_sample(tmp_path / "s.qbin")

    def huge(h):
        h["tensors"]["layers.0.ffn.w3"]["group_size"] = 2**64 + 1

    with pytest.raises(QbinError, match="group_size"):
        QbinReader(rewrite_header(base, huge, out=tmp_path / "bad.qbin"))


def test_a_tokenizer_that_loads_empty_is_refused():
    with pytest.raises(QbinError, match="sentencepiece tokenizer does not load"):
        Tokenizer(TokenizerInfo("sentencepiece", "tokenizer"), b"", source="x.qbin")
    with pytest.raises(QbinError, match="hf-json tokenizer does not load"):
        Tokenizer(TokenizerInfo("hf-json", "tokenizer"), b"\xff{", source="x.qbin")


@pytest.mark.parametrize("template, needle", [
    ("{{ 'a' * 10**9 }}", "product of 1000000000 items"),
    ("{{ x " + "+" * 200 + "y }}", "nests deeper"),  # 2.6 s in jinja2's compiler (a fuzzer's find)
    ("{{ " + "+" * 90 + "'x' }}", "nests deeper"),  # half a second on a loaded machine (another)
    ("{{ 10 ** 100000000 }}", "exponent"),
    ("{% for a in range(2000) %}{% for b in range(2000) %}xx{% endfor %}{% endfor %}", "rendered"),
    ("{{ raise_exception('roles must alternate') }}", "refuses these messages: roles must alternate"),
    ("{% for %}", "TemplateSyntaxError"),
    ("{{ messages.__class__.__mro__ }}", "fails"),
])
def test_chat_templates_past_the_sandbox_are_one_error(template, needle):
    started = time.perf_counter()
    with pytest.raises(QbinError, match=needle):
        render_chat(template, [{"role": "user", "content": "hi"}], source="x.qbin")
    assert time.perf_counter() - started < 5


def test_templates_people_ship_still_render():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for template in TEMPLATES:
        assert "hi" in render_chat(template, messages, "<s>", "</s>")
    np.testing.assert_equal(render_chat("{{ 2 ** 10 }}{{ 'ab' * 3 }}", []), "1024ababab")
