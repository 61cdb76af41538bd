"""Bits per tensor for a size budget (convert/allocate.py, sensitivity.py, budgeted.py)."""
from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from qformat import QbinReader
from qformat.convert import convert
from qformat.convert.allocate import Choice, solve_budget, solve_max_loss
from qformat.convert.plan import ConvertError
from qformat.schemes import parse_scheme

CALIB = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}." for i in range(400))
S = [parse_scheme(n) for n in ("int2-g64", "int3-g64", "int4-g64", "int8")]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB)
    return path


def budgeted(folder, dst, calib_file, **kw):
    return convert(folder, dst, calib=str(calib_file), calib_samples=6, calib_seqlen=48, progress=False, force=True,
                   **kw)


def _convex_choices(rng, n):
    """n tensors, each with 4 candidates of rising bytes and falling, convex losses."""
    out = {}
    for i in range(n):
        base = int(rng.integers(100, 1000))
        scale = float(rng.uniform(0.1, 10))
        out[f"t{i}"] = [Choice(s, base * (j + 1), scale * 4.0 ** -j) for j, s in enumerate(S)]
    return out


def test_budget_solution_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    for trial in range(20):
        choices = _convex_choices(rng, 4)
        everything = sum(max(c.nbytes for c in cands) for cands in choices.values())
        budget = int(rng.integers(everything // 4, everything))
        best = min((combo for combo in itertools.product(*choices.values())
                    if sum(c.nbytes for c in combo) <= budget), key=lambda combo: sum(c.loss for c in combo))
        pick = solve_budget(choices, budget)
        assert sum(c.nbytes for c in pick.values()) <= budget
        assert sum(c.loss for c in pick.values()) == pytest.approx(sum(c.loss for c in best), rel=1e-12), trial


def test_budget_and_bound_errors_name_the_fix():
    choices = _convex_choices(np.random.default_rng(1), 3)
    with pytest.raises(ValueError, match="raise the target"):
        solve_budget(choices, 10)
    with pytest.raises(ValueError, match="raise the bound"):
        solve_max_loss(choices, 1e-9)
    pick = solve_max_loss(choices, 1.0)
    assert sum(c.loss for c in pick.values()) <= 1.0


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "qat"])
def test_target_bpw_meets_the_budget_exactly(tiny_checkpoint, tmp_path, calib_file, method):
    """The file written has the size planned (also by the dry run), within the budget, with the
    allocation recorded, and the runtime computes what the reference dequantization gives."""
    from qformat.runtime.model import Transformer
    from test_outliers import hf_reference_logits

    folder = tiny_checkpoint("llama", tied=True)
    out = tmp_path / "m.qbin"
    dry = budgeted(folder, out, calib_file, target_bpw=5.0, method=method, dry_run=True)
    rep = budgeted(folder, out, calib_file, target_bpw=5.0, method=method)
    size = out.stat().st_size
    assert not any(n.startswith("warning") for n in rep.notes)
    assert dry.file_size == rep.file_size == size
    n_weights = rep.n_params
    assert size <= int(5.0 * n_weights / 8) and size > 0.9 * 5.0 * n_weights / 8
    r = QbinReader(out)
    alloc = r.provenance.allocation
    assert alloc["target_bpw"] == 5.0 and alloc["budget_bytes"] == int(5.0 * n_weights / 8)
    assert alloc["score"] == "fisher" and alloc["predicted_kl"] > 0
    kinds = {r[n].kind for n in r.names() if ".attn." in n or ".ffn." in n or n == "tok_embeddings"}
    assert len(kinds) > 1, "one budget, one scheme for everything: nothing was allocated"
    assert {t.name: t.scheme for t in rep.tensors} == {t.name: t.scheme for t in dry.tensors}
    ids = [int(i) for i in np.random.default_rng(3).integers(0, r.model.vocab_size, 12)]
    ref = hf_reference_logits(folder, out, ids)
    got = Transformer(r).forward(ids, 0, all_logits=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-2 * np.abs(ref).max())


