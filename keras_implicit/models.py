"""The paper's networks (appendix A-B, after Keskar et al.'s F1 and C1), with normalized top features.

Both models end in ``L2Normalization`` (layer ``"features"``) followed by the top ``Dense``
(layer ``"logits"``): the top layer's input x has ||x|| = 1 (the paper's section 3.2), so the Gcdf
loss needs no feature norm. No dropout, no weight decay.

``fc6``: input -> Flatten -> 5 x [Dense 512, BatchNorm, ReLU] -> L2Normalization -> Dense(classes).
``c1``:  input -> 2 x [Conv 5x5 with 64 filters, BatchNorm, ReLU, MaxPool 3x3 stride 2]
         -> Flatten -> [Dense 384, BatchNorm, ReLU] -> [Dense 192, BatchNorm, ReLU]
         -> L2Normalization -> Dense(classes).

The outputs are logits (train with ``from_logits=True``). :func:`with_features` returns a model over
the same layers with two outputs, (logits, top-layer features), for one-pass tracking.
"""

from __future__ import annotations

from typing import Sequence

import keras

from keras_implicit.names import MODELS

__all__ = ["MODELS", "L2Normalization", "make_model", "with_features", "top_layer"]

TOP_LAYER = "logits"
FEATURES_LAYER = "features"


@keras.saving.register_keras_serializable(package="keras_implicit")
class L2Normalization(keras.layers.Layer):
    """``x / max(||x||_2, epsilon)`` over the last axis: features of unit norm.

    Args:
        epsilon: the smallest norm divided by, so that a zero vector stays zero.

    Example:
        >>> keras.ops.convert_to_numpy(L2Normalization()(np.array([[3.0, 4.0]])))
        array([[0.6, 0.8]], dtype=float32)
    """

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)

    def call(self, inputs):
        squared = keras.ops.sum(keras.ops.square(inputs), axis=-1, keepdims=True)
        return inputs * keras.ops.rsqrt(keras.ops.maximum(squared, self.epsilon**2))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _dense_block(x, units, index):
    x = keras.layers.Dense(units, name=f"dense_{index}")(x)
    x = keras.layers.BatchNormalization(name=f"batch_norm_{index}")(x)
    return keras.layers.ReLU(name=f"relu_{index}")(x)


def _conv_block(x, index):
    x = keras.layers.Conv2D(64, 5, padding="same", name=f"conv_{index}")(x)
    x = keras.layers.BatchNormalization(name=f"conv_batch_norm_{index}")(x)
    x = keras.layers.ReLU(name=f"conv_relu_{index}")(x)
    return keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"max_pool_{index}")(x)


def make_model(name: str, input_shape: Sequence[int], num_classes: int, seed: int | None = None) -> keras.Model:
    """One of the paper's networks, built and ready to compile.

    Args:
        name: ``"fc6"`` (6-layer fully connected, MNIST-like data) or ``"c1"`` (convolutional,
            CIFAR-10-like data).
        input_shape: the shape of one example, e.g. ``(28, 28, 1)`` or ``(32, 32, 3)``.
        num_classes: the number of classes (>= 2).
        seed: if given, ``keras.utils.set_random_seed(seed)`` before creating the weights, so the
            initial weights are reproducible.

    Returns:
        A functional ``keras.Model`` returning logits [batch, num_classes]; its layer ``"features"``
        outputs the L2-normalized top features and ``"logits"`` is the top Dense layer.

    Example:
        >>> model = make_model("fc6", (28, 28, 1), 10, seed=0)
        >>> model.get_layer("logits").kernel.shape
        (512, 10)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d <= 0 for d in input_shape):
        raise ValueError(f"input_shape must be positive dimensions, got {input_shape}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if name == "c1" and len(input_shape) != 3:
        raise ValueError(f"c1 needs images [height, width, channels], got input_shape {input_shape}")
    if seed is not None:
        keras.utils.set_random_seed(int(seed))

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if name == "fc6":
        x = keras.layers.Flatten(name="flatten")(x)
        for index in range(1, 6):
            x = _dense_block(x, 512, index)
    else:
        for index in (1, 2):
            x = _conv_block(x, index)
        x = keras.layers.Flatten(name="flatten")(x)
        x = _dense_block(x, 384, 1)
        x = _dense_block(x, 192, 2)
    x = L2Normalization(name=FEATURES_LAYER)(x)
    logits = keras.layers.Dense(int(num_classes), name=TOP_LAYER)(x)
    return keras.Model(inputs, logits, name=name)


def top_layer(model: keras.Model) -> keras.layers.Dense:
    """The top Dense layer (named ``"logits"``, or else the last layer), which must output logits (no
    activation): raises ValueError otherwise."""
    try:
        layer = model.get_layer(TOP_LAYER)
    except ValueError:
        layer = model.layers[-1]
    if not isinstance(layer, keras.layers.Dense):
        raise ValueError(f"the top layer of {model.name!r} is a {type(layer).__name__}, not a Dense layer")
    activation = getattr(layer.activation, "__name__", str(layer.activation))
    if activation != "linear":
        raise ValueError(f"the top layer of {model.name!r} ({layer.name!r}) has activation {activation!r}: the "
                         "losses are computed from logits s = W x + b, so the top Dense layer must have no "
                         "activation (train it with from_logits=True losses)")
    return layer


def with_features(model: keras.Model) -> keras.Model:
    """A model over the same layers (shared weights) returning ``(logits, top-layer features)``.

    One call gives both, so tracking costs one forward pass. ``model`` must be a functional model
    whose top layer is a Dense layer fed by one tensor (as :func:`make_model`'s are).
    """
    if not hasattr(model, "inputs") or not model.inputs:
        raise ValueError("with_features needs a functional (or built Sequential) model with known inputs")
    top = top_layer(model)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [model.outputs[0], top.input], name=f"{model.name}_with_features")
