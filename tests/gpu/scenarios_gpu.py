"""The small run the GPU tests train (shared by the torch and TE backend runs)."""

from megatron_consa.config import ConsaConfig
from megatron_consa.model import ArchitectureConfig
from megatron_consa.training.data import SyntheticRecallData

ARCH = ArchitectureConfig(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_layers=4,
    num_attention_heads=8,
    num_kv_heads=4,
    head_dim=32,
    qk_norm=True,
    rope_theta=10000.0,
    max_position_embeddings=512,
)
DATA = SyntheticRecallData(vocab_size=256, seq_length=256, key_length=8, min_distance=96, seed=5)


def consa_config(backend: str) -> ConsaConfig:
    return ConsaConfig(
        window=64, target_sparsity=0.5, target_warmup_iters=3, gate_lr=0.05, lagrangian_lr=1.0,
        init_log_alpha=0.5, backend=backend,
    )
