"""benchmarks.traffic, the counted model of the Triton layer's kernels (issue #19)."""

from __future__ import annotations

import pytest

from benchmarks import traffic
from benchmarks.shapes import NAMED


def test_launch_order_models():
    # 2-D grid, rows fastest; grouped: GROUP rows take every column before the next group
    assert traffic._order(3, 2, False, 8) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert traffic._order(3, 2, True, 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1)]
    # a panel is read when neither the running wave nor the one before used it
    progs = [(0, 0), (1, 0), (0, 1), (1, 1)]
    one = lambda key: 1.0  # noqa: E731
    assert traffic._panel_bytes(progs, lambda p: p[0], lambda p: p[1], one, one, wave=2) == 4.0
    assert traffic._panel_bytes(progs, lambda p: p[0], lambda p: p[1], one, one, wave=1) == 6.0


@pytest.mark.parametrize("name", ["clip-train", "connector-train"])
def test_schedule_counts(name):
    shape = NAMED[name]
    before = traffic.layer_launches(shape, traffic.SCHEDULES["before"])
    after = traffic.layer_launches(shape, traffic.SCHEDULES["after"])
    for part in ("fwd", "bwd"):
        # the same GEMM FLOPs in both schedules, 3x the forward's over the whole call
        gemm = lambda ls: sum(x.flops for x in ls if "fc" in x.name)  # noqa: E731
        assert gemm(before[part]) == pytest.approx(gemm(after[part]))
    total = lambda d: sum(x.flops for ls in d.values() for x in ls if "fc" in x.name)  # noqa: E731
    assert total(after) == pytest.approx(shape.flops("fwd+bwd"))
    byts = lambda d: sum(x.bytes for ls in d.values() for x in ls)  # noqa: E731
    assert byts(after) < byts(before)
    act = lambda d: sum(x.act_evals for ls in d.values() for x in ls)  # noqa: E731
    # act' once per element of [T*k, hidden] after; once per loaded element in dX and dW before
    assert act(after) == shape.tokens * shape.top_k * shape.hidden
    assert act(before) > 8 * act(after)


def test_cli(capsys):
    assert traffic.main(["--shapes", "clip-train", "--schedule", "after"]) == 0
    out = capsys.readouterr().out
    assert "clip-train [after]" in out and "predicted: fwd" in out and "of dense" in out
    assert traffic.main(["--shapes", "mixtral"]) == 2
    assert traffic.main(["--schedule", "nonesuch"]) == 2
