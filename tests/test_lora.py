"""LoRA adapters at run time (runtime/lora.py, qrun --lora): peft's own adapters and qtune's, on an
f16 base so that the runtime and peft on transformers compute the same numbers, on the CPU and on
the CUDA kernels' host emulation; and every adapter the runtime cannot run refused by name."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_kernel_table import layouts, make  # noqa: E402
from tiny_models import float_model_on, make_tiny_checkpoint  # noqa: E402

import qformat  # noqa: E402
from qformat import QbinError, QbinReader  # noqa: E402
from qformat.runtime.cli import main as qrun  # noqa: E402
from qformat.runtime.lora import read_adapter  # noqa: E402
from qformat.runtime.model import Transformer  # noqa: E402

TOKENS = [5, 17, 33, 2, 9, 100, 7, 8, 61, 3, 44, 12]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(checkpoint folder, its f16 qbin)."""
    from qformat.convert import convert

    root = tmp_path_factory.mktemp("lora")
    folder = make_tiny_checkpoint(root / "llama", arch="llama")
    convert(folder, root / "f16.qbin", "f16", progress=False)
    return folder, root / "f16.qbin"


def peft_adapter(base, dst, seed: int = 0, **config):
    """A peft adapter with random A and B (peft starts B at zero), saved to dst; returns (dst,
    peft's logits of TOKENS with it, without it)."""
    folder, qbin = base
    torch.manual_seed(seed)
    model = peft.get_peft_model(float_model_on(folder, qbin),
                                peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL,
                                                   "init_lora_weights": False, **config}))
    with torch.no_grad():
        model.save_pretrained(str(dst))
        ids = torch.tensor([TOKENS])
        with_adapter = model(ids).logits[0].numpy()
        with model.disable_adapter():
            without = model(ids).logits[0].numpy()
    return dst, with_adapter, without


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """One peft adapter of the base model (the folder; copy it before changing it)."""
    return peft_adapter(base, tmp_path_factory.mktemp("saved") / "adapter")[0]


def logits(qbin, adapter, backend, request, monkeypatch, scale: float = 1.0):
    if backend == "emulated-cuda":
        from cuda_emulation import emulate_cuda

        emulate_cuda(monkeypatch, request.getfixturevalue("cuda_host"))
    device = "cuda" if backend == "emulated-cuda" else "cpu"
    reader = QbinReader(qbin)
    lora = read_adapter(adapter, reader, scale) if adapter is not None else None
    model = Transformer(reader, device, fused=backend != "cpu-per-op", lora=lora)
    assert (model.fused is not None) == (backend == "cpu")  # the CPU's one-call step runs adapters too
    # a prompt's rows, then one-token decode steps (gemm, then the fused step or gemv)
    out = [model.forward(TOKENS[:8], 0, all_logits=True)]
    out += [model.forward(TOKENS[p:p + 1], p)[None] for p in range(8, len(TOKENS))]
    return np.concatenate(out)


RSLORA = {"use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"], "alpha_pattern": {"v_proj": 2}}


@pytest.mark.parametrize("backend, config", [("cpu", {}), ("cpu-per-op", {}), ("emulated-cuda", {}), ("cpu", RSLORA)],
                         ids=["cpu", "cpu-per-op", "emulated-cuda", "cpu-rslora-pattern"])
def test_peft_s_adapter_gives_peft_s_logits(base, tmp_path, backend, config, request, monkeypatch):
    adapter, theirs, without = peft_adapter(base, tmp_path / "adapter", **config)
    tol = (1e-2 if backend == "emulated-cuda" else 1e-4) * np.abs(theirs).max()
    ours = logits(base[1], adapter, backend, request, monkeypatch)
    assert np.abs(ours - theirs).max() <= tol
    assert np.abs(theirs - without).max() > 100 * tol  # the adapter acts
    off = logits(base[1], adapter, backend, request, monkeypatch, scale=0.0)
    assert np.abs(off - without).max() <= tol  # --lora-scale 0: the base model


def test_qtune_s_adapter_gives_qtune_s_logits(base, tmp_path):
    from qformat.tune.adapter import save_adapter
    from qformat.tune.model import QuantDecoder

    with QbinReader(base[1]) as reader:
        model = QuantDecoder(reader, targets=("q", "v", "o", "down"), rank=4, alpha=8)
        gen = torch.Generator().manual_seed(5)
        for lora in model.adapters().values():
            lora.lora_B.weight.data = 0.1 * torch.randn(lora.lora_B.weight.shape, generator=gen)
        with torch.no_grad():
            theirs = model(torch.tensor([TOKENS]))[0].numpy()
        folder = save_adapter(model, tmp_path / "adapter")
    ours = qformat.load(base[1], lora=folder).logits(TOKENS)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_qrun_generates_with_an_adapter_and_refuses_a_scale_without_one(base, saved, capsys):
    qrun([str(base[1]), "--lora", str(saved), "--prompt", "The capital", "-n", "4", "--lora-scale", "0.5"])
    out = capsys.readouterr()
    assert out.out.strip() and "decode: 4 tokens" in out.err
    with pytest.raises(SystemExit) as done:
        qrun([str(base[1]), "--lora-scale", "0.5", "--prompt", "The capital"])
    assert done.value.code == 2 and "--lora-scale only applies with --lora" in capsys.readouterr().err


