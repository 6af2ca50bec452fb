"""optkern.torch under views, strides and storage changes: the NumPy views it caches are reused
only while a tensor's address, shape, strides and dtype are the ones they were made from, so a
parameter, gradient or state tensor changed in place (``t_()``, ``p.data = p.data.view(...)``,
``set_``, ``.data =``) is stepped where it now is (through a contiguous copy if it is no longer
contiguous, by torch's own step if the kernels cannot serve it), or refused with an error naming
it, never through a stale view. Also: 0-d parameters step as torch.optim steps them, and a
gradient that shares memory with its parameter (``p.grad = p.data``) is read as torch reads it."""

import warnings

import pytest

torch = pytest.importorskip("torch")
import optkern.torch as okt  # noqa: E402

#: every class of optkern.torch, with a small lr (the tests compare runs, not values)
CLASSES = sorted(okt.RULES)
TORCH_TWINS = [n for n in CLASSES if okt.RULES[n].torch_name is not None and n != "Nesterov"]
# the classes that take dense gradients (SparseAdam takes sparse ones only, as torch's): a 0-d
# parameter's gradient is dense
DENSE = [n for n in CLASSES if not okt.RULES[n].sparse_only]


def make(name, params, **kw):
    cls = getattr(okt, name)
    return cls(params, lr=kw.pop("lr", 1e-2), **kw)


def twin(name, params, **kw):
    return getattr(torch.optim, name)(params, lr=kw.pop("lr", 1e-2), **kw)


def _param(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, generator=g))


def _grad(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _run_both(edit, name="SGD", steps=3, **kw):
    """The same parameter edited the same way under optkern.torch and torch.optim: the values
    must match (bitwise for SGD, closely otherwise)."""
    out = []
    for maker in (make, twin):
        p = _param((4, 6))
        opt = maker(name, [p], **kw)
        for t in range(steps):
            if t == 1:
                with torch.no_grad():
                    edit(p)
            p.grad = _grad(tuple(p.shape), seed=t)
            opt.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-7)
    return out[0]


# -- the parameter's layout changes under the cache ------------------------------------------------

SAME_MEMORY_EDITS = {
    "view to a new shape": lambda p: setattr(p, "data", p.data.view(6, 4)),
    "view flattened": lambda p: setattr(p, "data", p.data.view(-1)),
    "unsqueezed in place": lambda p: p.data.unsqueeze_(0),
    "a contiguous slice": lambda p: setattr(p, "data", p.data.view(-1)[6:18].view(3, 4)),
    "set_ at an offset": lambda p: p.data.set_(p.data.untyped_storage(), 4, (5, 4), (4, 1)),
    "resized smaller": lambda p: p.data.resize_(3, 5),
    "a clone": lambda p: setattr(p, "data", p.data.clone()),
    "transposed then made contiguous": lambda p: setattr(p, "data", p.data.t().contiguous()),
}


@pytest.mark.parametrize("edit", list(SAME_MEMORY_EDITS), ids=str)
def test_parameter_reshaped_under_the_cache_steps_like_torch(edit):
    _run_both(SAME_MEMORY_EDITS[edit])


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Adagrad"])
def test_state_of_the_old_shape_is_refused_not_misread(name):
    p = _param((4, 6))
    opt = make(name, [p]) if name != "SGD" else make(name, [p], momentum=0.9)
    p.grad = _grad((4, 6))
    opt.step()
    with torch.no_grad():
        p.data = p.data.view(6, 4)
    p.grad = _grad((6, 4))
    before = p.detach().clone()
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)


CHANGED_EDITS = {
    "transposed in place": lambda p: p.t_(),
    "a transposed view": lambda p: setattr(p, "data", p.data.t()),
    "every other row": lambda p: setattr(p, "data", p.data[::2]),
    "as_strided_": lambda p: p.as_strided_((4, 3), (6, 2)),
    "reinterpreted as float16 pairs": lambda p: setattr(p, "data", p.data.view(torch.float16)),
    "cast to bfloat16": lambda p: setattr(p, "data", p.data.to(torch.bfloat16)),
    "cast to float64": lambda p: setattr(p, "data", p.data.double()),
}


