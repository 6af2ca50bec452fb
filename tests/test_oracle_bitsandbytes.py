"""int8 state against bitsandbytes' own blockwise quantisation on CPU (the oracle lane installs
bitsandbytes): the same dynamic maps, the same absmax per block of 256, the same values for the
same codes; optkern's codes are the nearest code of the map, bitsandbytes' CPU search picks a
neighbour of it for a few elements per thousand (each checked to be no nearer)."""

import numpy as np
import pytest

import optkern as ok
from optkern import _lowbits

bnb_functional = pytest.importorskip("bitsandbytes.functional")
torch = pytest.importorskip("torch")

ISAS = ok.available_isas()


def blocks_of(rng, n, nonnegative):
    x = rng.standard_normal(n).astype(np.float32)
    # blocks over many scales, with ties, exact zeros and the block maximum negative
    x *= np.repeat(np.exp(rng.uniform(-20, 5, -(-n // 256))), 256)[:n].astype(np.float32)
    x[1000:1100] = x[1000]
    x[3000:3010] = 0.0
    x[5 * 256 : 5 * 256 + 3] = -1e3
    return np.abs(x) if nonnegative else x


@pytest.mark.parametrize("nonnegative", [False, True], ids=["signed", "unsigned"])
def test_the_dynamic_maps_are_bitsandbytes(nonnegative):
    code = bnb_functional.create_dynamic_map(signed=not nonnegative).numpy()
    assert np.array_equal(ok._core.dynamic_map(nonnegative=nonnegative), code)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nonnegative", [False, True], ids=["signed", "unsigned"])
def test_quantize_blockwise_against_bitsandbytes(nonnegative, isa):
    rng = np.random.default_rng(1)
    n = 256 * 300 + 77  # a partial last block
    x = blocks_of(rng, n, nonnegative)
    code = bnb_functional.create_dynamic_map(signed=not nonnegative)
    q, qs = bnb_functional.quantize_blockwise(torch.from_numpy(x), code=code, blocksize=256)
    assert qs.blocksize == _lowbits.BLOCK
    theirs, absmax_theirs = q.numpy(), qs.absmax.numpy()

    codes = np.empty(n, np.uint8)
    absmax = np.empty(-(-n // 256), np.float32)
    ok._core.quantize_blockwise(x, codes, absmax, nonnegative=nonnegative, isa=isa)
    assert np.array_equal(absmax, absmax_theirs)

    # the same codes but where bitsandbytes' pick is not the nearest; ours always is
    cmap = code.numpy()
    scaled = x / np.repeat(absmax, 256)[:n]
    ours_err = np.abs(cmap[codes] - scaled)
    theirs_err = np.abs(cmap[theirs] - scaled)
    assert np.all(ours_err <= np.min(np.abs(cmap[None, :] - scaled[:, None]), axis=1))
    differ = codes != theirs
    assert differ.mean() < 0.01
    assert np.all(ours_err[differ] <= theirs_err[differ])

    # dequantisation: bitsandbytes' values for its own codes, bit for bit
    values = np.empty(n, np.float32)
    ok._core.dequantize_blockwise(theirs, absmax_theirs, values, nonnegative=nonnegative, isa=isa)
    want = bnb_functional.dequantize_blockwise(q, qs).numpy()
    assert np.array_equal(values.view(np.uint32), want.view(np.uint32))


def test_an_all_zero_block_stays_zero():
    """bitsandbytes divides by a zero absmax (NaN, then code -0.99); optkern keeps zeros."""
    codes, absmax = _lowbits.quantize(np.zeros(300, np.float32), False)
    assert np.all(_lowbits.dequantize(codes, absmax, False) == 0.0)
