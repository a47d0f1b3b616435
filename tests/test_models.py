"""keras_implicit.models: the paper's fc6 and c1, normalized top features, the two-output view."""

import keras
import numpy as np
import pytest

from keras_implicit.models import L2Normalization, make_model, top_layer, with_features


def _fc6_parameters(inputs, classes):
    # 5 x (Dense 512 with bias + BatchNorm's gamma, beta, moving mean, moving variance) + top Dense.
    sizes = [inputs] + [512] * 5
    dense = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    return dense + 5 * 4 * 512 + 512 * classes + classes


def _c1_parameters(height, width, channels, classes):
    conv1 = 5 * 5 * channels * 64 + 64 + 4 * 64
    conv2 = 5 * 5 * 64 * 64 + 64 + 4 * 64

    def pooled(n):  # two 'same' poolings with stride 2: ceil(ceil(n / 2) / 2)
        return -(-(-(-n // 2)) // 2)

    flat = pooled(height) * pooled(width) * 64
    return conv1 + conv2 + (flat * 384 + 384 + 4 * 384) + (384 * 192 + 192 + 4 * 192) + 192 * classes + classes


@pytest.mark.parametrize("name, shape, expected", [
    ("fc6", (28, 28, 1), _fc6_parameters(784, 10)),
    ("fc6", (5, 3, 2), _fc6_parameters(30, 10)),
    ("c1", (32, 32, 3), _c1_parameters(32, 32, 3, 10)),
    ("c1", (28, 28, 1), _c1_parameters(28, 28, 1, 10)),
])
def test_architecture_and_parameter_count(name, shape, expected):
    model = make_model(name, shape, 10, seed=0)
    assert model.count_params() == expected
    kinds = [type(layer).__name__ for layer in model.layers]
    assert "Dropout" not in kinds
    assert kinds[-2:] == ["L2Normalization", "Dense"]
    if name == "fc6":
        assert kinds.count("Dense") == 6 and kinds.count("BatchNormalization") == 5
        assert [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)] == [512] * 5 + [10]
    else:
        assert kinds.count("Conv2D") == 2 and kinds.count("MaxPooling2D") == 2
        assert kinds.count("BatchNormalization") == 4
        convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        assert all(c.filters == 64 and c.kernel_size == (5, 5) for c in convs)
        pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
        assert all(p.pool_size == (3, 3) and p.strides == (2, 2) for p in pools)
        assert [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)] == [384, 192, 10]
    assert model.output.shape == (None, 10)


@pytest.mark.parametrize("name, shape", [("fc6", (8, 8, 1)), ("c1", (12, 12, 3))])
def test_features_have_unit_norm_and_feed_the_top_layer(name, shape):
    model = make_model(name, shape, 7, seed=1)
    x = np.random.default_rng(0).normal(size=(9, *shape)).astype(np.float32)
    two = with_features(model)
    for training in (False, True):
        logits, features = (t.numpy() for t in two(x, training=training))
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
        top = top_layer(model)
        np.testing.assert_allclose(logits, features @ top.kernel.numpy() + top.bias.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two(x)[0].numpy(), model(x).numpy(), rtol=1e-6, atol=1e-7)
    # Shared weights: changing the model changes the two-output view.
    top.bias.assign(top.bias.numpy() + 1.0)
    np.testing.assert_allclose(two(x)[0].numpy(), model(x).numpy(), rtol=1e-6, atol=1e-7)


def test_seed_makes_the_initial_weights_reproducible():
    a, b, c = (make_model("fc6", (4, 4, 1), 3, seed=s) for s in (3, 3, 4))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


def test_l2_normalization_layer():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], np.float32)
    out = L2Normalization()(x).numpy()
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])  # no NaN for a zero vector
    assert np.all(np.isfinite(out))
    layer = L2Normalization(epsilon=1e-6, name="n")
    assert L2Normalization.from_config(layer.get_config()).epsilon == 1e-6
    with pytest.raises(ValueError, match="epsilon"):
        L2Normalization(epsilon=0)


def test_save_and_load_round_trip(tmp_path):
    model = make_model("fc6", (4, 4, 1), 3, seed=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).random((5, 4, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6)


@pytest.mark.parametrize("args, message", [
    (("resnet", (28, 28, 1), 10), "unknown model"),
    (("fc6", (28, 0, 1), 10), "positive"),
    (("fc6", (28, 28, 1), 1), "num_classes"),
    (("c1", (784,), 10), "images"),
])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        make_model(*args)


def test_top_layer_must_be_dense():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.ReLU()(keras.layers.Dense(2)(inputs)))
    with pytest.raises(ValueError, match="not a Dense layer"):
        top_layer(model)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "relu"])
def test_top_layer_must_output_logits(activation):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation=activation)(inputs))
    with pytest.raises(ValueError, match=f"has activation '{activation}'"):
        top_layer(model)
    assert top_layer(keras.Model(inputs, keras.layers.Dense(2)(inputs))).activation.__name__ == "linear"
