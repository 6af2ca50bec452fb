"""optkern.torch.Muon and optkern.torch.LBFGS against torch.optim (skipped without torch; the CI
oracle lane runs them): every input torch's optimizer test database (optim_db) gives for them,
torch's error inputs, state dicts moving both ways, and optkern.Muon / optkern.LBFGS (NumPy)
against torch too."""

import contextlib
import copy
import warnings

import numpy as np
import pytest

import optkern as ok

torch = pytest.importorskip("torch")
okt = pytest.importorskip("optkern.torch")

# torch's own LBFGS reads a closure's loss with float() (a once-per-process warning of torch's)
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning"
    ),
    # torch.sparse_coo_tensor's once-per-process note
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning"),
]


def optim_db_inputs(name):
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as e:  # its imports (expecttest, ...) are test-only dependencies of torch
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no optim_db: {e}"))]
    info = next(i for i in optim_db if i.name == name)
    return [
        pytest.param(dict(inp.kwargs), id=inp.desc)
        for inp in info.optim_inputs_func(device="cpu", dtype=torch.float32)
    ]


def error_inputs(name):
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as e:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no optim_db: {e}"))]
    info = next(i for i in optim_db if i.name == name)
    return [
        pytest.param(e, id=e.optimizer_error_input.desc)
        for e in info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    ]


