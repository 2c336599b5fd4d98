"""Benchmark `setemb.similarity.score` (smooth-Chamfer, DivE eq. 7) against its floor and a DivE-style reference.

Scores image sets [B, K, D] against caption sets [G, L, D] on CPU at Flickr30K 1K test size (1,000 x 5,000) or, with
``--coco``, COCO 5K size (5,000 x 25,000), K = L = 4, D = 1024, alpha = 16, and prints:

* ``score``: setemb's tiled score, the full [B, G] float32 matrix;
* ``reference``: what DivE's public code does: materialise the full cosine matrix [B*K, G*L], exp, sum, log. When
  that does not fit (``--reference-gb``), it runs on the first queries only and the time is scaled to all of B;
* ``matmul``: the bare GEMM of the same shapes, ``[B*K, D] @ [D, G*L]`` (the floor), in row chunks reusing one output
  buffer when the full product would exceed ``--reference-gb``;
* ``matmul_tiled``: only the GEMMs of the very tiles ``score`` computes (same block sizes), i.e. ``score`` minus the
  normalisation and the two LSE reductions: the floor that isolates their cost;
* peak memory of each, as the ``ru_maxrss`` growth of a child process that runs only that measurement once (after
  its inputs exist), and the ratios score/matmul, score/matmul_tiled and score/reference.

Times are medians over ``--repeats`` rounds (default 3 at 1K, 1 at COCO size) after ``--warmup`` rounds (default 0;
never for the reference, whose first-touch page faults are part of its cost). With several repeats all measurements
run interleaved, round by round, in one child process, so that load from other users of a shared machine affects
them alike; with one repeat the times of the memory children are used.

Usage: ``python benchmarks/bench_similarity.py [--coco] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from setemb.similarity import score
from setemb.similarity.scoring import _block_sizes

MEASUREMENTS = ("score", "reference", "matmul", "matmul_tiled")


def _data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    images = torch.randn(args.images, args.k, args.dim, generator=generator).to(dtype)  # [B, K, D]
    captions = torch.randn(args.captions, args.k, args.dim, generator=generator).to(dtype)  # [G, L, D]
    return images, captions


def _reference(images: torch.Tensor, captions: torch.Tensor, alpha: float) -> torch.Tensor:
    """DivE similarity.py style: full cosine matrix, then log(sum(exp(alpha * C))) pooled over each set axis."""
    B, K, D = images.shape
    G, L, _ = captions.shape
    img = torch.nn.functional.normalize(images.float(), dim=-1).reshape(B * K, D)
    txt = torch.nn.functional.normalize(captions.float(), dim=-1).reshape(G * L, D)
    e = torch.exp(alpha * (img @ txt.T)).view(B, K, G, L)  # [B, K, G, L]
    i2t = e.sum(3).log().mean(1)  # [B, G]
    t2i = e.sum(1).log().mean(2)  # [B, G]
    return (i2t + t2i) / (2 * alpha)


def _reference_rows(args: argparse.Namespace) -> int:
    """Queries the reference can hold: cosine matrix and its exp, 2 x rows*K x G*L float32 <= --reference-gb."""
    per_row = 2 * args.k * args.captions * args.k * 4
    return max(1, min(args.images, int(args.reference_gb * 2**30 // per_row)))


def _runner(what: str, args: argparse.Namespace, images: torch.Tensor, captions: torch.Tensor):
    """(run, time_scale, note) for one measurement on the given data."""
    B, K, D = images.shape
    G, L, _ = captions.shape
    if what == "score":
        block = None if args.block_size is None else tuple(args.block_size)
        return lambda: score(images, captions, "smooth_chamfer", alpha=args.alpha, block_size=block), 1.0, ""
    if what == "reference":
        rows = _reference_rows(args)
        note = (
            "" if rows == B else f"on the first {rows} of {B} queries (full matrix would not fit), time x{B / rows:.1f}"
        )
        sub = images[:rows]
        return lambda: _reference(sub, captions, args.alpha), B / rows, note
    a = images.reshape(B * K, D)  # [B*K, D]
    b = captions.reshape(G * L, D)  # [G*L, D]
    if what == "matmul":
        rows = max(1, min(B * K, int(args.reference_gb * 2**30 // (G * L * images.element_size()))))
        note = "" if rows == B * K else f"in row chunks of {rows} into one reused [{rows}, {G * L}] buffer"
        out = torch.zeros(rows, G * L, dtype=images.dtype)  # zeros: pages touched before timing

        def run() -> None:
            for r0 in range(0, B * K, rows):
                r1 = min(r0 + rows, B * K)
                torch.mm(a[r0:r1], b.T, out=out[: r1 - r0])

        return run, 1.0, note
    bq, bg = args.block_size or _block_sizes(None, K * L)
    tile = torch.zeros(min(B, bq) * K * min(G, bg) * L, dtype=images.dtype)  # one reused output, like score's

    def run_tiles() -> None:
        for g0 in range(0, G * L, bg * L):
            for b0 in range(0, B * K, bq * K):
                x, y = a[b0 : b0 + bq * K], b[g0 : g0 + bg * L]
                torch.mm(x, y.T, out=tile[: len(x) * len(y)].view(len(x), len(y)))

    return run_tiles, 1.0, f"tiles of {bq} x {bg} sets"


def _child(args: argparse.Namespace) -> None:
    """Print one JSON line. ``--child NAME``: one run of NAME, its time and ru_maxrss growth (memory).
    ``--child all``: ``--warmup`` + ``--repeats`` rounds of every measurement, interleaved so that load from other
    processes hits all of them alike (times)."""
    images, captions = _data(args)
    if args.child != "all":
        run, scale, note = _runner(args.child, args, images, captions)
        base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        run()
        seconds = (time.perf_counter() - start) * scale
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
        print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "note": note}))
        return
    runners = {what: _runner(what, args, images, captions) for what in MEASUREMENTS}
    runs: dict[str, list[float]] = {what: [] for what in MEASUREMENTS}
    for round_ in range(args.warmup + args.repeats):
        for what, (run, scale, _) in runners.items():
            if round_ < args.warmup and what == "reference":
                continue  # its first-touch page faults are part of what it costs
            start = time.perf_counter()
            run()
            if round_ >= args.warmup:
                runs[what].append((time.perf_counter() - start) * scale)
    print(json.dumps(runs))


def _spawn(what: str, forward: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, *forward, "--child", what], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{what}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(args: argparse.Namespace) -> float:
    """Max |score - reference| on a small slice (sanity check of the numbers being timed)."""
    images, captions = _data(args)
    images, captions = images[:50], captions[:200]
    return float((score(images, captions, alpha=args.alpha) - _reference(images, captions, args.alpha)).abs().max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", action="store_true", help="COCO 5K size (5,000 x 25,000) instead of F30K 1K")
    parser.add_argument("--images", type=int, default=None, help="override B (image sets)")
    parser.add_argument("--captions", type=int, default=None, help="override G (caption sets)")
    parser.add_argument("--k", type=int, default=4, help="set size K = L")
    parser.add_argument("--dim", type=int, default=1024, help="embedding width D")
    parser.add_argument("--alpha", type=float, default=16.0, help="smooth-Chamfer temperature")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="input dtype")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; 1 at COCO)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds first (not for the reference)")
    parser.add_argument("--block-size", type=int, nargs=2, default=None, help="score (query, gallery) block sizes")
    parser.add_argument("--reference-gb", type=float, default=2.0, help="memory allowed for full matrices (GiB)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--child", choices=[*MEASUREMENTS, "all"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.images = args.images or (5000 if args.coco else 1000)
    args.captions = args.captions or 5 * args.images
    args.repeats = args.repeats or (1 if args.coco else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        _child(args)
        return

    B, G, K, D = args.images, args.captions, args.k, args.dim
    print(f"smooth_chamfer B={B} x G={G} sets, K=L={K}, D={D}, alpha={args.alpha}, {args.dtype}, CPU, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} (+{args.warmup} warm-up)")  # fmt: skip
    print(
        f"result matrix [B, G] float32 = {B * G * 4 / 2**20:.0f} MiB; GEMM = {2 * B * K * G * K * D / 1e12:.2f} TFLOP"
    )
    print(f"sanity: max |score - reference| on 50 x 200 = {_check(args):.2e}")
    forward = list(argv if argv is not None else sys.argv[1:])
    memory = {what: _spawn(what, forward) for what in MEASUREMENTS}  # one child per measurement: peak memory
    memory = {what: r for what, r in memory.items() if r is not None}
    if args.repeats > 1:
        times = _spawn("all", forward) or {}
    else:
        times = {what: [r["seconds"]] for what, r in memory.items()}
    seconds = {what: statistics.median(t) for what, t in times.items() if t}
    for what in MEASUREMENTS:
        if what not in seconds or what not in memory:
            continue
        gflops = 2 * B * K * G * K * D / seconds[what] / 1e9
        runs = ", ".join(f"{t:.2f}" for t in times[what])
        note = f"  [{memory[what]['note']}]" if memory[what]["note"] else ""
        line = f"{what:>12}: {seconds[what]:7.2f} s ({gflops:5.0f} GFLOP/s)  peak +{memory[what]['peak_mb']:6.0f} MiB"
        print(f"{line}  runs [{runs}]{note}")
    if "score" in seconds:
        beyond = memory["score"]["peak_mb"] - B * G * 4 / 2**20
        print(f"score peak memory beyond the result matrix: {beyond:.0f} MiB")
        for other in ("matmul", "matmul_tiled", "reference"):
            if other in seconds:
                print(f"score / {other}: {seconds['score'] / seconds[other]:.2f}")
    if len(seconds) < len(MEASUREMENTS):
        sys.exit(1)


if __name__ == "__main__":
    main()