def _edit_config(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _other_model(folder):  # an adapter of a wider model: A and B do not fit
    from safetensors.numpy import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = {k: np.concatenate([v, v], axis=1) if "lora_A" in k else v for k, v in load_file(path).items()}
    save_file(tensors, path)


def _extra_module(folder):  # peft can adapt the head; the runtime cannot
    from safetensors.numpy import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
    save_file(tensors, path)


def _half_pair(folder):  # an A without its B
    from safetensors.numpy import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors[next(k for k in tensors if "lora_B" in k)]
    save_file(tensors, path)


BAD = {
    "missing folder": (lambda f: shutil.rmtree(f), "no such adapter folder"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    "config not JSON": (lambda f: (f / "adapter_config.json").write_text("{"), "not JSON"),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "weights not safetensors": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 40),
                                "not a safetensors file"),
    "DoRA": (_edit_config(use_dora=True), "DoRA adapters do not run here"),
    "trained biases": (_edit_config(bias="all"), "trained biases do not run here"),
    "saved modules": (_edit_config(modules_to_save=["lm_head"]), "fully trained modules"),
    "not LoRA": (_edit_config(peft_type="IA3"), "only LoRA adapters run"),
    "another model": (_other_model, "do not fit the projection"),
    "the head": (_extra_module, "lm_head.lora_A.weight adapts no projection of this model"),
    "half a pair": (_half_pair, "has no lora_B beside it"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_an_adapter_the_runtime_cannot_run_is_refused_by_name(base, saved, tmp_path, case, capsys):
    adapter = shutil.copytree(saved, tmp_path / "adapter")
    damage, message = BAD[case]
    damage(adapter)
    with QbinReader(base[1]) as reader, pytest.raises(QbinError, match=message):
        read_adapter(adapter, reader)
    with pytest.raises(SystemExit) as done:
        qrun([str(base[1]), "--lora", str(adapter), "--prompt", "Hi", "-n", "1"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind, form", layouts())
def test_the_adapter_adds_b_a_x_beside_every_layout(kind, form):
    from qformat.kernels import linear_op, lora_op

    t = make(kind, form, seed=7)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, t.shape[1])).astype(np.float32)
    b = rng.standard_normal((t.shape[0], 4)).astype(np.float32)
    base, ours = linear_op("cpu", t), lora_op("cpu", linear_op("cpu", t), a, b)
    for rows in (1, 3, 9):  # one GEMV, the batched decode GEMV, a prompt's GEMM
        x = rng.standard_normal((rows, t.shape[1])).astype(np.float32)
        want = x @ a.T @ b.T
        if rows == 1:
            got = ours.gemv(x[0], np.empty(t.shape[0], np.float32)) - base.gemv(x[0], np.empty(t.shape[0], np.float32))
        elif rows == 3:
            got = ours.gemv_many(x) - base.gemv_many(x)
        else:
            got = ours.gemm(x) - base.gemm(x)
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["f16", "q4"])
def test_the_fused_step_s_row_adds_what_the_op_adds(kind):
    from qformat.kernels import linear_op, lora_op
    from qformat.kernels.cpu.base import H2F, ROUTINE_COL, ROUTINES
    from qformat.kernels.cpu.fused import gemv_row

    t = make(kind, "dense", seed=8)
    rng = np.random.default_rng(2)
    op = lora_op("cpu", linear_op("cpu", t), rng.standard_normal((4, t.shape[1])).astype(np.float32),
                 rng.standard_normal((t.shape[0], 4)).astype(np.float32))
    row, keep = op.fused_row()
    table = np.asarray([row], np.int64)
    routines = tuple(0 if r == row[ROUTINE_COL] else None for r in range(len(ROUTINES)))
    x = rng.standard_normal(t.shape[1]).astype(np.float32)
    fused = np.empty(t.shape[0], np.float32)
    gemv_row(table, 0, H2F, x, fused, *routines)
    np.testing.assert_allclose(fused, op.gemv(x, np.empty(t.shape[0], np.float32)), rtol=1e-5, atol=1e-5)


def test_qserve_answers_with_the_adapter(base, saved):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from qformat.runtime.server import build_server

    server = build_server(base[1], parallel=2, context=64, threads=1, lora=saved)
    with TestClient(server.app()) as http:
        got = http.post("/v1/completions", json={"model": server.name, "prompt": "The capital", "max_tokens": 6,
                                                 "temperature": 0}).json()
    assert got["choices"][0]["text"] == "".join(qformat.load(base[1], lora=saved).generate("The capital", max_tokens=6))
