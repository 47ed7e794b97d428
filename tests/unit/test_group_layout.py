"""Fixed layers that store their KV groups by type (`group_layout`, `ConsaSelfAttention`).

* the order itself, exhaustively for 8 KV groups at TP 1/2/4/8: a permutation,
  FA balanced over ranks, each type contiguous per rank, as few cross-rank moves
  as the balance needs, and the identity where nothing has to move;
* a reordered model == the same model in megatron's order == dense masked
  attention per head (logits and every gradient, fp32, 1e-6), and its mixed
  layers run each kernel on a view of q, k and v;
* a Hugging Face export of a reordered model is canonical (bit for bit the
  weights of megatron's order) and, imported back, computes the same function.

TP2/TP4 balance, logits and checkpoints: tests/distributed/test_parallel_equivalence.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path

import pytest
import torch

import megatron_consa  # noqa: F401  (makes megatron.core importable without triton)
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_consa.config import ConsaConfig
from megatron_consa.group_layout import fa_per_rank, inverse_order, kv_group_order, take_groups, type_runs
from megatron_consa.model import ArchitectureConfig, build_gpt_model, build_transformer_config, consa_attention_modules
from megatron_consa.self_attention import ConsaSelfAttention, to_canonical_order, to_stored_order

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

from attention_reference import reference_attention, visible_mask  # noqa: E402  written apart from the library

ARCH = ArchitectureConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=4, num_attention_heads=8, num_kv_heads=4,
    head_dim=8, qk_norm=True, qkv_bias=True, rope_theta=10000.0, max_position_embeddings=64,
)
# rows 0 and 1 interleave their types (reordered even at TP1), row 2 is already contiguous, row 3 one type
ALLOCATION = [[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]]
WINDOW, SEQ = 3, 20


# ----------------------------------------------------------------- the order


def _min_cross_rank_moves(row, tp):
    """Fewest FA groups that must leave their rank for balance (brute force over who gets the larger share)."""
    per_rank = len(row) // tp
    counts = [sum(row[r * per_rank : (r + 1) * per_rank]) for r in range(tp)]
    base, extra = divmod(sum(row), tp)
    return min(
        sum(max(0, c - base - (r in larger)) for r, c in enumerate(counts))
        for larger in itertools.combinations(range(tp), extra)
    )


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_order_balances_and_makes_types_contiguous_for_every_row(tp):
    per_rank = 8 // tp
    for row in itertools.product([0, 1], repeat=8):
        order = kv_group_order(row, tp)
        assert sorted(order) == list(range(8)), (row, order)
        counts = fa_per_rank(row, order, tp)
        assert max(counts) - min(counts) <= 1, (row, tp, counts)
        for r in range(tp):
            held = order[r * per_rank : (r + 1) * per_rank]
            assert len(type_runs([row[g] for g in held])) <= 2, (row, tp, order)
        moved = sum(order[p] // per_rank != p // per_rank for p in range(8))
        assert moved == 2 * _min_cross_rank_moves(row, tp), (row, tp, order)  # each move is a swap
        natural = list(range(8))
        already_fine = max(fa_per_rank(row, natural, tp)) - min(fa_per_rank(row, natural, tp)) <= 1 and all(
            len(type_runs(row[r * per_rank : (r + 1) * per_rank])) <= 2 for r in range(tp)
        )
        assert (order == tuple(natural)) == already_fine, (row, tp, order)


def test_order_examples():
    assert kv_group_order([1, 0, 1, 0], 1) == (0, 2, 1, 3)  # FA first, each type in index order
    assert kv_group_order([0, 0, 1, 1], 1) == (0, 1, 2, 3)  # already one run per type
    # rank 0's last FA groups swap places with rank 1's last SWA groups
    assert kv_group_order([1, 1, 1, 1, 0, 0, 0, 0], 2) == (0, 1, 6, 7, 4, 5, 2, 3)
    assert kv_group_order([1, 1, 0, 0, 0, 0, 0, 0], 4) == (0, 3, 2, 1, 4, 5, 6, 7)


def test_take_groups_moves_whole_blocks_and_inverse_undoes_it():
    t = torch.arange(4 * 3 * 2).view(12, 2)  # 4 groups of 3 rows
    got = take_groups(t, (2, 0, 3, 1), dim=0, num_groups=4)
    assert torch.equal(got, torch.cat([t[6:9], t[0:3], t[9:12], t[3:6]]))
    assert torch.equal(take_groups(got, inverse_order((2, 0, 3, 1)), dim=0, num_groups=4), t)
    assert torch.equal(take_groups(t.T, (1, 0), dim=1, num_groups=2), torch.cat([t.T[:, 6:], t.T[:, :6]], dim=1))


# ----------------------------------------------------------------- the model


def _model(*, permute: bool, allocation=ALLOCATION, arch=ARCH, seed: int = 7):
    config = build_transformer_config(arch, ConsaConfig(window=WINDOW, allocation=allocation, permute_kv_groups=permute, backend="torch"))
    model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(config, arch, use_transformer_engine=False)


def _tokens():
    return torch.randint(0, ARCH.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _logits_and_grads(model):
    model.zero_grad(set_to_none=True)
    toks = _tokens()
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(toks)
    logits = model(toks, pos, attention_mask=None)
    (logits.float().square().mean() + logits.float().mean()).backward()
    return logits.detach(), to_canonical_order(model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def _dense_forward(attn):
    """A forward for `attn` (megatron's order): dense masked attention, one mask per head."""

    def forward(query, key, value, attention_mask, *args, **kwargs):
        sq, b, hq, d = query.shape
        rep = hq // key.size(2)
        causal = visible_mask(sq, sq, 0)  # written in the test from the convention, not the library's
        window = visible_mask(sq, attn.consa.window, attn.consa.sink_tokens)
        mask = torch.stack([causal if attn.fa_row[g] else window for g in attn.local_groups for _ in range(rep)])
        bhsd = [x.permute(1, 2, 0, 3) for x in (query, key, value)]
        out = reference_attention(*bhsd, mask.unsqueeze(0), attn.softmax_scale).to(query.dtype)  # [b, hq, s, d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)

    return forward


def _assert_same(got, want, what):
    logits, grads = got
    ref_logits, ref_grads = want
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6, msg=f"{what}: logits")
    assert sorted(grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-6, msg=f"{what}: gradient of {name}")


