"""keras-implicit: track what SGD implicitly minimizes besides the loss it is given.

The alternative loss families of "On the implicit minimization of alternative loss functions
when training deep networks" (Gcdf, tempered cross-entropy, multi-class hinge) as Keras losses,
metrics and a shared-computation panel, the paper's models and training protocol, and the
comparison of runs at equal training loss.

Submodules load on first use, so ``import keras_implicit.analysis`` (and the plotting of
finished runs) never imports TensorFlow.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "gcdf": "losses",
    "tempered_crossentropy": "losses",
    "multiclass_hinge": "losses",
    "zero_one_error": "losses",
    "panel_values": "losses",
    "panel_names": "losses",
    "format_parameter": "losses",
    "active_path": "losses",
    "force_path": "losses",
    "noisy_error": "sharpness",
    "noisy_crossentropy": "sharpness",
    "crossentropy_hessian_trace": "sharpness",
    "eq9": "sharpness",
    "evaluate_sharpness": "sharpness",
    "AltLossPanel": "metrics",
    "alt_loss_panel": "metrics",
    "load_dataset": "data",
    "make_model": "models",
    "with_features": "models",
    "GhostBatchModel": "ghost",
    "ghost_batch_model": "ghost",
    "AltLossTracker": "callbacks",
    "RunConfig": "training",
    "RunDirectory": "training",
    "train": "training",
}
_SUBMODULES = ("losses", "metrics", "sharpness", "analysis", "plots", "data", "models", "ghost", "callbacks",
               "training")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_implicit.{name}")
    if name in _EXPORTS:
        module = importlib.import_module(f"keras_implicit.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'keras_implicit' has no attribute {name!r}")


def __dir__():
    return __all__
