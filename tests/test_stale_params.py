"""StaleParameterWarning: a parameter that nothing but its optimizer holds any more (the code
that read it replaced it, e.g. ``model.params = best_params`` copies) is reported once by the
next step, naming it; arrays reachable another way (a FlatParams block, a view's base, a torch
tensor) are not; the warning can be silenced."""

import gc
import warnings

import numpy as np
import optim_db as db
import pytest

import optkern as ok


def grads_for(params, value=0.1):
    return [np.full(p.shape, value, np.float32) for p in params]


def stale_warnings(record):
    return [w for w in record if issubclass(w.category, ok.StaleParameterWarning)]


def step_n(opt, grads, n=2):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(n):
            opt.step(grads)
    return stale_warnings(record)


class Model:
    def __init__(self):
        self.params = {
            "W1": np.ones((4, 3), np.float32),
            "b1": np.zeros(3, np.float32),
            "W2": np.ones((3, 2), np.float32),
        }


RICHEST = db.richest() + [("SGD", {})]  # every class with every state, and plain SGD (none)


@pytest.mark.parametrize("name, hp", RICHEST, ids=[db.case_id(c) for c in RICHEST])
def test_replaced_parameters_warn_once_each(name, hp):
    model = Model()
    opt = getattr(ok, name)(list(model.params.values()), **hp)
    grads = grads_for(model.params.values())
    assert step_n(opt, grads, 3) == []
    model.params = {k: v.copy() for k, v in model.params.items()}  # the Solver's last line
    found = step_n(opt, grads, 3)
    assert len(found) == 3
    for i, w in enumerate(found):
        text = str(w.message)
        assert f"param_groups[0]['params'][{i}]" in text and "held by nothing but" in text
        assert "np.copyto" in text and "StaleParameterWarning" in text
        assert w.filename == __file__  # points at the caller's step()
    assert issubclass(ok.StaleParameterWarning, RuntimeWarning)


def test_only_the_replaced_parameter_warns_and_names_are_used():
    W, b = np.ones((3, 2), np.float32), np.zeros(2, np.float32)
    opt = ok.Adam([("weight", W), ("bias", b)], lr=0.1)
    grads = grads_for([W, b])
    assert step_n(opt, grads) == []
    W = W.copy()
    (w,) = step_n(opt, grads)
    assert "parameter 'weight' (shape (3, 2))" in str(w.message)


def test_a_parameter_held_again_and_dropped_again_does_not_warn_twice():
    model = Model()
    opt = ok.Adam(list(model.params.values()), lr=0.1)
    grads = grads_for(model.params.values())
    step_n(opt, grads)
    names = list(model.params)
    model.params = {}
    assert len(step_n(opt, grads)) == 3
    model.params = dict(zip(names, opt.param_groups[0]["params"]))  # held again
    step_n(opt, grads)
    model.params = {}
    assert step_n(opt, grads) == []


def test_arrays_made_for_the_optimizer_alone_do_not_warn():
    """An array nobody ever held (made in the argument list) is read back through the optimizer,
    if at all: nothing was replaced."""
    opt = ok.Adam([np.ones(5, np.float32), np.ones((2, 2), np.float32)], lr=0.1)
    assert step_n(opt, grads_for(opt.param_groups[0]["params"]), 5) == []


def test_flat_params_views_are_held_through_their_block():
    fp = ok.FlatParams([(4, 3), (3,)])
    opt = ok.Adam(list(fp), lr=0.1)
    grads = grads_for(fp)
    assert step_n(opt, grads) == []
    flat = fp.flat
    del fp  # the views now live only in the optimizer, but their memory is read through flat
    gc.collect()
    assert step_n(opt, grads) == []
    del flat  # now nothing else reads that memory
    gc.collect()
    assert len(step_n(opt, grads)) == 2


def test_the_block_itself_as_the_parameter():
    fp = ok.FlatParams([(4, 3), (3,)])
    W, b = fp  # the model reads the views
    opt = ok.Adam([fp.flat], lr=0.1)
    grads = [np.full(fp.flat.shape, 0.1, np.float32)]
    assert step_n(opt, grads) == []
    del fp
    assert step_n(opt, grads) == []  # W and b still see every update
    del W, b
    assert len(step_n(opt, grads)) == 1


def test_a_view_whose_base_someone_holds_does_not_warn():
    buffer = np.zeros(20, np.float32)
    W = buffer[:12].reshape(4, 3)
    opt = ok.SGD([W], lr=0.1, momentum=0.9)
    grads = grads_for([W])
    assert step_n(opt, grads) == []
    del W
    assert step_n(opt, grads) == []
    assert buffer[0] != 0  # the update reaches the memory the caller reads
    del buffer
    assert len(step_n(opt, grads)) == 1


def test_arrays_on_memory_the_optimizer_cannot_see_into_do_not_warn():
    raw = bytearray(48)
    W = np.frombuffer(raw, np.float32).reshape(4, 3)
    opt = ok.Adam([W], lr=0.1)
    grads = grads_for([W])
    step_n(opt, grads)
    del W
    assert step_n(opt, grads) == []


def test_arrays_of_torch_tensors_do_not_warn():
    torch = pytest.importorskip("torch")
    t = torch.ones(4, 3)
    W = t.numpy()  # shares the tensor's memory
    opt = ok.Adam([W], lr=0.1)
    grads = grads_for([W])
    step_n(opt, grads)
    del W
    assert step_n(opt, grads) == []
    assert float(t[0, 0]) != 1.0


def test_optkern_torch_steps_do_not_warn():
    torch = pytest.importorskip("torch")
    import optkern.torch as okt

    model = torch.nn.Linear(4, 3)
    opt = okt.Adam(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            model.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
    assert stale_warnings(record) == []


def test_silenced_by_a_filter_or_the_option():
    for silence in ("filter", "option"):
        model = Model()
        opt = ok.Adam(list(model.params.values()), lr=0.1)
        grads = grads_for(model.params.values())
        step_n(opt, grads)
        model.params = {}
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            if silence == "filter":
                warnings.filterwarnings("ignore", category=ok.StaleParameterWarning)
            else:
                opt.warn_stale = False
            opt.step(grads)
        assert stale_warnings(record) == []
        assert opt.step_count == 3


def test_as_an_error_it_stops_the_step_before_anything_changes():
    model = Model()
    opt = ok.Adam(list(model.params.values()), lr=0.1)
    grads = grads_for(model.params.values())
    step_n(opt, grads)
    params = opt.param_groups[0]["params"]
    before = [p.copy() for p in params]
    model.params = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ok.StaleParameterWarning)
        with pytest.raises(ok.StaleParameterWarning):
            opt.step(grads)
    assert opt.step_count == 2
    assert all(np.array_equal(p, q) for p, q in zip(params, before))
