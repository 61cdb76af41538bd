"""qinfo: describe a .qbin file (architecture, size, bits per weight, schemes, metadata).

The summary is computed from the header alone, so it takes milliseconds on any file size;
`--verify` additionally reads every byte to check the checksums.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import click

from .constants import PREAMBLE_SIZE
from .errors import QbinError
from .reader import QbinReader
from .schemes import FILE_KINDS, QUANT_KINDS
from .tensors import tensor_group

# Tensor classes in display order. A class is the group of the name's entry in the tensor name
# table (qformat.tensors, spec/qbin.md §3.1); names outside the contract are "other".
CLASSES = ("embeddings", "attention", "mlp", "head", "norms", "biases", "other")

# Array roles that hold the quantized weight itself; every other role is a sidecar.
_BASE_ROLES = frozenset({"data", "codes", "scales", "zeros", "offsets"})
# Sidecar roles shown under one name (the CSR triple is one sidecar, so are the 16-bit columns).
_SIDECAR_NAMES = {
    "outlier_rowptr": "outliers", "outlier_cols": "outliers", "outlier_values": "outliers",
    "fp_cols": "fp_cols", "fp_weight": "fp_cols",
}

BPW_HELP = ("Bits per weight = 8 x (bytes of every stored array of the weight tensors) / (number "
            "of logical weights). Counted: codes, scales, zeros and every sidecar (perm, outliers, "
            "16-bit columns, n:m index, activation scales); float tensors count their data. Not "
            "counted: alignment padding, the header, and the tokenizer file.")


class QinfoError(click.ClickException):
    """A bad FILE: printed as one line `qinfo: error: <file>: <problem>`, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"qinfo: error: {self.format_message()}", err=True)


def scheme_of(entry: dict) -> dict:
    """Kind, group size and symmetry of a directory entry, as a JSON-ready dict."""
    kind = entry["kind"]
    if kind not in QUANT_KINDS:
        return {"kind": kind}
    out = {
        "kind": kind,
        "group_size": entry["group_size"],
        "per_channel": entry["group_size"] >= entry["shape"][1],
        "symmetric": entry["symmetric"],
    }
    if entry.get("sparsity") is not None:
        out["sparsity"] = "{}:{}".format(*entry["sparsity"])
    if entry.get("activation") is not None:
        out["activation"] = f"int8 {entry['activation']['mode']}"
    if "offsets" in entry.get("arrays", {}):
        out["offsets"] = True  # a float minimum per group (spec §4.2), not a zero-point
    if "scale_exp" in entry.get("arrays", {}):
        out["log_scales"] = True  # 8-bit log-coded scales (spec §4.3)
    return out


def scheme_label(scheme: dict) -> str:
    """Short text form of scheme_of(): "q4 g64 asym", "q8 per-channel sym", "nf4 g64", "f16"."""
    kind = scheme["kind"]
    if kind not in QUANT_KINDS:
        return kind
    parts = [kind, "per-channel" if scheme["per_channel"] else f"g{scheme['group_size']}"]
    if kind != "nf4":
        parts.append("sym" if scheme["symmetric"] else "asym")
    if "sparsity" in scheme:
        parts.append(scheme["sparsity"])
    if "activation" in scheme:
        parts.append(f"a8-{scheme['activation'].split()[1]}")
    if scheme.get("log_scales"):
        parts.append("dq")
    return " ".join(parts)


def _bpw(nbytes: int, params: int) -> float | None:
    return round(8 * nbytes / params, 4) if params else None