@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("edit", list(CHANGED_EDITS), ids=str)
def test_parameter_changed_to_a_layout_the_kernels_cannot_take_steps_as_torch(edit, name):
    """A strided parameter is stepped through a contiguous copy; one of another dtype the kernels
    take by the kernels (float64 and bfloat16 here), else by torch's own step: what torch.optim
    gives, but where torch refuses a bfloat16 parameter with its float32 state. Where the edit changed the parameter's shape,
    both refuse (the state has the old shape): optkern with a ValueError naming it before
    anything changes, torch with a RuntimeError from its arithmetic."""
    out = []
    for maker in (make, twin):
        p = _param((4, 6))
        opt = maker(name, [p], momentum=0.9) if name == "SGD" else maker(name, [p])
        p.grad = _grad((4, 6))
        opt.step()
        with torch.no_grad():
            CHANGED_EDITS[edit](p)
        for t in range(2):
            g = _grad(tuple(p.shape), seed=2 + t)
            p.grad = g.to(p.dtype)
            before = p.detach().clone()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", okt.TorchFallbackWarning)
                    opt.step()
                err = None
            except (RuntimeError, ValueError) as e:
                err = e
                break
        out.append((err, p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
        if maker is make:
            ours_before = before
    if tuple(p.shape) != (4, 6):
        assert out[0][0] is not None and out[1][0] is not None  # both refuse
        if isinstance(out[0][0], ValueError):  # the kernels': before anything changed
            assert "has shape (4, 6)" in str(out[0][0])
            raw = [t.contiguous().view(-1).view(torch.uint8) for t in (out[0][1], ours_before)]
            assert torch.equal(*raw)
        else:  # torch's own step (the dtype): its error
            assert type(out[0][0]) is type(out[1][0])
        return
    if edit == "cast to bfloat16" and out[1][0] is not None:
        # torch's Adam refuses a bfloat16 parameter with its float32 state (its lerp takes one
        # dtype); the kernels step it, the state kept in float32 (optkern's state_dtype)
        assert out[0][0] is None and p.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for v in out[0][2].values())
        assert torch.isfinite(out[0][1]).all()
        return
    assert type(out[0][0]) is type(out[1][0])
    raw = [t.contiguous().view(-1).view(torch.uint8) for t in (out[0][1], out[1][1])]
    if p.dtype == torch.float32:
        torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-6, atol=1e-7)
    else:
        assert out[0][0] is not None or torch.equal(*raw)  # torch's own step: bit for bit
    for k, v in out[1][2].items():
        torch.testing.assert_close(out[0][2][k], v, rtol=1e-6, atol=1e-7)


# -- the gradient changes under the cache ----------------------------------------------------------


def test_a_reused_gradient_transposed_in_place_is_read_where_it_now_is():
    out = []
    for maker in (make, twin):
        p = _param((4, 4))
        opt = maker("SGD", [p])
        p.grad = _grad((4, 4))
        opt.step()
        p.grad.t_()  # the same gradient object, same address: a cached view would be stale
        opt.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_reused_gradient_whose_data_is_replaced_is_read_anew(name):
    ps = []
    for maker in (make, twin):
        p = _param((3, 5))
        opt = maker(name, [p])
        p.grad = _grad((3, 5))
        opt.step()
        p.grad.data = _grad((3, 5), seed=9)  # the same gradient object, new memory
        opt.step()
        ps.append(p.detach().clone())
    torch.testing.assert_close(ps[0], ps[1], rtol=1e-6, atol=1e-7)


def test_a_gradient_viewed_from_a_larger_tensor_steps_like_torch():
    big = torch.randn(100)
    out = []
    for maker in (make, twin):
        p = _param((2, 3))
        opt = maker("Adam", [p])
        for t in range(3):
            p.grad = big[10 * t : 10 * t + 6].view(2, 3)
            opt.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad", "RMSprop"])
def test_gradient_that_is_the_parameter_itself_steps_as_torch(name):
    out = []
    for maker in (make, twin):
        p = _param((3, 4))
        opt = maker(name, [p])
        for _ in range(3):
            p.grad = p.data  # torch allows it: the step reads the parameter as its gradient
            opt.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-7)


def test_gradient_overlapping_part_of_the_parameter_reads_it_before_the_update():
    base = torch.randn(12)
    p = torch.nn.Parameter(base[:8].view(2, 4))  # shares base's memory
    opt = make("SGD", [p], lr=0.5)
    p.grad = base[4:12].view(2, 4)  # overlaps the parameter's second half
    g = p.grad.clone()
    expected = p.detach() - 0.5 * g
    opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


