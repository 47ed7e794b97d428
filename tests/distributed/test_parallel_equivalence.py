"""One ConSA run at every parallel layout, on 4 spawned gloo ranks, against TP1PP1.

A single launch trains the same 8 iterations (same initial checkpoint, same
data, same gate noise) at TP1PP1, TP2, PP2, interleaved PP2, TP2xPP2, TP2+SP,
TP2 with the distributed optimizer (its parameter all-gather also overlapped with the
forward, there and at interleaved PP2), PP2 with full recomputation and TP2 with
selective recomputation (data parallelism fills the rest of the 4 ranks), then
resumes a TP2xPP2 checkpoint taken at iteration 5 at TP1PP1 and at PP2 (its data-parallel
replicas reading shares of it: fully parallel load), and
interleaved-PP2 checkpoints (fp32, bf16) in their own layout. A second launch runs
the fixed phase (where an overlapped parameter all-gather finishes in the forward).
"""

from __future__ import annotations

import pytest
import torch

import megatron_consa  # noqa: F401
from harness import launch
from scenarios import ARCH, BALANCE_ALLOCATION, BALANCE_TP_SIZES, DATA, LAYOUTS, PRECISION_RUNS, make_trainer

from megatron_consa.group_layout import fa_per_rank, type_runs
from megatron_consa.model import unwrap_model
from megatron_consa.training.checkpoint import load_checkpoint
from megatron_consa.training.data import micro_batches

REFERENCE = "tp1pp1"
COMPARED = [name for name in LAYOUTS if name != REFERENCE]
ITERS, RESUME_AT = 8, 5
SELF_RESUMES = ("pp2_vpp2", "pp2_vpp2_bf16")  # the interleaved pipeline's chunks once hid each other's optimizer state


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    results = launch(
        "layouts",
        4,
        out,
        names=[REFERENCE, *COMPARED, *PRECISION_RUNS],
        iters=ITERS,
        resume_from="tp2pp2",
        resume_at=RESUME_AT,
        resume_into=("tp1pp1", "pp2", "pp2_uneven"),
        self_resumes=SELF_RESUMES,
    )
    return results


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-8)


def _assert_same_trajectory(run: list[dict], ref: list[dict], what: str) -> None:
    assert len(run) == len(ref)
    for k, (r, e) in enumerate(zip(run, ref)):
        for key in ("loss", "s_hat", "lambda1", "lambda2"):
            assert _close(r[key], e[key]), f"{what} iteration {k}: {key} {r[key]!r} != {e[key]!r}"
        assert (r["params_norm"] is None) == (e["params_norm"] is None), f"{what} iteration {k}: params norm logged"
        if e["params_norm"] is not None:  # the tied output layer and TP duplicates counted once
            assert _close(r["params_norm"], e["params_norm"]), f"{what} iteration {k}: params norm"
        diff = (r["log_alpha"] - e["log_alpha"]).abs().max().item()
        assert torch.allclose(r["log_alpha"], e["log_alpha"], rtol=1e-5, atol=1e-6), f"{what} iteration {k}: log_alpha differs by {diff:.3g}"


def _times_by_rank(report: str) -> dict[str, dict[int, float]]:
    """megatron-core's 'all' timer report: {timer: {rank: ms}}."""
    out: dict[str, dict[int, float]] = {}
    for line in report.splitlines()[1:]:
        if line.startswith("     rank"):
            rank, ms = line.split(":")
            out[name][int(rank.split()[1])] = float(ms)
        else:
            name = line.strip().rstrip(":")
            out[name] = {}
    return out


def test_tflops_per_gpu_divide_the_iterations_flops_over_the_four_ranks(launched):
    """The log line's TFLOP/s per GPU at every 4-rank layout: the iteration's FLOPs at the logged token
    rate, over the world of 4 (to the printed precision)."""
    import re

    for name, (lines, flops) in launched[0]["log_lines"].items():
        assert lines, name
        for line in lines:
            tokens, tflops = re.search(r"\| (\d+) tok/s \| ([0-9.e+-]+) TFLOP/s/GPU \|", line).groups()
            per_token = flops / (8 * 32) / 4 / 1e12  # (global batch 8 x 32 tokens, over 4 ranks)
            # the printed token rate is rounded to a whole token (7 tok/s is 6.5 to 7.5: 7% at a slow first
            # iteration), the TFLOP/s to 3 significant digits
            low, high = (float(tokens) - 0.5) * per_token, (float(tokens) + 0.5) * per_token
            assert low * (1 - 5e-3) <= float(tflops) <= high * (1 + 5e-3), (name, line, low, high)