def check_error_input(cls, err):
    from torch.testing._internal.common_optimizers import OptimizerErrorEnum

    inp = err.optimizer_error_input
    params, kwargs = inp.params, dict(inp.kwargs)
    if err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(err.error_type, Warning):
            with pytest.warns(err.error_type, match=err.error_regex):
                cls(params, **kwargs)
        else:
            with pytest.raises(err.error_type, match=err.error_regex):
                cls(params, **kwargs)
    else:  # torch's own step raises it (optkern's runs the group there: a warning says so)
        opt = cls(params, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", okt.TorchFallbackWarning)
            with pytest.raises(err.error_type, match=err.error_regex):
                opt.step()


# -- Muon -----------------------------------------------------------------------------------------


def muon_pair(kwargs, shape=(10, 5), steps=10, ns_dtype=None, seed=0):
    """torch.optim.Muon and optkern.torch.Muon on the same gradients; returns both parameters and
    optimizers after ``steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    oa = torch.optim.Muon([a], **copy.deepcopy(kwargs))
    ob = okt.Muon([b], ns_dtype=ns_dtype, **copy.deepcopy(kwargs))
    for _ in range(steps):
        g = torch.randn(shape, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    return a, b, oa, ob


@pytest.mark.parametrize("kwargs", optim_db_inputs("Muon"))
@pytest.mark.parametrize("shape", [(10, 5), (5, 10), (64, 64)])
def test_muon_bfloat16_equals_torch_bit_for_bit(kwargs, shape):
    a, b, oa, ob = muon_pair(kwargs, shape, ns_dtype=torch.bfloat16)
    assert torch.equal(a, b)
    assert torch.equal(oa.state[a]["momentum_buffer"], ob.state[b]["momentum_buffer"])


@pytest.mark.parametrize("kwargs", optim_db_inputs("Muon"))
@pytest.mark.parametrize("shape", [(10, 5), (5, 10), (64, 64)])
def test_muon_float32_within_bfloat16_of_torch(kwargs, shape):
    # torch orthogonalises in bfloat16 (8 bits): its update differs from a float32 one by about
    # 1%, so each step moves the parameters apart by about lr' * 1e-2 per element.
    steps = 10
    a, b, oa, ob = muon_pair(kwargs, shape, steps=steps, ns_dtype=torch.float32)
    lr = float(kwargs.get("lr", 1e-3))
    adj = max(1.0, shape[0] / shape[1]) ** 0.5
    assert (a - b).abs().max().item() <= steps * lr * adj * 0.05
    assert torch.equal(oa.state[a]["momentum_buffer"], ob.state[b]["momentum_buffer"])


def test_numpy_muon_equals_optkern_torch_float32():
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(12, 7, generator=gen)
    b = torch.nn.Parameter(p0.clone())
    ob = okt.Muon([b], ns_dtype=torch.float32, lr=0.02)
    q = p0.numpy().copy()
    oq = ok.Muon([q], lr=0.02)
    for _ in range(5):
        g = torch.randn(12, 7, generator=gen)
        b.grad = g.clone()
        ob.step()
        oq.step([g.numpy()])
    np.testing.assert_allclose(q, b.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("err", error_inputs("Muon"))
def test_muon_error_inputs(err):
    check_error_input(okt.Muon, err)


def test_muon_state_dict_both_ways():
    a, b, oa, ob = muon_pair({"lr": 0.01}, (6, 9), steps=3, ns_dtype=torch.bfloat16)
    for src, dst_cls in ((oa, okt.Muon), (ob, torch.optim.Muon)):
        p = torch.nn.Parameter(a.detach().clone())
        dst = dst_cls([p], lr=0.01)
        dst.load_state_dict(copy.deepcopy(src.state_dict()))
        assert torch.equal(dst.state[p]["momentum_buffer"], oa.state[a]["momentum_buffer"])


# -- LBFGS ----------------------------------------------------------------------------------------


def lbfgs_run(cls, kwargs, steps=5, seed=0):
    """optim_db's problem: weight (10, 5), bias (10), loss (W x + b)^2 summed."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(10, 5, generator=gen))
    b = torch.nn.Parameter(torch.randn(10, generator=gen))
    x = torch.randn(5, generator=gen)
    opt = cls([W, b], **copy.deepcopy(kwargs))

    def closure():
        opt.zero_grad()
        loss = (W.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(steps)]
    return W, b, opt, losses


@pytest.mark.parametrize("kwargs", optim_db_inputs("LBFGS"))
def test_lbfgs_matches_torch_on_optim_db_inputs(kwargs):
    Wa, ba, oa, la = lbfgs_run(torch.optim.LBFGS, kwargs)
    Wb, bb, ob, lb = lbfgs_run(okt.LBFGS, kwargs)
    torch.testing.assert_close(Wb, Wa, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(bb, ba, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(lb, la, rtol=1e-4, atol=1e-7)
    sa, sb = oa.state[Wa], ob.state[Wb]
    assert sb["func_evals"] == sa["func_evals"] and sb["n_iter"] == sa["n_iter"]
    assert set(sb) == set(sa)
    assert len(sb["old_dirs"]) == len(sa["old_dirs"])


def torch_problem(kind, n=None, seed=0):
    """(x0, closure factory) of a float64 problem evaluated on float32 tensors."""
    from reference_algos import logistic_problem, rosenbrock

    if kind == "rosenbrock":
        f, x0 = rosenbrock, np.array([-1.2, 1.0, 0.5, -0.3, 1.5])
    else:
        _, _, f = logistic_problem(n=400, dim=20, seed=seed)
        x0 = np.zeros(21)

    def closure_for(p, opt):
        def closure():
            opt.zero_grad()
            loss, g = f(p.detach().double().numpy())
            p.grad = torch.tensor(g, dtype=torch.float32)
            return torch.tensor(loss)

        return closure

    return x0, closure_for


@pytest.mark.parametrize("kind", ["rosenbrock", "logistic"])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_trajectories_match_torch(kind, line_search_fn):
    x0, closure_for = torch_problem(kind)
    lr = 0.1 if (kind == "rosenbrock" and line_search_fn is None) else 1.0
    runs = []
    for cls in (torch.optim.LBFGS, okt.LBFGS):
        p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float32))
        opt = cls([p], lr=lr, line_search_fn=line_search_fn, history_size=10)
        traj = []
        for _ in range(3):
            opt.step(closure_for(p, opt))
            traj.append(p.detach().clone())
        runs.append((traj, opt.state[p]["func_evals"]))
    (ta, ea), (tb, eb) = runs
    if kind == "rosenbrock" and line_search_fn == "strong_wolfe":
        # In Rosenbrock's valley the line search's branches (and so the evaluation counts) of any
        # two float32 runs part (torch's float32 and float64 runs take 50 and 60 evaluations
        # here): the iterates stay within 1e-3.
        for a, b in zip(ta, tb):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-3)
        return
    assert ea == eb
    for a, b in zip(ta, tb):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-5)


