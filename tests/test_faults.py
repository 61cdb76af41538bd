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


def test_sigkill_at_random_moments_leaves_no_output_and_a_sound_calibration_cache(tiny_checkpoint, tmp_path):
    import random

    import numpy as np

    env = dict(os.environ, QFORMAT_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out" / "m.qbin"
    out.parent.mkdir()
    cmd = [*QCONVERT, str(tiny_checkpoint()), str(out), "-s", "int4-g64", "--method", "gptq", "--calib", "mix",
           "--calib-samples", "4", "--calib-seqlen", "32"]
    rng = random.Random(22)
    for moment in sorted(rng.uniform(0.5, 9.0) for _ in range(3)):  # a whole run takes about 10 s here
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.wait(timeout=60)
        # The rename is the commit point: a kill after it (the interpreter still shutting down) leaves a
        # whole file, a kill before it none at all.
        if out.exists():
            QbinReader(out, verify=True).close()
            out.unlink()
        else:
            assert proc.returncode != 0, moment
        assert [n for n in os.listdir(out.parent) if not n.startswith(".")] == [], moment
        for entry in (tmp_path / "cache" / "calib").glob("*.npy"):  # only whole entries under a cache name
            assert np.load(entry).shape == (2, 32), (moment, entry)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    QbinReader(out, verify=True).close()


def test_a_source_changed_during_the_conversion_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    from qformat import QbinWriter
    from qformat.convert import ConvertError, convert

    src = shutil.copytree(tiny_checkpoint(), tmp_path / "model")
    weights = next(src.glob("*.safetensors"))
    add_tensor = QbinWriter.add_tensor

    def add_while_the_source_changes(self, tensor):
        add_tensor(self, tensor)
        later = weights.stat().st_mtime_ns + 10**9  # an editor or a download writing the file meanwhile
        os.utime(weights, ns=(later, later))

    monkeypatch.setattr(QbinWriter, "add_tensor", add_while_the_source_changes)
    out = tmp_path / "m.qbin"
    with pytest.raises(ConvertError, match=f"{weights.name}: changed while it was being converted"):
        convert(src, out, "int8", progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


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


def _damage(cache) -> list:
    """Damage the kernel cache as disks and races do: an index truncated, entries with bytes
    zeroed (the decode step's among them: it is always loaded), an entry overwritten by another
    function's; returns the files damaged."""
    index = sorted(cache.glob("*.nbi"), key=lambda p: p.stat().st_size)
    data = sorted(cache.glob("*.nbc"), key=lambda p: p.stat().st_size)
    assert len(index) >= 3 and len(data) >= 4, sorted(p.name for p in cache.iterdir())
    index[0].write_bytes(index[0].read_bytes()[: index[0].stat().st_size // 2])
    for path in (data[0], data[-1]):
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2: len(blob) // 2 + 16] = bytes(16)
        path.write_bytes(bytes(blob))
    data[2].write_bytes(data[1].read_bytes())  # another key's entry under this name
    return [index[0], data[0], data[1], data[-1]]


def _read_only_prefix(folders: list[str]) -> list[str] | None:
    """A command prefix that runs the rest with `folders` mounted read-only (a private mount
    namespace: read-only even to root, which ignores permissions), or None where this machine
    does not allow one."""
    script = 'for d in "$@"; do [ "$d" = -- ] && break; mount -o bind,ro "$d" "$d" || exit 97; shift; done; shift; exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, "sh", *folders, "--"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None


def test_a_read_only_output_folder_is_one_line(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    prefix = _read_only_prefix([str(out)])
    if prefix is None:
        pytest.skip("this machine allows no private read-only mount")
    run = subprocess.run([*prefix, *QCONVERT, str(tiny_checkpoint()), str(out / "m.qbin"), "-s", "int8", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "its folder is not writable" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert list(out.iterdir()) == []


def test_two_first_runs_share_an_empty_kernel_cache_then_survive_its_damage(qbin, tmp_path):
    """Two `qrun` at once on an empty numba cache (with the package folder and home mounted
    read-only where the machine allows it), then a cache with damaged entries."""
    from pathlib import Path

    import qformat.kernels.cpu

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    prefix = _read_only_prefix([str(Path(qformat.kernels.cpu.__file__).parent), str(home)])
    if prefix is None:  # no private mounts here: a fresh folder of the user's choosing instead
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    cache_root = tmp / f"qformat-numba-{os.getuid()}" if prefix else tmp_path / "numba"

    def qrun():
        return subprocess.Popen([*(prefix or []), *QRUN, str(qbin), "-p", "Hello", "-n", "6", "-t", "0", "-q",
                                 "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    first = [qrun(), qrun()]
    outs = [p.communicate(timeout=600) for p in first]
    for p, (out, err) in zip(first, outs):
        assert p.returncode == 0 and "Traceback" not in err, err
        assert prefix is None or "are read-only; the kernels are cached in" in err, err
    assert outs[0][0] == outs[1][0] and outs[0][0]
    index = sorted(cache_root.rglob("*.nbi"))
    assert index, f"nothing cached under {cache_root}"
    damaged = _damage(index[0].parent)
    env["NUMBA_DEBUG_CACHE"] = "1"  # numba's log on stdout, the checked cache's on stderr
    again = qrun()
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0 and "Traceback" not in err, err
    assert [line for line in out.splitlines(True) if not line.startswith("[cache]")] == outs[0][0].splitlines(True)
    found = {line.split()[-1] for line in err.splitlines() if line.startswith("qformat cache: damaged")}
    saved = {line.split()[-1] for line in err.splitlines() if line.startswith("qformat cache: saved entry")}
    assert str(damaged[-1]) in found, err  # the decode step: damaged, found so, compiled again
    assert {p for p in found if p.endswith(".nbc")} <= saved, err
