"""What log-coded 8-bit scales (spec §4.3, the "-dq" schemes) cost in weight error.

Round-to-nearest of every decoder projection and the embedding of a checkpoint, with float16
scales and with log-coded ones; prints the change of the summed squared weight error per scheme.

    python bench/bench_log_scales.py MODEL_DIR [--schemes int4-g64,int3-g64,...]
"""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from safetensors.numpy import safe_open

from qformat.schemes import parse_scheme


def squared_error(scheme, w: np.ndarray) -> float:
    return float(np.square(scheme.quantize("w", w).dequantize() - w, dtype=np.float64).sum())


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--schemes", default="int4-g64,int3-g64,int2-g64,int4-g32,int4-g64-sym,nf4-g64", show_default=True)
def main(model_dir: Path, schemes: str) -> None:
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if name.endswith("proj.weight") or name == "model.embed_tokens.weight":
                    weights[name] = f.get_tensor(name).float().numpy()
    for base in schemes.split(","):
        plain = log = 0.0
        for w in weights.values():
            plain += squared_error(parse_scheme(base), w)
            log += squared_error(parse_scheme(base + "-dq"), w)
        click.echo(f"{base}: log-coded scales {100 * (log / plain - 1):+.2f}% squared weight error "
                   f"({len(weights)} tensors)")


if __name__ == "__main__":
    main()