def test_numpy_lbfgs_matches_torch():
    x0, closure_for = torch_problem("logistic", seed=2)
    from reference_algos import logistic_problem

    _, _, f = logistic_problem(n=400, dim=20, seed=2)
    p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float32))
    topt = torch.optim.LBFGS([p], line_search_fn="strong_wolfe")
    w = x0.astype(np.float32)
    opt = ok.LBFGS([w], line_search_fn="strong_wolfe")

    def closure():
        loss, g = f(w.astype(np.float64))
        return loss, [g.astype(np.float32)]

    for _ in range(3):
        topt.step(closure_for(p, topt))
        opt.step(closure)
    np.testing.assert_allclose(w, p.detach().numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_state_dict_both_ways(line_search_fn):
    # A state dict moves between torch's LBFGS and optkern's mid-run: optkern resumed from its
    # own state dict goes on bit for bit; across the two, within float32 rounding.
    x0, closure_for = torch_problem("logistic", seed=1)
    kw = {"history_size": 4, "line_search_fn": line_search_fn}
    for src_cls, dst_cls in (
        (okt.LBFGS, okt.LBFGS),
        (torch.optim.LBFGS, okt.LBFGS),
        (okt.LBFGS, torch.optim.LBFGS),
    ):
        p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float32))
        src = src_cls([p], **kw)
        src.step(closure_for(p, src))
        q = torch.nn.Parameter(p.detach().clone())
        dst = dst_cls([q], **kw)
        dst.load_state_dict(copy.deepcopy(src.state_dict()))
        for _ in range(2):
            src.step(closure_for(p, src))
            dst.step(closure_for(q, dst))
        if src_cls is dst_cls:
            assert torch.equal(p, q)
        else:  # float32 rounding (and the line search's branches it can flip)
            torch.testing.assert_close(q, p, rtol=0, atol=1e-3)


def test_lbfgs_state_dict_layout_is_torchs():
    Wa, ba, oa, _ = lbfgs_run(torch.optim.LBFGS, {"history_size": 3})
    Wb, bb, ob, _ = lbfgs_run(okt.LBFGS, {"history_size": 3})
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert list(sa["state"]) == list(sb["state"]) == [0]
    for k, v in sa["state"][0].items():
        w = sb["state"][0][k]
        if isinstance(v, torch.Tensor):
            assert isinstance(w, torch.Tensor) and w.dtype == v.dtype and w.shape == v.shape, k
        elif isinstance(v, list):
            assert isinstance(w, list) and len(w) == len(v), k
            assert all(type(x) is type(y) for x, y in zip(v, w)), k


@pytest.mark.parametrize("err", error_inputs("LBFGS"))
def test_lbfgs_error_inputs(err):
    check_error_input(okt.LBFGS, err)


def lbfgs_closure(p, target):
    def closure():
        p.grad = None
        loss = ((p - target) ** 2).sum() + (p**4).sum()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "make", [lambda t: t.double(), lambda t: t.reshape(4, 3).t()], ids=["float64", "transposed"]
)
def test_lbfgs_parameters_it_cannot_step_run_torchs_lbfgs(make):
    # torch accepts them: its own LBFGS runs (a warning once), and the state is torch's
    target = make(torch.arange(12.0) / 7)
    results = []
    for cls in (torch.optim.LBFGS, okt.LBFGS):
        p = torch.nn.Parameter(make(torch.zeros(12)))
        opt = cls([p], max_iter=5, line_search_fn="strong_wolfe")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                for _ in range(3):
                    opt.step(lbfgs_closure(p, target))
            except RuntimeError as err:  # torch's own refusal (its view of a transposed grad)
                results.append((None, str(err), seen))
                continue
        results.append((p.detach().clone(), opt.state_dict(), seen))
    if results[0][0] is None:
        assert results[1][0] is None and results[1][1] == results[0][1]
        return
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1]["state"][0]["n_iter"] == results[1][1]["state"][0]["n_iter"]
    fallbacks = [w for w in results[1][2] if issubclass(w.category, okt.TorchFallbackWarning)]
    assert len(fallbacks) == 1 and "not a CPU float32 contiguous tensor" in str(fallbacks[0].message)


