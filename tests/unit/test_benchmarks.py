"""The benchmarks run end to end at tiny sizes (their figures are not asserted:
timings belong to benchmarks/, not to tests) and report what they measured."""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_consa.backends import cpu_extension

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "attention_cpu.py"


def _load(name: str):
    """A benchmark script of benchmarks/, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def attention_cpu():
    return _load("attention_cpu")


def test_work_ratio(attention_cpu):
    # Score entries counted directly from the window mask.
    for n, w in [(64, 16), (64, 8), (100, 7), (16, 16)]:
        mask = torch.ones(n, n).tril()
        band = mask.triu(-(w - 1))
        assert attention_cpu.swa_work_ratio(n, w) == pytest.approx(band.sum().item() / mask.sum().item())
    # with sinks: the first S keys stay visible left of the window (the kernel computes them)
    for n, w, sinks in [(200, 24, 2), (64, 16, 4), (20, 16, 8), (16, 16, 4), (30, 8, 30)]:
        mask = torch.ones(n, n).tril()
        band = mask.triu(-(w - 1))
        band[:, :sinks] = mask[:, :sinks]
        assert attention_cpu.score_entries(n, w, sinks) == band.sum().item(), (n, w, sinks)
        assert attention_cpu.swa_work_ratio(n, w, sinks) == pytest.approx(band.sum().item() / mask.sum().item())


def test_time_interleaved_repeats_until_min_time(attention_cpu, monkeypatch):
    clock = [0.0]  # the benchmark's clock, advanced by the calls alone: exact under any load

    class Call:
        """A method whose forward+backward takes ``seconds`` on the clock; counts its calls."""

        def __init__(self, seconds):
            self.seconds, self.calls = seconds, 0

        def __call__(self):
            self.calls += 1
            clock[0] += self.seconds
            return x.sum()

    monkeypatch.setattr(attention_cpu, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    x = torch.zeros(1, requires_grad=True)
    grad = torch.ones(())
    slow, fast = Call(0.01), Call(0.0)
    times = attention_cpu.time_interleaved({"slow": slow, "fast": fast}, (x,), grad, reps=2, warmup=1,
                                           min_time=0.1, max_reps=50)
    # The slow method's timed forward+backward calls reach 0.1 s at 10 repetitions,
    # every method repeated alike; 3 calls a repetition plus 2 of warm-up.
    got = len(times["slow"]["fwd_bwd"])
    assert got == 10 and sum(times["slow"]["fwd_bwd"]) == pytest.approx(0.1)
    assert all(len(t[key]) == got for t in times.values() for key in ("fwd", "fwd_bwd"))
    assert slow.calls == fast.calls == 3 * got + 2
    # --reps is the floor and --max-reps the cap.
    assert len(attention_cpu.time_interleaved({"slow": slow}, (x,), grad, reps=4, warmup=0)["slow"]["fwd"]) == 4
    capped = attention_cpu.time_interleaved({"slow": slow}, (x,), grad, reps=2, warmup=0, min_time=10.0,
                                            max_reps=5)
    assert len(capped["slow"]["fwd"]) == 5


def test_grid_mode(attention_cpu, tmp_path):
    out = tmp_path / "grid.json"
    rows = attention_cpu.main([
        "--grid", "--grid-seq-lens", "128,256", "--grid-windows", "16,32,64,128", "--grid-gqa", "1,2",
        "--grid-dtypes", "fp32", "--heads", "4", "--head-dim", "16", "--reps", "1", "--warmup", "0",
        "--threads", str(torch.get_num_threads()), "--json", str(out),
    ])
    # Every W <= n/4 once per (n, GQA ratio): 128 -> 16, 32; 256 -> 16, 32, 64.
    got = sorted((r["seq_len"], r["window"], r["heads"] // r["kv_heads"]) for r in rows)
    want = sorted((n, w, g) for g in (1, 2) for n, ws in ((128, (16, 32)), (256, (16, 32, 64))) for w in ws)
    assert got == want
    for r in rows:
        assert r["fwd_ratio"] == pytest.approx(r["swa_fwd_ms"] / r["fa_fwd_ms"])
        assert r["fwd_bwd_ratio"] == pytest.approx(r["swa_fwd_bwd_ms"] / r["fa_fwd_bwd_ms"])
        assert r["pass"] == (max(r["fwd_ratio"], r["fwd_bwd_ratio"]) <= 0.30)
        assert 1 <= r["reps"] <= 50  # --reps 1, more up to --max-reps (50) for --min-time (1 s)
    assert any(r["reps"] > 1 for r in rows)  # these calls take well under 1 s: --min-time asked for more
    # FA is timed once per (n, ratio, dtype) and shared by its windows.
    fa = {(r["seq_len"], r["kv_heads"]): r["fa_fwd_ms"] for r in rows}
    assert all(r["fa_fwd_ms"] == fa[(r["seq_len"], r["kv_heads"])] for r in rows)
    saved = json.loads(out.read_text())
    assert saved["grid"] == rows
    # The rates of exact work: entries counted from the masks, 4 * d flops each forward and
    # 14 * d forward+backward, per query head; the floor at the measured matrix-product rate.
    config = saved["config"]
    matmul, products = config["matmul_gflops"]["fp32"], config["product_rates"]["fp32"]
    # the floor's product: the fastest of torch.mm and, where the kernel built, the tile products
    want = {"a 2048^3 torch.mm in fp32"}
    if cpu_extension.extension() is not None:
        want |= {"brgemm 32x16 by 16x512 in fp32", "brgemm 32x512 by 512x16 in fp32"}  # head dim 16
    assert set(products) == want and all(rate > 0 for rate in products.values())
    assert config["matmul_source"] == {"fp32": max(products, key=products.get)} and matmul == max(products.values())
    for r in rows:
        n, w = r["seq_len"], r["window"]
        causal = torch.ones(n, n).tril()
        entries = {"fa": causal.sum().item(), "swa": causal.triu(-(w - 1)).sum().item()}
        rates = attention_cpu.grid_rates(r)
        for m in ("fa", "swa"):
            for part, flops in (("fwd", 4), ("fwd_bwd", 14)):
                want = flops * 4 * 16 * entries[m] / (r[f"{m}_{part}_ms"] / 1e3) / 1e9
                assert rates[f"{m}_{part}"] == pytest.approx(want)
        for part in ("fwd", "fwd_bwd"):
            # ours at the matmul rate: its exact work's seconds over FA's
            floor = FLOPS[part] * 4 * 16 * entries["swa"] / (matmul * 1e9) / (r[f"fa_{part}_ms"] / 1e3)
            assert attention_cpu.floor_ratio(r, part, matmul) == pytest.approx(floor)


FLOPS = {"fwd": 4, "fwd_bwd": 14}


@pytest.mark.parametrize("bf16_mm,fp32_tile,bf16_tile,source", [
    (300.0, 0.0, 0.0, "a 2048^3 torch.mm in bf16"),
    (20.0, 0.0, 0.0, "a 2048^3 torch.mm in fp32"),
    (300.0, 120.0, 0.0, "a 2048^3 torch.mm in bf16"),
    (20.0, 120.0, 0.0, "brgemm 32x512 by 512x16 in fp32"),
    (300.0, 120.0, 350.0, "brgemm 32x512 by 512x16 in bf16"),
])
def test_grid_floors_at_the_fastest_product(attention_cpu, monkeypatch, tmp_path, bf16_mm, fp32_tile, bf16_tile,
                                            source):
    """A dtype's floor takes the fastest product measured: torch.mm's and the tile products, in
    the dtype and in fp32 (a kernel may convert); a tile product that is not there (0) is left
    out."""
    mm = {torch.float32: 100.0, torch.bfloat16: bf16_mm}
    tile = {torch.float32: fp32_tile, torch.bfloat16: bf16_tile}
    monkeypatch.setattr(attention_cpu, "matmul_gflops", lambda dtype: mm[dtype])
    # the P V tile (K = 512) at the given rate, the scores tile a little slower
    monkeypatch.setattr(attention_cpu, "tile_gflops",
                        lambda dtype, shape: tile[dtype] * (1.0 if shape[2] == 512 else 0.9))
    out = tmp_path / "grid.json"
    attention_cpu.main(["--grid", "--grid-seq-lens", "128", "--grid-windows", "32", "--grid-gqa", "1",
                        "--grid-dtypes", "fp32,bf16", "--heads", "2", "--head-dim", "16", "--reps", "1",
                        "--warmup", "0", "--min-time", "0", "--threads", "1", "--json", str(out)])
    config = json.loads(out.read_text())["config"]
    assert config["matmul_source"]["bf16"] == source
    assert config["matmul_gflops"] == {"fp32": max(100.0, fp32_tile), "bf16": max(100.0, bf16_mm, fp32_tile, bf16_tile)}
    bf16 = config["product_rates"]["bf16"]
    assert bf16["a 2048^3 torch.mm in bf16"] == bf16_mm and bf16["a 2048^3 torch.mm in fp32"] == 100.0
    assert ("brgemm 32x16 by 16x512 in fp32" in bf16) == (fp32_tile > 0)
    assert ("brgemm 32x16 by 16x512 in bf16" in bf16) == (bf16_tile > 0)
    text = attention_cpu.main(["--report", str(out)])
    assert f"bf16: floors at {source}'s {config['matmul_gflops']['bf16']:.0f} GFLOP/s" in text


def test_matmul_rate_is_a_rate(attention_cpu):
    # 2 * 64^3 flops in the time of the best call: between 10 MFLOP/s and 100 TFLOP/s here
    assert 1e-2 < attention_cpu.matmul_gflops(torch.float32, size=64, reps=3) < 1e5


def test_tile_product_rate(attention_cpu):
    """The kernel's own brgemm at a tile's shape, on every thread: a rate in fp32; in bf16 where
    bf16 dot products run (0 elsewhere); a bad dtype or size is refused, naming the field."""
    ext = cpu_extension.extension()
    if ext is None:
        assert attention_cpu.tile_gflops(torch.float32, (32, 64, 64)) == 0.0
        pytest.skip("the CPU SWA kernel did not build here")
    assert 1e-2 < attention_cpu.tile_gflops(torch.float32, (32, 64, 64), seconds=0.05) < 1e5
    bf16 = attention_cpu.tile_gflops(torch.bfloat16, (32, 64, 64), seconds=0.05)
    assert (bf16 > 0) == ext.packs_bf16(64)
    with pytest.raises(RuntimeError, match="dtype fp32 or bf16"):
        ext.tile_product_gflops(torch.float64, 32, 64, 64, 0.05)
    with pytest.raises(RuntimeError, match="sizes >= 1"):
        ext.tile_product_gflops(torch.float32, 0, 64, 64, 0.05)


def test_single_mode_checks_against_dense(attention_cpu, tmp_path):
    out = tmp_path / "one.json"
    rows = attention_cpu.main([
        "--seq-len", "200", "--window", "24", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--sinks", "2", "--reps", "1", "--warmup", "0", "--threads", str(torch.get_num_threads()),
        "--json", str(out),
    ])
    assert [r["method"].split(":")[0] for r in rows] == ["FA (SDPA causal)", "dense-mask SWA (SDPA [n,n] mask)", "ours"]
    config = json.loads(out.read_text())["config"]
    assert config["max_abs_err_ours_vs_dense"] < 1e-5


def test_report_renders_the_grid(attention_cpu, tmp_path, capsys):
    out = tmp_path / "grid.json"
    rows = attention_cpu.main([
        "--grid", "--grid-seq-lens", "128,256", "--grid-windows", "16,32,64", "--grid-gqa", "1",
        "--grid-dtypes", "fp32", "--heads", "2", "--head-dim", "16", "--reps", "1", "--warmup", "0",
        "--threads", "1", "--json", str(out),
    ])
    capsys.readouterr()
    text = attention_cpu.main(["--report", str(out)])
    assert capsys.readouterr().out == text
    # 128: W=16 (n/8), 32 (n/4); 256: W=16 (n/16), 32 (n/8), 64 (n/4)
    by_class = {c: [r for r in rows if attention_cpu.window_class(r["seq_len"], r["window"]) == c]
                for c in ("W <= n/16", "W = n/8", "W = n/4")}
    assert [len(v) for v in by_class.values()] == [1, 2, 2]
    counts = " | ".join(f"{sum(r['pass'] for r in v)} / {len(v)}" for v in by_class.values())
    assert f"| fp32 | {counts} |" in text
    matmul = json.loads(out.read_text())["config"]["matmul_gflops"]["fp32"]
    for r in rows:  # every row, and its matrix cell
        assert r["block_size"] == attention_cpu.swa_tile(r["window"], r["seq_len"], 1, torch.float32, 16)
        assert r["bwd_block_size"] == attention_cpu.swa_tile(r["window"], r["seq_len"], 1, torch.float32, 16,
                                                             backward=True)
        assert (f"| {r['seq_len']} | {r['window']} | 1 | {r['block_size']} / {r['bwd_block_size']} "
                f"| {r['ideal']:.3f} |") in text
        rates = attention_cpu.grid_rates(r)
        floors = " / ".join(f"{attention_cpu.floor_ratio(r, part, matmul):.2f}" for part in ("fwd", "fwd_bwd"))
        assert (f"| {'yes' if r['pass'] else 'NO'} | {r['reps']} | {rates['fa_fwd']:.0f} / {rates['swa_fwd']:.0f} "
                f"| {rates['fa_fwd_bwd']:.0f} / {rates['swa_fwd_bwd']:.0f} | {floors} |") in text
        cell = f"{r['fwd_ratio']:.2f} / {r['fwd_bwd_ratio']:.2f}"
        assert (cell if r["pass"] else f"**{cell}**") in text
    # The cells out of reach: their floor above the pass mark, counted per column like the passes.
    reach = " | ".join(f"{sum(attention_cpu.out_of_reach({**r, 'matmul_gflops': matmul}, 0.30) for r in v)} / {len(v)}"
                       for v in by_class.values())
    assert "Out of reach" in text and f"| fp32 | {reach} |" in text
    # A file from before the tile products: floors at the torch.mm of its matrix_dtype.
    old = json.loads(out.read_text())
    del old["config"]["matmul_source"], old["config"]["product_rates"]
    old["config"]["matmul_dtype"] = {"fp32": "fp32"}
    (tmp_path / "mm.json").write_text(json.dumps(old))
    assert f"fp32: floors at a 2048^3 torch.mm in fp32's {matmul:.0f} GFLOP/s" in attention_cpu.main(
        ["--report", str(tmp_path / "mm.json")])
    # A file from before the matrix-product rate (and the shape in its rows): rates, no floor.
    del old["config"]["matmul_gflops"], old["config"]["matmul_dtype"]
    for r in old["grid"]:
        del r["batch"], r["head_dim"], r["bwd_block_size"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    text = attention_cpu.main(["--report", str(tmp_path / "old.json")])
    assert "Out of reach" not in text and "2048^3" not in text
    for r in rows:
        rates = attention_cpu.grid_rates(r)
        assert f"| {rates['fa_fwd_bwd']:.0f} / {rates['swa_fwd_bwd']:.0f} |  |" in text
        assert f"| {r['seq_len']} | {r['window']} | 1 | {r['block_size']} | {r['ideal']:.3f} |" in text


MODEL_STEP = BENCH.parent / "model_step.py"
TINY_STEP = ["--device", "cpu", "--seq-len", "64", "--window", "16", "--hidden", "64", "--heads", "4",
             "--kv-heads", "4", "--head-dim", "16", "--layers", "2", "--reps", "1", "--threads", "1"]


def test_cpu_kernel_products_compares_brgemm_with_mkl(tmp_path):
    bench = _load("cpu_kernel_products")
    argv = ["--shapes", "256:32:1,200:64:2", "--heads", "4", "--head-dim", "16", "--reps", "2",
            "--threads", str(torch.get_num_threads()), "--json", str(tmp_path / "products.json")]
    if not cpu_extension.extension().brgemm_fp32():  # AVX2 build: MKL only, said so
        with pytest.raises(SystemExit, match="nothing to compare"):
            bench.main(argv)
        return
    rows = bench.main(argv)
    assert [(r["seq_len"], r["window"], r["kv_heads"]) for r in rows] == [(256, 32, 4), (200, 64, 2)]
    for r in rows:
        assert r["max_rel_diff"] < 1e-5
        assert r["fwd_ratio"] == pytest.approx(r["fwd_brgemm_ms"] / r["fwd_mkl_ms"])
        assert r["bwd_ratio"] == pytest.approx(r["bwd_brgemm_ms"] / r["bwd_mkl_ms"])
    assert json.loads((tmp_path / "products.json").read_text())["rows"] == rows


def test_cpu_kernel_products_against_a_baseline_source(tmp_path, monkeypatch):
    """--baseline times this checkout's kernel against another version of its source, in the
    library's tile and the chosen dtype: a git revision resolves to that revision's kernel,
    and the source is compiled under a module name of its own (the build itself is the
    library's, stubbed here with this checkout's module: the test times the same kernel twice)."""
    bench = _load("cpu_kernel_products")
    assert bench.baseline_source("HEAD").read_text().startswith("// Banded (sliding-window) flash attention")
    with pytest.raises(SystemExit, match="neither a file nor a git revision"):
        bench.baseline_source("no-such-revision")
    built = []
    monkeypatch.setattr(cpu_extension, "build", lambda name, source: built.append((name, source)) or cpu_extension.extension())
    argv = ["--shapes", "256:32:1,200:64:2", "--heads", "4", "--head-dim", "64", "--reps", "2", "--dtype", "bf16",
            "--threads", str(torch.get_num_threads()), "--baseline", str(cpu_extension.SOURCE),
            "--json", str(tmp_path / "versions.json")]
    rows = bench.main(argv)
    [(name, source)] = built
    assert source == cpu_extension.SOURCE and name.startswith(cpu_extension.module_name() + "_baseline_")
    for r, (n, w, ratio) in zip(rows, [(256, 32, 1), (200, 64, 2)]):
        assert (r["seq_len"], r["window"], r["kv_heads"]) == (n, w, 4 // ratio)
        assert r["tile"] == bench.cpu_q_tile(w, ratio, torch.bfloat16, 64)
        assert r["bwd_tile"] == bench.cpu_q_tile(w, ratio, torch.bfloat16, 64, backward=True)
        assert r["max_rel_diff"] == 0.0  # the same kernel twice
        assert r["fwd_ratio"] == pytest.approx(r["fwd_this_ms"] / r["fwd_baseline_ms"])
    assert json.loads((tmp_path / "versions.json").read_text())["config"]["dtype"] == "bf16"


def test_cpu_kernel_products_stops_on_differing_results_unless_told(tmp_path, monkeypatch):
    """A baseline whose results differ stops the run, naming the shape; --no-check times it
    anyway (a source changed for a timing experiment) and records that it did not check."""
    bench = _load("cpu_kernel_products")
    ext = cpu_extension.extension()

    class Doubled:  # the forward's output off by a factor of two
        def forward(self, *args, **kwargs):
            out, lse = ext.forward(*args, **kwargs)
            return out * 2, lse

        def backward(self, *args, **kwargs):
            return ext.backward(*args, **kwargs)

    monkeypatch.setattr(cpu_extension, "build", lambda name, source: Doubled())
    argv = ["--shapes", "256:32:1", "--heads", "4", "--head-dim", "16", "--reps", "2",
            "--threads", str(torch.get_num_threads()), "--baseline", str(cpu_extension.SOURCE),
            "--json", str(tmp_path / "timed.json")]
    with pytest.raises(SystemExit, match="differ by .* at n=256 W=32 ratio=1"):
        bench.main(argv)
    assert not (tmp_path / "timed.json").exists()
    [row] = bench.main(argv + ["--no-check"])
    assert row["max_rel_diff"] > 0.1
    assert json.loads((tmp_path / "timed.json").read_text())["config"]["checked"] is False


def test_model_step_runs_every_model(tmp_path):
    """The model step builds the stock models (megatron-core's own spec) and every ConSA model, and
    refuses --transformer-engine where TE cannot run (its figures are not asserted)."""
    from megatron_consa.backends.select import transformer_engine_available

    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(MODEL_STEP), *TINY_STEP, "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows][:3] == ["stock FA", "stock SWA (window_size)", "consa all FA"]
    assert len(rows) == 7 and all(r["ms"] > 0 for r in rows) and rows[0]["ratio"] == 1.0
    if not transformer_engine_available():
        proc = subprocess.run([sys.executable, str(MODEL_STEP), *TINY_STEP, "--transformer-engine"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "--transformer-engine needs" in proc.stderr, proc.stderr[-3000:]


def test_train_throughput_runs_every_model_through_the_entry_point(tmp_path):
    """Each model trains through `python -m megatron_consa.train` and its tokens/s is read from the
    training log (a change of the log line would break the README's table unseen otherwise)."""
    bench = _load("train_throughput")
    out = tmp_path / "tt.json"
    rates = bench.main(["--seq-length", "64", "--window", "16", "--iters", "6", "--log-interval", "2",
                        "--rounds", "1", "--out", str(out)])
    assert list(rates) == list(bench.CASES) and all(r > 0 for r in rates.values())
    saved = json.loads(out.read_text())
    assert saved["tokens_per_s"] == rates
    assert all(len(r) == 1 and r[0] == rates[name] for name, r in saved["tokens_per_s_per_round"].items())
    assert saved["vs_all_fa"] == pytest.approx({name: r / rates["consa all-FA"] for name, r in rates.items()})
    line = "12:00:00 iter {:>6}/20 | loss 6.9 | lr 0.001 | {} tok/s | elapsed 0:00:00 | ETA 0\n"
    with pytest.raises(ValueError, match="logged 1 interval"):
        bench.tokens_per_s(line.format(1, 823) + line.format(5, 900) + line.format(10, 950), 5)
    # the lines at iteration 1 and at the first --log-interval are the warm-up
    log = "".join(line.format(i, r) for i, r in ((1, 100), (5, 200), (10, 300), (15, 400), (20, 1000)))
    assert bench.tokens_per_s(log, 5) == 400


def test_decode_benchmark_checks_the_cache_against_the_formula(tmp_path):
    """The decode benchmark runs all three models; it exits non-zero unless every cache holds what
    `evaluation/kv_memory.py` says, so a passing run has checked it."""
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, str(BENCH.parent / "decode.py"), "--contexts", "48", "--new-tokens", "3",
                           "--window", "16", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "4",
                           "--head-dim", "16", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["stock", "consa all FA", "consa 75% SWA"]
    assert all(r["kv_bytes"] == r["formula_bytes"] and r["cached_tokens"] == 50 for r in rows.values())
    # one FA KV head of four per layer keeps all 50 tokens, the three SWA heads the window of 16
    assert rows["consa 75% SWA"]["kv_bytes"] * 200 == rows["consa all FA"]["kv_bytes"] * (50 + 3 * 16)


def test_controller_benchmark_toy_grid(tmp_path):
    out = tmp_path / "controller"
    proc = subprocess.run([sys.executable, str(BENCH.parent / "controller.py"), "--skip-trainer", "--toy-iters", "20",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    toy = json.loads((out / "controller.json").read_text())["toy"]
    assert toy == json.loads((out / "controller_toy.json").read_text())
    assert {r["controller"] for r in toy} == {"old", "new"} and len(toy) == 120  # 60 representable cases, each twice
    report = (out / "controller.md").read_text()
    assert "| old | 60 |" in report and "| new | 60 |" in report


def test_controller_summary_worst_settle_is_never_when_one_case_never_settles():
    controller = _load("controller")
    rows = [{"settled_by": None, "finalize_ok": False, "tail_gap": 0.2},
            {"settled_by": 1476, "finalize_ok": True, "tail_gap": 0.01}]
    assert controller._summary(rows)["worst_settle"] is None
    assert controller._summary(rows[1:])["worst_settle"] == 1476 and controller._summary([])["worst_settle"] is None
