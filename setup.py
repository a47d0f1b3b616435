"""keras-implicit: the paper's alternative loss families for Keras 3 (TensorFlow backend)."""

from setuptools import find_packages, setup

setup(
    name="keras-implicit",
    version="0.1.0",
    description="Track what SGD implicitly minimizes: Gcdf, tempered cross-entropy and hinge panels for Keras",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["keras_implicit", "keras_implicit.*"]),
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.10",
        "numpy",
        "matplotlib",
        "tensorboard",
        "tensorflow-datasets",
        "importlib_resources",
    ],
    extras_require={
        "dev": [
            "pytest",
            "scipy",
            # Only for cross-checking Phi in the tests; the library never imports it.
            "tensorflow-probability==0.25.*",
            "tf-keras==2.21.*",
        ],
    },
)