@pytest.mark.parametrize(
    "make", [lambda t: t.double(), lambda t: t.t()], ids=["float64", "transposed"]
)
def test_muon_groups_it_cannot_step_run_torchs_muon(make):
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(6, 4, generator=gen)
    grads = [torch.randn(6, 4, generator=gen) for _ in range(3)]
    outs = []
    for cls in (torch.optim.Muon, okt.Muon):
        fast = torch.nn.Parameter(p0.clone())
        slow = torch.nn.Parameter(make(p0.clone()))
        kw = {} if cls is torch.optim.Muon else {"ns_dtype": torch.bfloat16}
        opt = cls([{"params": [fast]}, {"params": [slow]}], lr=0.02, **kw)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for g in grads:
                fast.grad, slow.grad = g.clone(), make(g.clone())
                opt.step()
        outs.append((fast.detach().clone(), slow.detach().clone(), seen))
    assert torch.equal(outs[1][1], outs[0][1])  # group 1: torch's own step
    if torch.equal(outs[1][0], outs[0][0]) is False:  # group 0: optkern's, bfloat16 as torch
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-2, atol=1e-3)
    fallbacks = [w for w in outs[1][2] if issubclass(w.category, okt.TorchFallbackWarning)]
    assert len(fallbacks) == 1 and "not a CPU float32 contiguous" in str(fallbacks[0].message)


# -- sparse gradients: SparseAdam, Adagrad, SGD -----------------------------------------------------

SPARSE = [
    ("SparseAdam", {"lr": 0.01}),
    ("SparseAdam", {"lr": 0.01, "betas": (0.8, 0.99), "maximize": True}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
]


def embedding_run(module, name, kw, steps=100):
    """An Embedding and an EmbeddingBag (sparse=True) trained on lookups with many duplicates."""
    torch.manual_seed(1)
    emb = torch.nn.Embedding(300, 8, sparse=True)
    bag = torch.nn.EmbeddingBag(100, 4, sparse=True, mode="sum")
    opt = getattr(module, name)([*emb.parameters(), *bag.parameters()], **copy.deepcopy(kw))
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, 60, (4, 9), generator=gen)
        bi = torch.randint(0, 100, (16,), generator=gen)
        opt.zero_grad()
        loss = emb(idx).pow(2).sum() + bag(bi, torch.tensor([0, 7])).pow(2).sum()
        loss.backward()
        opt.step()
    return emb.weight, bag.weight, opt


@pytest.mark.parametrize("name, kw", SPARSE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SPARSE)])
def test_sparse_gradients_match_torch_after_100_steps(name, kw):
    ea, ba, oa = embedding_run(torch.optim, name, kw)
    eb, bb, ob = embedding_run(okt, name, kw)
    torch.testing.assert_close(eb, ea, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bb, ba, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"]):
        sa, sb = oa.state[pa], ob.state[pb]
        assert set(sa) == set(sb)
        for k, v in sa.items():
            w = sb[k]
            if isinstance(v, torch.Tensor) and v.is_sparse:  # torch's SGD keeps a sparse buffer
                v = v.to_dense()
            if isinstance(v, torch.Tensor):  # float32 rounding of the largest value
                scale = max(1.0, float(v.abs().max())) if v.numel() else 1.0
                torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6 * scale)
            else:
                assert type(w) is type(v) and w == v, k  # SparseAdam's step: an int


def test_sparse_adam_follows_torchs_order_of_operations():
    # The same operations in torch's order: within a rounding or two after 100 steps (a row
    # listed several times has its values summed, optkern in the order they appear, torch's
    # coalesce in the order of its unstable sort).
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(40, 6, generator=gen)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    oa, ob = torch.optim.SparseAdam([a], lr=0.02), okt.SparseAdam([b], lr=0.02)
    for _ in range(100):
        idx = torch.randint(0, 40, (1, 25), generator=gen)
        vals = torch.randn(25, 6, generator=gen)
        a.grad = torch.sparse_coo_tensor(idx, vals, (40, 6))
        b.grad = torch.sparse_coo_tensor(idx, vals, (40, 6))
        oa.step()
        ob.step()
    torch.testing.assert_close(b, a, rtol=1e-6, atol=2e-7)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ob.state[b][k], oa.state[a][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["SparseAdam", "Adagrad", "SGD"])
