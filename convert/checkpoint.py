"""Lazy access to the weights of a local Hugging Face checkpoint, one tensor at a time.

safetensors files (single or sharded with model.safetensors.index.json) are memory-mapped and
read tensor by tensor, so resident memory stays near the largest tensor. pytorch_model.bin
checkpoints are pickles: they are refused unless the caller opts in, and are then loaded with
torch.load(weights_only=True), which refuses arbitrary objects.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
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
        return sorted(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

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
        path = self._names[name]
        if self.format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                source = handle.get_slice(name)
                yield LazyRows(source, tuple(source.get_shape()), path, name)
        else:
            t = self._torch(path)[name]
            yield LazyRows(t, tuple(t.shape), path, name)

    def close(self) -> None:
        self._handles.clear()
        self._torch_state.clear()


class LazyRows:
    """A 2-D (or 1-D) checkpoint tensor read on demand: `shape`, and row slices as float32 numpy."""

    def __init__(self, source, shape: tuple[int, ...], path: Path, name: str):
        self._source = source  # a safetensors slice or a (memory-mapped) torch tensor
        self.shape = shape
        self._where = f"{path}: tensor {name}"

    def __getitem__(self, rows: slice) -> np.ndarray:
        import torch

        t = self._source[rows]
        if not t.is_floating_point():
            raise CheckpointError(f"{self._where} has dtype {t.dtype}; expected a float weight")
        return t.to(torch.float32).numpy()

    def read(self) -> np.ndarray:
        """The whole tensor as float32."""
        return self[0:self.shape[0]]
