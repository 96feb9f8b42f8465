"""shls_jax: SHLS self-supervised video object segmentation in JAX/Flax."""

import setuptools

setuptools.setup(
    name="shls_jax",
    version="0.1.0",
    description=(
        "SHLS (superfeatures learned from still images) for self-supervised"
        " video object segmentation, in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=["shls_jax", "shls_jax.*", "data_prep", "data_prep.*"]
    ),
    # The shipped model (shls_jax/shipped.py) travels inside the package.
    package_data={"shls_jax": ["weights/*.npz", "weights/*.json"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorflow-cpu>=2.21",
        "tensorflow-datasets>=4.9.10",
        "numpy>=2.0",
        "scipy>=1.13",  # Already required by scikit-image; used directly.
        "scikit-image>=0.26",
        "ml-collections>=1.1",
        "tensorboard>=2.21",  # Event files for training curves (tf.summary).
        "tqdm>=4.66",  # Progress bars on long offline work.
        "imageio>=2.37",  # Frame and mask I/O (ships with scikit-image).
        "pillow>=10",  # Palette PNGs of results (ships with imageio).
        "av>=14",  # Video-file decoding for own videos (PyAV wheels).
        # Score charts of evaluation runs (Agg backend, no display needed).
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",
            # tests/test_notebooks.py runs the notebooks headlessly.
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        # Reading the authors' .pth in shls_jax.convert_torch (an .npz of
        # the state dict needs no PyTorch).
        "torch": ["torch>=2.4"],
    },
)
