"""Shared test setup: quiet TensorFlow, and the two panel paths (fused op, pure TensorFlow)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

PANEL_PATHS = ("tf", "op")


def _op_available() -> bool:
    from keras_implicit import _op

    with _op.force_path("op"):
        try:
            return _op.panel_op() is not None
        except RuntimeError:
            return False


@pytest.fixture(params=PANEL_PATHS)
def panel_path(request):
    """Runs a test once on the pure-TensorFlow path and once on the fused op.

    The op path is skipped when the op is not built, unless KERAS_IMPLICIT_REQUIRE_OP=1 (CI sets it),
    where a missing op fails the test.
    """
    from keras_implicit import _op

    path = request.param
    if path == "op" and not _op_available():
        if os.environ.get("KERAS_IMPLICIT_REQUIRE_OP") == "1":
            pytest.fail("KERAS_IMPLICIT_REQUIRE_OP=1 but the fused op could not be loaded")
        pytest.skip("the fused op is not built (make -C custom_ops)")
    with _op.force_path(path):
        yield path
