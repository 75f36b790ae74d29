"""The cost model of ops: predictions from measured op times, by kind and rows."""

from __future__ import annotations

import pytest

from qllm.kernel.costs import OpCosts, bucket
from qllm.kernel.runtime.ops import OpKind
from qllm.kernel.view import CostView


def test_rows_are_bucketed_by_the_executors_padding():
    assert [bucket(n) for n in (1, 4, 5, 8, 9, 130)] == [4, 4, 8, 8, 12, 132]
    with pytest.raises(ValueError, match="at least one row"):
        bucket(0)


def test_nothing_measured_predicts_nothing():
    costs = OpCosts()
    assert costs.predict(OpKind.EXPERT, 3) is None and not costs.known(OpKind.EXPERT)
    costs.record(OpKind.EXPERT, 3, 0.002)
    assert costs.known(OpKind.EXPERT) and costs.predict(OpKind.ATTENTION, 3) is None


def test_a_bucket_predicts_its_smoothed_mean():
    costs = OpCosts(smoothing=0.5)
    costs.record(OpKind.EXPERT, 2, 0.004)
    assert costs.predict(OpKind.EXPERT, 1) == pytest.approx(0.004)
    costs.record(OpKind.EXPERT, 4, 0.002)  # same bucket: the mean moves halfway
    assert costs.predict(OpKind.EXPERT, 3) == pytest.approx(0.003)
    assert costs.snapshot() == {"expert": {4: {"mean_s": pytest.approx(0.003), "count": 2}}}


def test_between_buckets_it_interpolates_and_past_them_it_extends_the_slope():
    costs = OpCosts()
    costs.record(OpKind.ATTENTION, 4, 0.010)
    assert costs.predict(OpKind.ATTENTION, 40) == pytest.approx(0.100)  # one point: proportional
    costs.record(OpKind.ATTENTION, 20, 0.018)
    assert costs.predict(OpKind.ATTENTION, 12) == pytest.approx(0.014)
    assert costs.predict(OpKind.ATTENTION, 36) == pytest.approx(0.026)
    assert costs.predict(OpKind.ATTENTION, 1) == pytest.approx(0.010)


def test_more_rows_never_predict_less_time():
    costs = OpCosts()
    costs.record(OpKind.ROUTER, 4, 0.003)
    costs.record(OpKind.ROUTER, 8, 0.001)  # a noisy fast measurement of more rows
    costs.record(OpKind.ROUTER, 16, 0.005)
    predictions = [costs.predict(OpKind.ROUTER, n) for n in range(1, 24)]
    assert predictions == sorted(predictions) and predictions[7] == pytest.approx(0.003)


def test_policies_read_the_model_through_a_view_without_recording():
    costs = OpCosts()
    costs.record(OpKind.HEAD, 1, 0.001)
    view = CostView(costs)
    assert view.predict(OpKind.HEAD, 1) == pytest.approx(0.001) and view.known(OpKind.HEAD)
    assert not hasattr(view, "record")
