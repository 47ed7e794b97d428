"""CPU benchmark: causal full attention vs dense-mask SWA vs blocked O(n*W) SWA.

Runs, side by side in one process:
  (a) FA          torch SDPA with ``is_causal=True``
  (b) dense SWA   torch SDPA with the dense ``[n, n]`` boolean window mask
  (c) ours        ``megatron_consa.backends.torch_attention.sliding_window_attention``

For each: median forward time (under ``torch.no_grad``) and median
forward+backward time over ``--reps`` repetitions after warm-up (more, up to
``--max-reps``, until FA's forward+backward calls add up to ``--min-time``
seconds: a few-millisecond case gets tens of samples), and the ratio to FA.
Repetitions are interleaved across methods (a, b, c, a, b, c, ...) so
that background load on a shared machine hits all of them alike, and each timed
call follows an untimed forward+backward of its own method, so each is timed warm
rather than after whichever method ran before it.

    python benchmarks/attention_cpu.py [--seq-len 4096 --window 256 --heads 8
        --head-dim 64 --reps 5 --threads 2 --json out.json]

Grid mode (issue 10's acceptance grid: every n, every W <= n/4, every GQA ratio,
every dtype; FA vs ours only; FA and ours at every W interleaved per n, ratio
and dtype, since FA's time does not depend on W) prints one table and writes
JSON:

    python benchmarks/attention_cpu.py --grid [--grid-seq-lens 1024,4096
        --grid-windows 32,256 --grid-gqa 1,8 --grid-dtypes fp32,bf16] --json grid.json

The query heads stay at --heads (KV heads = heads / ratio), so FA's work is
the same across ratios. A configuration passes at SWA/FA <= --grid-limit
(0.30), forward and forward+backward.

Each row also gives the rate (GFLOP/s) at which FA and ours did their exact work
(score entries seen, times 4 * d flops forward and 14 * d forward+backward), and a
floor: the ratio ours would take doing its exact work at the rate of the fastest
matrix product measured once per dtype at the start, in the dtype or in fp32 (a kernel
may convert): a 2048^3 torch.mm, and oneDNN brgemm on all threads at a tile's shapes
on cache-resident operands (where the banded kernel built), which on AMD outruns
torch.mm's generic MKL path.
A cell whose floor is above the pass mark is out of reach of any exact kernel on
that machine (W = n/4: exact work 0.44x of FA's, so 0.30x asks for 1.46x FA's rate).

Report mode renders grid JSON files (one per dtype, say) as the markdown of
docs/benchmarks/attention_cpu_grid.md: pass counts by W / n (and, for files with the
matrix-product rate, the cells out of reach), a ratio matrix per (dtype, GQA ratio),
every row:

    python benchmarks/attention_cpu.py --report grid_fp32.json grid_bf16.json > grid.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# OpenMP threads spin at barriers by default. On a machine shared with other jobs a
# spinning thread holds the core its partner needs: the blocked SWA (many short
# parallel regions) then ran 5x slower while FA (one long region) did not. PASSIVE
# (threads sleep at barriers) measures the kernels rather than the scheduler; it is
# set before torch starts OpenMP. Export OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_consa.files import write_json_atomic  # noqa: E402
from megatron_consa.backends import cpu_extension  # noqa: E402
from megatron_consa.backends.torch_attention import (  # noqa: E402
    cpu_q_tile,
    default_block_size,
    full_causal_attention,
    sliding_window_attention,
    sliding_window_mask,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA KV heads (default: = heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sinks", type=int, default=0, help="attention sink tokens for SWA")
    p.add_argument("--block-size", type=int, default=None, help="SWA query block (default: library's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--reps", type=int, default=5, help="repetitions at least (medians are reported)")
    p.add_argument(
        "--min-time", type=float, default=1.0,
        help="seconds: repeat beyond --reps until the slowest method's forward+backward calls add up to this "
        "(at most --max-reps), so a millisecond-scale case gets as many samples as its median needs",
    )
    p.add_argument("--max-reps", type=int, default=50, help="the cap for --min-time")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-dense", action="store_true", help="skip the O(n^2) dense-mask SWA")
    p.add_argument("--json", type=str, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--baseline", type=str, default=None,
        help="another torch_attention.py (e.g. from `git show REV:megatron_consa/backends/torch_attention.py`) "
        "whose sliding_window_attention runs as one more method, side by side",
    )
    p.add_argument("--grid", action="store_true", help="run the grid below instead of one configuration")
    p.add_argument("--grid-seq-lens", type=_ints, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--grid-windows", type=_ints, default=[32, 64, 128, 256, 512, 1024, 2048],
                   help="windows; only W <= n/4 is run for each n")
    p.add_argument("--grid-gqa", type=_ints, default=[1, 2, 4, 8], help="query heads per KV head")
    p.add_argument("--grid-dtypes", type=lambda t: t.split(","), default=["fp32", "bf16"])
    p.add_argument("--grid-limit", type=float, default=0.30, help="pass mark for SWA / FA")
    p.add_argument("--report", nargs="+", metavar="JSON", default=None,
                   help="render these grid JSON files as markdown on stdout instead of measuring")
    return p.parse_args(argv)


def _ints(text):
    return [int(t) for t in text.split(",")]


def cpu_kernel() -> str:
    """Which CPU SWA kernel ``sliding_window_attention`` runs here (see megatron_consa.backends.cpu_extension)."""
    return "banded" if cpu_extension.extension() is not None else "flash-op"


def swa_tile(window: int, n: int, rep: int, dtype: torch.dtype, head_dim: int, backward: bool = False) -> int:
    """The default tile of that kernel: query positions per tile of its forward (or
    ``backward``: banded) or query block B (flash-op)."""
    if cpu_kernel() == "banded":
        return cpu_q_tile(window, rep, dtype, head_dim, backward)
    return default_block_size(window, n)


def _tiles(row) -> str:
    """A grid row's tile cell: the forward's, and the backward's where a file has it apart."""
    bwd = row.get("bwd_block_size")
    return f"{row['block_size']}" if bwd is None else f"{row['block_size']} / {bwd}"


