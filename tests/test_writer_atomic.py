"""The writer never leaves a partial file at the destination (spec/qbin.md §9): not after an
exception, not after SIGKILL, and a file it was asked to overwrite survives a failed write."""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import qformat.writer as writer_module
from qbin_testutil import metadata, model_args, write_sample
from qformat import QbinReader, QbinWriter, Tensor, parse_scheme


def _tensor(i: int, n: int = 1024) -> Tensor:
    return parse_scheme("f32").quantize(f"t{i}", np.full(n, i, np.float32))


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_exception_inside_block_leaves_nothing(tmp_path):
    dest = tmp_path / "m.qbin"
    with pytest.raises(KeyError, match="boom"):
        with QbinWriter(dest) as w:
            w.add_tensor(_tensor(0))
            w.add_tensor(_tensor(1))
            assert len(_listing(tmp_path)) == 1  # the scratch file, hidden, beside the destination
            raise KeyError("boom")
    assert _listing(tmp_path) == []
    assert w.stage is writer_module.Stage.ABORTED


def test_invalid_tensor_aborts_cleanly(tmp_path):
    dest = tmp_path / "m.qbin"
    with pytest.raises(ValueError, match="cannot be stored"):
        with QbinWriter(dest) as w:
            w.add_tensor(_tensor(0))
            w.add_tensor(Tensor("bad", "f32", (2,), {"data": np.zeros(2, np.float64)}))
    assert _listing(tmp_path) == []


def test_exception_in_finish_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="tokenizer tensor"):
        with QbinWriter(tmp_path / "m.qbin") as w:
            w.add_tensor(_tensor(0))
            w.finish(**metadata())  # the tokenizer tensor was never added
    assert _listing(tmp_path) == []


def test_failure_while_assembling_keeps_the_old_file(tmp_path, monkeypatch):
    """A disk-full error while the final file is assembled: the old destination survives."""
    dest, _ = write_sample(tmp_path / "m.qbin")
    before = dest.read_bytes()

    def disk_full(src, dst, length=0):
        dst.write(src.read(100))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module.shutil, "copyfileobj", disk_full)
    with pytest.raises(OSError, match="No space left"):
        with QbinWriter(dest, overwrite=True) as w:
            w.add_tensor(_tensor(0))
            w.finish(model=model_args())
    assert dest.read_bytes() == before
    assert _listing(tmp_path) == ["m.qbin"]


def test_closing_without_finish_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="without finish"):
        with QbinWriter(tmp_path / "m.qbin") as w:
            w.add_tensor(_tensor(0))
    assert _listing(tmp_path) == []


def test_out_of_order_calls_raise(tmp_path):
    with QbinWriter(tmp_path / "m.qbin") as w:
        w.add_tensor(_tensor(0))
        w.finish(model=model_args())
        with pytest.raises(RuntimeError, match=r"add_tensor\(\) called on a writer that is finished"):
            w.add_tensor(_tensor(1))
        with pytest.raises(RuntimeError, match=r"finish\(\) called on a writer that is finished"):
            w.finish(model=model_args())
        with pytest.raises(RuntimeError, match="finished"):
            w.add_bytes("tokenizer", b"x")
    assert QbinReader(tmp_path / "m.qbin").names() == ["t0"]
    w = QbinWriter(tmp_path / "n.qbin")
    w.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        w.add_tensor(_tensor(0))
    with pytest.raises(RuntimeError, match="aborted"):
        w.finish(model=model_args())
    assert _listing(tmp_path) == ["m.qbin"]


def test_existing_destination_needs_overwrite(tmp_path):
    dest, _ = write_sample(tmp_path / "m.qbin")
    before = dest.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        QbinWriter(dest)
    assert _listing(tmp_path) == ["m.qbin"] and dest.read_bytes() == before
    with QbinWriter(dest, overwrite=True) as w:
        w.add_tensor(_tensor(7))
        w.finish(model=model_args())
    assert QbinReader(dest, verify=True).names() == ["t7"]
    assert _listing(tmp_path) == ["m.qbin"]


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QbinWriter(tmp_path / "no" / "m.qbin")


def test_file_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        dest, _ = write_sample(tmp_path / "m.qbin")
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640


# ---------------------------------------------------------------------------- SIGKILL

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import qformat.writer as writer_module
    from qformat import ModelArgs, QbinWriter, Tensor

    dest, stage, overwrite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    data = np.ones(1 << 18, np.float32)  # 1 MiB per tensor

    def tensor(i):
        return Tensor(f"t{i}", "f32", data.shape, {"data": data})

    def copy_then_hang(src, dst, length=0):
        dst.write(src.read(1 << 20))
        dst.flush()
        print("assembling", flush=True)
        sys.stdin.read()  # blocks until the parent kills us

    writer_module.shutil.copyfileobj = copy_then_hang
    with QbinWriter(dest, overwrite=overwrite) as w:
        for i in range(64):
            w.add_tensor(tensor(i))
            if i == 3 and stage == "data":
                print("streaming", flush=True)  # the parent kills while we keep writing
        if stage == "data":
            sys.stdin.read()
        w.finish(model=ModelArgs("llama", 8, 8, 1, 1, 1, 8, 8, 1e-5, 1e4, 8, True))
""")


@pytest.mark.parametrize("stage", ["data", "assembling"])
@pytest.mark.parametrize("pre_existing", [False, True])
def test_sigkill_mid_write_leaves_destination_as_it_was(tmp_path, stage, pre_existing):
    folder = tmp_path / "out"
    folder.mkdir()
    dest = folder / "m.qbin"
    before = write_sample(dest)[0].read_bytes() if pre_existing else None
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    with open(tmp_path / "child.err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(dest), stage, "1" if pre_existing else "0"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            line = proc.stdout.readline()  # the child says where it is; no sleeps
            assert line.strip() == ("streaming" if stage == "data" else "assembling"), \
                (tmp_path / "child.err").read_text()
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if pre_existing:
        assert dest.read_bytes() == before
        QbinReader(dest, verify=True)
    else:
        assert not dest.exists()
    # a killed process cannot clean up: what remains is hidden scratch named after the destination
    leftovers = [n for n in _listing(folder) if n != "m.qbin"]
    assert leftovers and all(re.fullmatch(r"\.m\.qbin\..+\.tmp", n) for n in leftovers), leftovers
