# ruff: noqa: B023  (every lambda below is timed at once, inside its loop iteration)
"""Probe of the fused path's pieces on the GPU, one table each (DeiT-B shapes, batch 1 and 256).

1. LayerNorm + quantize (Triton) for several (rows per program, warps), against the bandwidth floor
   (a device-to-device copy of the same bytes) and Inductor's fused LayerNorm + quantize;
2. attention: scaled_dot_product_attention per backend;
3. 2:4 GEMMs: cuSPARSELt's own search (matmul_search) against an exhaustive sweep of algorithm ids x
   split-K, per shape and epilogue.

Run on the device: ``python benchmarks/speed_probe.py [--json out.json] [--only ln,attn,gemm]``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def bench(fn, reps: int = 7, inner: int = 20) -> float:
    from gpusq.deploy.cusparselt import time_graph

    return time_graph(fn, reps=reps, inner=inner)


def probe_ln(rows_list=(50432, 224), c: int = 768) -> list[dict]:
    from gpusq.deploy.kernels import layernorm_quant

    out = []
    for rows in rows_list:
        x = torch.randn(rows, c, device="cuda").to(torch.bfloat16)
        w, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
        inv = torch.tensor(20.0, device="cuda")
        y = torch.empty(rows, c, dtype=torch.int8, device="cuda")
        copy_src = torch.empty(rows * c * 3 // 2, dtype=torch.uint8, device="cuda")
        copy_dst = torch.empty_like(copy_src)
        floor = bench(lambda: copy_dst.copy_(copy_src)) / 2  # copy reads+writes 2x the bytes; LN moves 1.5x
        row = {"rows": rows, "floor_ms(bytes/copy-bw)": floor * 1.0}
        row["default"] = bench(lambda: layernorm_quant(x, w, b, 1e-6, inv, rows, c, out=y))
        for bm in (1, 2, 4, 8, 16):
            for nw in (1, 2, 4, 8):
                try:
                    row[f"bm{bm}w{nw}"] = bench(lambda bm=bm, nw=nw: layernorm_quant(x, w, b, 1e-6, inv, rows, c, out=y,
                                                                                   block_m=bm, num_warps=nw))
                except Exception as e:  # noqa: BLE001
                    row[f"bm{bm}w{nw}"] = f"ERR {str(e)[:60]}"

        def ind(t):
            return torch.clamp(torch.round(F.layer_norm(t.float(), (c,), w, b, 1e-6) * inv), -128, 127).to(torch.int8)

        cf = torch.compile(ind, dynamic=False)
        cf(x)
        row["inductor"] = bench(lambda: cf(x))
        out.append(row)
        best = min((v, k) for k, v in row.items() if isinstance(v, float) and k.startswith("bm"))
        print(f"LN rows {rows}: floor {row['floor_ms(bytes/copy-bw)']:.4f} default {row['default']:.4f} "
              f"best {best[1]} {best[0]:.4f} inductor {row['inductor']:.4f}", flush=True)
    return out


def probe_attn() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    for b in (256, 1):
        q, k, v = (torch.randn(b, 197, 3, 12, 64, device="cuda").to(torch.bfloat16).permute(2, 0, 3, 1, 4))
        row = {"batch": b, "default": bench(lambda: F.scaled_dot_product_attention(q, k, v))}
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    F.scaled_dot_product_attention(q, k, v)
                    row[name] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            except Exception as e:  # noqa: BLE001
                row[name] = f"ERR {str(e)[:80]}"
        out.append(row)
        print("ATTN", json.dumps(row), flush=True)
    return out


def probe_gemm(mps=(224, 50432)) -> list[dict]:
    from gpusq.deploy import cslt
    from gpusq.sparsity import mask_2to4

    shapes = {"qkv": (2304, 768, {}), "proj": (768, 768, {"residual": True}),
              "fc1": (3072, 768, {"out": "int8", "gelu": True, "gelu_scale": 30.0}),
              "fc2": (768, 3072, {"residual": True})}
    out = []
    for name, (n, k, kw) in shapes.items():
        w = torch.randint(-127, 128, (n, k), device="cuda").float()
        w = w * mask_2to4(w)
        alpha = torch.rand(n, device="cuda") * 1e-4
        bias = torch.randn(n, device="cuda")
        for mp in mps:
            g = cslt.SparseGemm(w, alpha, bias, name=name, **kw)
            x = torch.randint(-128, 128, (mp, g.kp), dtype=torch.int8, device="cuda")
            c = torch.randn(mp, g.np_, device="cuda").to(torch.bfloat16) if g.residual else None
            g.prepare(mp, search=True)
            searched = g.report()[str(mp)]
            t_searched = bench(lambda g=g, x=x, c=c: g(x, c))
            bias_dt = cslt.bias_dtype_for(g.out)
            plan0 = g.plans.pop(mp)
            max_id = cslt.max_alg_id(g, mp, bias_dt)
            sweep = {}
            for alg in range(max_id + 1):
                for sk in (1, 2, 3, 4, 6):
                    try:
                        p = cslt._Plan(g, mp, bias_dt, {"alg": alg, "split_k": sk})
                        g.plans[mp] = p
                        sweep[(alg, sk)] = bench(lambda g=g, x=x, c=c: g(x, c), reps=5, inner=10)
                    except Exception:  # noqa: BLE001 - an id/split the library refuses
                        pass
                    finally:
                        q = g.plans.pop(mp, None)
                        if q is not None:
                            q.destroy()
            g.plans[mp] = plan0
            best = min(sweep, key=sweep.get) if sweep else None
            row = {"gemm": name, "mp": mp, "searched": searched, "searched_ms": t_searched, "max_id": max_id,
                   "sweep_best": list(best) if best else None, "sweep_best_ms": sweep.get(best),
                   "n_tried": len(sweep)}
            out.append(row)
            print(f"GEMM {name:<5} mp {mp:>6}: matmul_search alg {searched['alg']} split {searched['split_k']} "
                  f"{t_searched:.4f} ms | sweep best {best} {sweep.get(best, float('nan')):.4f} ms "
                  f"({len(sweep)} configs, max id {max_id})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--only", default="ln,attn,gemm")
    args = ap.parse_args()
    res = {}
    parts = args.only.split(",")
    if "ln" in parts:
        res["ln"] = probe_ln()
    if "attn" in parts:
        res["attn"] = probe_attn()
    if "gemm" in parts:
        res["gemm"] = probe_gemm()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
