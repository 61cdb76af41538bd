"""Planning and sizing a conversion: every tensor to write, in file order, with its target scheme,
and the exact bytes each takes (what `--dry-run` prints, without reading a weight)."""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

import numpy as np

from qformat import tensors as T
from qformat.config import ModelArgs
from qformat.constants import ALIGNMENT, DTYPES
from qformat.packing import row_nbytes
from qformat.schemes import FILE_KINDS, KINDS, Scheme, parse_scheme

from .architectures import IGNORED_HF_TENSORS, Architecture, tensor_rules
from .checkpoint import Checkpoint
from .options import ConvertOptions
from .outliers import outlier_count
from .prune import parse_pattern


class ConvertError(ValueError):
    """A conversion request that cannot be carried out; the message is one line with the fix."""


def weight_tensors(reader, target: str):
    """(tensor, entry, layer) of every tensor of a qbin file but its files (the tokenizer), for
    an export to `target`; a name outside the tensor name table (qformat.tensors) has no name
    there and is a ConvertError."""
    for name in reader.names():
        t = reader[name]
        if t.kind in FILE_KINDS:
            continue
        parsed = T.parse_name(name)
        if parsed is None:
            raise ConvertError(f"{reader.path}: tensor {name!r} has no {target} name")
        yield t, *parsed


@dataclass(frozen=True)
class SidecarPlan:
    """What a conversion adds to a quantized projection beyond codes, scales and zeros, as far
    as it is known before calibration: n:m compression, act-order permutation, the outlier
    budget. (LLM.int8() columns depend on the calibration activations and are not estimated.)"""

    nm: tuple[int, int] | None = None
    perm: bool = False
    outliers: float | None = None


