"""keras-implicit: track what SGD implicitly minimizes besides the loss it is given.

The alternative loss families of "On the implicit minimization of alternative loss functions
when training deep networks" (Gcdf, tempered cross-entropy, multi-class hinge) as Keras losses,
metrics and a shared-computation panel, the paper's models and training protocol, and the
comparison of runs at equal training loss.

Submodules load on first use, so ``import keras_implicit.analysis`` (and the plotting of
finished runs) never imports TensorFlow. The package's Keras classes (losses, metrics, the panel, the
ghost-batch model, the models' layers) are registered with Keras as soon as both this package and Keras
are imported, in either order, so ``keras.models.load_model`` finds them after a plain
``import keras_implicit``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import sys

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "gcdf": "losses",
    "tempered_crossentropy": "losses",
    "multiclass_hinge": "losses",
    "zero_one_error": "losses",
    "mixture": "losses",
    "panel_values": "losses",
    "panel_names": "names",
    "format_parameter": "names",
    "parse_name": "names",
    "active_path": "losses",
    "force_path": "losses",
    "noisy_error": "sharpness",
    "noisy_crossentropy": "sharpness",
    "crossentropy_hessian_trace": "losses",
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
    "train_with_exit_code": "training",
}
_SUBMODULES = ("names", "losses", "metrics", "sharpness", "analysis", "plots", "data", "models", "ghost", "callbacks",
               "training", "sweep", "launchers")

# The submodules that define classes registered with keras.saving.register_keras_serializable.
_REGISTERING = ("losses", "metrics", "models", "ghost")

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


# --------------------------------------------------------------------------- #
# Registration of the Keras classes without importing Keras (nor TensorFlow) here
# --------------------------------------------------------------------------- #
def _register_serializables() -> None:
    """Import the submodules whose classes are registered Keras serializables, once Keras is imported."""
    if _KerasRegistration.done or "keras" not in sys.modules:
        return
    _KerasRegistration.done = True
    _KerasRegistration.uninstall()
    try:
        for name in _REGISTERING:
            importlib.import_module(f"keras_implicit.{name}")
    except Exception as error:  # an import of Keras must not fail because of this package
        logging.getLogger(__name__).warning(
            "keras_implicit could not register its Keras classes (%s: %s); import keras_implicit.losses, "
            ".metrics, .models and .ghost before keras.models.load_model", type(error).__name__, error)


class _KerasRegistration(importlib.abc.MetaPathFinder):
    """Calls :func:`_register_serializables` when an import of Keras, or the outermost import of one of this
    package's submodules, completes: not earlier, since a submodule that is still executing cannot be imported
    by the others (``from keras_implicit.losses import ...`` in the middle of ``losses`` would fail)."""

    done = False
    depth = 0  # the imports of keras and of keras_implicit.* executing now

    def find_spec(self, fullname, path, target=None):
        if fullname != "keras" and not fullname.startswith(f"{__name__}."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        execute = getattr(spec.loader, "exec_module", None)
        if execute is None:
            return spec

        def exec_module(module):
            type(self).depth += 1
            try:
                execute(module)
            finally:
                type(self).depth -= 1
            if type(self).depth == 0:
                _register_serializables()

        spec.loader.exec_module = exec_module
        return spec

    @classmethod
    def uninstall(cls) -> None:
        sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != cls.__name__]


if "keras" in sys.modules:
    _register_serializables()
elif not any(type(finder).__name__ == _KerasRegistration.__name__ for finder in sys.meta_path):
    sys.meta_path.insert(0, _KerasRegistration())
