"""Faults a converter and a runtime meet on real machines: a full disk, two conversions racing
for one path, Ctrl-C, a prompt at the context's edge (the README's Reliability section)."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from qformat import QbinReader  # noqa: E402

QCONVERT = [sys.executable, "-c", "from qformat.convert.cli import main; main()"]
QRUN = [sys.executable, "-c", "from qformat.runtime.cli import main; main()"]


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_checkpoint, tmp_path):
    def small_disk():  # a file-size limit stands in for a full disk: writes past it fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))

    out = tmp_path / "out" / "m.qbin"
    out.parent.mkdir()
    run = subprocess.run([*QCONVERT, str(tiny_checkpoint()), str(out), "-s", "int8"], preexec_fn=small_disk,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.replace("\r", "\n").splitlines() if "Error:" in line]
    assert len(lines) == 1 and "File too large while writing; nothing was written" in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists() and _leftovers(out.parent) == []


def test_two_conversions_to_one_path_leave_one_whole_file(tiny_checkpoint, tmp_path):
    out = tmp_path / "m.qbin"
    procs = [subprocess.Popen([*QCONVERT, str(tiny_checkpoint()), str(out), "-s", scheme, "--force"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for scheme in ("int8", "int4-g64")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with QbinReader(out, verify=True) as r:  # whichever finished last, complete and consistent
        assert r.provenance.scheme in ("int8", "int4-g64")
    assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def qbin(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    from qformat.convert import convert

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("faults"), arch="llama")
    out = folder.parent / "m.qbin"
    convert(folder, out, "int8", progress=False)
    return out


def test_ctrl_c_exits_with_130_and_no_traceback(qbin):
    proc = subprocess.Popen([*QRUN, str(qbin), "--chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # loading or waiting for the first message: either way Ctrl-C ends it cleanly
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_a_prompt_at_the_context_edge(qbin):
    import qformat

    model = qformat.load(qbin, threads=1, context=32)
    text = "".join(model.generate(list(range(3, 34)), max_tokens=4))  # 31 tokens: one position left
    assert model.stats.generated_tokens >= 1 and isinstance(text, str)
    with pytest.raises(ValueError, match="does not fit the context of 32"):
        model.generate(list(range(3, 35)))
    qrun = subprocess.run([*QRUN, str(qbin), "--context", "8", "--prompt", "word " * 40],
                          capture_output=True, text=True, timeout=120)
    assert qrun.returncode == 2 and "does not fit the context" in qrun.stderr and "Traceback" not in qrun.stderr
    assert os.path.exists(qbin)