def planned_arrays(shape: tuple[int, ...], scheme: Scheme, sidecars: SidecarPlan | None = None
                   ) -> list[tuple[str, str, tuple[int, ...]]]:
    """(role, dtype, shape) of every array a tensor of `shape` takes in `scheme`, in the order the
    quantizers store them (codes, scales, zeros, then the sidecars of spec §6 that `sidecars`
    plans)."""
    if not scheme.quantized:
        return [("data", scheme.kind, tuple(shape))]
    rows, k = shape
    group = scheme.group_for(k)
    n_groups = -(-k // group)
    side = sidecars or SidecarPlan()
    kind = KINDS[scheme.kind]
    if side.nm:  # §6.3: n of every m codes, in groups of G·n/m, plus their positions
        n, m = side.nm
        kept = k * n // m
        out = [("codes", "u8", (rows, row_nbytes(kept, group * n // m, kind.bits)))]
        index = [("sparse_index", "u8", (rows, -(-kept * (2 if m == 4 else 4) // 8)))]
    else:
        out, index = [("codes", "u8", (rows, row_nbytes(k, group, kind.bits)))], []
    if scheme.log_scales:  # spec §4.3: 8-bit codes and the tensor's exponent
        out += [("scales", "u8", (rows, n_groups)), ("scale_exp", "i32", (1,))]
    else:
        out.append(("scales", "f16", (rows, n_groups)))
    if not scheme.symmetric and not kind.nf4:
        out.append(("zeros", "u8", (rows, n_groups)))
    out += index
    if side.perm:
        out.append(("perm", "i32", (k,)))
    count = outlier_count(rows * k, side.outliers)
    if count:  # §6.2: i32 row pointers, u16 (or i32) columns, f16 values
        out += [("outlier_rowptr", "i32", (rows + 1,)), ("outlier_cols", "u16" if k <= 1 << 16 else "i32", (count,)),
                ("outlier_values", "f16", (count,))]
    return out


def array_sizes(shape: tuple[int, ...], scheme: Scheme, sidecars: SidecarPlan | None = None) -> list[int]:
    """Byte sizes of the arrays of `planned_arrays`."""
    return [int(np.prod(s)) * DTYPES[dtype].itemsize for _, dtype, s in planned_arrays(shape, scheme, sidecars)]


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor to write: where it comes from, its qbin name, role, shape and target scheme."""

    hf_name: str
    name: str
    role: str  # embed, head, linear, norm, bias
    shape: tuple[int, ...]
    scheme: Scheme

    def nbytes(self, sidecars: SidecarPlan | None = None) -> int:
        """Bytes of the stored arrays (with the sidecars a conversion would add, when given)."""
        return sum(array_sizes(self.shape, self.scheme, sidecars))

    def aligned_nbytes(self, sidecars: SidecarPlan | None = None) -> int:
        """Bytes the arrays take in the file, each padded to the file's alignment."""
        return sum(-(-n // ALIGNMENT) * ALIGNMENT for n in array_sizes(self.shape, self.scheme, sidecars))


def planned_sidecars(p: PlannedTensor, options: ConvertOptions, pruned: bool) -> SidecarPlan | None:
    """The sidecars a conversion with these options gives planned tensor p (the dry run's
    estimate); pruned: whether p is among the pruned projections."""
    if p.role != "linear" or not p.scheme.quantized:
        return None  # float tensors store pruned zeros densely; embeddings and head get no sidecars
    pattern = parse_pattern(options.prune) if pruned else None
    nm = (pattern.n, pattern.m) if pattern is not None and pattern.structured else None
    perm = options.method == "gptq" and options.gptq_act_order and not options.gptq_static_groups
    return SidecarPlan(nm=nm, perm=perm, outliers=options.keep.fraction)


# The embeddings' and the head's schemes by choice; "auto" is resolve_special's rule.
_SPECIAL = {"scheme": lambda main: main, "f16": lambda main: parse_scheme("f16"),
            "int8": lambda main: parse_scheme("int8")}


def resolve_special(choice: str, main: Scheme) -> Scheme:
    """The scheme for the embeddings or the LM head.

    "auto" keeps them in the main scheme when it has 8 bits or more (f16, bf16, int8) and uses
    int8 per channel below that (w8a8 included: the head keeps float inputs, as SmoothQuant's
    reference leaves the head unquantized). Measured on SmolLM2-135M (tied; the embedding matrix is a fifth
    of the weights) at int4-g64 with bench/bench_convert.py, EVAL.md perplexity (reference
    14.00): embeddings/head in int4-g64 give 23.40 (77 MB), in int8 19.00 (90 MB), in f16
    18.86 (118 MB): int8 recovers 97% of what 16 bits would, for a third of its extra bytes.
    """
    if choice in _SPECIAL:
        return _SPECIAL[choice](main)
    if not main.quantized or (main.bits >= 8 and not main.act_bits):
        return main
    return parse_scheme("int8")


def skipped(names: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """Whether any of a tensor's names (qbin, HF) matches a --skip pattern."""
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def plan(ckpt: Checkpoint, args: ModelArgs, arch: Architecture, options: ConvertOptions
         ) -> tuple[list[PlannedTensor], ModelArgs]:
    """Every tensor to write, in file order, and ModelArgs adjusted for a split tied head."""
    main = options.main
    head, embed = resolve_special(options.head, main), resolve_special(options.embed, main)
    rules = tensor_rules(arch, args.n_layers)
    mapped = {hf for hf, _, _ in rules}
    for name in ckpt.names():
        if name not in mapped and not any(p.match(name) for p in IGNORED_HF_TENSORS):
            raise ConvertError(f"{ckpt.folder}: tensor {name} has no place in a {arch.hf_name} qbin "
                               "(a variant this converter does not support)")
    split_head = args.tie_embeddings and head != embed
    if split_head:
        args = dataclasses.replace(args, tie_embeddings=False)
    f16, f32 = parse_scheme("f16"), parse_scheme("f32")
    out = []
    for hf, name, role in rules:
        if role == "head":
            if split_head:
                hf = "model.embed_tokens.weight"
            elif args.tie_embeddings:
                continue
        if hf not in ckpt:
            raise ConvertError(f"{ckpt.folder}: tensor {hf} is missing from the checkpoint")
        shape = ckpt.shape(hf)
        want = T.parse_name(name)[0].shape_of(args)
        if shape != want:
            raise ConvertError(f"{ckpt.folder}: tensor {hf} has shape {list(shape)}, config.json implies {list(want)}")
        if role in ("norm", "bias", "router"):  # small, and what every other weight's use depends on
            target = f32
        elif skipped((name, hf), options.skip):
            target = f16
        else:
            target = {"embed": embed, "head": head}.get(role, main)
        out.append(PlannedTensor(hf, name, role, shape, target))
    return out, args
