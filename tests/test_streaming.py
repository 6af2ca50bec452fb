"""Streaming calls: an update whose operands exceed the driver's threshold (32 MiB) runs the
kernels of the rules with a division per element in pieces, prefetching ahead. The pieces never
change a result: every option set of every rule, in every element type with a compiled kernel and
on every ISA, gives the same bits with the pieces forced on every call and with them off, on one
thread and on two with chunks cut through the tensors; and a real call above the threshold gives
the bits of the same update cut into calls below it.
"""

import numpy as np
import pytest
from golden import placed
from helpers import THREAD_TEST_SIZES, bits
from optim_db import CASES, case_id

import optkern as ok

ISAS = ok.available_isas()
OFF = 1 << 62
FACTORED = {r.cls for r in ok.registry.rules() if r.factored}
HAS_STATE = {r.cls for r in ok.registry.rules() if r.states}
TAKES_INT8 = {r.cls for r in ok.registry.rules() if r.states and all(st.int8 for st in r.states)}
DEFAULT_MIN_PER_THREAD = ok._core._testing.min_elements_per_thread()


@pytest.fixture(autouse=True)
def _restore():
    yield
    ok._core._testing.set_streaming_call_bytes(32 << 20)
    ok._core._testing.set_chunk_elements(0)
    ok._core._testing.set_min_elements_per_thread(DEFAULT_MIN_PER_THREAD)


def _bf16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return ml_dtypes.bfloat16


def run(name, hp, isa, dtype, state_dtype, options, streaming_bytes, threads=1, chunk=0, steps=4):
    """The bits of every parameter and state array after ``steps`` steps over tensors of
    THREAD_TEST_SIZES (5000 and 100003 elements hold several pieces; the others are shorter than
    the prefetch distance)."""
    ok._core._testing.set_streaming_call_bytes(streaming_bytes)
    ok._core._testing.set_chunk_elements(chunk)
    ok.set_num_threads(threads)
    rng = np.random.default_rng(7)
    params = [placed(rng.standard_normal(n), i % 2, dtype) for i, n in enumerate(THREAD_TEST_SIZES)]
    kw = dict(options) if state_dtype == "float32" else {"state_dtype": state_dtype, **options}
    opt = getattr(ok, name)(params, **hp, **kw)
    opt._isa = isa
    for _ in range(steps):
        opt.step([rng.standard_normal(n).astype(np.float32) for n in THREAD_TEST_SIZES])
    return [bits(p) for p in params] + [
        bits(v)
        for p in params
        if p in opt.state
        for v in opt.state[p].values()
        if isinstance(v, np.ndarray)
    ]


def types(name):
    """(parameter type, state_dtype, options): the compiled combinations, and the staged ones
    (int8 state, master weights, stochastic rounding), which prefetch blocks ahead instead."""
    out = [("float32", "float32", {}), ("float64", "float32", {})]
    if name not in FACTORED:
        out.append(("bfloat16", "float32", {}))
        if name in HAS_STATE:
            out.append(("float32", "bfloat16", {}))
        out.append(("bfloat16", "float32", {"master_weights": True}))
        out.append(("bfloat16", "float32", {"stochastic_rounding": True}))
    if name in TAKES_INT8:
        out += [("float32", "int8", {}), ("bfloat16", "int8", {})]
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pieces_change_no_bit(case, isa):
    name, hp = case
    ok._core._testing.set_min_elements_per_thread(1)
    for ptype, state, options in types(name):
        dtype = _bf16() if ptype == "bfloat16" else np.dtype(ptype)
        whole = run(name, hp, isa, dtype, state, options, OFF)
        assert run(name, hp, isa, dtype, state, options, 0) == whole, (ptype, state, options)
        for chunk in (640, 4096):  # ranges shorter and longer than the prefetch distance
            got = run(name, hp, isa, dtype, state, options, 0, threads=2, chunk=chunk)
            assert got == whole, (ptype, state, options, chunk)


def test_threshold_is_the_calls_bytes():
    """A real streaming call (Adam, 1.25M float32 elements: 35 MB of operands) against the same
    update in five calls of 250K elements (7 MB each), below the threshold."""
    assert ok._core._testing.streaming_call_bytes() == 32 << 20
    rng = np.random.default_rng(1)
    n = 1_250_000
    p_big = rng.standard_normal(n).astype(np.float32)
    pieces = [p_big[i : i + 250_000].copy() for i in range(0, n, 250_000)]
    big = ok.Adam([p_big], lr=1e-2)
    small = [ok.Adam([q], lr=1e-2) for q in pieces]
    for _ in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        big.step([g])
        for k, opt in enumerate(small):
            opt.step([g[k * 250_000 : (k + 1) * 250_000]])
    assert bits(p_big) == bits(np.concatenate(pieces))
    m_big = big.state[p_big]["exp_avg_sq"]
    assert bits(m_big) == bits(
        np.concatenate([o.state[q]["exp_avg_sq"] for o, q in zip(small, pieces)])
    )
