"""keras-implicit: track what SGD implicitly minimizes besides the loss it is given.

The alternative loss families of "On the implicit minimization of alternative loss functions
when training deep networks" (Gcdf, tempered cross-entropy, multi-class hinge) as Keras losses,
metrics and a shared-computation panel.
"""

from keras_implicit import losses, metrics
from keras_implicit.losses import (
    format_parameter,
    gcdf,
    multiclass_hinge,
    panel_names,
    panel_values,
    tempered_crossentropy,
    zero_one_error,
)
from keras_implicit.metrics import AltLossPanel, alt_loss_panel

__version__ = "0.1.0"

__all__ = [
    "losses",
    "metrics",
    "gcdf",
    "tempered_crossentropy",
    "multiclass_hinge",
    "zero_one_error",
    "panel_values",
    "panel_names",
    "format_parameter",
    "AltLossPanel",
    "alt_loss_panel",
    "__version__",
]
