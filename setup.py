"""Installs moe_jax: sparse Mixture-of-Experts in JAX/Flax with expert parallelism."""

import pathlib

import setuptools

# Lower bounds are what resolves on Python 3.11 today (jax 0.10.2 on CPU hosts, 0.11.2 on the GPU host).
INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "numpy>=1.26",
    "orbax-checkpoint>=0.12",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "ml-collections>=1.1",
    "sentencepiece>=0.2",
    "sacrebleu>=2.4",
    "rouge-score>=0.1.2",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "absl-py>=2.1",
    # TFDS reads builders that live inside a package through importlib_resources.
    "importlib_resources>=6.0",
    # Offline image-recognition data (8x8 digits) ships inside scikit-learn.
    "scikit-learn>=1.4",
    # Hugging Face checkpoints in and out (moe_jax.interop.hf) read and write safetensors with NumPy.
    "safetensors>=0.4",
    # Speech recognition: log-mel features (librosa; soxr resampling comes with it) and WER/CER (jiwer).
    # The offline speech corpus also needs espeak-ng, a Debian package (apt-get install espeak-ng).
    "librosa>=0.10",
    "jiwer>=3.0",
]

# The TPU compiler (libtpu) for planning TPU pods from a CPU host (experiments/compare_sharding.py
# --topology). Deliberately no version of its own: `jax[tpu]` names the libtpu built for whichever jax
# resolves (jax 0.10.2 -> libtpu 0.0.42.*), and an installed jax already satisfies ">=0.10", so this extra
# adds libtpu without moving jax. Pinning `jax[tpu]==X` here would drag every environment to jax X.
# libtpu wheels exist for Linux x86-64 only.
TPU_PLAN = "jax[tpu]>=0.10"
_LINUX_X86 = "platform_system == 'Linux' and platform_machine == 'x86_64'"

EXTRAS_REQUIRE = {
    # The planner tests really compile for a TPU topology, so the test extra brings libtpu where it exists.
    "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "scipy>=1.11", f"{TPU_PLAN}; {_LINUX_X86}"],
    "tpu-plan": [TPU_PLAN],
    # Preparing real TFDS datasets (wmt14, cnn_dailymail, ...) needs TensorFlow.
    "tf": ["tensorflow-cpu>=2.16"],
    "gpu": ["jax[cuda12]>=0.10"],
    # Parity tests against the transformers implementation (tests marked slow). torch 2.13.0 is the CPU
    # build this machine keeps on disk; a newer or unpinned torch pulls a CUDA build of several GB.
    "hf": ["transformers>=5.0", "torch==2.13.0"],
}

setuptools.setup(
    name="moe_jax",
    version="0.1.0",
    description="Sparse Mixture-of-Experts models with expert parallelism in JAX/Flax.",
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["moe_jax", "moe_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "moe-jax-train=moe_jax.main:run",
            "moe-jax-generate=moe_jax.generate:run",
            "moe-jax-convert=moe_jax.convert:run",
        ]
    },
)
