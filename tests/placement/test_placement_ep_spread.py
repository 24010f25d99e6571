"""Expert-parallel members are priced at the expected slowest, not the average: how many of
its experts a step touches varies per member, and the step waits for the busiest. The
references are independent: a simulation of uniform routing (numpy) and textbook values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlxdist.placement.cost import Profile, expected_max
from mlxdist.placement.model import load_model


def simulate(experts: int, k: int, members: int, tokens: int, runs: int = 4000) -> tuple[float, float]:
    """(standard deviation of one member's distinct experts touched, expected maximum over
    the members) over `runs` routings: each token picks k distinct experts at random,
    member j owning experts [j E/m, (j+1) E/m)."""
    rng = np.random.default_rng(members * 100 + tokens)
    picks = np.argpartition(rng.random((runs, tokens, experts)), k, axis=-1)[..., :k]
    touched = np.zeros((runs, experts), bool)
    for t in range(tokens):
        np.put_along_axis(touched, picks[:, t, :], True, axis=1)
    counts = touched.reshape(runs, members, experts // members).sum(-1)
    return float(counts[:, 0].std()), float(counts.max(1).mean())


@pytest.mark.parametrize("members,tokens", [(2, 1), (2, 4), (4, 1), (4, 16), (8, 2), (8, 16)])
def test_the_spread_and_the_slowest_member_against_simulated_routing(members, tokens):
    """DeepSeek-R1's 256 experts, 8 per token: the count's spread matches simulated routing
    within 4 %, and the expected slowest member's count lies within 12 % under the
    simulated maximum (independence makes it a little low) and far above the average the
    planner used before (up to 2.6 x under it at 8 members)."""
    p = Profile(load_model("deepseek-r1"))
    assert (p.E, p.k) == (256, 8)
    owned = p.E // members
    sd, worst = simulate(p.E, p.k, members, tokens)
    assert p.expert_spread(tokens, owned) == pytest.approx(sd, rel=0.04)
    mean = p.distinct_experts(tokens, owned)
    est = expected_max([mean] * members, [p.expert_spread(tokens, owned)] * members)
    assert 0.88 * worst <= est <= 1.02 * worst
    assert est > mean + 0.3 * (worst - mean)  # most of the way from the average to the truth


def test_expected_max_of_normals_against_textbook_values():
    """Two alike: mu + sigma / sqrt(pi); eight standard: 1.4236 (tables of normal order
    statistics); no spread: the largest mean; one far ahead: itself."""
    assert expected_max([3.0, 3.0], [2.0, 2.0]) == pytest.approx(3.0 + 2.0 / math.sqrt(math.pi), rel=1e-9)
    assert expected_max([0.0] * 8, [1.0] * 8) == pytest.approx(1.4236, abs=2e-4)
    assert expected_max([1.0, 5.0, 2.0], [0.0, 0.0, 0.0]) == 5.0
    assert expected_max([100.0, 0.0], [1.0, 1.0]) == pytest.approx(100.0, rel=1e-9)