def test_timers_report_every_rank_in_a_pipeline(launched):
    """--timing-log-level 2 --timing-log-option all at PP2 x DP2 (every layout above ran with them):
    the step's timers on every rank, a pipeline receive of activations only on the ranks of the
    second stage, and no timer longer than the whole forward-backward but the optimizer's."""
    reports = launched[0]["timer_reports"]["pp2"]
    assert len(reports) == 2  # the log lines of iterations 1 (the first) and 8 (the last; --log-interval 10)
    second_stage = {r["rank"] for r in launched if r["stages"]["pp2"] == 1}
    assert len(second_stage) == 2
    for report in reports:
        times = _times_by_rank(report)
        for name in ("forward-backward", "forward-compute", "backward-compute", "batch-generator", "all-grads-sync",
                     "optimizer", "consa-constraint", "consa-dual-step"):
            assert set(times[name]) == {0, 1, 2, 3}, (name, report)
        assert set(times["forward-recv"]) == second_stage, report
        for name, by_rank in times.items():
            if not name.startswith(("optimizer", "consa-dual", "consa-constraint")):
                assert all(ms <= times["forward-backward"][r] * 1.001 + 0.01 for r, ms in by_rank.items()), name


@pytest.mark.parametrize("layout", COMPARED)
def test_layout_follows_the_tp1pp1_trajectory(launched, layout):
    runs = launched[0]["runs"]
    _assert_same_trajectory(runs[layout], runs[REFERENCE], layout)
    # the run really moved: gates learned, multipliers acted
    first, last = runs[REFERENCE][0], runs[REFERENCE][-1]
    assert last["log_alpha"].abs().max() > 1e-3  # init_log_alpha is 0; 1000x the trajectories' tolerance
    assert abs(last["lambda1"]) > 0.1 and last["s_hat"] != first["s_hat"]


@pytest.mark.parametrize("into", ["tp1pp1", "pp2", "pp2_uneven"])
def test_tp2pp2_checkpoint_resumes_the_same_trajectory(launched, into):
    runs = launched[0]["runs"]
    _assert_same_trajectory(runs[f"resume:{into}"], runs["tp2pp2"][RESUME_AT:], f"resume at {into}")


def test_data_parallel_replicas_share_the_checkpoint_writes(launched):
    """Fully parallel save (the default): at DP4 (TP1PP1) each replica writes about a quarter of
    the tensors they all hold; with replica 0 writing them alone, the other ranks write almost
    nothing. (The resumes above read their checkpoint fully parallel: their trajectories.)"""
    shares = launched[0]["shard_bytes"]
    parallel, replica0 = shares["init"], shares["init-replica0"]
    assert abs(sum(parallel) - sum(replica0)) < 0.05 * sum(replica0), shares  # the same tensors
    assert min(parallel) > 0.15 * sum(parallel), shares
    assert replica0[0] > 0.9 * sum(replica0), shares


@pytest.mark.parametrize("name", SELF_RESUMES)
def test_interleaved_pipeline_checkpoint_resumes_bit_for_bit(launched, name):
    """Saved mid-run with the optimizer and resumed in the same layout and precision: the rest
    of the run is the one that was not interrupted, exactly."""
    runs = launched[0]["runs"]
    resumed, whole = runs[f"self-resume:{name}"], runs[name][RESUME_AT:]
    assert len(resumed) == len(whole) == ITERS - RESUME_AT
    for k, (r, w) in enumerate(zip(resumed, whole)):
        for key in ("loss", "s_hat", "lambda1", "lambda2"):
            assert r[key] == w[key], f"{name} iteration {RESUME_AT + k}: {key} {r[key]!r} != {w[key]!r}"
        assert torch.equal(r["log_alpha"], w["log_alpha"]), f"{name} iteration {RESUME_AT + k}: log_alpha"


