"""Coverage-guided fuzzing (atheris: libFuzzer over Python) of everything that parses a file.

    python tests/fuzz/fuzz.py TARGET [--runs N] [--seed S] [--work DIR] [-- libFuzzer flags]

TARGET is one of
  reader     a .qbin: preamble, JSON header, tensor directory, every sidecar's values, qinfo's
             summary, the checksums; each mutated input is resealed (header checksum and size
             recomputed, seal()) so that mutations reach the parser rather than stop at the checksum
  decode     a mutated runnable .qbin, opened as the runtime opens it and decoding one token with
             Numba's bounds checks on (NUMBA_BOUNDSCHECK=1, kernels cached apart in --work)
  tokenizer  a tokenizer blob (first byte: the kind) built, self-tested, encoding and decoding
  template   a chat template rendered over a conversation
  gguf       a GGUF file imported (convert/gguf_import.py, gguf-py's reader) into a scratch .qbin,
             which is then read back with its checksums verified

A finding is an exception other than QbinError (ConvertError for gguf), a crash, a hang over 2 s (-timeout=2) or memory
over 1 GB (-rss_limit_mb=1024); libFuzzer saves the input under --work/artifacts/ and exits
non-zero. Inputs that once failed live in tests/fuzz/regressions/TARGET/ and are replayed by
tests/test_fuzz.py. The seed corpus (seeds.py) is built under --work on the first run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
REGRESSIONS = HERE / "regressions"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello, who are you? 🙂"},
    {"role": "assistant", "content": "A model."},
    {"role": "user", "content": "Count to three."},
]
TEXTS = ["Hello world", "  spaces\tand\nlines  ", "ünïcödé — 日本語 🙂", "def f(x):\n    return x**2", ""]


def seal(data: bytes) -> bytes:
    """`data` with the preamble's file size and header checksum made to agree with its bytes
    (when it has a whole preamble and its header length fits): what a crafted file would carry."""
    import xxhash

    from qformat.constants import PREAMBLE, PREAMBLE_SIZE

    if len(data) < PREAMBLE_SIZE:
        return data
    magic, major, minor, header_len, _, _ = PREAMBLE.unpack_from(data)
    if PREAMBLE_SIZE + header_len > len(data):
        return data
    digest = xxhash.xxh3_64_intdigest(data[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len])
    return PREAMBLE.pack(magic, major, minor, header_len, len(data), digest) + data[PREAMBLE_SIZE:]


def mutate_json(doc, rng: random.Random) -> bool:
    """Replace one value inside the JSON document `doc` in place (a number nudged or made
    extreme, a type swapped, a key dropped, a list grown or shortened); False if it has none."""
    slots = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            slots.append((node, key))
            walk(value)

    walk(doc)
    if not slots:
        return False
    node, key = rng.choice(slots)
    value = node[key]
    choice = rng.randrange(8)
    if choice == 0 and isinstance(node, dict):
        del node[key]
    elif isinstance(value, bool) or choice == 1:
        node[key] = rng.choice([None, True, 0, -1, "", [], {}, 2**63, 1e308, "q4"])
    elif isinstance(value, int):
        node[key] = rng.choice([value + 1, value - 1, value * 2, value // 2, 0, -value, 2**31, 2**64 + 1])
    elif isinstance(value, float):
        node[key] = rng.choice([0.0, -value, value * 1e6, float("nan"), float("inf")])
    elif isinstance(value, str):
        node[key] = rng.choice([value[:-1], value + "x", value.upper(), "", "layers.0.attn.wq", "f16", "q3"])
    elif isinstance(value, list):
        node[key] = value + value[:1] if rng.random() < 0.5 else value[:-1]
    elif isinstance(value, dict) and value:
        del value[rng.choice(list(value))]
    return True


def mutate_header(data: bytes, rng: random.Random) -> bytes | None:
    """A structural mutation of the JSON header (mutate_json), the rest of the file kept."""
    from qformat.constants import PREAMBLE, PREAMBLE_SIZE

    if len(data) < PREAMBLE_SIZE:
        return None
    magic, major, minor, header_len, _, _ = PREAMBLE.unpack_from(data)
    try:
        header = json.loads(data[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len])
    except ValueError:
        return None
    if not mutate_json(header, rng):
        return None
    raw = json.dumps(header, allow_nan=True).encode()
    if rng.random() < 0.5:  # keep the data where it was (the header padded), or let it move
        pad = header_len - len(raw)
        if pad >= 0:
            raw += b" " * pad
    rest = data[PREAMBLE_SIZE + header_len:]
    return PREAMBLE.pack(magic, major, minor, len(raw), 0, 0) + raw + rest


def tokenizer_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Half the time one value of a tokenizer.json edited (mutate_json), else libFuzzer's own
    mutations: bytes alone rarely stay JSON, and the parsers are native code libFuzzer cannot see."""
    rng = random.Random(seed)
    if data[:1] == b"\x00" and rng.random() < 0.5:
        try:
            doc = json.loads(data[1:])
        except ValueError:
            doc = None
        if doc is not None and mutate_json(doc, rng):
            out = b"\x00" + json.dumps(doc, ensure_ascii=False).encode()
            if len(out) <= max_size:
                return out
    return atheris.Mutate(data, max_size)


