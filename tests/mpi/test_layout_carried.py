"""The flat layout of optkern.distributed (sharded checkpoints, ZeRO) keeps a rule's carried
numbers (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) with the step count of each group.
In-process, no mpiexec; skipped without mpi4py (optkern.distributed imports it)."""

import numpy as np
import pytest

import optkern as ok

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'optkern[mpi]')")
from optkern.distributed._layout import Layout, flat_state, state_from_flat  # noqa: E402

CARRIED = [r for r in ok.registry.rules() if r.carried]


@pytest.mark.parametrize("rule", CARRIED, ids=[r.cls for r in CARRIED])
def test_sharded_layout_keeps_carried_numbers(rule):
    shapes = [[(3, 4), (5,)], [(7,)]]
    layout = Layout(shapes)
    rng = np.random.default_rng(0)
    params = [[rng.standard_normal(s).astype(np.float32) for s in g] for g in shapes]
    opt = getattr(ok, rule.cls)([{"params": params[0]}, {"params": params[1], "lr": 0.1}])
    for _ in range(3):
        opt.step([rng.standard_normal(p.shape).astype(np.float32) for g in params for p in g])
    sd = opt.state_dict()
    names = [c.name for c in rule.carried]
    meta, flats = flat_state(layout, sd, 0, layout.total)
    assert meta[1]["numbers"] == {n: sd["state"][2][n] for n in names}
    back = state_from_flat(layout, meta, flats)
    for i, s in sd["state"].items():
        assert all(back[i][n] == s[n] for n in names)
        for st in rule.states:
            np.testing.assert_array_equal(back[i][st.name], s[st.name])
    sd["state"][1][names[0]] += 1e-3  # unlike the group's first parameter: refused
    with pytest.raises(ValueError, match="carried numbers"):
        flat_state(layout, sd, 0, layout.total)


def test_sharded_layout_refuses_factored_state():
    """Adafactor's row and column factors are not shaped like their parameters: an element-wise
    shard cannot hold them, and flat_state says so (a consolidated checkpoint can)."""
    shapes = [[(3, 4), (5,)]]
    layout = Layout(shapes)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes[0]]
    opt = ok.Adafactor(params)
    opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    with pytest.raises(ValueError, match="'row_var' has shape .* sharded layout cannot hold"):
        flat_state(layout, opt.state_dict(), 0, layout.total)