def test_to_sparse_of_any_shape(name):
    # optim_db's tests hand SparseAdam `grad.to_sparse()`: sparse in every dimension
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(6, 5, 3, generator=gen)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    oa, ob = getattr(torch.optim, name)([a], lr=0.05), getattr(okt, name)([b], lr=0.05)
    for _ in range(10):
        g = torch.randn(6, 5, 3, generator=gen)
        g[g.abs() < 0.7] = 0
        a.grad, b.grad = g.to_sparse(), g.to_sparse(2)
        oa.step()
        b.grad = g.to_sparse() if name != "SGD" else b.grad
        ob.step()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("err", error_inputs("SparseAdam"))
def test_sparse_adam_error_inputs(err):
    check_error_input(okt.SparseAdam, err)


def test_sparse_refusals_are_torchs():
    # what the kernels do not take runs torch's own step (a TorchFallbackWarning says so), and
    # torch's step raises its own error
    p = torch.nn.Parameter(torch.zeros(4, 3))
    for name, kwargs in [
        ("Adam", {}),
        ("Adagrad", {"weight_decay": 0.1}),
        ("SGD", {"lr": 0.1, "weight_decay": 0.1}),
    ]:
        p.grad = torch.ones(4, 3).to_sparse()
        with pytest.raises(RuntimeError) as theirs:
            getattr(torch.optim, name)([p], **kwargs).step()
        with pytest.warns(okt.TorchFallbackWarning), pytest.raises(RuntimeError) as mine:
            getattr(okt, name)([p], **kwargs).step()
        assert str(mine.value) == str(theirs.value)
    p.grad = torch.ones(4, 3)
    with (
        pytest.warns(okt.TorchFallbackWarning, match="dense"),
        pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"),
    ):
        okt.SparseAdam([p]).step()
    assert torch.equal(p, torch.zeros(4, 3))
    lion = okt.Lion([p])  # a class torch lacks refuses it itself, naming the parameter
    p.grad = torch.ones(4, 3).to_sparse()
    with pytest.raises(TypeError, match="gradient of parameter 0 of param group 0 is sparse"):
        lion.step()
    assert not lion.state


def _two_tables(mod, first, broken):
    """SparseAdam over two groups; group 1's gradient (or lr, or dtype) made what ``broken``
    says before the step under test. Returns the optimizer, the step to run, the tables."""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(20, 4, generator=gen))
    b = torch.nn.Parameter(torch.randn(10, 3, generator=gen))
    opt = mod.SparseAdam([{"params": [a]}, {"params": [b]}], lr=0.01)

    def grads():
        a.grad = torch.sparse_coo_tensor([[1, 5, 1]], torch.randn(3, 4, generator=gen), (20, 4))
        b.grad = torch.sparse_coo_tensor([[2, 2]], torch.randn(2, 3, generator=gen), (10, 3))

    if not first:
        grads()
        opt.step()
    grads()
    if broken == "negative lr":
        opt.param_groups[1]["lr"] = -1.0
    elif broken == "row out of range":
        b.grad = torch.sparse_coo_tensor([[2, 12]], torch.randn(2, 3, generator=gen), (10, 3))
    elif broken == "float64":
        with torch.no_grad():
            b.data = b.data.double()
        b.grad = torch.sparse_coo_tensor([[2]], torch.ones(1, 3, dtype=torch.float64), (10, 3))
    else:
        b.grad = torch.ones(10, 3)
    return opt, a, b