@pytest.mark.usefixtures("single_rank_mcore")
class TestReorderedModel:
    def test_orders_as_expected_and_agrees_with_the_allocation(self):
        model = _model(permute=True)
        orders = [m.kv_group_order for m in model.modules() if isinstance(m, ConsaSelfAttention)]
        assert orders == [(0, 2, 1, 3), (1, 2, 0, 3), (0, 1, 2, 3), (0, 1, 2, 3)]
        for attn, row in zip(consa_attention_modules([model]), ALLOCATION):
            assert attn.fa_heads() == row  # the model reports the allocation, in canonical order
            assert list(attn.fa_local) == [bool(row[g]) for g in attn.local_groups]
        megatron_order = _model(permute=False)
        assert all(m.kv_group_order is None for m in megatron_order.modules() if isinstance(m, ConsaSelfAttention))
        learning = build_gpt_model(build_transformer_config(ARCH, ConsaConfig(window=WINDOW)), ARCH)
        assert all(m.kv_group_order is None for m in learning.modules() if isinstance(m, ConsaSelfAttention))
        sharded = learning.sharded_state_dict()
        assert isinstance(sharded["decoder.layers.0.self_attention.linear_qkv.weight"], ShardedTensor)
        assert isinstance(model.sharded_state_dict()["decoder.layers.0.self_attention.linear_qkv.weight"], ShardedTensorFactory)

    def test_attention_mass_scores_are_per_canonical_head_in_a_reordered_model(self):
        """Calibration reads each layer's groups as it stores them: a reordered model scores each KV head as the
        same model in megatron's order does (both compute one function)."""
        from megatron_consa.evaluation.calibration import attention_mass_scores

        tokens = torch.randint(0, ARCH.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(2))
        reordered, megatron_order = (attention_mass_scores(_model(permute=p), tokens, window=WINDOW, batch_size=2)
                                     for p in (True, False))
        torch.testing.assert_close(torch.tensor(reordered.scores), torch.tensor(megatron_order.scores), rtol=0, atol=1e-6)
        assert len({round(v, 6) for row in megatron_order.scores[:2] for v in row}) == 8  # the heads differ

    def test_plain_state_dicts_convert_between_orders_in_one_process(self):
        reordered = _model(permute=True)
        canonical = to_canonical_order(reordered, reordered.state_dict())
        want = _model(permute=False).state_dict()  # same seed: the same weights in megatron's order
        assert [k for k, v in want.items() if torch.is_tensor(v) and not torch.equal(canonical[k], v)] == []
        # a state dict in megatron's order (a conversion's, another model's) loads through to_stored_order
        other = _model(permute=False, seed=8)
        reordered.load_state_dict(to_stored_order(reordered, other.state_dict()))
        torch.testing.assert_close(_logits_and_grads(reordered)[0], _logits_and_grads(other)[0], rtol=0, atol=1e-6)

    def test_logits_and_gradients_equal_megatrons_order_and_dense_masked_attention(self):
        reordered = _logits_and_grads(_model(permute=True))
        gathered = _logits_and_grads(_model(permute=False))  # mixed layers gather heads by type
        dense = _model(permute=False)
        for attn in consa_attention_modules([dense]):
            attn.forward = _dense_forward(attn)
        reference = _logits_and_grads(dense)
        _assert_same(reordered, reference, "reordered vs dense")
        _assert_same(gathered, reference, "megatron's order vs dense")
        # the allocation matters at this length: all-FA differs by far more than the tolerance
        all_fa, _ = _logits_and_grads(_model(permute=False, allocation=[[1] * 4] * 4))
        assert (all_fa - reference[0]).abs().max() > 1e-3

    def test_mixed_layers_run_each_kernel_on_a_view(self):
        model = _model(permute=True)
        calls = []
        for attn in consa_attention_modules([model]):
            inputs = {}
            attn.register_forward_pre_hook(lambda m, args, inputs=inputs: inputs.update(q=args[0], k=args[1], v=args[2]))
            for name in ("full", "sliding"):
                real = getattr(attn.backend, name)

                def call(q, k, v, real=real, name=name, attn=attn, inputs=inputs):
                    shares = all(x.untyped_storage().data_ptr() == inputs[n].untyped_storage().data_ptr()
                                 for x, n in ((q, "q"), (k, "k"), (v, "v")))
                    calls.append((attn.layer_index, name, q.size(2), shares))
                    return real(q, k, v)

                setattr(attn.backend, name, call)
        toks = _tokens()
        with torch.no_grad():
            model(toks, torch.arange(SEQ).unsqueeze(0).expand_as(toks), attention_mask=None)
        rep = ARCH.num_attention_heads // ARCH.num_kv_heads
        expected = []
        for layer, row in enumerate(ALLOCATION):
            fa = sum(row) * rep
            expected += [(layer, "full", fa, True)] if fa else []
            expected += [(layer, "sliding", len(row) * rep - fa, True)] if fa < len(row) * rep else []
        assert sorted(calls) == sorted(expected)