def summarize(reader: QbinReader, per_tensor: bool = False) -> dict:
    """The stable JSON summary of an open file (see `qinfo --json`); per_tensor: also each
    tensor's scheme and bits per weight (key "per_tensor")."""
    directory = reader.header["tensors"]
    classes: dict[str, dict] = {}
    sidecars_total: Counter = Counter()
    for name, entry in directory.items():
        if entry["kind"] in FILE_KINDS:
            continue
        cls = classes.setdefault(tensor_group(name), {
            "tensors": 0, "parameters": 0, "bytes": 0, "_schemes": Counter(), "_sidecars": Counter()})
        cls["tensors"] += 1
        cls["parameters"] += math.prod(entry["shape"])
        cls["bytes"] += sum(a["nbytes"] for a in entry["arrays"].values())
        cls["_schemes"][json.dumps(scheme_of(entry), sort_keys=True)] += 1
        for side in sorted({_SIDECAR_NAMES.get(r, r) for r in entry["arrays"] if r not in _BASE_ROLES}):
            cls["_sidecars"][side] += 1
            sidecars_total[side] += 1
    ordered = {}
    for cls_name in CLASSES:
        if cls_name not in classes:
            continue
        c = classes[cls_name]
        schemes = [dict(json.loads(s), tensors=n) for s, n in sorted(c["_schemes"].items(), key=lambda x: (-x[1], x[0]))]
        ordered[cls_name] = {
            "tensors": c["tensors"], "parameters": c["parameters"], "bytes": c["bytes"],
            "bits_per_weight": _bpw(c["bytes"], c["parameters"]),
            "schemes": schemes, "sidecars": dict(sorted(c["_sidecars"].items())),
        }
    params = sum(c["parameters"] for c in ordered.values())
    weight_bytes = sum(c["bytes"] for c in ordered.values())
    tok = reader.tokenizer
    extra = {}
    if per_tensor:
        extra["per_tensor"] = [
            {"name": name, "shape": entry["shape"], **scheme_of(entry),
             "bits_per_weight": _bpw(sum(a["nbytes"] for a in entry["arrays"].values()), math.prod(entry["shape"]))}
            for name, entry in directory.items() if entry["kind"] not in FILE_KINDS]
    return {
        "file": str(reader.path),
        "format_version": "{}.{}".format(*reader.version),
        "file_size": reader.file_size,
        "header_bytes": reader.header_end - PREAMBLE_SIZE,
        "tensors": len(directory),
        "model": dataclasses.asdict(reader.model),
        "parameters": params,
        "weight_bytes": weight_bytes,
        "bits_per_weight": _bpw(weight_bytes, params),
        "file_bits_per_weight": _bpw(reader.file_size, params),
        "classes": ordered,
        "sidecars": dict(sorted(sidecars_total.items())),
        "tokenizer": None if tok is None else {
            "kind": tok.kind, "tensor": tok.tensor, "bytes": directory[tok.tensor]["arrays"]["data"]["nbytes"]
            if "data" in directory[tok.tensor]["arrays"] else 0,
            "compression": "xz" if directory[tok.tensor]["kind"] == "xz" else None,
            "add_bos": tok.add_bos, "selftest_cases": len(tok.selftest),
        },
        "chat_template": {"present": reader.chat_template is not None,
                          "chars": len(reader.chat_template or "")},
        "generation": dataclasses.asdict(reader.generation),
        "provenance": dataclasses.asdict(reader.provenance),
        "verified_arrays": None,
        **extra,
    }


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1."""
    if n < 1024:
        return f"{n} B"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"


def render(info: dict) -> str:
    """Human-readable form of summarize()'s dict."""
    m = info["model"]
    rope = m.get("rope_scaling")
    rope_text = "no scaling" if not rope else f"{rope['kind']} scaling x{rope['factor']}"
    flags = [f for f, on in (("qkv bias", m.get("qkv_bias")), ("qk norm", m.get("qk_norm"))) if on]
    flags = [f + (" over whole projections" if f == "qk norm" and m.get("qk_norm_per_head") is False else "")
             for f in flags]
    if m.get("sliding_window"):
        types = m.get("layer_types") or []
        where = f" on {types.count('sliding')} of {len(types)} layers" if types else ""
        flags.append(f"sliding window {m['sliding_window']}{where}")
    flags += [text for text, on in (
        (f"local rope theta {m.get('rope_local_theta')}", m.get("rope_local_theta") is not None),
        (f"no RoPE in layers {m.get('nope_layers')}", bool(m.get("nope_layers"))),
        (f"{m.get('activation')} gate", m.get("activation", "silu") != "silu"),
        (f"embeddings x{m.get('embed_scale') or 0:.4g}", m.get("embed_scale") is not None),
        ("no pre-norms", m.get("pre_norms") is False),
        ("post-norms", bool(m.get("post_norms"))),
        (f"attention scale {m.get('attn_scale') or 0:.4g}", m.get("attn_scale") is not None),
        (f"attention soft cap {m.get('attn_softcap')}", m.get("attn_softcap") is not None),
        (f"logit soft cap {m.get('final_softcap')}", m.get("final_softcap") is not None),
        (f"rotary dims {m.get('rotary_dim')}", m.get("rotary_dim") is not None),
        (f"{m.get('n_experts')} experts, {m.get('experts_per_token')} per token"
         + ("" if m.get("norm_topk", True) else " (not renormalized)"), bool(m.get("n_experts"))),
        (f"a shared expert of {m.get('shared_ffn_dim')}", bool(m.get("shared_ffn_dim"))),
    ) if on]
    bpw = info["bits_per_weight"]
    lines = [
        f"file          {info['file']} ({_size(info['file_size'])}, qbin {info['format_version']}, "
        f"{info['tensors']} tensors)",
        f"architecture  {m.get('arch')}: {m.get('n_layers')} layers, dim {m.get('dim')}, {m.get('n_heads')} heads "
        f"({m.get('n_kv_heads')} kv, head_dim {m.get('head_dim')}), ffn {m.get('ffn_dim')}, "
        f"vocab {m.get('vocab_size')}, context {m.get('max_seq_len')}",
        f"              rope theta {m.get('rope_theta')}, {rope_text}; norm eps {m.get('norm_eps')}; "
        f"{'tied' if m.get('tie_embeddings') else 'separate'} embeddings"
        + "".join(f"; {f}" for f in flags),
        f"              bos {m.get('bos_token_id')}, eos {m.get('eos_token_ids')}, pad {m.get('pad_token_id')}",
        f"parameters    {info['parameters']:,}",
        f"bits/weight   {'-' if bpw is None else f'{bpw:.3f}'} overall "
        f"({info['weight_bytes']:,} bytes of weight arrays; see --help for what is counted); "
        f"{'-' if info['file_bits_per_weight'] is None else format(info['file_bits_per_weight'], '.3f')} "
        "whole file",
        "",
        f"  {'class':<11} {'tensors':>7} {'parameters':>13} {'bits/w':>7}  schemes / sidecars",
    ]
    for name, c in info["classes"].items():
        labels: Counter = Counter()
        for s in c["schemes"]:  # per-channel schemes of different widths share one label
            labels[scheme_label(s)] += s["tensors"]
        schemes = ", ".join(label + (f" (x{n})" if len(labels) > 1 else "") for label, n in labels.items())
        side = ", ".join(f"{k} (x{v})" for k, v in c["sidecars"].items())
        cbpw = c["bits_per_weight"]
        lines.append(f"  {name:<11} {c['tensors']:>7} {c['parameters']:>13,} "
                     f"{'-' if cbpw is None else f'{cbpw:.3f}':>7}  {schemes}" + (f" + {side}" if side else ""))
    lines.append("")
    lines.append(f"sidecars      {', '.join(info['sidecars']) if info['sidecars'] else 'none'}")
    tok = info["tokenizer"]
    lines.append("tokenizer     none" if tok is None else
                 f"tokenizer     {tok['kind']} (tensor {tok['tensor']!r}, {tok['bytes']:,} bytes{', xz' if tok['compression'] else ''}), "
                 f"add_bos {str(tok['add_bos']).lower()}, {tok['selftest_cases']} selftest case(s)")
    ct = info["chat_template"]
    lines.append(f"chat template {'present (' + format(ct['chars'], ',') + ' chars)' if ct['present'] else 'absent'}")
    gen = {k: v for k, v in info["generation"].items() if v is not None}
    lines.append(f"generation    {', '.join(f'{k} {v}' for k, v in gen.items()) or 'no defaults'}")
    prov = info["provenance"]
    lines.append(f"provenance    source {prov.get('source') or '?'}; converter {prov.get('converter') or '?'}; "
                 f"scheme {prov.get('scheme') or '?'}; method {prov.get('method') or '?'}; "
                 f"created {prov.get('created') or '?'}")
    files = prov.get("source_files") or {}
    lines.append(f"              {len(files)} source file(s) hashed; calibration "
                 f"{prov.get('calibration_sha256') or 'none'}")
    if prov.get("command"):
        lines.append(f"              command: {prov['command']}")
    alloc = prov.get("allocation")
    if alloc:
        target = (f"{alloc.get('target_bpw')} bits/weight ({alloc.get('budget_bytes'):,} bytes)"
                  if alloc.get("target_bpw") is not None else f"predicted KL <= {alloc.get('max_kl')}")
        lines.append(f"allocation    {target}; score {alloc.get('score')} on {alloc.get('samples')} windows; "
                     f"predicted KL {alloc.get('predicted_kl', 0):.4f} nats/token")
        lines.append(f"              candidates {', '.join(alloc.get('candidates') or [])}")
    if "per_tensor" in info:
        lines.append("")
        for t in info["per_tensor"]:
            tbpw = t["bits_per_weight"]
            lines.append(f"  {t['name']:<28} {'x'.join(map(str, t['shape'])):>12}  {scheme_label(t):<24} "
                         f"{'-' if tbpw is None else f'{tbpw:.3f}':>7}")
    if info["verified_arrays"] is not None:
        lines.append(f"checksums     {info['verified_arrays']} arrays OK, padding zero")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=BPW_HELP)
@click.argument("file", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--verify", is_flag=True, help="Also check every array's checksum (reads the whole file).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object (stable keys).")
@click.option("--tensors", "per_tensor", is_flag=True,
              help="Also list every tensor: shape, scheme and bits per weight (a budget's choices).")
def main(file: Path, verify: bool, as_json: bool, per_tensor: bool) -> None:
    """Describe the .qbin FILE: architecture, parameters, size, bits per weight per tensor
    class, schemes, sidecars, tokenizer, chat template and provenance.

    Exit code 2 and one line `qinfo: error: FILE: problem` when FILE is not a valid qbin.
    """
    try:
        with QbinReader(file) as reader:
            info = summarize(reader, per_tensor)
            if verify:
                info["verified_arrays"] = reader.verify()
    except QbinError as e:
        raise QinfoError(str(e)) from None
    except OSError as e:
        raise QinfoError(f"{file}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - the CLI promises one error line, never a traceback
        raise QinfoError(f"{file}: cannot summarize ({type(e).__name__}: {e}); the header is "
                         "malformed in a way the reader did not catch, please report it") from None
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


if __name__ == "__main__":
    main()