def mutate_data(data: bytes, rng: random.Random) -> bytes | None:
    """A few bytes of the tensor data changed, the header kept: a file the reader accepts
    (checksums are verify()'s, not the loader's) carrying values no converter wrote, for the
    sidecar checks and the kernels."""
    from qformat.constants import PREAMBLE, PREAMBLE_SIZE

    if len(data) < PREAMBLE_SIZE:
        return None
    start = PREAMBLE_SIZE + PREAMBLE.unpack_from(data)[3]
    if start >= len(data):
        return None
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        out[rng.randrange(start, len(out))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    return bytes(out)


def qbin_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Structural header edits, data-only edits, and libFuzzer's own byte-level mutations."""
    rng = random.Random(seed)
    r = rng.random()
    out = mutate_header(data, rng) if r < 0.35 else mutate_data(data, rng) if r < 0.7 else None
    if out is not None and len(out) <= max_size:
        return out
    return atheris.Mutate(data, max_size)


class Targets:
    """One method per target: bytes in; True when the input was accepted and run through (the
    reader: opened and every tensor taken and decoded), False when it was refused with QbinError;
    any other exception is a finding."""

    def __init__(self, work: Path):
        import numpy as np

        from qformat import QbinError

        np.seterr(all="ignore")  # NaN or infinite scales are a file's right; they must not crash
        self.QbinError = QbinError
        self.path = work / f"input-{os.getpid()}.qbin"

    def reader(self, data: bytes) -> bool:
        from qformat import QbinReader
        from qformat.qinfo import render, summarize
        from qformat.schemes import KINDS, BytesKind

        self.path.write_bytes(seal(data))
        try:
            with QbinReader(self.path) as r:
                render(summarize(r))
                for name in r.names():
                    t = r[name]
                    if isinstance(KINDS[t.kind], BytesKind):
                        r.raw_bytes(name)
                    else:
                        t.dequantize()
                try:
                    r.verify()  # data edits are accepted above and caught here
                except self.QbinError:
                    pass
        except self.QbinError:
            return False
        return True

    def gguf(self, data: bytes) -> bool:
        from qformat import QbinReader
        from qformat.convert import ConvertError, import_gguf

        source, out = self.path.with_suffix(".gguf"), self.path.with_suffix(".out.qbin")
        source.write_bytes(data)
        try:
            import_gguf(source, out, force=True)
        except ConvertError:
            return False
        with QbinReader(out, verify=True):  # what the importer writes, the reader takes whole
            return True

    def decode(self, data: bytes) -> bool:
        import qformat

        self.path.write_bytes(seal(data))
        try:
            model = qformat.load(self.path, threads=1, context=64)
        except self.QbinError:
            return False
        try:
            "".join(model.generate("Hello", max_tokens=1))
        finally:
            model.reader.close()
        return True

    def tokenizer(self, data: bytes) -> bool:
        from qformat.config import TokenizerInfo
        from qformat.runtime.tokenizer import Tokenizer

        from seeds import TOKENIZER_KINDS

        if not data:
            return False
        info = TokenizerInfo(TOKENIZER_KINDS[data[0] % len(TOKENIZER_KINDS)], "tokenizer")
        try:
            tok = Tokenizer(info, data[1:], source="fuzz input")
        except self.QbinError:
            return False
        for text in TEXTS:
            ids = tok.encode(text)
            tok.decode(ids)
            stream = tok.stream()
            "".join(stream.push(i) for i in ids) + stream.flush()
        return True

    def template(self, data: bytes) -> bool:
        from qformat.runtime.chat import render_chat

        text = data.decode("utf-8", errors="replace")
        rendered = False
        for messages in (CONVERSATION, CONVERSATION[1:2]):
            try:
                render_chat(text, messages, "<s>", "</s>", True, source="fuzz input")
                rendered = True
            except self.QbinError:
                pass
        return rendered


def counted(target, path: Path, every: int = 1000):
    """`target` that also counts its inputs by outcome (refused with QbinError, or accepted and
    run through) into the JSON file `path` every `every` inputs: libFuzzer reports neither."""
    outcomes = {"accepted": 0, "refused": 0}

    def run(data: bytes) -> None:
        outcomes["accepted" if target(data) else "refused"] += 1
        if sum(outcomes.values()) % every == 0:
            path.write_text(json.dumps(outcomes))

    return run


def data_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """mutate_data, or libFuzzer's mutation where the input has no header to keep."""
    out = mutate_data(data, random.Random(seed))
    return out if out is not None and len(out) <= max_size else atheris.Mutate(data, max_size)


def fresh_peak_rss() -> None:
    """Re-run this script one process further down when it inherited a high peak RSS, and exit
    with its status: libFuzzer's -rss_limit_mb reads getrusage's peak, which Linux carries from a
    parent through fork and exec, so started by a test runner past 1 GB every input would look
    out of memory. A child of this (still small) process counts afresh."""
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < (512 << 10) or os.environ.get("QFORMAT_FUZZ_CHILD"):
        return
    child = subprocess.run([sys.executable, *sys.argv], env=dict(os.environ, QFORMAT_FUZZ_CHILD="1"))
    sys.exit(child.returncode)


def main() -> None:
    fresh_peak_rss()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=["reader", "decode", "tokenizer", "template", "gguf"])
    p.add_argument("--runs", type=int, default=10000, help="inputs to try (-1: until a finding)")
    p.add_argument("--seed", type=int, default=1, help="libFuzzer's seed: equal seeds, equal runs")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qformat" / "fuzz",
                   help="seed corpus, grown corpus, artifacts and the decode target's kernel cache")
    p.add_argument("--seeds-only", action="store_true", help="only build the seed corpus")
    args, libfuzzer = p.parse_known_args()
    work = args.work.resolve()
    if args.target == "decode":  # before numba is imported: bounds-checked kernels, cached apart
        os.environ["NUMBA_BOUNDSCHECK"] = "1"
        os.environ.setdefault("NUMBA_CACHE_DIR", str(work / "numba-boundscheck"))
    sys.path.insert(0, str(HERE))
    if args.seeds_only:
        import seeds

        seeds.build(work / "seeds")
        return
    if not (work / "seeds" / "gguf").is_dir():  # built apart: it imports torch, and this process
        subprocess.run([sys.executable, __file__, args.target, "--seeds-only", "--work", str(work)], check=True)
    # instrumented before anything imports them, so that libFuzzer sees their branches
    include = {"template": ["qformat", "jinja2"], "gguf": ["qformat", "gguf"]}.get(args.target, ["qformat"])
    # (the Numba kernels load lazily, after this block: numba compiles their bytecode as written)
    with atheris.instrument_imports(include=include):
        import qformat.qinfo  # noqa: F401
        import qformat.runtime.api  # noqa: F401
        import qformat.runtime.chat  # noqa: F401
        import qformat.runtime.tokenizer  # noqa: F401
        import jinja2.sandbox  # noqa: F401  (render_chat imports it lazily)
        if args.target == "gguf":
            import gguf  # noqa: F401
            import qformat.convert.gguf_import  # noqa: F401
    corpus = {t: sorted((work / "seeds" / t).iterdir()) for t in ("reader", "decode", "tokenizer", "template", "gguf")}
    targets = Targets(work)
    target = counted(getattr(targets, args.target), work / f"outcomes-{args.target}-{os.getpid()}.json")
    if args.target == "decode":  # compile every kernel the seeds use before the 2 s clock runs
        for path in corpus["decode"]:
            target(path.read_bytes())
    grown = work / "corpus" / args.target
    artifacts = work / "artifacts" / args.target
    for d in (grown, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    largest = max(p.stat().st_size for p in corpus[args.target])
    argv = [sys.argv[0], str(grown), str(work / "seeds" / args.target), f"-runs={args.runs}", f"-seed={args.seed}",
            "-timeout=2", "-rss_limit_mb=1024", f"-max_len={largest + 4096}", f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1", *libfuzzer]
    # decode mutates the data only: header edits are the reader's (and nearly all are refused)
    mutator = {"reader": qbin_mutator, "decode": data_mutator, "tokenizer": tokenizer_mutator}.get(args.target)
    atheris.Setup(argv, target, custom_mutator=mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
