"""Training ConSA models on megatron-core pieces (schedules, DDP, optimizer, checkpoints).

Configs flow from the entry point as typed dataclasses (`ParallelConfig`,
`TrainingConfig`); nothing here reads global arguments.
"""
