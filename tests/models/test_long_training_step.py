"""A graph-mode training step of the reference model at 128K tokens.

Only at this length does each attention layer loop over its heads in the
reversible backward pass, and only when a step's estimated memory is near
the machine's does TensorFlow's graph optimizer rewrite sums inside loops
into temporary variables (which failed at run time with an
AlreadyExistsError when a head's input gradient was a sum of two). Short
tests force the head loop and compare its gradients with autodiff
(tests/layers/test_fused_attention_backward.py); this one runs the real
thing end to end.
"""

import importlib
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_graph_mode_step_at_128k_tokens(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    train_step = importlib.import_module("train_step")
    length = 131072
    model = train_step.build("reformer", length, jit=False)
    x, y = train_step.batch("reformer", length)
    before = [w.copy() for w in model.get_weights()]
    loss = float(model.train_on_batch(x, y))
    assert np.isfinite(loss)
    # Random bytes: the loss starts near log(vocabulary size).
    assert abs(loss - np.log(model.backbone.vocabulary_size)) < 1.0, loss
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]
    assert sum(changed) > len(changed) // 2
