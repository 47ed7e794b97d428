"""megatron-consa: learned hybrid FA/SWA attention allocation for megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# tools/<tool>.py: installed as megatron_consa_tools.<tool>, with the console script consa-<tool>
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__")

setup(
    name="megatron-consa",
    version="0.1.0",
    description=(
        "ConSA for megatron-core: hard-concrete L0 gates learn which attention units "
        "keep full attention and which become sliding-window attention, under a KV budget."
    ),
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # megatron-core 0.19 declares Python 3.12+ but runs on 3.11 (tested): on 3.11 install it
    # first with `pip install --no-deps --ignore-requires-python megatron-core==0.19.2`, as
    # the Makefile does
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_consa", "megatron_consa.*"]) + ["megatron_consa_tools"],
    package_dir={"megatron_consa_tools": "tools"},
    entry_points={
        "console_scripts": [f"consa-{tool.replace('_', '-')} = megatron_consa_tools.{tool}:cli" for tool in TOOLS],
    },
    # The banded CPU SWA kernel is compiled from this source on first use (ninja + a C++ compiler).
    package_data={"megatron_consa.backends": ["csrc/*.cpp"]},
    install_requires=[
        "megatron-core>=0.19,<0.20",
        "torch>=2.6",
        "numpy",
        "packaging>=24.2",
        "psutil",
        "sentencepiece",
        "protobuf",  # (a sentencepiece model's pieces, read to write its Hugging Face tokenizer on export)
        "safetensors",
        # the cache layers (CacheLayerMixin), masking_utils and rope_parameters of transformers 5;
        # the Hugging Face tests pass on 5.23.0 and 5.25.0
        "transformers>=5.23",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "ninja",
    ],
    extras_require={
        # (the tests check what a run logs to Weights & Biases, offline)
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.8", "filelock", "wandb>=0.19.10"],
        "wandb": ["wandb>=0.19.10"],  # --wandb-project (reinit="create_new")
        "gpu": ["transformer-engine[pytorch]>=2.0", "nvidia-ml-py"],  # (NVML: --log-straggler's GPU figures)
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