# ----------------------------------------------------------------- export


def test_hf_export_of_a_reordered_model_is_canonical_and_imports_back_to_the_same_function(tmp_path, single_rank_mcore):
    from safetensors.torch import load_file

    from conversion_fixtures import hf_logits
    from scenarios import checkpoint_logits, save_weights

    from megatron_consa.allocation import Allocation
    from megatron_consa.conversion.exporter import ExportRequest, export_to_hf
    from megatron_consa.conversion.importer import ImportRequest, import_hf_checkpoint
    from megatron_consa.conversion.keymap import mcore_to_hf
    from megatron_consa.training.checkpoint import load_model_weights

    arch = dataclasses.replace(ARCH, qk_norm=False, model_type="qwen2")  # Qwen2: the reordered rows carry a bias
    toks, ckpt, hf_dir, back = _tokens(), tmp_path / "ckpt", tmp_path / "hf", tmp_path / "back"
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(toks)
    model = _model(permute=True, arch=arch).eval()
    with torch.no_grad():
        before = model(toks, pos, attention_mask=None)
    save_weights(model, ckpt, arch)
    export_to_hf(ExportRequest(load=str(ckpt), save=str(hf_dir)))  # a head-wise allocation: exported all-FA

    # the export holds the weights in canonical order: bit for bit those of megatron's order
    exported = load_file(str(hf_dir / "model.safetensors"))
    megatron_order = _model(permute=False, arch=arch)
    canonical = mcore_to_hf({k: v for k, v in megatron_order.state_dict().items() if torch.is_tensor(v)}, arch)
    assert sorted(exported) == sorted(canonical)
    assert [k for k in canonical if not torch.equal(exported[k], canonical[k])] == []

    # imported back with the allocation, the reordered model computes what it computed before
    import_hf_checkpoint(ImportRequest(hf_path=str(hf_dir), save=str(back), dtype="fp32"))
    Allocation(granularity="kv_head", num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, window=WINDOW,
               sink_tokens=0, target_sparsity=None, fa=ALLOCATION, source="test").save(back / "allocation.json")
    after = checkpoint_logits(str(back), toks)
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-5

    # and transformers' own forward of the export equals our all-FA model from the same checkpoint
    all_fa = _model(permute=True, arch=arch, allocation=[[1] * 4] * 4).eval()
    load_model_weights([all_fa], ckpt)
    with torch.no_grad():
        ours = all_fa(toks, pos, attention_mask=None)
    theirs = hf_logits(hf_dir, toks)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5
