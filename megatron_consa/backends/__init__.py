"""Attention backends for megatron-consa.

``torch_attention`` holds pure-PyTorch kernels (causal full attention and
O(n*W) sliding-window attention) that run on CPU and CUDA without
Transformer Engine or flash-attn.
"""