def score_entries(n: int, window: int | None = None, sinks: int = 0) -> float:
    """The score entries a query sequence of n sees: n(n+1)/2 causal (window None), or
    n*W - W(W-1)/2 in a window of W, plus the sink keys left of the window: the sum over
    positions p of min(S, max(0, p + 1 - W))."""
    w = n if window is None else min(window, n)
    past = n - w  # positions whose window has left key 0 behind: p + 1 - W = 1 .. n - W
    s = min(sinks, past)
    return n * w - w * (w - 1) / 2 + s * (s + 1) / 2 + sinks * max(0, past - sinks)


def swa_work_ratio(n: int, window: int, sinks: int = 0) -> float:
    """Score entries of exact SWA over those of causal FA: (n*W - W(W-1)/2 + sinks') / (n(n+1)/2).
    About 2W/n for W << n; 0.44 at W = n/4, where a kernel has to do its work 1.46x as fast
    as FA does FA's to reach 0.30x (see :func:`floor_ratio`)."""
    return score_entries(n, window, sinks) / score_entries(n)


# Floating-point operations per visible score entry per head and head dimension: the
# forward's two products (Q K^T, P V), the backward's five (the scores again from the
# log-sum-exp, dO V^T, P^T dO, dS K, dS^T Q). The softmax's elementwise work is not counted.
FLOPS_PER_ENTRY = {"fwd": 4, "fwd_bwd": 14}


def gflops(ms: float, entries: float, *, batch: int, heads: int, head_dim: int, part: str) -> float:
    """The rate (GFLOP/s) at which a call of ``ms`` milliseconds did the exact work of
    ``entries`` score entries per (batch, query head): ``part`` "fwd" or "fwd_bwd"."""
    return FLOPS_PER_ENTRY[part] * batch * heads * head_dim * entries / (ms * 1e-3) / 1e9


