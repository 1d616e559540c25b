"""Resident bytes of a GGUF's matrices kept quantized (weights="q4") against the file's bytes, per
stack of matrices, for a file of any architecture (Gemma 3 270M Q4_K_M by default).

Tensors are grouped the way a model's layer scan stacks them: "blk.N.<name>" over N (all layers of
one <name> share one resident layout, `jaxchunk.weights.quantized.resident_format` of their types),
every other tensor alone. Block-quantized groups are packed with `pack_stacked` (exactly the
`gguf` package's values: checked with --verify); float tensors (norms) stay as stored (F32 here).

Writes results.csv / results.json (one row per group: types, layout, file bytes, resident bytes,
ratio, and a "total" row) and resident_bytes.png into --out.

  .venv/bin/python -m experiments.kquant_resident --gguf /path/to/gemma-3-270m-q4_k_m.gguf --verify
"""
from __future__ import annotations

import argparse
import collections
import re
import time
from pathlib import Path

import numpy as np

from experiments import common

DEFAULT_MODEL = "gemma3-270m"


def group_tensors(tensors: dict) -> dict[str, list]:
    """name -> [RawTensor, ...]: "blk.N.x" grouped by x (in layer order), other names alone."""
    groups: dict[str, list] = collections.defaultdict(list)
    for name, t in tensors.items():
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        groups[m.group(2) if m else name].append((int(m.group(1)) if m else 0, t))
    return {key: [t for _, t in sorted(items, key=lambda it: it[0])] for key, items in groups.items()}


def verify(stack, tensors) -> None:
    """Every layer of the packed stack dequantizes to gguf.quants' values (only the first column
    tiles, <= 4096 of the columns, of very wide ones such as a 262k-token embedding)."""
    import jax
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from jaxchunk.weights.quantized import dequantize as dequantize_weight
    tiles, tile = stack.qs.shape[-3], stack.qs.shape[-1]
    n_tiles = max(1, min(tiles, 4096 // tile))
    cols = n_tiles * tile  # W's columns = the tensor's rows
    for i, t in enumerate(tensors):
        layer = jax.tree.map(lambda a: a[i, :n_tiles], stack)
        want = dequantize(t.blocks[:cols], GGMLQuantizationType[t.qtype]).reshape(cols, t.shape[1]).T
        if not np.array_equal(np.asarray(dequantize_weight(layer)), want):
            raise AssertionError(f"{t.name}: packed weights differ from gguf.quants' dequantization")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help=f"default: `jaxchunk fetch {DEFAULT_MODEL}`'s file")
    p.add_argument("--verify", action="store_true", help="check every packed layer against gguf.quants")
    p.add_argument("--out", type=Path, default=Path("results/kquant_resident"))
    args = p.parse_args(argv)
    if args.gguf is None:
        from jaxchunk.fetch import MODELS, fetch_model
        if DEFAULT_MODEL not in MODELS:
            p.error(f"no {DEFAULT_MODEL!r} in jaxchunk.fetch.MODELS here: pass --gguf")
        args.gguf = fetch_model(DEFAULT_MODEL)

    from jaxchunk.weights.gguf import open_gguf
    from jaxchunk.weights.gguf_quants import QUANT_TYPES
    from jaxchunk.weights.quantized import pack_stacked, resident_format

    start = time.perf_counter()
    gguf = open_gguf(args.gguf)
    rows = []
    for key, tensors in group_tensors(gguf.tensors).items():
        types = sorted({t.qtype for t in tensors})
        file_bytes = sum(t.blocks.nbytes for t in tensors)
        if all(q in QUANT_TYPES for q in types) and len(tensors[0].shape) == 2:
            stack = pack_stacked(tensors)
            if args.verify:
                verify(stack, tensors)
            fmt = resident_format(types)
            layout = f"{fmt.bits}-bit g{fmt.group} {fmt.scale_dtype}{' +mins' if fmt.has_mins else ''}"
            resident = stack.nbytes
            del stack
        else:
            layout, resident = "float, as stored", file_bytes
        rows.append(dict(group=key, layers=len(tensors), types="+".join(types), layout=layout,
                         file_bytes=file_bytes, resident_bytes=resident, ratio=resident / file_bytes))
        print(f"{key:28} {len(tensors):3} x {'+'.join(types):10} {layout:26} "
              f"{file_bytes / common.MB:8.2f} MiB -> {resident / common.MB:8.2f} MiB ({resident / file_bytes:.3f}x)",
              flush=True)
    total_file = sum(r["file_bytes"] for r in rows)
    total_resident = sum(r["resident_bytes"] for r in rows)
    rows.append(dict(group="total", layers=0, types="", layout="", file_bytes=total_file,
                     resident_bytes=total_resident, ratio=total_resident / total_file))
    print(f"total: file {total_file / common.MB:.2f} MiB (tensor data; the file is "
          f"{args.gguf.stat().st_size / common.MB:.2f} MiB), resident {total_resident / common.MB:.2f} MiB, "
          f"ratio {total_resident / total_file:.4f}")
    settings = {"gguf": str(args.gguf), "verify": args.verify, "file_size": args.gguf.stat().st_size}
    df = common.write_results(args.out, rows, settings, common.machine_info())

    plt = common.pyplot()
    part = df[df.group != "total"].sort_values("file_bytes", ascending=False)
    part = part[part.file_bytes > 0.001 * total_file]  # the norms are too small to see
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(part))
    ax.bar(x - 0.2, part.file_bytes / common.MB, 0.4, label="in the file")
    ax.bar(x + 0.2, part.resident_bytes / common.MB, 0.4, label='resident (weights="q4")')
    ax.set_xticks(x, [f"{g}\n{t}" for g, t in zip(part.group, part.types)], fontsize=7)
    ax.set_ylabel("MiB (all layers)")
    ax.set_title(f"{args.gguf.name}: resident / file = {total_resident / total_file:.3f} "
                 f"({total_resident / common.MB:.0f} / {total_file / common.MB:.0f} MiB)", fontsize=10)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    common.save_figure(fig, args.out / "resident_bytes.png")
    common.print_written(args.out, [args.out / "resident_bytes.png"], time.perf_counter() - start)
    return df


if __name__ == "__main__":
    main()
