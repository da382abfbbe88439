"""Per-head precision: bfloat16 weights and int8 dynamic quantization stay close to float32."""
from __future__ import annotations

import numpy as np
import pytest

from heads.base import Doc
from heads.engine import pipe
from heads.loading import load_head

TEXTS = [f"Document {i}: " + " ".join(["markets", "football", "election", "chips", "film"][(i * k) % 5]
                                      for k in range(3 + i % 17)) for i in range(40)]


def probabilities(head):
    results = pipe(head, [Doc(str(i), t) for i, t in enumerate(TEXTS)])
    labels = list(results[0].rows[0]["scores"])
    return np.array([[r.rows[0]["scores"][l] for l in labels] for r in results])


@pytest.fixture(scope="module")
def float32(tiny_models):
    return probabilities(load_head("t", "classification", tiny_models["classification"]))


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.03), ("int8", 0.03)])
def test_reduced_precision_is_close_to_float32(tiny_models, float32, dtype, tolerance):
    head = load_head("t", "classification", tiny_models["classification"], dtype=dtype)
    if dtype == "int8":
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

        assert any(isinstance(m, DynamicQuantizedLinear) for m in head.model.modules())
    else:
        assert next(head.model.parameters()).dtype.is_floating_point and "bfloat16" in str(
            next(head.model.parameters()).dtype)
    probs = probabilities(head)
    assert np.abs(probs - float32).max() < tolerance
    assert not np.array_equal(probs, float32)  # it really ran at another precision
    agreement = (probs.argmax(1) == float32.argmax(1)).mean()
    assert agreement >= 0.9, agreement
