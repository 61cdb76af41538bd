"""Lazy access to the weights of a local Hugging Face checkpoint, one tensor at a time.

safetensors files (single or sharded with model.safetensors.index.json) are memory-mapped and
read tensor by tensor, so resident memory stays near the largest tensor. pytorch_model.bin
checkpoints are pickles: they are refused unless the caller opts in, and are then loaded with
torch.load(weights_only=True), which refuses arbitrary objects.
"""
from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """The checkpoint folder cannot be read; the message is one line naming the fix."""


def _shard_map(folder: Path, index_name: str) -> dict[str, Path]:
    index_path = folder / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: malformed index ({e}); expected a 'weight_map' object") from None
    files = {name: folder / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard named in {index_name} is missing; re-download the checkpoint")
    return files


class Checkpoint:
    """The weights of one checkpoint folder: names, shapes and float32 arrays on demand."""

    def __init__(self, folder: Path, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        self._torch_state: dict[Path, dict] = {}
        if (self.folder / SAFETENSORS_INDEX).is_file():
            self._files = _shard_map(self.folder, SAFETENSORS_INDEX)
            self.format = "safetensors"
        elif (self.folder / SAFETENSORS_SINGLE).is_file():
            self._files = None
            self.format = "safetensors"
        elif (self.folder / PICKLE_INDEX).is_file() or (self.folder / PICKLE_SINGLE).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.folder}: only pytorch_model.bin (a pickle, which can run code when loaded) "
                    "was found; convert it to safetensors, or pass --allow-pickle to load it with "
                    "torch.load(weights_only=True)")
            self.format = "pickle"
            if (self.folder / PICKLE_INDEX).is_file():
                self._files = _shard_map(self.folder, PICKLE_INDEX)
            else:
                self._files = None
        else:
            raise CheckpointError(f"{self.folder}: no model.safetensors, {SAFETENSORS_INDEX} or "
                                  "pytorch_model.bin found; is this a Hugging Face model folder?")
        self._handles: dict[Path, object] = {}
        self._names: dict[str, Path] = self._list_names()
        self._offsets: dict[str, float] = {}
        self._lora: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}  # stored name -> (A, B, scale)
        self._parts: dict[str, tuple[str, int, int]] = {}  # a split tensor's part -> (fused name, row range)
        self._stacks: dict[str, list[str]] = {}  # a stacked tensor -> the tensors it stacks
        self._hidden: set[str] = set()  # stored names shown only as parts of split or stacked tensors

    # -- discovery ---------------------------------------------------------
    def _single_file(self) -> Path:
        return self.folder / (SAFETENSORS_SINGLE if self.format == "safetensors" else PICKLE_SINGLE)

    def _list_names(self) -> dict[str, Path]:
        if self._files is not None:
            return dict(self._files)
        path = self._single_file()
        if self.format == "safetensors":
            return {name: path for name in self._open(path).keys()}
        return {name: path for name in self._torch(path)}

    @property
    def weight_files(self) -> list[Path]:
        """Every file the weights come from (index first), for provenance hashes."""
        if self._files is None:
            return [self._single_file()]
        index = SAFETENSORS_INDEX if self.format == "safetensors" else PICKLE_INDEX
        return [self.folder / index] + sorted(set(self._files.values()))

    def names(self) -> list[str]:
        return sorted([n for n in self._names if n not in self._hidden] + list(self._parts) + list(self._stacks))

    def __contains__(self, name: str) -> bool:
        return name in self._parts or name in self._stacks or (name in self._names and name not in self._hidden)

    def stack(self, name: str, parts: list[str]) -> None:
        """Show the tensors `parts` (of one shape) stacked along their rows as one tensor `name`
        (a mixture's experts, spec §3.1); the parts themselves are then no longer listed."""
        missing = [p for p in parts if p not in self._names]
        if missing:
            raise CheckpointError(f"{self.folder}: tensor {missing[0]} is missing from the checkpoint")
        shapes = {self.shape(p) for p in parts}
        if len(shapes) != 1:
            raise CheckpointError(f"{self.folder}: the tensors stacked as {name} differ in shape ({sorted(shapes)})")
        self._stacks[name] = list(parts)
        self._hidden.update(parts)

    def split(self, fused: str, parts: list[tuple[str, int]]) -> None:
        """Show the tensor `fused` as the tensors `parts` (name, rows) stacked along its rows, in
        that order (Phi-3's qkv_proj and gate_up_proj); `fused` itself is then no longer listed."""
        if fused not in self._names:
            raise CheckpointError(f"{self.folder}: tensor {fused} is missing from the checkpoint")
        total = self.shape(fused)[0]
        if sum(n for _, n in parts) != total:
            raise CheckpointError(f"{self.folder}: tensor {fused} has {total} rows; config.json implies "
                                  f"{' + '.join(str(n) for _, n in parts)}")
        start = 0
        for name, n in parts:
            self._parts[name] = (fused, start, start + n)
            start += n
        self._hidden.add(fused)

    def add_offset(self, names, value: float) -> None:
        """Read the tensors `names` with `value` added to every element (Gemma's norms store
        w for a multiplication by 1 + w: qbin stores the factor itself)."""
        self._offsets.update({n: float(value) for n in names})

    def add_lora(self, name: str, a: np.ndarray, b: np.ndarray, scale: float) -> None:
        """Read the stored tensor `name` (out, in) with the LoRA update scale * b @ a added
        (a: (rank, in), b: (out, rank)): an adapter merged before quantization."""
        if name not in self._names:
            raise CheckpointError(f"{self.folder}: the adapter changes {name}, which the checkpoint lacks")
        shape = self.shape(name)
        if len(shape) != 2 or a.shape[1] != shape[1] or b.shape[0] != shape[0] or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{self.folder}: the adapter's {name} is {tuple(b.shape)} @ {tuple(a.shape)}, "
                                  f"which does not fit its {shape}")
        self._lora[name] = (np.asarray(a, np.float32), np.asarray(b, np.float32), float(scale))

    # -- access ------------------------------------------------------------
    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types; name the file
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
            self._handles[path] = handle
        return handle

    def _torch(self, path: Path) -> dict:
        state = self._torch_state.get(path)
        if state is None:
            import torch

            # weights_only refuses arbitrary pickled objects; mmap keeps tensors on disk until used.
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            self._torch_state = {path: state}  # keep one shard mapped at a time
        return state

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, read from the file header only."""
        if name in self._parts:
            fused, start, stop = self._parts[name]
            return (stop - start,) + self.shape(fused)[1:]
        if name in self._stacks:
            first = self.shape(self._stacks[name][0])
            return (first[0] * len(self._stacks[name]),) + first[1:]
        path = self._names[name]
        if self.format == "safetensors":
            return tuple(self._open(path).get_slice(name).get_shape())
        return tuple(self._torch(path)[name].shape)

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a float32 numpy array (bf16 and fp16 widen exactly)."""
        with self.rows(name) as rows:
            return rows.read()

    def read_stored(self, name: str) -> tuple[np.ndarray, str]:
        """(the tensor in its stored dtype, that dtype's name as torch spells it, e.g. "int32");
        bfloat16 is widened to float32 exactly, as numpy has no bfloat16."""
        import torch

        path = self._names[name]
        t = self._open(path).get_tensor(name) if self.format == "safetensors" else self._torch(path)[name]
        dtype = str(t.dtype).removeprefix("torch.")
        return (t.to(torch.float32) if t.dtype == torch.bfloat16 else t).numpy(), dtype

    @contextmanager
    def rows(self, name: str) -> Iterator["LazyRows"]:
        """The tensor as a LazyRows: `.shape`, and `[start:stop]` reads just those rows as float32.

        Quantization reads a large tensor block by block through this, so neither the whole
        float32 copy nor the whole stored tensor is ever resident. The file is unmapped on exit.
        """
        if name in self._stacks:
            with ExitStack() as opened:
                yield StackedRows([opened.enter_context(self.rows(p)) for p in self._stacks[name]])
            return
        stored, row0 = name, None
        if name in self._parts:
            stored, row0, _ = self._parts[name]
        path = self._names[stored]
        offset = self._offsets.get(name, 0.0)
        if self.format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                source = handle.get_slice(stored)
                yield LazyRows(source, self.shape(name), path, name, offset, row0, self._lora.get(stored))
        else:
            t = self._torch(path)[stored]
            yield LazyRows(t, self.shape(name), path, name, offset, row0, self._lora.get(stored))

    def close(self) -> None:
        self._handles.clear()
        self._torch_state.clear()


