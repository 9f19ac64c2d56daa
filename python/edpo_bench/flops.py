"""FLOPs of prep and train counted from a Llama-style model's shapes, and this CPU's measured
fp32 matrix-multiply peak (a timed GEMM), so benchmarks can say what share of the peak a stage
reaches.

Counted per scored sequence of T tokens (prompt + response) with R response tokens, for a
model of L layers, width d, MLP width f, h heads of size d/h, g key/value heads, vocabulary V:

    P     = L · (2·d² + 2·d·g·(d/h) + 3·d·f)           weights of the linear layers
    fwd   = 2·P·T + 4·L·d·T² + 2·d·V·R                 linear layers, attention scores and
                                                       mixing (the full T×T square, as dense
                                                       kernels compute it; edpo's training
                                                       graph in B query blocks computes
                                                       (B+1)/(2B) of it, counted in full all
                                                       the same), output projection
                                                       over the response positions (the only
                                                       ones prep and the loss need)
    prep  = fwd over both sequences of every pair
    train = 3 · fwd over both sequences (backward ≈ 2 × forward)

Padding is not counted: a padded position is work done but not work needed. The peak is the
best of ONNX Runtime's MatMul (MLAS), torch.mm and numpy.matmul on 2,048² fp32 matrices at the
benchmark's thread count, best of several repeats (on this machine MLAS reaches about twice
what the BLAS libraries of the torch and numpy wheels do).

    python -m edpo_bench.flops --peak --threads 2     prints {"gflops": …} (its own process, so
                                                      the thread count holds for its libraries)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    layers: int
    width: int
    mlp_width: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def of_bundle(cls, bundle: Path) -> "ModelShape":
        c = json.loads((bundle / "config.json").read_text())
        return cls(
            layers=c["num_hidden_layers"], width=c["hidden_size"], mlp_width=c["intermediate_size"],
            heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            vocab=c["vocab_size"],
        )  # fmt: skip

    def linear_params(self) -> int:
        d, head = self.width, self.width // self.heads
        return self.layers * (2 * d * d + 2 * d * self.kv_heads * head + 3 * d * self.mlp_width)

    def forward_flops(self, length: int, response: int) -> int:
        d = self.width
        return 2 * self.linear_params() * length + 4 * self.layers * d * length**2 + 2 * d * self.vocab * response


def pair_lengths(shards: Path) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of every pair in a shard folder."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = []
    for file in sorted(shards.glob("*.parquet")):
        t = pq.read_table(file, columns=["prompt_ids", "chosen_ids", "rejected_ids"])
        lens = [pc.list_value_length(t[c]).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
        out.extend(zip(*lens))
    if not out:
        raise SystemExit(f"no pairs in {shards}")
    return out


def pair_forward_flops(shape: ModelShape, prompt: int, chosen: int, rejected: int) -> int:
    return shape.forward_flops(prompt + chosen, chosen) + shape.forward_flops(prompt + rejected, rejected)


def prep_flops(shape: ModelShape, shards: Path) -> int:
    """FLOPs of scoring every pair in `shards` once."""
    return sum(pair_forward_flops(shape, *p) for p in pair_lengths(shards))


def train_flops_per_pair(shape: ModelShape, shards: Path) -> float:
    """Mean FLOPs of one pair's forward and backward over the pairs in `shards`."""
    lengths = pair_lengths(shards)
    return 3 * sum(pair_forward_flops(shape, *p) for p in lengths) / len(lengths)


def measure_peak_here(n: int = 2048, repeats: int = 8) -> dict:
    import numpy as np
    import torch

    def best(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 2 * n**3 / min(times) / 1e9

    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    session = ort_matmul(n, torch.get_num_threads())
    result = {
        "n": n,
        "onnxruntime_gflops": best(lambda: session.run(None, {"a": an, "b": bn})),
        "torch_gflops": best(lambda: torch.mm(a, b)),
        "numpy_gflops": best(lambda: np.matmul(an, bn)),
    }
    result["gflops"] = max(v for k, v in result.items() if k.endswith("_gflops"))
    return result


def ort_matmul(n: int, threads: int):
    """An ONNX Runtime session of one [n, n] × [n, n] fp32 MatMul."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "aby")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "matmul", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure_peak(threads: int) -> dict:
    """The fp32 GEMM peak at `threads` threads, measured in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "edpo_bench.flops", "--peak", "--threads", str(threads)],
                         check=True, capture_output=True, text=True, env=env)  # fmt: skip
    return {"threads": threads, **json.loads(out.stdout)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edpo_bench.flops", description=__doc__.split("\n")[0])
    ap.add_argument("--peak", action="store_true", help="measure the fp32 GEMM peak and print it as JSON")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.peak:
        ap.error("nothing to do: pass --peak")
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(measure_peak_here()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
