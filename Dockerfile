# megatron-consa on an NGC PyTorch container (it brings CUDA, NCCL, Transformer Engine and apex).
#
#   docker build -t megatron-consa .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it \
#       -v /data:/data -v /models:/models megatron-consa \
#       torchrun --nproc-per-node 8 -m megatron_consa.train --help
#
# The NGC release pins torch; megatron-core is installed without dependencies so
# pip does not replace that torch. The versions follow setup.py (transformers 5.23+ for
# the hybrid KV cache's transformers classes: the build imports them to check).
ARG BASE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE}

WORKDIR /workspace/megatron-consa
# the dependencies first, in layers of their own: a change to the code below reinstalls none of them
RUN pip install --no-cache-dir "packaging>=24.2" psutil && \
    pip install --no-cache-dir --no-deps "megatron-core==0.19.2" && \
    pip install --no-cache-dir sentencepiece protobuf safetensors "transformers>=5.23" tqdm tensorboard matplotlib \
        ninja "wandb>=0.19.10" nvidia-ml-py
COPY setup.py README.md ./
COPY megatron_consa ./megatron_consa
COPY tools ./tools
COPY examples ./examples
RUN pip install --no-cache-dir --no-deps -e . && \
    python -c "import megatron_consa, megatron_consa.inference.hf, transformer_engine; print('megatron-consa ready, TE', transformer_engine.__version__)"
ENV PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
