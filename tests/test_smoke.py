"""End-to-end smoke test, run once per ISA by CI with OPTKERN_FORCE_ISA set (the whole suite runs
once, and test_isa.py covers every ISA's kernels in one process): the forced ISA is the one in
use, and every optimizer class steps a few times close to its float64 reference."""

import os

import numpy as np
import pytest
from helpers import gradient_sequence
from reference import Reference

import optkern as ok

pytestmark = pytest.mark.smoke


def test_forced_isa_is_active():
    forced = os.environ.get("OPTKERN_FORCE_ISA", "").strip().lower()
    assert ok.active_isa() == (forced or ok.available_isas()[-1])


@pytest.mark.parametrize("rule", ok.registry.rules(), ids=lambda r: r.cls)
def test_every_class_steps_on_the_active_isa(rule):
    p0 = (np.random.default_rng(0).standard_normal(1037) * 0.5).astype(np.float32)
    p = p0.copy()
    opt = getattr(ok, rule.cls)([p])
    ref = Reference(rule.cls, p0)
    for g in gradient_sequence(1037, 10, seed=1, scale=0.1):
        opt.step([g], max_grad_norm=100.0)
        ref.step(g)
    np.testing.assert_allclose(p, ref.p, rtol=1e-5, atol=1e-6)