def test_max_kl_gives_a_smaller_file_for_a_looser_bound(tiny_checkpoint, tmp_path, calib_file):
    folder = tiny_checkpoint("llama", tied=False)
    sizes = []
    for bound in (1e-4, 1e-2):
        rep = budgeted(folder, tmp_path / f"{bound}.qbin", calib_file, max_kl=bound)
        alloc = QbinReader(tmp_path / f"{bound}.qbin").provenance.allocation
        assert alloc["predicted_kl"] <= bound and alloc["max_kl"] == bound
        sizes.append(rep.file_size)
    assert sizes[1] < sizes[0]


def test_a_planted_sensitive_tensor_gets_more_bits(tiny_checkpoint, tmp_path, calib_file):
    """Scaling one projection up by 8 makes its errors 8 times larger at the same bits: the
    allocator gives it more bits than it gets in the unscaled model, and at least as many as
    any other projection of its kind."""
    from safetensors.torch import load_file, save_file

    folder = tiny_checkpoint("llama", tied=True)
    planted = tmp_path / "planted"
    shutil.copytree(folder, planted)
    weights = load_file(planted / "model.safetensors")
    target = "model.layers.1.mlp.down_proj.weight"
    weights[target] = weights[target] * 8.0
    save_file(weights, planted / "model.safetensors", metadata={"format": "pt"})

    def bits(model):
        budgeted(model, tmp_path / "x.qbin", calib_file, target_bpw=6.0)
        r = QbinReader(tmp_path / "x.qbin")
        return {n: r[n].nbytes * 8 / np.prod(r[n].shape) for n in r.names() if ".ffn.w2" in n}

    before, after = bits(folder), bits(planted)
    assert after["layers.1.ffn.w2"] > before["layers.1.ffn.w2"]
    assert after["layers.1.ffn.w2"] >= max(after.values())


def test_budget_errors_are_one_line(tiny_checkpoint, tmp_path, calib_file):
    folder = tiny_checkpoint("llama")
    with pytest.raises(ConvertError, match="raise --target-bpw"):
        budgeted(folder, tmp_path / "a.qbin", calib_file, target_bpw=0.5)
    with pytest.raises(ConvertError, match="do not combine"):
        budgeted(folder, tmp_path / "a.qbin", calib_file, target_bpw=4.0, prune="2:4")
    with pytest.raises(ConvertError, match="give one of them"):
        budgeted(folder, tmp_path / "a.qbin", calib_file, target_bpw=4.0, max_kl=0.1)
    assert not (tmp_path / "a.qbin").exists()