def test_every_replica_holds_bit_identical_gates(launched):
    # Each train step also ran the bit-for-bit replica check (allocation_check_interval=1);
    # here every rank's local copy is compared with the gathered reference values.
    final = {name: run[-1]["log_alpha"] for name, run in launched[0]["runs"].items()}
    for rank_result in launched:
        for layout, local in rank_result["local_gates"].items():
            for layer, value in local.items():
                assert torch.equal(value, final[layout][layer]), (rank_result["rank"], layout, layer)


def test_distributed_gate_gradient_equals_single_process_autograd(launched, single_rank_mcore):
    """TP2xPP2's gate gradient at iteration 5 == d(LM loss + Lagrangian)/dlog_alpha in one process."""
    expected = launched[0]["runs"]["tp2pp2"][RESUME_AT]["gate_grad"]
    trainer = make_trainer(LAYOUTS["tp1pp1"])
    load_checkpoint(trainer, launched[0]["mid_ckpt"])
    model = unwrap_model(trainer.chunks[0]).train()
    ctl = trainer.controller
    assert ctl.iteration == RESUME_AT and ctl.lambda1 != 0.0
    ctl.begin_iteration(trainer.gates)
    batches = micro_batches(
        DATA, iteration=RESUME_AT, global_batch_size=8, micro_batch_size=1, dp_rank=0, dp_size=1
    )
    lm = 0.0
    for b in batches:
        per_token = model(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"])
        lm = lm + (per_token * b["loss_mask"]).sum() / b["loss_mask"].sum()
    lm = lm / len(batches)
    objective = lm + ctl.penalty(ctl.expected_sparsity(trainer.gates))
    grads = torch.autograd.grad(objective, [g.log_alpha for g in trainer.gates])
    got = torch.stack([g.float() for g in grads]).view(ARCH.num_layers, -1)
    assert got.abs().max() > 0
    torch.testing.assert_close(expected, got, rtol=1e-5, atol=1e-7)


def test_overlapped_parameter_gather_is_deferred_and_finished(launched):
    """--overlap-param-gather really leaves the all-gather to later (after a step the DP
    replicas of the gates differ: each rank updated its shard), and `finish_param_gather`
    completes it (the trajectories above read parameters only after it or in a forward)."""
    for r in launched:
        apart_after_step, equal_after_finish = r["deferred_gather"]
        assert apart_after_step and equal_after_finish, (r["rank"], r["deferred_gather"])


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(launched):
    """The divergence check needs no collective of its own: the loss, the grad norms and s_hat
    are the same on every rank, so all raise together (none is left waiting)."""
    errors = {r["rank"]: r["diverged"] for r in launched}
    assert all(e is not None and e.startswith("iteration 2: loss nan") for e in errors.values()), errors  # (the second step)


def test_consistency_guard_names_the_rank_that_differs(launched):
    # TP2 x DP2 on 4 ranks: rank 3 shares gates with rank 2 (TP) and with rank 1 (DP).
    errors = {r["rank"]: r["guard_error"][0] for r in launched}
    assert all(e is not None for e in errors.values()), errors
    for rank, message in errors.items():  # every rank raises, with the same message
        assert "iteration 7" in message and "ranks [3]" in message, message
        assert "tensor-parallel group [2, 3]" in message and "data-parallel group [1, 3]" in message, message


def test_weight_hash_check_names_the_replica_that_differs(launched):
    """--check-weight-hash-across-dp-replicas-interval (every layout above checked its replicas at
    iteration 5 and found them alike): rank 2's nudged weight differs from its data-parallel
    replica 0 (rank 0), and every rank stops with the same message."""
    errors = {r["rank"]: r["guard_error"][1] for r in launched}
    assert all(e is not None for e in errors.values()), errors
    for message in errors.values():
        assert message.startswith("iteration 8: ranks [2] hold weights that differ"), message
        assert "(rank 2: module.embedding.word_embeddings.weight)" in message, message  # the one nudged


@pytest.mark.parametrize("run", list(PRECISION_RUNS))
def test_mixed_precision_follows_fp32_with_the_constraint_scaled_right(launched, run):
    """bf16, and fp16 with dynamic loss scaling: the unscaled gate gradient (LM + constraint)
    matches fp32 to half-precision accuracy, so the constraint share is scaled like the LM part."""
    runs = launched[0]["runs"]
    ref, got = runs[REFERENCE], runs[run]
    assert not any(r["skipped"] for r in got), f"{run}: a step overflowed; lower initial_loss_scale"
    for k in range(len(got)):
        assert abs(got[k]["loss"] - ref[k]["loss"]) < 1e-2 * ref[k]["loss"], (run, k)
        assert abs(got[k]["s_hat"] - ref[k]["s_hat"]) < 5e-3, (run, k)
    for k in (0, RESUME_AT, len(got) - 1):
        scale = ref[k]["gate_grad"].abs().max()
        torch.testing.assert_close(got[k]["gate_grad"], ref[k]["gate_grad"], rtol=0.1, atol=0.1 * scale)


# the fixed phase reads no gates: the overlapped all-gathers finish in the forward's hooks
# (TP2xDP2), or are launched by the interleaved schedule (aligned, PP2xVPP2xDP2)
FIXED_LAYOUTS = ["tp1pp1", "tp2", "pp2", "tp2pp2", "tp2_overlap_grad_reduce", "tp2_distopt", "tp2_overlap_param_gather",
                 "pp2_vpp2_overlap_param_gather"]
FIXED_SELF_RESUMES = ("tp2_overlap_param_gather",)  # saved with its all-gather pending


@pytest.fixture(scope="module")
def fixed_launched(tmp_path_factory):
    return launch("fixed_layouts", 4, tmp_path_factory.mktemp("fixed"), names=FIXED_LAYOUTS, iters=6,
                  self_resumes=FIXED_SELF_RESUMES)[0]["runs"]


@pytest.mark.parametrize("layout", FIXED_LAYOUTS[1:])
def test_fixed_allocation_training_follows_tp1pp1(fixed_launched, layout):
    """Continued training with a mixed, TP-unbalanced fixed allocation: same loss curve at every layout."""
    ref, got = fixed_launched["fixed:tp1pp1"], fixed_launched[f"fixed:{layout}"]
    assert len(got) == len(ref) and ref[-1] < ref[0]
    for k, (a, b) in enumerate(zip(got, ref)):
        assert _close(a, b), f"{layout} iteration {k}: loss {a!r} != {b!r}"


@pytest.mark.parametrize("name", FIXED_SELF_RESUMES)
def test_a_checkpoint_saved_with_the_parameter_gather_pending_resumes_bit_for_bit(fixed_launched, name):
    """The save completes the overlapped all-gather the last step left (the replicas' weights
    differ until then): the resumed run is the uninterrupted one, exactly."""
    assert fixed_launched[f"fixed:pending-at-save:{name}"] is True
    resumed, whole = fixed_launched[f"fixed:self-resume:{name}"], fixed_launched[f"fixed:{name}"][3:]
    assert len(resumed) == len(whole) == 3 and resumed == whole, (resumed, whole)


def test_fixed_allocation_changes_the_function(fixed_launched):
    """The fixed runs really run the mixed allocation: all-FA from the same weights gives another loss."""
    fixed, full = fixed_launched["fixed:tp1pp1"], fixed_launched["allfa:tp1pp1"]
    # 100x the equivalence tolerance: a rank that sliced the wrong half of its row could not pass unseen
    assert max(abs(a - b) / abs(b) for a, b in zip(fixed, full)) > 1e-3, (fixed, full)


def test_layer_granularity_follows_tp1pp1(fixed_launched):
    ref, got = fixed_launched["layer:tp1pp1"], fixed_launched["layer:tp2pp2"]
    for k, (a, b) in enumerate(zip(got, ref)):
        assert all(_close(x, y) for x, y in zip(a, b)), f"layer granularity iteration {k}: {a} != {b}"
    torch.testing.assert_close(fixed_launched["layer:tp2pp2:log_alpha"], fixed_launched["layer:tp1pp1:log_alpha"],
                               rtol=1e-5, atol=1e-6)
    assert fixed_launched["layer:tp1pp1:log_alpha"].shape[1] == 1


def test_per_token_loss_weighs_every_token_of_the_global_batch_alike(fixed_launched):
    """--calculate-per-token-loss with EOD-masked data: DP4 (whose ranks hold different numbers of
    tokens with loss) follows DP1 in loss and gradient norm; the default normalisation gives
    another loss on the same batch."""
    ref, got = fixed_launched["per-token:tp2pp2"], fixed_launched["per-token:tp1pp1"]
    assert len(got) == len(ref) == 6 and ref[-1][0] < ref[0][0]
    for k, (a, b) in enumerate(zip(got, ref)):
        assert _close(a[0], b[0]) and _close(a[1], b[1]), f"per-token loss iteration {k}: {a} != {b}"
    mean = fixed_launched["mean:tp2pp2"][0]
    assert abs(mean[0] - ref[0][0]) / ref[0][0] > 1e-4, (mean, ref[0])  # 10x the tolerance above


def test_fixed_allocation_resumes_at_another_tp_size(fixed_launched):
    """A TP2 checkpoint of a reordered fixed model (optimizer states included) resumes at TP1."""
    ref, got = fixed_launched["fixed:tp2"][3:], fixed_launched["fixed:resume:tp1pp1"]
    assert len(got) == len(ref)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert _close(a, b), f"resume at tp1pp1 iteration {k}: loss {a!r} != {b!r}"


def test_hand_made_allocation_is_unbalanced_in_megatrons_order():
    """So the balance below is the reordering's work, not the rows'."""
    natural = list(range(len(BALANCE_ALLOCATION[0])))
    for tp in (2, 4):
        counts = [fa_per_rank(row, natural, tp) for row in BALANCE_ALLOCATION]
        assert max(max(c) - min(c) for c in counts) > 1, (tp, counts)


@pytest.mark.parametrize("tp", BALANCE_TP_SIZES)
def test_fa_groups_spread_evenly_over_tp_ranks(fixed_launched, tp):
    """Each rank's core attention holds its groups contiguously by type, FA counts per layer
    differ by at most 1 over the ranks, and the ranks together hold the allocation's row."""
    ranks = fixed_launched["balance"]["groups"][tp]
    for layer, row in enumerate(BALANCE_ALLOCATION):
        held = [ranks[r][layer] for r in range(tp)]
        fa_counts = [sum(types) for _, types in held]
        assert max(fa_counts) - min(fa_counts) <= 1, (tp, layer, fa_counts)
        assert sorted(g for groups, _ in held for g in groups) == list(range(len(row))), (tp, layer, held)
        for groups, types in held:
            assert list(types) == [bool(row[g]) for g in groups], (tp, layer, groups, types)
            assert len(type_runs(types)) <= 2, (tp, layer, types)


@pytest.mark.parametrize("tp", BALANCE_TP_SIZES)
def test_reordered_models_compute_the_tp1_function(fixed_launched, tp):
    """Loaded from the same canonical weights, TP2/TP4 in the stored order give the logits of
    TP1 in megatron's order; freshly built, each order starts from the same function."""
    balance = fixed_launched["balance"]
    ref = balance["reference"]
    scale = ref.abs().max()
    torch.testing.assert_close(balance["logits"][tp], ref, rtol=0, atol=1e-6 * scale)
    megatron_order, stored_order = balance["fresh"][tp]
    torch.testing.assert_close(stored_order, megatron_order, rtol=0, atol=1e-6 * megatron_order.abs().max())
    # the allocation matters here: all-FA from the same weights differs by far more than the tolerance
    assert (balance["all_fa"] - ref).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("tp", BALANCE_TP_SIZES)
def test_reordered_checkpoints_are_canonical(fixed_launched, tp):
    """Weights saved by a reordered model at any TP size load into megatron's order at TP1 bit for bit."""
    assert fixed_launched["balance"]["round_trip"][tp] == []
