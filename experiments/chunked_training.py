"""Chunked training: memory, step time and gradient error of chunked losses vs the full sequence.

For each sequence length n and chunk length c, one training step (loss + gradient w.r.t. every
parameter, batch 1) computed four ways (jaxchunk/training.py):

- full:              jax.grad of the full-sequence loss (`jaxchunk.model.forward`, no cache) - the reference;
- exact:             chunked through the KV cache, gradients through earlier chunks' K/V (custom-VJP
                     recompute: one cache + its cotangent, one chunk's activations);
- exact-checkpoint:  the same gradient by plain jax.grad over a lax.scan of jax.checkpoint'ed chunks
                     (scan saves the whole cache once per chunk);
- truncated:         the first n - train_len tokens prefilled without gradients, the last train_len
                     trained (train_len = min(--train-len, n)).

Columns:
- peak_mb / temp_mb: XLA's compiled memory analysis of the jitted step (arguments + outputs - aliased
  + temporaries), for pass=train (loss and gradient) and pass=forward (the loss alone: full forward
  vs the chunked forward). Compile-only, so it is reported for every length, also those above
  --run-max-len that are too big to run here.
- step_s, tok_per_s: median wall time of warm training steps (lengths <= --run-max-len).
- grad_rel_<group>: ||g - g_ref|| / ||g_ref|| over each parameter group (embed, attention
  wq/wk/wv/wo, mlp, norms, lm_head when untied) and over all parameters (grad_rel_all), plus
  grad_cos (cosine of the whole gradient vectors). g_ref: the full-sequence gradient of the *same*
  loss: all targets for exact, the last train_len positions' targets for truncated - so truncated
  rows measure what cutting the gradient at the prefix K/V costs. grad_rel_all_vs_all_targets
  compares truncated gradients with the all-targets full gradient (what training on every token
  would give). pass=forward rows exist for full and exact only (the other chunked methods run the
  same chunked forward).

  .venv/bin/python -m experiments.chunked_training --quick          # tiny random model, ~5 min
  .venv/bin/python -m experiments.chunked_training --model smollm2-135m --lengths 512,1024 --chunk-lens 256

Writes results.csv, results.json, memory.png, time.png, grad_error.png into --out.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import numpy as np

from experiments import common
from jaxchunk.training import loss_and_grad, lower_step

FULL = dict(lengths=[512, 1024, 2048, 4096, 8192], chunk_lens=[128, 512, 2048], run_max_len=4096, repeats=3)
QUICK = dict(lengths=[512, 1024, 2048, 4096, 8192], chunk_lens=[128, 512], run_max_len=2048, repeats=1)
METHODS = ("full", "exact", "exact-checkpoint", "truncated")
GROUPS = {"embed": ("embed",), "attention": ("wq", "wk", "wv", "wo"), "mlp": ("w_gate", "w_up", "w_down"),
          "norms": ("attn_norm", "mlp_norm", "final_norm"), "lm_head": ("lm_head",)}
TABLE_COLUMNS = ["seq_len", "method", "chunk_len", "pass", "peak_mb", "temp_mb", "step_s", "tok_per_s",
                 "grad_rel_all", "grad_cos", "grad_rel_attention", "grad_rel_mlp", "grad_rel_embed",
                 "grad_rel_all_vs_all_targets"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.TINY_MODEL, choices=common.MODELS,
                   help="tiny-random: 2-layer random Llama (default); smollm2-135m: real GGUF weights")
    p.add_argument("--dtype", default="f32", choices=("f32",), help="float32 only: gradients are compared")
    p.add_argument("--lengths", type=common.parse_list, help="sequence lengths (tokens)")
    p.add_argument("--chunk-lens", type=common.parse_list, help="chunk lengths")
    p.add_argument("--methods", type=lambda s: common.parse_list(s, str), default=list(METHODS))
    p.add_argument("--train-len", type=int, default=256, help="trained tail for method truncated")
    p.add_argument("--run-max-len", type=int, help="longer sequences: compiled memory only (not run)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--quick", action="store_true", help=f"preset: {QUICK} (explicit flags still win)")
    p.add_argument("--out", type=Path, default=Path("results/chunked_training"))
    args = p.parse_args(argv)
    common.apply_preset(args, QUICK if args.quick else FULL)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return args


def runs_for(n: int, args) -> list[dict]:
    """The (method, chunk_len, kwargs) settings for one length; chunks >= n are left out."""
    runs = [dict(method="full", chunk_len=None, kwargs=dict(mode="full"))] if "full" in args.methods else []
    for c in args.chunk_lens:
        if c >= n:
            continue
        train_len = min(args.train_len, n)
        options = {"exact": dict(chunk_len=c), "exact-checkpoint": dict(chunk_len=c, strategy="checkpoint"),
                   "truncated": dict(chunk_len=c, mode="truncated", train_len=train_len)}
        runs += [dict(method=m, chunk_len=c, kwargs=kw) for m, kw in options.items() if m in args.methods]
    return runs


def compiled_memory(params, config, n: int, kwargs: dict, grad: bool) -> dict:
    stats = lower_step(params, config, 1, n, grad=grad, **kwargs).compile().memory_analysis()
    if stats is None:
        return {}
    arg, out, alias, temp = (stats.argument_size_in_bytes, stats.output_size_in_bytes,
                             stats.alias_size_in_bytes, stats.temp_size_in_bytes)
    return {"arg_mb": arg / common.MB, "out_mb": out / common.MB, "temp_mb": temp / common.MB,
            "peak_mb": (arg + out - alias + temp) / common.MB}


def grouped(grads: dict) -> dict[str, np.ndarray]:
    """Flatten each parameter group into one float64 vector (plus "all")."""
    flat = {"embed": grads["embed"], "final_norm": grads["final_norm"], **grads["layers"]}
    if "lm_head" in grads:
        flat["lm_head"] = grads["lm_head"]
    out = {}
    for group, names in GROUPS.items():
        parts = [np.asarray(flat[k], np.float64).ravel() for k in names if k in flat]
        if parts:
            out[group] = np.concatenate(parts)
    out["all"] = np.concatenate(list(out.values()))
    return out


def grad_error(got: dict, ref: dict) -> dict:
    """Relative L2 difference per parameter group and overall, and the cosine of the whole vectors."""
    g, r = grouped(got), grouped(ref)
    row = {f"grad_rel_{k}": float(np.linalg.norm(g[k] - r[k]) / np.linalg.norm(r[k])) for k in r}
    row["grad_cos"] = float(g["all"] @ r["all"] / (np.linalg.norm(g["all"]) * np.linalg.norm(r["all"])))
    return row


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    machine = common.machine_info()
    model = common.load_model(args.model, args.dtype)
    params, config = model.params, model.config
    rows = []
    plan = [(n, run) for n in sorted(args.lengths) for run in runs_for(n, args)]
    references: dict = {}
    for n, run in (bar := common.progress(plan, "chunked_training")):
        bar.set_postfix_str(f"n={n} {run['method']} c={run['chunk_len']}")
        base = {"model": model.name, "dtype": model.dtype, "seq_len": n, "method": run["method"],
                "chunk_len": run["chunk_len"], "train_len": run["kwargs"].get("train_len")}
        if run["method"] in ("full", "exact"):  # the forward alone: full vs chunked (the others chunk alike)
            rows.append({**base, "pass": "forward",
                         **compiled_memory(params, config, n, run["kwargs"], grad=False)})
        row = {**base, "pass": "train", **compiled_memory(params, config, n, run["kwargs"], grad=True)}
        if n <= args.run_max_len:
            ids = common.prompt_ids(args.model, n)[None]
            last = []

            def step():
                last[:] = [loss_and_grad(params, config, ids, **run["kwargs"])]
                return last[0]

            timing = common.timeit(step, args.repeats)
            loss, grads = last.pop()
            grads = jax.tree.map(np.asarray, grads)
            row.update(step_s=timing.median_s, step_min_s=timing.min_s, step_max_s=timing.max_s,
                       tok_per_s=n / timing.median_s, compile_s=timing.compile_s,
                       loss=float(loss))
            train_len = run["kwargs"].get("train_len")
            if run["method"] == "full":
                references[n, None] = grads
            for key in (None, train_len):  # the full-sequence reference gradients of this length
                if (n, key) not in references:
                    references[n, key] = jax.tree.map(np.asarray, loss_and_grad(
                        params, config, ids, mode="full", train_len=key)[1])
            if run["method"] != "full":
                row.update(grad_error(grads, references[n, train_len]))
            if train_len is not None:
                row["grad_rel_all_vs_all_targets"] = grad_error(grads, references[n, None])["grad_rel_all"]
            del grads
        rows.append(row)
        references = {k: v for k, v in references.items() if k[0] >= n}  # drop shorter lengths' refs

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(model_source=model.source, config=str(config), wall_s=round(time.perf_counter() - started, 1))
    df = common.write_results(args.out, rows, settings, machine)

    df["label"] = [m if (c is None or (isinstance(c, float) and math.isnan(c))) else f"{m} c={int(c)}"
                   for m, c in zip(df["method"], df["chunk_len"])]
    kw = dict(x="seq_len", line="label", xlabel="sequence length (tokens, log2)")
    pngs = [common.line_plot(df, args.out / "memory.png", y="peak_mb", facet="pass", logy=True,
                             ylabel="compiled peak memory (MB, log)",
                             title=f"{args.model}: compiled memory of one step (forward = loss only, "
                                   f"train = loss + gradient)", **kw)]
    ran = df[(df["pass"] == "train") & df["step_s"].notna()] if "step_s" in df else df.iloc[:0]
    if len(ran):
        pngs.append(common.line_plot(ran, args.out / "time.png", y="step_s", logy=True,
                                     ylabel="training step time (s, log)",
                                     title=f"{args.model}: loss + gradient wall time (batch 1)", **kw))
        chunked = ran[ran["method"] != "full"]
        pngs.append(common.line_plot(chunked, args.out / "grad_error.png", y="grad_rel_all", logy=True,
                                     floor=1e-8, ylabel="||g - g_full|| / ||g_full|| (log)",
                                     title=f"{args.model}: gradient vs full-sequence gradient of the same loss "
                                           f"(truncated: train_len {args.train_len})", **kw))
    common.print_table(df, TABLE_COLUMNS, title=f"\n{args.model} {args.dtype}, batch 1, load average "
                                                 f"{machine['load_average_1_5_15']}")
    common.print_written(args.out, pngs, settings['wall_s'])
    return df


if __name__ == "__main__":
    main()