def test_cli_needs_a_scheme_or_a_budget(tiny_checkpoint, tmp_path, calib_file):
    from click.testing import CliRunner

    from qformat.convert.cli import main

    folder = str(tiny_checkpoint("llama"))
    res = CliRunner().invoke(main, [folder, str(tmp_path / "o.qbin")])
    assert res.exit_code == 2 and "--target-bpw" in res.output
    res = CliRunner().invoke(main, [folder, str(tmp_path / "o.qbin"), "--target-bpw", "5", "--calib", str(calib_file),
                                    "--calib-samples", "4", "--calib-seqlen", "32", "-q", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "allocation (fisher" in res.output and "tok_embeddings" in res.output


def test_sensitivity_statistics_equal_transformers_autograd(tiny_checkpoint):
    """H (inputs' Gram matrix), F (outputs' squared loss gradients) and the embedding rows'
    squared gradients, measured layer by layer, equal what autograd gives on the transformers
    model for the same cross entropy (hooks on its modules)."""
    import transformers

    from qformat.convert.checkpoint import Checkpoint
    from qformat.convert.hf_config import architecture_of, model_args
    from qformat.convert.options import ConvertOptions
    from qformat.convert.plan import plan
    from qformat.convert.sensitivity import measure

    folder = tiny_checkpoint("llama", tied=False)
    config = json.loads((folder / "config.json").read_text())
    ckpt = Checkpoint(folder)
    args = model_args(config, {}, has_lm_head=True)
    planned, args = plan(ckpt, args, architecture_of(config), ConvertOptions(head="scheme", embed="scheme"))
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (3, 24))
    sens = measure(ckpt, args, planned, tokens, progress=False)

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen: dict[str, dict] = {}

    def watch(name, module):
        slot = seen.setdefault(name, {"gram": 0, "sq": 0})
        module.register_forward_hook(lambda m, i, o: slot.__setitem__("gram", slot["gram"] + (
            i[0].reshape(-1, i[0].shape[-1]).T @ i[0].reshape(-1, i[0].shape[-1])).detach()))
        module.register_full_backward_hook(lambda m, gi, go: slot.__setitem__("sq", slot["sq"] + (
            go[0].reshape(-1, go[0].shape[-1]).double() ** 2).sum(0)))

    watch("layers.1.ffn.w2", model.model.layers[1].mlp.down_proj)
    watch("layers.0.attn.wk", model.model.layers[0].self_attn.k_proj)
    watch("output", model.lm_head)
    emb_out = []

    def keep_embedding(module, inputs, output):
        output.retain_grad()
        emb_out.append(output)

    model.model.embed_tokens.register_forward_hook(keep_embedding)
    ids = torch.as_tensor(tokens)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")
    loss.backward()
    for name, slot in seen.items():
        st = sens.stats[name]
        np.testing.assert_allclose(st.gram.numpy(), slot["gram"].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(st.out_sq_grad.numpy(), slot["sq"].numpy(), rtol=1e-3, atol=1e-9)
    lookup = torch.zeros(args.vocab_size, args.dim).index_add_(0, ids.reshape(-1),
                                                               emb_out[0].grad.reshape(-1, args.dim) ** 2)
    np.testing.assert_allclose(sens.stats["tok_embeddings"].lookup.numpy(), lookup.numpy(), rtol=1e-3, atol=1e-9)
    assert sens.loss == pytest.approx(float(loss) / (3 * 23), rel=1e-5)


def test_imatrix_rounding_lowers_the_weighted_error_and_runs(tiny_checkpoint, tmp_path, calib_file):
    """Importance-weighted rounding: per group, no worse an a-weighted error than min/max
    rounding (the search starts there), lower on columns of unequal importance; its file runs
    and computes the reference dequantization's logits."""
    from qformat.convert.groupquant import fake_quant
    from qformat.convert.imatrix import imatrix_tensor
    from qformat.runtime.model import Transformer
    from test_outliers import hf_reference_logits

    rng = np.random.default_rng(4)
    w = torch.from_numpy(rng.standard_normal((64, 192)).astype(np.float32))
    a = torch.from_numpy(rng.exponential(1.0, 192).astype(np.float32) ** 3)
    for name in ("int3-g64", "int4-g64-sym", "int5-g128", "int8"):
        scheme = parse_scheme(name)
        t, w_hat = imatrix_tensor("w", w, a, scheme)
        assert np.array_equal(t.dequantize(), w_hat.numpy())
        weighted = float((a * (w_hat - w) ** 2).sum())
        plain = float((a * (fake_quant(w, scheme) - w) ** 2).sum())
        assert weighted < plain, name
    folder = tiny_checkpoint("llama", tied=True)
    out = tmp_path / "i.qbin"
    budgeted(folder, out, calib_file, scheme="int4-g64", method="imatrix")
    r = QbinReader(out)
    assert r.provenance.method.startswith("imatrix(")
    ids = [int(i) for i in np.random.default_rng(5).integers(0, r.model.vocab_size, 10)]
    ref = hf_reference_logits(folder, out, ids)
    np.testing.assert_allclose(Transformer(r).forward(ids, 0, all_logits=True), ref, rtol=0,
                               atol=3e-2 * np.abs(ref).max())
