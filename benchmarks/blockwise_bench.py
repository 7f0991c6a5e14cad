"""Peak memory of GPTQ and AWQ calibration in lowbit.torch, in one pass over the whole model against block by
block (lowbit.torch.blockwise), on a GPT-style model built in code (random weights: memory does not depend on them).

    python benchmarks/blockwise_bench.py            # d_model 768, 8 blocks, 48 sequences of 128 tokens
    python benchmarks/blockwise_bench.py --quick    # d_model 512, 4 blocks, 32 sequences of 64 tokens

Each of the four runs (GPTQ / AWQ x one pass / block by block) is its own Python process (one torch thread), so
that one's memory does not hide the next one's: it builds the model, quantizes it to INT4 weights in groups of 128
(``w4a16_group128``, plain rounding), then measures the rounding alone: the process's peak resident memory
(VmHWM, reset just before through /proc/self/clear_refs; tracemalloc does not see torch's allocations) above what
it held before (the model with its quantizers, and the calibration tokens), and the wall time. AWQ searches on
``--awq-rows`` sampled input rows per group (fewer than the library's 512, to keep the run short).

Writes the "blockwise" section of docs/BENCHMARKS.md and docs/benchmarks/blockwise.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, reset_peak_memory, status_mb, write_section  # noqa: E402


def build(d: int, blocks: int, vocab: int, seed: int = 0):
    """A pre-LN GPT: token embedding, ``blocks`` blocks (q, k, v, o; MLP 4x with GELU; causal attention), a final
    LayerNorm and a head over the vocabulary."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.heads = max(1, d // 64)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln1(x)

            def split(y):
                return y.reshape(b, t, self.heads, -1).transpose(1, 2)

            a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)

        def forward(self, ids):
            h = self.embed(ids)
            for block in self.blocks:
                h = block(h)
            return self.head(self.ln_f(h))

    return GPT().eval()


def child(args) -> dict:
    """One run, in this process: build, quantize with plain rounding, then the measured rounding."""
    import torch

    import lowbit.torch as lt

    torch.set_num_threads(1)
    method, mode = args.run.split(",")
    model = build(args.d, args.blocks, args.vocab)
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, args.seq)
    calib = [torch.randint(0, args.vocab, shape, generator=g) for _ in range(args.samples // args.batch)]
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    q = lt.quantize(model, "w4a16_group128", calib, inplace=True, progress=False)
    blocks = None if mode == "blocks" else False
    base = reset_peak_memory()
    start = time.perf_counter()
    if method == "gptq":
        done = len(lt.gptq(q, calib, blocks=blocks, progress=False))
    else:
        done = len(lt.awq(q, calib, blocks=blocks, rows=args.awq_rows, progress=False))
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    return {"method": method, "mode": mode, "model_mb": model_mb, "base_mb": base, "peak_mb": peak,
            "above_mb": peak - base, "seconds": seconds, "layers_or_groups": done}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="d_model 512, 4 blocks, 32 sequences of 64 tokens")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--samples", type=int, default=48, help="calibration sequences")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--awq-rows", type=int, default=128)
    p.add_argument("--run", help=argparse.SUPPRESS)  # method,mode: one measured run (the child process)
    args = p.parse_args()
    if args.quick:
        args.d, args.blocks, args.samples, args.seq = 512, 4, 32, 64
    if args.run:
        print(json.dumps(child(args)))
        return
    base_args = [f"--d={args.d}", f"--blocks={args.blocks}", f"--samples={args.samples}", f"--seq={args.seq}",
                 f"--batch={args.batch}", f"--vocab={args.vocab}", f"--awq-rows={args.awq_rows}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for run in ("gptq,one", "gptq,blocks", "awq,one", "awq,blocks"):
        out = subprocess.run([sys.executable, __file__, *base_args, f"--run={run}"], capture_output=True, text=True,
                             env=env, check=True)  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    d, n, rows = args.d, args.blocks, args.samples * args.seq
    h_mb = n * (5 * d * d + 16 * d * d) * 8 / 2**20  # GPTQ's float64 H: q, k, v, o, fc1 (d wide), fc2 (4d wide)
    lines = [
        f"GPT-style model built in code (random weights): d_model {d}, {n} blocks, MLP 4x, vocabulary "
        f"{args.vocab}, {runs[0]['model_mb']:.0f} MB of float32 parameters; {args.samples} calibration sequences "
        f"of {args.seq} tokens ({rows} rows per layer); INT4 weights in groups of 128. Peak = the rounding "
        "process's resident high-water mark above what it held before (the quantized model and the tokens); "
        "one torch thread, each run in its own process (times: a shared 2-core machine, other jobs running; a "
        "run on the same code took 126 s instead of 67 s for GPTQ in one pass). `python benchmarks/blockwise_bench.py"
        + (" --quick" if args.quick else "")
        + "`.",
        "",
        "| rounding | statistics | peak above the model (MB) | x model size | time (s) | layers / groups |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['method'].upper()} | {'block by block' if r['mode'] == 'blocks' else 'one pass'} | "
            f"{r['above_mb']:.0f} | {r['above_mb'] / r['model_mb']:.2f} | {r['seconds']:.0f} | "
            f"{r['layers_or_groups']} |"
        )
    lines += [
        "",
        f"GPTQ in one pass holds every layer's float64 second moment at once ({h_mb:.0f} MB for the blocks here); "
        "block by block it holds one block's, plus the activations entering one block for the calibration set "
        f"({rows * d * 4 / 2**20:.0f} MB, twice while a block runs). AWQ keeps per-column statistics and "
        f"{args.awq_rows} sampled rows per group: small either way, so block by block does not lower its peak "
        "(it holds the activations entering a block on top, and runs each block twice). "
        "GPTQ rounds the layers that saw at least 8 rows per input column; fc2 (4 x d_model inputs) gets fewer "
        "here and keeps plain rounding, its second moment still gathered (and counted). The rest of each peak is "
        "transient, as traced stage by stage on smaller models (not itemised here): each batch's float32 "
        "product and its float64 copy for the widest layer, the rounding's copies of H, per-group float64 weights "
        "and quantized candidates (AWQ), and memory the allocator keeps after freeing it.",
    ]
    write_section("blockwise", "## Block-by-block calibration: peak memory\n\n" + "\n".join(lines),
                  {"machine": machine(), "args": vars(args), "runs": runs})  # fmt: skip


if __name__ == "__main__":
    main()
