"""Memory shared by other means than one NumPy base array. The C++
check compares address ranges, not base objects, so two np.frombuffer views of one bytearray, a
memoryview, ctypes buffers and multiprocessing.shared_memory are caught like slices of one array;
a parameter aliasing its own gradient or state, or a parameter of another group, is refused, and
nothing changes."""

import ctypes
import mmap

import numpy as np
import pytest
import optim_db as db
from helpers import digest

import optkern as ok

#: Every class of the optimizer database, with the options under which it keeps every state.
OPTIONS = dict(db.richest())
CLASSES = list(OPTIONS)


def two_views(make_buffer, n=8, overlap=0):
    """Two float32 arrays of n elements over one foreign buffer, the second starting n - overlap
    elements after the first."""
    buf = make_buffer(4 * (2 * n))
    a = np.frombuffer(buf, np.float32, count=n)
    b = np.frombuffer(buf, np.float32, count=n, offset=4 * (n - overlap))
    return buf, a, b


def bytearray_buf(n):
    return bytearray(n)


def ctypes_buf(n):
    return (ctypes.c_char * n)()


def memoryview_buf(n):
    return memoryview(bytearray(n))


def mmap_buf(n):
    return mmap.mmap(-1, n)


BUFFERS = {
    "bytearray": bytearray_buf,
    "ctypes": ctypes_buf,
    "memoryview": memoryview_buf,
    "anonymous-mmap": mmap_buf,
}


@pytest.mark.parametrize("source", BUFFERS)
@pytest.mark.parametrize("overlap", [1, 4, 8])
def test_overlapping_views_of_a_foreign_buffer_refused_as_params(source, overlap):
    _, a, b = two_views(BUFFERS[source], overlap=overlap)
    with pytest.raises(ValueError, match="share"):
        ok.Adam([a, b])


@pytest.mark.parametrize("source", BUFFERS)
def test_adjacent_views_of_a_foreign_buffer_accepted(source):
    _, a, b = two_views(BUFFERS[source], overlap=0)
    opt = ok.SGD([a, b], lr=1.0)
    opt.step([np.ones(8, np.float32), np.full(8, 2.0, np.float32)])
    assert np.array_equal(a, -np.ones(8, np.float32)) and np.array_equal(b, np.full(8, -2.0))


@pytest.mark.parametrize("kind", CLASSES)
def test_grad_over_the_param_memory_by_frombuffer_refused(kind):
    buf = bytearray(32)
    p = np.frombuffer(buf, np.float32)
    p[:] = 1.0
    g = np.frombuffer(buf, np.float32)  # another array object, same bytes
    opt = getattr(ok, kind)([p], **OPTIONS[kind])
    before = digest([p, opt.state_dict()])
    with pytest.raises(ValueError, match="share"):
        opt.step([g])
    assert digest([p, opt.state_dict()]) == before


@pytest.mark.parametrize("kind", CLASSES)
def test_param_aliasing_its_own_state_refused(kind):
    p = np.ones(4, np.float32)
    opt = getattr(ok, kind)([p], **OPTIONS[kind])
    opt.step([np.ones(4, np.float32)])
    name = next(k for k, v in opt.state[p].items() if isinstance(v, np.ndarray))
    opt.state[p][name] = p  # someone points the state at the parameter itself
    before = digest([p])
    with pytest.raises(ValueError, match="share"):
        opt.step([np.ones(4, np.float32)])
    assert digest([p]) == before


def array_states(opt, p):
    return [k for k, v in opt.state[p].items() if isinstance(v, np.ndarray)]


@pytest.mark.parametrize("kind", CLASSES)
def test_grad_aliasing_state_refused(kind):
    p = np.ones(4, np.float32)
    opt = getattr(ok, kind)([p], **OPTIONS[kind])
    opt.step([np.ones(4, np.float32)])
    for name in array_states(opt, p):
        g = opt.state[p][name]
        before = digest([p, opt.state_dict()])
        with pytest.raises(ValueError, match="share"):
            opt.step([g])
        assert digest([p, opt.state_dict()]) == before


def keeps_two_states(kind):
    """Whether a 1-d parameter of ``kind`` keeps two or more state arrays."""
    rule = db.entry(kind).rule
    group = getattr(ok, kind)([np.zeros(1, np.float32)], **OPTIONS[kind]).param_groups[0]
    return len(rule.state_shapes(rule.to_core(group), (4,))) > 1


@pytest.mark.parametrize("kind", [k for k in CLASSES if keeps_two_states(k)])
def test_two_state_buffers_aliased_refused(kind):
    p = np.ones(4, np.float32)
    opt = getattr(ok, kind)([p], **OPTIONS[kind])
    opt.step([np.ones(4, np.float32)])
    first, *others = array_states(opt, p)
    assert others
    for name in others:
        opt.state[p][name] = opt.state[p][first]
        with pytest.raises(ValueError, match="share"):
            opt.step([np.ones(4, np.float32)])