class LazyRows:
    """A 2-D (or 1-D) checkpoint tensor read on demand: `shape`, and row slices as float32 numpy."""

    def __init__(self, source, shape: tuple[int, ...], path: Path, name: str, offset: float = 0.0,
                 row0: int | None = None, lora: tuple[np.ndarray, np.ndarray, float] | None = None):
        self._source = source  # a safetensors slice or a (memory-mapped) torch tensor
        self.shape = shape
        self._where = f"{path}: tensor {name}"
        self._offset = offset
        self._row0 = row0  # where the rows begin in `source` when the tensor is a part of a split one
        self._lora = lora  # (A, B, scale) of the stored tensor's merged adapter

    def __getitem__(self, rows: slice) -> np.ndarray:
        import torch

        if self._row0 is not None:  # rows of a part: its own range of the fused tensor's
            start, stop, _ = rows.indices(self.shape[0])
            rows = slice(self._row0 + start, self._row0 + max(start, stop))
        t = self._source[rows]
        if not t.is_floating_point():
            raise CheckpointError(f"{self._where} has dtype {t.dtype}; expected a float weight")
        t = t.to(torch.float32)
        out = (t + self._offset if self._offset else t).numpy()
        if self._lora is not None:  # rows of the stored tensor: B's rows are the same ones
            a, b, scale = self._lora
            out = out + scale * (b[rows] @ a)
        return out

    def read(self) -> np.ndarray:
        """The whole tensor as float32."""
        return self[0:self.shape[0]]


class StackedRows:
    """LazyRows of several tensors of one shape stacked along their rows."""

    def __init__(self, parts: list[LazyRows]):
        self._parts = parts
        self._rows = parts[0].shape[0]
        self.shape = (self._rows * len(parts),) + parts[0].shape[1:]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        pieces = []
        for p in range(start // self._rows, -(-stop // self._rows) if stop > start else 0):
            lo, hi = max(start, p * self._rows), min(stop, (p + 1) * self._rows)
            pieces.append(self._parts[p][lo - p * self._rows:hi - p * self._rows])
        return np.concatenate(pieces) if pieces else self._parts[0][0:0]

    def read(self) -> np.ndarray:
        return self[0:self.shape[0]]
