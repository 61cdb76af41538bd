"""qtune's parts: the frozen quantized linear that autograd runs through, LoRA beside it, and the
QSGD codec and DDP hook (tune/)."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_kernel_table import layouts, make  # noqa: E402
from qformat.tune import QSGD, FrozenQuantLinear, LoraLinear  # noqa: E402
from qformat.tune.qsgd import QSGDState, qsgd_hook  # noqa: E402


@pytest.mark.parametrize("kind, form", layouts())
def test_frozen_linear_gradients_are_a_float_linears_on_the_dequantized_weight(kind, form):
    t = make(kind, form, seed=3)
    w = torch.from_numpy(np.ascontiguousarray(t.dequantize(), np.float32))
    bias = np.linspace(-1, 1, t.shape[0]).astype(np.float32)
    layer = FrozenQuantLinear(t, bias, tile_rows=7)  # tiles that do not divide the rows
    x = torch.randn(3, 5, t.shape[1], generator=torch.Generator().manual_seed(0), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(3, 5, t.shape[0], generator=torch.Generator().manual_seed(1))
    y = layer(x)
    y.backward(grad_out)
    y_ref = torch.nn.functional.linear(x_ref, w, torch.from_numpy(bias))
    y_ref.backward(grad_out)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-4)
    assert list(layer.parameters()) == []  # nothing of the base trains


def test_lora_starts_at_the_base_and_trains_only_its_adapters():
    t = make("q4", "dense", seed=4)
    base = FrozenQuantLinear(t)
    lora = LoraLinear(base, t.shape[1], t.shape[0], rank=4, alpha=8, dropout=0.0)
    x = torch.randn(6, t.shape[1])
    assert torch.equal(lora(x), base(x))  # B starts at zero, as peft's
    torch.nn.init.normal_(lora.lora_B.weight)
    loss = lora(x).square().sum()
    loss.backward()
    assert {n for n, p in lora.named_parameters() if p.grad is not None} == {"lora_A.weight", "lora_B.weight"}
    expect = base(x) + x @ lora.delta_weight().T
    assert torch.allclose(lora(x), expect, rtol=1e-5, atol=1e-4)
    assert lora.scaling == 2.0


@pytest.mark.parametrize("norm", ["l2", "max"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_is_unbiased_within_the_papers_variance_bound(bits, norm):
    codec = QSGD(bits=bits, chunk=256, norm=norm)
    gen = torch.Generator().manual_seed(bits)
    v = torch.randn(1000, generator=gen) * torch.linspace(0.01, 3, 1000)  # a last, partial chunk
    v[100:140] = 0  # zeros stay zeros
    draws = torch.stack([codec.decode(codec.encode(v, gen), v.numel()) for _ in range(3000)])
    assert torch.all(draws[:, 100:140] == 0)
    s, mean = codec.levels, draws.mean(0)
    for lo in range(0, 1000, 256):
        chunk, q = v[lo:lo + 256], draws[:, lo:lo + 256]
        d, norm2 = chunk.numel(), float(chunk.square().sum())
        scale = float(chunk.abs().max()) if norm == "max" else math.sqrt(norm2)
        variance = float((q - chunk).square().sum(1).mean())
        assert variance <= min(d / s**2, math.sqrt(d) / s) * norm2 * 1.05  # Lemma 3.1, sampling slack
        assert variance <= d * (scale / s) ** 2 / 4 * 1.05  # no value's rounding exceeds step^2 / 4
        # unbiased: each value's mean over the draws within 5 standard errors of the value, its
        # variance the rounding's: (||v|| / s)^2 p (1 - p), p the fractional part of |v_i| s / ||v||
        frac = chunk.abs() * s / scale % 1
        per_value_var = (scale / s) ** 2 * frac * (1 - frac)
        assert torch.all((mean[lo:lo + 256] - chunk).abs() <= 5 * (per_value_var / len(q)).sqrt() + 1e-5)


@pytest.mark.parametrize("norm", ["l2", "max"])
def test_qsgd_codes_are_exact_on_their_grid_and_small_on_the_wire(norm):
    codec = QSGD(bits=4, chunk=512, norm=norm)
    v = torch.zeros(512)
    v[:49] = torch.tensor([1.0, -1.0] * 24 + [1.0])  # |v_i| / ||v|| * 7 = 1 (l2), 7 (max): on the grid
    v[500] = 0.0
    assert torch.equal(codec.decode(codec.encode(v), 512), v)
    one_hot = torch.zeros(512)
    one_hot[7] = -2.5
    assert torch.equal(codec.decode(codec.encode(one_hot), 512), one_hot)
    assert codec.encode(v).numel() == codec.wire_bytes(512) == 4 + 256
    n = 1 << 20
    assert 4 * n / codec.wire_bytes(n) > 7.7  # against float32: 4 bits and a norm per 512 values
    with pytest.raises(ValueError, match="bits"):
        QSGD(bits=3)
    with pytest.raises(ValueError, match="norm"):
        QSGD(norm="l1")


def _ddp_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5))
    ddp = DistributedDataParallel(model, bucket_cap_mb=1)
    state = QSGDState(QSGD(bits=4, chunk=64), torch.Generator().manual_seed(100 + rank))
    local, order = [], []

    def recording_hook(state, bucket):
        local.append(bucket.buffer().clone())
        order.extend(bucket.parameters())  # the bucket's layout of the parameters
        return qsgd_hook(state, bucket)

    ddp.register_comm_hook(state, recording_hook)
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in order])
    locals_all = [torch.empty_like(local[0]) for _ in range(world)]
    dist.all_gather(locals_all, local[0])
    codec = QSGD(bits=4, chunk=64)
    expect = sum(codec.decode(codec.encode(g, torch.Generator().manual_seed(100 + r)), g.numel())
                 for r, g in enumerate(locals_all)) / world
    # error feedback, two steps: what each encoding left out goes into the next gradient
    model2 = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5))
    ddp2 = DistributedDataParallel(model2, bucket_cap_mb=1)
    ef = QSGDState(QSGD(bits=4, chunk=64), torch.Generator().manual_seed(200 + rank), error_feedback=True)
    local2: list = []

    def recording_ef(state, bucket):  # DDP checks the parameter names
        local2.append(bucket.buffer().clone())
        return qsgd_hook(state, bucket)

    ddp2.register_comm_hook(ef, recording_ef)
    for step in range(2):
        ddp2.zero_grad()
        ddp2(x * (step + 1)).square().sum().backward()
    mine, residual = torch.Generator().manual_seed(200 + rank), torch.zeros_like(local2[0])
    for g in local2:  # this process's own encodings, replayed
        sent = g + residual
        residual = sent - codec.decode(codec.encode(sent, mine), sent.numel())
    torch.save({"grads": grads, "expect": expect, "true": sum(locals_all) / world, "sent": state.bytes_sent,
                "uncompressed": state.bytes_uncompressed, "buckets": len(local), "ef_residual": ef.residuals[0],
                "ef_expect": residual}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_the_ddp_hook_averages_the_decoded_gradients_of_every_process(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    assert r0["buckets"] == 1  # the whole model in one bucket: its buffer is the gradient
    assert torch.equal(r0["grads"], r1["grads"])  # every process steps with the same gradient
    assert torch.allclose(r0["grads"], r0["expect"], atol=1e-6)
    assert torch.allclose(r0["expect"], r1["expect"])
    error = (r0["expect"] - r0["true"]).norm() / r0["true"].norm()
    assert 0 < error < 0.5  # quantized, and near the true average
    assert r0["uncompressed"] / r0["sent"] > 6
    for r in (r0, r1):  # error feedback keeps exactly what the rounding left out
        assert torch.allclose(r["ef_residual"], r["ef_expect"], atol=1e-6) and r["ef_residual"].abs().max() > 0


@pytest.fixture(scope="module")
def tiny_qbins(tmp_path_factory):
    """Factory: arch -> a tiny random model of that architecture converted at int4-g64 (its
    checkpoint folder beside it, named after the arch)."""
    from tiny_models import make_tiny_checkpoint

    from qformat.convert import convert

    made = {}

    def build(arch):
        if arch not in made:
            folder = make_tiny_checkpoint(tmp_path_factory.mktemp(arch) / arch, arch=arch)
            made[arch] = folder.parent / f"{arch}.qbin"  # folder.parent / arch: the checkpoint
            convert(folder, made[arch], "int4-g64", progress=False)
        return made[arch]

    return build


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "olmo2", "phi3"])
def test_the_decoder_gives_the_runtimes_logits(tiny_qbins, arch):
    from test_architectures import prefills_on_int8

    import qformat
    from qformat import QbinReader
    from qformat.tune.model import QuantDecoder

    path = tiny_qbins(arch)
    tokens = [5, 17, 33, 2, 9, 100, 7, 8, 61, 3, 44, 12]
    with QbinReader(path) as reader, torch.no_grad():
        ours = QuantDecoder(reader, rank=4, alpha=8)(torch.tensor([tokens])).numpy()[0]
    runtime = qformat.load(path, threads=1)
    theirs = np.asarray(runtime.logits(tokens))
    # the torch model multiplies float activations; the runtime's q4 prompt rows are int8 on
    # AVX512-VNNI CPUs (measured there: up to 1.9e-2 of the largest logit, Gemma 2)
    tol = 5e-2 if prefills_on_int8(runtime.transformer) else 2e-3
    assert np.abs(ours - theirs).max() <= tol * max(1.0, np.abs(theirs).max())


def test_training_moves_only_the_adapters_and_lowers_the_loss(tiny_qbins):
    from qformat import QbinReader
    from qformat.tune.model import QuantDecoder

    with QbinReader(tiny_qbins("llama")) as reader:
        model = QuantDecoder(reader, targets=("q", "v", "down"), rank=4, alpha=8)
        assert {n.split(".")[-1] for n in model.adapters()} == {"wq", "wv", "w2"}
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(n.split(".")[-2] in ("lora_A", "lora_B")
                                 for n, p in model.named_parameters() if p.requires_grad)
        frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
        tokens = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(trainable, lr=3e-2)

        def loss():
            logits = model(tokens)
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     tokens[:, 1:].reshape(-1))

        with torch.no_grad():
            first = float(loss())
        for _ in range(20):  # one batch, memorized
            opt.zero_grad()
            step = loss()
            step.backward()
            opt.step()
        with torch.no_grad():
            assert float(loss()) < 0.9 * first
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_adapter_is_peft_s_and_peft_gives_the_same_logits_on_the_float_model(tiny_qbins, tmp_path, arch):
    peft = pytest.importorskip("peft")
    from tiny_models import float_model_on

    from qformat import QbinReader
    from qformat.tune.adapter import load_adapter, save_adapter
    from qformat.tune.model import QuantDecoder

    path = tiny_qbins(arch)
    tokens = torch.tensor([[5, 17, 33, 2, 9, 100, 7, 8, 61, 3]])
    with QbinReader(path) as reader:
        model = QuantDecoder(reader, targets=("q", "v", "o", "down"), rank=4, alpha=8)
        gen = torch.Generator().manual_seed(5)
        for lora in model.adapters().values():  # B away from zero: the adapter changes the logits
            lora.lora_B.weight.data = 0.1 * torch.randn(lora.lora_B.weight.shape, generator=gen)
        with torch.no_grad():
            ours = model(tokens)
        folder = save_adapter(model, tmp_path / "adapter", base_model=arch)
        peft_model = peft.PeftModel.from_pretrained(float_model_on(path.parent / arch, path), str(folder))
        with torch.no_grad():
            theirs = peft_model(tokens).logits
            with peft_model.disable_adapter():
                base = peft_model(tokens).logits
        assert torch.allclose(ours, theirs, atol=2e-3 * float(theirs.abs().max()))
        assert not torch.allclose(base, theirs, atol=2e-2 * float(theirs.abs().max()))  # the adapter acts
        fresh = QuantDecoder(reader, targets=("q", "v", "o", "down"), rank=4, alpha=8)
        load_adapter(fresh, folder)
        with torch.no_grad():
            assert torch.equal(fresh(tokens), ours)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": "2 plus 3 is 5."}, {"role": "user", "content": "and 4 and 4?"},
        {"role": "assistant", "content": "8."}]


def _chat_file(path, n=48, seed=0):
    import json
    import random

    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(1, 9), r.randint(1, 9)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}) + "\n")
    return path


def test_chat_examples_train_on_the_assistant_turns_only(tiny_qbins):
    from qformat import QbinReader
    from qformat.tune.data import Renderer

    with QbinReader(tiny_qbins("llama")) as reader:
        r = Renderer(reader)
        ex = r.conversation(CHAT, "test")
        tok = r.tokenizer
        learned = tok.decode([i for i, m in zip(ex.ids, ex.loss) if m], skip_special=False)
        ignored = tok.decode([i for i, m in zip(ex.ids, ex.loss) if not m], skip_special=False)
    assert "2 plus 3 is 5." in learned and "8." in learned
    assert "add 2 and 3" not in learned and "Be brief" not in learned and "and 4 and 4?" not in learned
    assert "add 2 and 3" in ignored and "Be brief" in ignored
    assert len(ex.ids) == len(ex.loss)


def test_qtune_lowers_the_held_out_loss_and_peft_reads_its_adapter(tiny_qbins, tmp_path):
    import json

    from click.testing import CliRunner

    from qformat.tune.cli import main

    data = _chat_file(tmp_path / "train.jsonl")
    out = tmp_path / "adapter"
    run = CliRunner().invoke(main, [str(tiny_qbins("llama")), "--data", str(data), "-o", str(out), "--context", "64",
                                    "--batch-tokens", "512", "--steps", "30", "--lr", "5e-3", "--rank", "8", "-q"],
                             standalone_mode=False)
    assert run.exit_code == 0, run.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    curve = torch.load(out / "checkpoint.pt", weights_only=False)["curve"]
    first, last = curve[0][2], curve[-1][2]
    assert last < 0.9 * first, curve  # held-out conversations the adapter never saw


def test_resume_continues_the_run_exactly(tiny_qbins, tmp_path, monkeypatch):
    from qformat.tune import TuneOptions, tune
    from qformat.tune.adapter import WEIGHTS

    data = _chat_file(tmp_path / "train.jsonl")
    options = TuneOptions(rank=4, steps=6, checkpoint_every=3, context=64, batch_tokens=256, lr=5e-3, dropout=0.1)
    whole = tune(tiny_qbins("llama"), data, tmp_path / "whole", options, progress=False)
    real_step, calls = torch.optim.AdamW.step, []

    def killed_in_step_four(self, *args, **kwargs):  # after the checkpoint of step 3 is in place
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", killed_in_step_four)
    with pytest.raises(KeyboardInterrupt):
        tune(tiny_qbins("llama"), data, tmp_path / "cut", options, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = tune(tiny_qbins("llama"), data, tmp_path / "cut", options, resume=True, progress=False)
    assert resumed.curve == whole.curve
    assert (tmp_path / "cut" / WEIGHTS).read_bytes() == (tmp_path / "whole" / WEIGHTS).read_bytes()


def test_bad_training_data_is_one_line(tiny_qbins, tmp_path):
    from click.testing import CliRunner

    from qformat.tune.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for data, message in [(bad, "bad.jsonl:1: no assistant message"), (tmp_path / "none.jsonl", "no such file")]:
        run = CliRunner().invoke(main, [str(tiny_qbins("llama")), "--data", str(data), "-o", str(tmp_path / "a")])
        assert run.exit_code == 2 and message in run.output and "Traceback" not in run.output, run.output



@pytest.mark.parametrize("scheme", ["f16", "int4-g64"])
def test_merge_lora_converts_what_peft_merges(tiny_qbins, tmp_path, scheme):
    peft = pytest.importorskip("peft")
    import shutil

    import transformers

    from qformat import QbinReader
    from qformat.convert import convert

    folder = tiny_qbins("llama").parent / "llama"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(9)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = 0.2 * torch.randn(p.shape, generator=gen)
    model.save_pretrained(str(tmp_path / "adapter"))
    merged = tmp_path / "merged"  # what peft merges, saved as a checkpoint of its own
    model.merge_and_unload().save_pretrained(str(merged))
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, merged / f.name)
    convert(folder, tmp_path / "a.qbin", scheme, merge_lora=str(tmp_path / "adapter"), progress=False)
    convert(merged, tmp_path / "b.qbin", scheme, progress=False)
    convert(folder, tmp_path / "base.qbin", scheme, progress=False)
    with QbinReader(tmp_path / "a.qbin") as a, QbinReader(tmp_path / "b.qbin") as b, \
            QbinReader(tmp_path / "base.qbin") as base:
        assert "lora/adapter_model.safetensors" in a.provenance.source_files
        for name in a.names():
            if name == "tokenizer":
                continue
            wa, wb = a[name].dequantize(), b[name].dequantize()
            step = np.abs(wb).max() / (7 if scheme == "int4-g64" else 1000)
            # float32 summation order may differ from peft's by an ulp: at most a rounding step apart
            assert np.abs(wa - wb).max() <= step, name
            assert np.mean(wa == wb) > 0.99, name
        changed = [n for n in a.names() if n != "tokenizer" and not np.array_equal(a[n].dequantize(), base[n].dequantize())]
    assert sorted(changed) == sorted(f"layers.{i}.{k}" for i in range(2) for k in ("attn.wq", "attn.wv", "ffn.w2"))


def test_merge_lora_refuses_what_it_cannot_merge(tiny_qbins, tmp_path):
    from qformat.convert import ConvertError, convert

    folder = tiny_qbins("llama").parent / "llama"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="not a peft LoRA adapter"):
        convert(folder, tmp_path / "x.qbin", "int8", merge_lora=str(tmp_path / "empty"), progress=False)
    assert not (tmp_path / "x.qbin").exists()


def _tune_rank(rank: int, world: int, port: int, base: str, data: str, out: str, compression: str) -> None:
    import os

    from qformat.tune import TuneOptions, tune

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    options = TuneOptions(rank=8, steps=20, context=64, batch_tokens=256, lr=5e-3, grad_compression=compression)
    report = tune(base, data, out, options, progress=False)
    torch.save({"curve": report.curve, "sent": report.bytes_sent, "uncompressed": report.bytes_uncompressed,
                "processes": report.processes}, f"{out}.rank{rank}")


@pytest.mark.parametrize("compression", ["qsgd:4", "none"])
def test_two_processes_train_together_on_compressed_gradients(tiny_qbins, tmp_path, compression):
    import socket

    import torch.multiprocessing as mp

    data = _chat_file(tmp_path / "train.jsonl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "adapter")
    mp.spawn(_tune_rank, args=(2, port, str(tiny_qbins("llama")), str(data), out, compression), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1))
    held = [[(step, e) for step, _, e in r["curve"] if e is not None] for r in (r0, r1)]
    assert r0["processes"] == 2 and held[0] == held[1]  # one model: one held-out curve (each its own batches)
    first, last = r0["curve"][0][2], r0["curve"][-1][2]
    assert last < 0.95 * first, r0["curve"]
    ratio = r0["uncompressed"] / r0["sent"]
    assert ratio > 6 if compression == "qsgd:4" else ratio == 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