# -- state tensors changed under the cache ---------------------------------------------------------

STATE_EDITS = {
    ".data replaced": lambda t: setattr(t, "data", torch.full_like(t, 0.25)),
    "filled in place": lambda t: t.fill_(0.25),
    "a new tensor object": None,  # replaced in the state dict: see the test
}


@pytest.mark.parametrize("edit", list(STATE_EDITS), ids=str)
def test_state_tensor_changed_between_steps_is_used_as_it_now_is(edit):
    out = []
    for maker in (make, twin):
        p = _param((3, 4))
        opt = maker("Adam", [p])
        p.grad = _grad((3, 4))
        opt.step()
        st = opt.state[p]
        if STATE_EDITS[edit] is None:
            st["exp_avg"] = torch.full_like(st["exp_avg"], 0.25)
        else:
            STATE_EDITS[edit](st["exp_avg"])
        p.grad = _grad((3, 4), seed=5)
        opt.step()
        out.append((p.detach().clone(), opt.state[p]["exp_avg"].clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-6, atol=1e-7)


def test_state_tensor_reshaped_in_place_is_refused_not_misread():
    p = _param((3, 4))
    opt = make("Adam", [p])
    p.grad = _grad((3, 4))
    opt.step()
    opt.state[p]["exp_avg"].data = opt.state[p]["exp_avg"].data.view(4, 3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_state_step_replaced_by_a_python_number_is_taken():
    p = _param((3,))
    opt = make("Adam", [p])
    p.grad = _grad((3,))
    opt.step()
    opt.state[p]["step"] = 7
    opt.step()
    assert float(opt.state[p]["step"]) == 8.0


def test_parameter_storage_cannot_be_freed_under_the_cached_view():
    p = _param((3, 4))
    opt = make("SGD", [p])
    p.grad = _grad((3, 4))
    opt.step()
    # torch marks a storage with a NumPy view as not resizable: it cannot be freed (as FSDP
    # frees parameters between uses) under optkern's view, so the view never dangles
    with pytest.raises(RuntimeError, match="not resizable"):
        p.data.untyped_storage().resize_(0)
    before = p.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before - 1e-2 * p.grad, rtol=0, atol=1e-7)


# -- 0-d parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in TORCH_TWINS if n in DENSE])
def test_zero_dim_parameter_steps_as_torch(name):
    out = []
    for maker in (make, twin):
        p = torch.nn.Parameter(torch.tensor(1.5))  # CLIP's logit_scale, a temperature
        q = _param((3,))
        opt = maker(name, [p, q])
        for t in range(4):
            p.grad = torch.tensor(0.3 - 0.2 * t)
            q.grad = _grad((3,), seed=t)
            opt.step()
        out.append((p.detach().clone(), q.detach().clone(), opt.state_dict()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)
    assert out[0][0].shape == ()
    for k, v in out[1][2]["state"].get(0, {}).items():  # torch's layout: 0-d buffers
        if isinstance(v, torch.Tensor) and k != "step":
            assert out[0][2]["state"][0][k].shape == v.shape, k


@pytest.mark.parametrize("name", DENSE)
def test_zero_dim_parameter_steps_as_one_element(name):
    """Every class: a 0-d parameter steps exactly as a 1-element one."""
    scalar = torch.nn.Parameter(torch.tensor(0.75))
    vector = torch.nn.Parameter(torch.tensor([0.75]))
    opts = [make(name, [scalar]), make(name, [vector])]
    for t in range(3):
        scalar.grad = torch.tensor(0.1 * (t + 1))
        vector.grad = torch.tensor([0.1 * (t + 1)])
        for opt in opts:
            opt.step()
    assert scalar.shape == ()
    assert scalar.item() == vector.item()


def test_zero_dim_state_dict_moves_to_torch_and_back():
    p = torch.nn.Parameter(torch.tensor(2.0))
    opt = make("Adam", [p])
    p.grad = torch.tensor(0.5)
    opt.step()
    theirs = twin("Adam", [torch.nn.Parameter(torch.tensor(2.0))])
    theirs.load_state_dict(opt.state_dict())
    back = make("Adam", [torch.nn.Parameter(torch.tensor(2.0))])
    back.load_state_dict(theirs.state_dict())
    assert back.state_dict()["state"][0]["exp_avg"].shape == ()
