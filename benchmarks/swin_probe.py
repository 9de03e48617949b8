"""Swin-T's window attention at batch 256 on the H200: gpusq's Triton kernel (``window_attention``:
reads q/k/v from the qkv GEMM output, writes proj's INT8 codes per token) per stage and launch
configuration, beside SDPA's memory-efficient kernel on q/k/v already padded to 64 tokens (the best
torch path found before, ../shared/probes/window_attn_probe.py; it does not include the partition,
the padding copies or the quantize that the Triton kernel does).

Run: python benchmarks/swin_probe.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

STAGES = [(56, 3, 2), (28, 6, 2), (14, 12, 6), (7, 24, 2)]  # Swin-T: (tokens per side, heads, blocks)


def _stage(b: int, side: int, heads: int, hd: int, win: tuple[int, int]) -> dict[str, float]:
    from gpusq.deploy.cusparselt import time_graph
    from gpusq.deploy.kernels import window_attention
    from gpusq.deploy.swin import bias_table, shift_mask, window_row_map

    shift = (3, 3) if side > 7 else (0, 0)
    rmap = window_row_map(side, side, win, shift).cuda()
    table = bias_table(torch.randn(heads, 49, 49).cuda(), None if not any(shift) else
                       shift_mask(side, side, win, shift).cuda(), 64)
    m = b * rmap.numel()
    qkv = torch.randn(m, 3 * heads * hd, device="cuda").to(torch.bfloat16)
    out = torch.empty(b * side * side, heads * hd, dtype=torch.int8, device="cuda")
    inv = torch.tensor(10.0, device="cuda")
    res = {}
    for nw in (1, 2, 4, 8):
        res[f"triton_w{nw}"] = time_graph(lambda nw=nw: window_attention(
            qkv, table, rmap, inv, out, images=b, window_tokens=49, heads=heads, head_dim=hd, scale=hd ** -0.5,
            src_rows=side * side, num_warps=nw))
    nwin = m // 49
    q = torch.randn(nwin, heads, 64, hd, device="cuda").to(torch.bfloat16)
    bias = table.repeat(nwin // table.shape[0], 1, 1, 1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
        res["sdpa_efficient_64"] = time_graph(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=bias))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()
    b, hd, win = args.batch, 32, (7, 7)
    rows, total = [], {}
    for side, heads, blocks in STAGES:
        res = _stage(b, side, heads, hd, win)
        rows.append({"side": side, "heads": heads, "blocks": blocks, **res})
        for k, v in res.items():
            total[k] = total.get(k, 0.0) + v * blocks
        print(side, heads, {k: round(v, 4) for k, v in res.items()}, flush=True)
    print("per forward (ms, 12 blocks):", {k: round(v, 3) for k, v in total.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": b, "stages": rows, "per_forward_ms": total, "gpu": torch.cuda.get_device_name()}, f,
                      indent=1)


if __name__ == "__main__":
    main()