@pytest.mark.parametrize("kind", CLASSES)
def test_state_of_two_params_aliased_refused(kind):
    a, b = np.ones(4, np.float32), np.ones(4, np.float32)
    opt = getattr(ok, kind)([a, b], **OPTIONS[kind])
    opt.step([np.ones(4, np.float32)] * 2)
    for name in array_states(opt, a):
        opt.state[b][name] = opt.state[a][name]
        with pytest.raises(ValueError, match="share"):
            opt.step([np.ones(4, np.float32)] * 2)


@pytest.mark.parametrize("source", BUFFERS)
def test_overlapping_params_across_groups_refused(source):
    _, a, b = two_views(BUFFERS[source], overlap=2)
    opt = ok.Adam([a])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1


def test_param_groups_made_to_overlap_afterwards_refused_at_step():
    buf = bytearray(64)
    a = np.frombuffer(buf, np.float32, count=8)
    b = np.frombuffer(buf, np.float32, count=8, offset=32)
    opt = ok.Adam([{"params": [a]}, {"params": [b]}])
    opt.param_groups[1]["params"] = [np.frombuffer(buf, np.float32, count=8, offset=16)]
    before = digest([a, b, opt.state_dict()])
    with pytest.raises(ValueError, match="share"):
        opt.step([np.ones(8, np.float32)] * 2)
    assert digest([a, b, opt.state_dict()]) == before


def test_shared_memory_segment_views_refused():
    shm_mod = pytest.importorskip("multiprocessing.shared_memory")
    try:
        shm = shm_mod.SharedMemory(create=True, size=64)
    except OSError as e:  # no /dev/shm in this sandbox
        pytest.skip(f"no shared memory here: {e}")
    try:
        a = np.ndarray((8,), np.float32, buffer=shm.buf)
        b = np.ndarray((8,), np.float32, buffer=shm.buf, offset=16)
        with pytest.raises(ValueError, match="share"):
            ok.Adam([a, b])
        del a, b
    finally:
        shm.close()
        shm.unlink()


def test_two_attachments_of_one_shared_memory_segment():
    """Two attachments of one segment are two mappings at different addresses: no address
    comparison can see they are the same memory (as with one file mapped twice). Left alone,
    documented here: the two arrays are accepted, and both see the update."""
    shm_mod = pytest.importorskip("multiprocessing.shared_memory")
    try:
        shm = shm_mod.SharedMemory(create=True, size=32)
    except OSError as e:
        pytest.skip(f"no shared memory here: {e}")
    other = shm_mod.SharedMemory(name=shm.name)
    try:
        a = np.ndarray((8,), np.float32, buffer=shm.buf)
        b = np.ndarray((8,), np.float32, buffer=other.buf)
        a[:] = 0
        ok.SGD([a], lr=1.0).step([np.ones(8, np.float32)])
        assert np.array_equal(b, -np.ones(8, np.float32))
        del a, b
    finally:
        other.close()
        shm.close()
        shm.unlink()


def test_ctypes_array_param_updated_in_place():
    raw = (ctypes.c_float * 6)(*range(6))
    p = np.ctypeslib.as_array(raw)
    ok.SGD([p], lr=1.0).step([np.ones(6, np.float32)])
    assert list(raw) == [float(i - 1) for i in range(6)]


def test_ctypes_readonly_bytes_param_refused():
    p = np.frombuffer(bytes(16), np.float32)  # bytes: read-only
    with pytest.raises(ValueError, match="read-only"):
        ok.Adam([p])


def test_same_foreign_buffer_as_grads_of_two_params_accepted():
    """Gradients are only read: two gradients over one buffer are fine."""
    buf = bytearray(32)
    g = np.frombuffer(buf, np.float32)
    g[:] = 1.0
    g2 = np.frombuffer(buf, np.float32)
    a, b = np.zeros(8, np.float32), np.zeros(8, np.float32)
    ok.SGD([a, b], lr=1.0).step([g, g2])
    assert np.array_equal(a, -np.ones(8, np.float32)) and np.array_equal(a, b)


def test_file_mapped_twice_is_not_detected(tmp_path):
    """One file mapped twice gives two address ranges; nothing but the kernel knows they are one
    file. Left alone (documented): the optimizer takes both, and the file holds the last write."""
    f = tmp_path / "p.bin"
    np.zeros(4, np.float32).tofile(f)
    a = np.memmap(f, np.float32, "r+", shape=(4,))
    b = np.memmap(f, np.float32, "r+", shape=(4,))
    assert not np.shares_memory(a, b) or a.ctypes.data == b.ctypes.data
    opt = ok.SGD([a, b], lr=1.0)
    opt.step([np.ones(4, np.float32), np.ones(4, np.float32)])
    assert np.all(np.asarray(a) <= -1.0) and np.array_equal(np.asarray(a), np.asarray(b))