def matmul_gflops(dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    """The rate (GFLOP/s) of a ``size``-cubed matrix product (``torch.mm``) in ``dtype`` on
    torch's threads, best of ``reps`` warm calls."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def tile_products(head_dim: int):
    """The tile products measured for the ceiling, [M, K] x [K, N] as (M, N, K): a 32-row
    tile's scores against 512 keys, and its P V over those keys."""
    return (32, 512, head_dim), (32, head_dim, 512)


def tile_gflops(dtype: torch.dtype, shape, seconds: float = 0.5) -> float:
    """The rate (GFLOP/s, every thread at once) of oneDNN brgemm at a tile's ``shape`` (M, N, K)
    in ``dtype`` on cache-resident operands, as the banded kernel runs its products; 0 where that
    kernel did not build, or bf16 has no dot products here."""
    ext = cpu_extension.extension()
    return 0.0 if ext is None else ext.tile_product_gflops(dtype, *shape, seconds)


def product_rates(dt: str, head_dim: int) -> dict:
    """Candidate ceilings for ``dt``'s floors, ``{source: GFLOP/s}``: a 2048^3 ``torch.mm``
    (:func:`matmul_gflops`) and the tile products at ``head_dim`` (:func:`tile_gflops`), each
    in ``dt`` and in fp32 (into which a kernel may convert). On AMD, torch.mm's large fp32 product takes MKL's
    generic path: on Zen 4 the tile products ran about 1.2x its rate."""
    rates = {}
    for name in dict.fromkeys([dt, "fp32"]):
        rates[f"a 2048^3 torch.mm in {name}"] = matmul_gflops(DTYPES[name])
        for m, n, k in tile_products(head_dim):
            rate = tile_gflops(DTYPES[name], (m, n, k))
            if rate > 0:
                rates[f"brgemm {m}x{k} by {k}x{n} in {name}"] = rate
    return rates


def grid_rates(row) -> dict:
    """FA's and ours' rates of exact work (GFLOP/s) in a grid row: ``{fa,swa}_{fwd,fwd_bwd}``."""
    n, shape = row["seq_len"], dict(batch=row.get("batch", 1), heads=row["heads"], head_dim=row["head_dim"])
    entries = {"fa": score_entries(n), "swa": score_entries(n, row["window"], row.get("sinks", 0))}
    return {f"{m}_{part}": gflops(row[f"{m}_{part}_ms"], entries[m], part=part, **shape)
            for m in ("fa", "swa") for part in ("fwd", "fwd_bwd")}


def floor_ratio(row, part: str, matmul: float) -> float:
    """The lowest SWA/FA ratio ours could reach in a grid row (``part`` "fwd" or "fwd_bwd"):
    its exact work done at the matrix-product rate ``matmul`` (GFLOP/s, the fastest of
    :func:`product_rates`) against FA as timed, ``ideal * FA's rate / matmul``. Where it is above the pass mark,
    the cell is out of reach of any exact kernel on that machine, not only of ours."""
    return row["ideal"] * grid_rates(row)[f"fa_{part}"] / matmul


def time_interleaved(methods, inputs, grad_out, *, reps, warmup, min_time=0.0, max_reps=None):
    """Forward (no grad) and forward+backward seconds per repetition for each method,
    the methods interleaved in every repetition: ``{name: {"fwd": [...], "fwd_bwd": [...]}}``.

    Each method's timed calls directly follow an untimed forward+backward of its own, so
    every method is timed warm, whatever ran before it. Timed straight after another
    method instead, a call starts with its code, its kernels' state and its inputs
    evicted: at n=1024 that added 0.3-0.5 ms to a 0.8 ms kernel, and to whichever
    method came first after FA's forward+backward (measured: warming the inputs alone
    recovered 3% of it, one tiny call of the same kernel all of it).

    There are at least ``reps`` repetitions, and more (up to ``max_reps``) until the
    slowest method's timed forward+backward calls add up to ``min_time`` seconds: on a
    2-core VM, the n=1024, W=64 and 128, GQA 4 bf16 cells took 0.18-0.35x of FA's forward
    over five runs with a median of 3, 0.19-0.32x over three with 21-25 repetitions (the
    VM itself drifts between runs; more samples only steady the median within one)."""

    def run_fwd(fn):
        with torch.no_grad():
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    def run_fwd_bwd(fn):
        for t in inputs:
            t.grad = None
        t0 = time.perf_counter()
        fn().backward(grad_out)
        return time.perf_counter() - t0

    for _ in range(warmup):
        for fn in methods.values():
            run_fwd(fn)
            run_fwd_bwd(fn)
    times = {name: {"fwd": [], "fwd_bwd": []} for name in methods}
    max_reps = max(reps, max_reps or reps)
    done = 0
    while done < reps or (
        done < max_reps and max(sum(t["fwd_bwd"]) for t in times.values()) < min_time
    ):
        done += 1
        for name, fn in methods.items():
            run_fwd_bwd(fn)
            times[name]["fwd"].append(run_fwd(fn))
            times[name]["fwd_bwd"].append(run_fwd_bwd(fn))
    return times


def run_grid(args):
    """FA vs ours over the grid; returns the rows (also printed, and written to --json).

    FA's time does not depend on W, so each (dtype, GQA ratio, n) is one timing
    group: FA and ours at every W <= n/4, interleaved in every repetition."""
    torch.set_num_threads(args.threads)
    d = args.head_dim
    groups = [
        (dt, ratio, n, [W for W in args.grid_windows if W <= n // 4])
        for dt in args.grid_dtypes
        for ratio in args.grid_gqa
        for n in args.grid_seq_lens
        if args.heads % ratio == 0
    ]
    groups = [g for g in groups if g[3]]
    print(
        f"CPU attention grid: kernel={cpu_kernel()} b={args.batch} hq={args.heads} d={d} S={args.sinks} "
        f"threads={args.threads} reps={args.reps}..{args.max_reps} (min time {args.min_time:g} s) "
        f"torch={torch.__version__} OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
        f"{sum(len(g[3]) for g in groups)} configurations; pass = SWA/FA <= "
        f"{args.grid_limit:.2f}, forward and forward+backward"
    )
    print()
    print("| n | W | hq/hkv | dtype | tile fwd / bwd | ideal | FA fwd (ms) | SWA fwd (ms) | fwd / FA | FA fwd+bwd (ms) "
          "| SWA fwd+bwd (ms) | fwd+bwd / FA | pass | reps | GFLOP/s FA / SWA fwd | fwd+bwd | floor |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    rows = []
    # per dtype: the fastest matrix product measured (product_rates), and which one it was
    products, matmul_source, matmul = {}, {}, {}
    for dt, ratio, n, windows in groups:
        torch.manual_seed(0)
        dtype = DTYPES[dt]
        if dt not in matmul:
            products[dt] = product_rates(dt, d)
            matmul_source[dt] = max(products[dt], key=products[dt].get)
            matmul[dt] = products[dt][matmul_source[dt]]
            print(f"| {dt}: matrix products at " + ", ".join(f"{r:.0f} GFLOP/s ({source})" for source, r in
                                                          products[dt].items()) + " |", flush=True)
        hq, hkv, S = args.heads, args.heads // ratio, args.sinks
        q = torch.randn(args.batch, hq, n, d, dtype=dtype, requires_grad=True)
        k = torch.randn(args.batch, hkv, n, d, dtype=dtype, requires_grad=True)
        v = torch.randn(args.batch, hkv, n, d, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(args.batch, hq, n, d, dtype=dtype)

        def ours(W):
            return lambda: sliding_window_attention(
                q, k, v, window=W, scale=d ** -0.5, sink_tokens=S, block_size=args.block_size
            )

        methods = {"fa": lambda: full_causal_attention(q, k, v, scale=d ** -0.5)}
        methods.update({W: ours(W) for W in windows})
        times = time_interleaved(methods, (q, k, v), grad_out, reps=args.reps, warmup=args.warmup,
                                 min_time=args.min_time, max_reps=args.max_reps)
        med = {m: {key: statistics.median(ts) for key, ts in t.items()} for m, t in times.items()}
        for W in windows:
            row = {
                "seq_len": n, "window": W, "batch": args.batch, "heads": hq, "kv_heads": hkv, "head_dim": d,
                "dtype": dt,
                "block_size": args.block_size or swa_tile(W, n, ratio, dtype, d),
                "bwd_block_size": args.block_size or swa_tile(W, n, ratio, dtype, d, backward=True),
                "sinks": S, "ideal": swa_work_ratio(n, W, S),
                "fa_fwd_ms": 1e3 * med["fa"]["fwd"], "swa_fwd_ms": 1e3 * med[W]["fwd"],
                "fwd_ratio": med[W]["fwd"] / med["fa"]["fwd"],
                "fa_fwd_bwd_ms": 1e3 * med["fa"]["fwd_bwd"], "swa_fwd_bwd_ms": 1e3 * med[W]["fwd_bwd"],
                "fwd_bwd_ratio": med[W]["fwd_bwd"] / med["fa"]["fwd_bwd"],
                "reps": len(times["fa"]["fwd"]),
            }
            row["pass"] = max(row["fwd_ratio"], row["fwd_bwd_ratio"]) <= args.grid_limit
            rows.append(row)
            print(
                f"| {n} | {W} | {ratio} | {dt} | {_tiles(row)} | {row['ideal']:.3f} | {row['fa_fwd_ms']:.1f} "
                f"| {row['swa_fwd_ms']:.1f} | {row['fwd_ratio']:.3f}x | {row['fa_fwd_bwd_ms']:.1f} "
                f"| {row['swa_fwd_bwd_ms']:.1f} | {row['fwd_bwd_ratio']:.3f}x | {'yes' if row['pass'] else 'NO'} "
                f"| {row['reps']} | {_rates_and_floor(row, matmul[dt])}",
                flush=True,
            )
    worst = max(rows, key=lambda r: max(r["fwd_ratio"], r["fwd_bwd_ratio"])) if rows else None
    if worst:
        print(
            f"\n{sum(r['pass'] for r in rows)}/{len(rows)} pass; worst: n={worst['seq_len']} W={worst['window']} "
            f"hkv={worst['kv_heads']} {worst['dtype']}: fwd {worst['fwd_ratio']:.3f}x, "
            f"fwd+bwd {worst['fwd_bwd_ratio']:.3f}x"
        )
    if args.json:
        config = {
            "batch": args.batch, "heads": args.heads, "head_dim": d, "sinks": args.sinks,
            "threads": args.threads, "reps": args.reps, "warmup": args.warmup, "min_time": args.min_time,
            "max_reps": args.max_reps, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "limit": args.grid_limit, "kernel": cpu_kernel(),
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "matmul_gflops": matmul, "matmul_source": matmul_source, "product_rates": products,
        }
        write_json_atomic(args.json, {"config": config, "grid": rows})
    return rows


def _rates_and_floor(row, matmul) -> str:
    """The trailing cells of a grid row: FA's and ours' rates, forward and forward+backward,
    then the floor ratios (blank without the matrix-product rate: files from before it)."""
    rates = grid_rates(row)
    cells = [f"{rates['fa_fwd']:.0f} / {rates['swa_fwd']:.0f}", f"{rates['fa_fwd_bwd']:.0f} / {rates['swa_fwd_bwd']:.0f}"]
    floors = "" if not matmul else f"{floor_ratio(row, 'fwd', matmul):.2f} / {floor_ratio(row, 'fwd_bwd', matmul):.2f}"
    return " | ".join(cells + [floors]) + " |"


def out_of_reach(row, limit: float) -> bool:
    """Whether a grid row's floor (:func:`floor_ratio`, at its file's matrix-product rate) is
    above the pass mark, forward or forward+backward; False where that rate was not measured."""
    matmul = row.get("matmul_gflops")
    return bool(matmul) and max(floor_ratio(row, part, matmul) for part in ("fwd", "fwd_bwd")) > limit


def window_class(n: int, window: int) -> str:
    """The grid's columns of the pass table: W <= n/16, W = n/8, W = n/4."""
    if window * 16 <= n:
        return "W <= n/16"
    return "W = n/8" if window * 8 <= n else "W = n/4"


def _reps_text(config) -> str:
    """How a grid file's medians were taken (files from before --min-time have a fixed count)."""
    if not config.get("min_time"):
        return f"reps={config['reps']} (median)"
    return (f"reps={config['reps']}..{config['max_reps']} (median; more until FA's forward+backward calls "
            f"add up to {config['min_time']:g} s)")


def _product_source(config, dt: str) -> str:
    """The product a grid file's ``dt`` floors were taken at (files from before the tile
    products name only the dtype of a 2048^3 torch.mm)."""
    if "matmul_source" in config:
        return config["matmul_source"][dt]
    return f"a 2048^3 torch.mm in {config['matmul_dtype'][dt]}"


def render_report(paths) -> str:
    """Markdown for grid JSON files: pass table, ratio matrices, every row."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    # what older files keep per file (reps, the shape), and the file's matrix-product rate per dtype
    rows = [{"reps": f["config"]["reps"], "batch": f["config"]["batch"], "head_dim": f["config"]["head_dim"], **r,
             "matmul_gflops": f["config"].get("matmul_gflops", {}).get(r["dtype"])}
            for f in files for r in f["grid"]]
    limit = files[0]["config"]["limit"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    classes = ["W <= n/16", "W = n/8", "W = n/4"]
    out = []
    for f, p in zip(files, paths):
        c = f["config"]
        out.append(
            f"`{Path(p).name}`: kernel={c.get('kernel', '?')} b={c['batch']} hq={c['heads']} d={c['head_dim']} "
            f"S={c['sinks']} threads={c['threads']} {_reps_text(c)} torch={c['torch']} "
            f"OMP_WAIT_POLICY={c['omp_wait_policy']}"
            + "".join(f"; {dt}: floors at {_product_source(c, dt)}'s {rate:.0f} GFLOP/s"
                      for dt, rate in c.get("matmul_gflops", {}).items())
        )

    def counts(title, count):
        """A table of ``count(row)`` summed per dtype and window class, over the class's rows."""
        table = ["", title, "", "| | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for dt in dtypes:
            cells = []
            for cls in classes:
                sel = [r for r in rows if r["dtype"] == dt and window_class(r["seq_len"], r["window"]) == cls]
                cells.append(f"{sum(count(r) for r in sel)} / {len(sel)}")
            table.append(f"| {dt} | " + " | ".join(cells) + " |")
        return table

    out += counts(f"Passing (SWA/FA <= {limit:.2f}x forward and forward+backward):", lambda r: r["pass"])
    if any(r["matmul_gflops"] for r in rows):
        out += counts(f"Out of reach (the floor above {limit:.2f}x: the cell's exact work done at the rate of the "
                      "fastest matrix product measured, against FA as timed, `ideal * FA's GFLOP/s / the "
                      "product's`):", lambda r: out_of_reach(r, limit))
    out += ["", "## Ratio matrices"]
    for dt in dtypes:
        for ratio in sorted({r["heads"] // r["kv_heads"] for r in rows if r["dtype"] == dt}):
            sel = {(r["seq_len"], r["window"]): r for r in rows
                   if r["dtype"] == dt and r["heads"] // r["kv_heads"] == ratio}
            ns = sorted({n for n, _ in sel})
            ws = sorted({w for _, w in sel})
            out += ["", f"{dt}, hq/hkv = {ratio} (fwd / fwd+bwd vs FA; ideal in brackets; **bold** = above "
                        f"{limit:.2f}x)", "", "| n \\ W | " + " | ".join(map(str, ws)) + " |",
                    "|---:|" + "---:|" * len(ws)]
            for n in ns:
                cells = []
                for w in ws:
                    r = sel.get((n, w))
                    if r is None:
                        cells.append("")
                        continue
                    text = f"{r['fwd_ratio']:.2f} / {r['fwd_bwd_ratio']:.2f}"
                    cells.append((text if r["pass"] else f"**{text}**") + f" ({r['ideal']:.2f})")
                out.append(f"| {n} | " + " | ".join(cells) + " |")
    for dt in dtypes:
        out += ["", f"## Every row, {dt}", "",
                "| n | W | hq/hkv | tile fwd / bwd | ideal | FA fwd (ms) | SWA fwd (ms) | fwd / FA | FA fwd+bwd (ms) "
                "| SWA fwd+bwd (ms) | fwd+bwd / FA | pass | reps | GFLOP/s FA / SWA fwd | fwd+bwd "
                "| floor fwd / fwd+bwd |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["dtype"] == dt):
            out.append(
                f"| {r['seq_len']} | {r['window']} | {r['heads'] // r['kv_heads']} | {_tiles(r)} "
                f"| {r['ideal']:.3f} | {r['fa_fwd_ms']:.1f} | {r['swa_fwd_ms']:.1f} | {r['fwd_ratio']:.3f}x "
                f"| {r['fa_fwd_bwd_ms']:.1f} | {r['swa_fwd_bwd_ms']:.1f} | {r['fwd_bwd_ratio']:.3f}x "
                f"| {'yes' if r['pass'] else 'NO'} | {r['reps']} | {_rates_and_floor(r, r['matmul_gflops'])}"
            )
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        text = render_report(args.report)
        print(text, end="")
        return text
    if args.grid:
        return run_grid(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    b, hq, n, d = args.batch, args.heads, args.seq_len, args.head_dim
    hkv = args.kv_heads or hq
    scale = d ** -0.5
    W, S = args.window, args.sinks
    block = args.block_size or swa_tile(W, n, hq // hkv, dtype, d)

    q = torch.randn(b, hq, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(b, hq, n, d, dtype=dtype)
    dense_mask = sliding_window_mask(n, W, S)  # [n, n] bool

    def fa():
        return full_causal_attention(q, k, v, scale=scale)

    def dense_swa():
        if hkv == hq:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, scale=scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense_mask, scale=scale, enable_gqa=True
        )

    def ours():
        return sliding_window_attention(
            q, k, v, window=W, scale=scale, sink_tokens=S, block_size=args.block_size
        )

    methods = {"FA (SDPA causal)": fa}
    if not args.skip_dense:
        methods["dense-mask SWA (SDPA [n,n] mask)"] = dense_swa
    methods[f"ours: {cpu_kernel()} SWA (tile {block})"] = ours
    if args.baseline:
        import importlib.util

        spec = importlib.util.spec_from_file_location("baseline_torch_attention", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        methods[f"baseline: {args.baseline}"] = lambda: baseline.sliding_window_attention(
            q, k, v, window=W, scale=scale, sink_tokens=S, block_size=args.block_size
        )

    # Sanity: ours vs dense-mask SWA.
    with torch.no_grad():
        ref = dense_swa().float() if not args.skip_dense else None
        max_err = (ours().float() - ref).abs().max().item() if ref is not None else None
        del ref

    times = time_interleaved(methods, (q, k, v), grad_out, reps=args.reps, warmup=args.warmup,
                             min_time=args.min_time, max_reps=args.max_reps)
    med = {name: {key: statistics.median(ts) for key, ts in t.items()} for name, t in times.items()}
    fa_name = next(iter(methods))
    rows = []
    for name in methods:
        rows.append(
            {
                "method": name,
                "fwd_ms": 1e3 * med[name]["fwd"],
                "fwd_ratio_to_fa": med[name]["fwd"] / med[fa_name]["fwd"],
                "fwd_bwd_ms": 1e3 * med[name]["fwd_bwd"],
                "fwd_bwd_ratio_to_fa": med[name]["fwd_bwd"] / med[fa_name]["fwd_bwd"],
                "fwd_ms_all": [1e3 * t for t in times[name]["fwd"]],
                "fwd_bwd_ms_all": [1e3 * t for t in times[name]["fwd_bwd"]],
            }
        )

    config = {
        "batch": b, "heads": hq, "kv_heads": hkv, "seq_len": n, "head_dim": d,
        "window": W, "sinks": S, "block_size": block, "kernel": cpu_kernel(), "dtype": args.dtype,
        "threads": args.threads, "reps": len(times[fa_name]["fwd"]), "warmup": args.warmup,
        "min_time": args.min_time, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "ideal_swa_ratio": swa_work_ratio(n, W, S),
        "max_abs_err_ours_vs_dense": max_err,
    }
    print(
        f"CPU attention benchmark: kernel={cpu_kernel()} b={b} hq={hq} hkv={hkv} n={n} d={d} W={W} S={S} "
        f"{args.dtype} threads={args.threads} reps={config['reps']} torch={torch.__version__} "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(f"ideal SWA/FA work ratio (score entries) = {config['ideal_swa_ratio']:.3f}; "
          f"max |ours - dense| = {'not checked (--skip-dense)' if max_err is None else f'{max_err:.2e}'}")
    print()
    print("| method | fwd (ms) | fwd / FA | fwd+bwd (ms) | fwd+bwd / FA |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['fwd_ms']:.1f} | {r['fwd_ratio_to_fa']:.3f}x | "
            f"{r['fwd_bwd_ms']:.1f} | {r['fwd_bwd_ratio_to_fa']:.3f}x |"
        )
    if args.json:
        write_json_atomic(args.json, {"config": config, "results": rows})
    return rows


if __name__ == "__main__":
    main()