@pytest.mark.parametrize("first", [True, False], ids=["first step", "later step"])
@pytest.mark.parametrize("broken", ["row out of range", "dense"])
def test_sparse_step_refused_in_group_1_changes_nothing_in_group_0(broken, first):
    # as tests/test_all_or_nothing.py for the dense classes: every group is checked before any
    # is written. A row out of range is refused by optkern (torch checks no sparse tensor's
    # indices by default: its step would write outside the table); a dense gradient by torch's
    # own step, which runs group 1
    opt, a, _ = _two_tables(okt, first, broken)
    before = [a.detach().clone(), copy.deepcopy(opt.state_dict())]
    with contextlib.ExitStack() as stack:
        if broken == "dense":
            stack.enter_context(pytest.warns(okt.TorchFallbackWarning))
        stack.enter_context(pytest.raises(ValueError if broken != "dense" else RuntimeError))
        opt.step()
    assert torch.equal(a, before[0])
    after = opt.state_dict()
    assert after["state"].keys() == before[1]["state"].keys()
    for k, st in before[1]["state"].items():
        for name, v in st.items():
            w = after["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


@pytest.mark.parametrize("first", [True, False], ids=["first step", "later step"])
@pytest.mark.parametrize("broken", ["negative lr", "float64"])
def test_sparse_group_the_kernels_refuse_runs_torchs_step(broken, first):
    # what torch accepts is not refused: group 1 runs torch's SparseAdam (a negative lr set
    # after construction, a float64 table), group 0 the kernels; both as torch's own optimizer
    theirs, ta, tb = _two_tables(torch.optim, first, broken)
    mine, ma, mb = _two_tables(okt, first, broken)
    theirs.step()
    with pytest.warns(okt.TorchFallbackWarning, match="param group 1"):
        mine.step()
    torch.testing.assert_close(ma, ta, rtol=1e-6, atol=1e-7)
    assert torch.equal(mb, tb)  # torch's own step, on the same state
    assert mine.state[mb]["step"] == theirs.state[tb]["step"]


def test_sparse_adam_state_dict_both_ways():
    _, _, oa = embedding_run(torch.optim, "SparseAdam", {"lr": 0.01}, steps=5)
    _, _, ob = embedding_run(okt, "SparseAdam", {"lr": 0.01}, steps=5)
    for src, dst_mod in ((oa, okt), (ob, torch.optim)):
        emb = torch.nn.Embedding(300, 8, sparse=True)
        bag = torch.nn.EmbeddingBag(100, 4, sparse=True, mode="sum")
        dst = dst_mod.SparseAdam([*emb.parameters(), *bag.parameters()], lr=0.01)
        dst.load_state_dict(copy.deepcopy(src.state_dict()))
        st = dst.state[emb.weight]
        assert st["step"] == 5 and type(st["step"]) is int


@pytest.mark.parametrize("name, kw", [("SparseAdam", {"lr": 0.01}), ("Adagrad", {"lr": 0.1})])
def test_float64_table_with_sparse_gradients_runs_torchs_step(name, kw):
    # the kernels take float32 row values: a float64 table's float64 sparse gradient runs
    # torch's own step (said once), with torch's results
    outs = []
    for module in (torch.optim, okt):
        torch.manual_seed(5)
        emb = torch.nn.Embedding(50, 4, sparse=True).double()
        opt = getattr(module, name)(emb.parameters(), **kw)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for k in range(5):
                opt.zero_grad()
                emb(torch.tensor([[1, 2, 2, k]])).pow(2).sum().backward()
                opt.step()
        outs.append((emb.weight.detach().clone(), seen))
    assert torch.equal(outs[0][0], outs[1][0])
    fallbacks = [w for w in outs[1][1] if issubclass(w.category, okt.TorchFallbackWarning)]
    assert len(fallbacks) == 1 and "torch.float64" in str(fallbacks[0].message)


def test_lbfgs_steps_complex_parameters_as_their_real_pairs():
    # as torch's LBFGS: a complex64 parameter is its float32 (real, imaginary) pairs, on the
    # kernels (no fallback), bit for bit its real twin, and within float32 rounding of torch's
    torch.manual_seed(0)
    c0, target = torch.randn(10, 5, dtype=torch.complex64), torch.randn(10, 5, 2)
    runs = []
    for cls, complex_param in ((okt.LBFGS, True), (okt.LBFGS, False), (torch.optim.LBFGS, True)):
        p = torch.nn.Parameter(c0.clone() if complex_param else torch.view_as_real(c0).clone())
        opt = cls([p], line_search_fn="strong_wolfe", max_iter=5)

        def closure(p=p, opt=opt):
            opt.zero_grad()
            x = torch.view_as_real(p) if p.is_complex() else p
            loss = ((x - target) ** 2).sum() + (x**4).sum()
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("error", okt.TorchFallbackWarning)
            for _ in range(3):
                opt.step(closure)
        runs.append(torch.view_as_real(p.detach()) if p.is_complex() else p.detach())
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], runs[2], rtol=1e-5, atol=1e-5)
