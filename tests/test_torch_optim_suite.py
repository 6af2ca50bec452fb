"""torch's optimizer test suite, on optkern.torch (the oracle lane: skipped without torch).

torch's own tests of its optimizers (test/test_optim.py, ``TestOptimRenewed``) are driven by
``torch.testing._internal.common_optimizers.optim_db``: one entry per optimizer with its inputs,
its error inputs and what it supports. The checks below are the ones that test makes about
behaviour on the CPU, written here against the installed optim_db, and each runs twice: with
torch's class (``impl="torch"``, the yardstick) and with optkern.torch's class of the same name
(``impl="optkern"``). A drop-in passes whatever torch's class passes. optim_db's own decorators
for a check (skips, tolerance overrides, expected failures) apply as they do in torch's suite;
checks that need an accelerator are not here.

``python -m pytest tests/test_torch_optim_suite.py -q -rs`` counts both lanes; a class optkern.torch
lacks is skipped in the optkern lane with that reason.
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
import warnings
from typing import Any, Dict

import pytest

torch = pytest.importorskip("torch")
co = pytest.importorskip("torch.testing._internal.common_optimizers")  # needs expecttest
okt = pytest.importorskip("optkern.torch")

from torch.nn import Parameter  # noqa: E402
from torch.optim.lr_scheduler import ReduceLROnPlateau  # noqa: E402
from torch.testing._internal.common_device_type import toleranceOverride  # noqa: E402

# torch's suite runs with warnings shown, not raised (its checks of a warning use pytest.warns,
# which sees every warning): ReduceLROnPlateau reading a loss that requires grad, sparse tensors'
# invariant checks, optkern.torch's TorchFallbackWarning
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)  # as torch's TestCase seeds every test


INFOS = list(co.optim_db)
IMPLS = ["torch", "optkern"]
DEVICE = "cpu"


# -- the harness ----------------------------------------------------------------------------------


class Case:
    """One check of one optim_db entry in one lane: the class to test, optim_db's decorators for
    the check, and torch's TestCase assertions (``assertEqual`` compares as torch's does: values
    of tensors within the dtype's tolerance, dtypes exactly, containers item by item)."""

    def __init__(self, impl: str, info: Any, test: str, dtype: Any, **params: Any) -> None:
        self.info, self.dtype = info, dtype
        decorators = info.get_decorators("TestOptimRenewed", test, DEVICE, dtype, params)
        self.tolerance = None
        body = lambda: None  # noqa: E731
        for d in decorators:
            if isinstance(d, toleranceOverride):
                self.tolerance = d.d.get(dtype)
            body = d(body)
        if getattr(body, "__unittest_skip__", False):
            pytest.skip(getattr(body, "__unittest_skip_why__", "skipped by optim_db"))
        body()  # a decorator that skips when called (skipIfTorchDynamo under dynamo)
        self.expect_failure = getattr(body, "__unittest_expecting_failure__", False)
        if impl == "torch":
            self.cls = info.optim_cls
        else:
            self.cls = getattr(okt, info.name, None)
            if self.cls is None:
                pytest.skip(f"optkern.torch has no {info.name}")

    def inputs(self, skip=(), dtype=None):
        return co._get_optim_inputs_including_global_cliquey_kwargs(
            DEVICE, dtype or self.dtype, self.info, skip=skip
        )

    def assertEqual(self, a: Any, b: Any, atol=None, rtol=None, msg: str = "") -> None:  # noqa: N802
        if atol is None and rtol is None and self.tolerance is not None:
            atol, rtol = self.tolerance.atol, self.tolerance.rtol
        _equal(a, b, atol, rtol, msg)

    def assertGreater(self, a, b, msg=None):  # noqa: N802 (TensorTracker's interface)
        assert a > b, msg

    def assertTrue(self, x, msg=None):  # noqa: N802
        assert x, msg


def _equal(a: Any, b: Any, atol, rtol, where: str) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        torch.testing.assert_close(
            a, b, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{where}: {m}"
        )
    elif isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), (where, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            _equal(a[k], b[k], atol, rtol, f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, atol, rtol, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _check(case: Case, fn) -> None:
    """Runs a check, as an expected failure where optim_db marks it one."""
    if not case.expect_failure:
        fn()
        return
    try:
        fn()
    except Exception:  # noqa: BLE001
        pytest.xfail("optim_db expects this check to fail")
    pytest.fail("optim_db expects this check to fail, but it passed")


def _params(cases, **kw):
    return pytest.mark.parametrize(
        "impl, info",
        [(impl, info) for info in INFOS for impl in IMPLS if cases(info)],
        ids=[f"{info.name}-{impl}" for info in INFOS for impl in IMPLS if cases(info)],
    )


EVERY = _params(lambda info: True)


def _sparse(case: Case, *tensors: torch.Tensor) -> None:
    """SparseAdam takes only sparse gradients: torch's tests turn theirs into sparse layout."""
    if case.info.only_supports_sparse_grads:
        for t in tensors:
            if t.grad is not None:
                t.grad = t.grad.to_sparse()


def _only_2d(info) -> bool:
    """An optimizer of matrices only (torch's Muon): torch's tests give it the weight alone."""
    return info.name == "Muon"


def _linear(dtype, contiguous=True):
    if contiguous:
        weight = Parameter(torch.randn((10, 5), dtype=dtype))
        bias = Parameter(torch.randn((10), dtype=dtype))
    else:
        weight = Parameter(torch.randn((10, 5, 2), dtype=dtype)[..., 0])
        bias = Parameter(torch.randn((10, 2), dtype=dtype)[..., 0])
    return weight, bias, torch.randn(5, dtype=dtype)


def _drive(case: Case, optimizer, closure, steps: int, schedulers=()) -> None:
    for _ in range(steps):
        if case.info.step_requires_closure:
            loss = optimizer.step(closure)
        else:
            loss = closure()
            optimizer.step()
        for s in schedulers:
            s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()


# -- errors ----------------------------------------------------------------------------------------


@_params(lambda info: info.optim_error_inputs_func is not None)
def test_errors(impl, info):
    """optim_db's error inputs as given: each raises (or warns) with torch's type and message,
    at construction or at the step, as torch's class does."""
    case = Case(impl, info, "test_errors", torch.float32)

    def run():
        for error_input in info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32):
            inp = error_input.optimizer_error_input
            params, kwargs = inp.params, inp.kwargs
            kind, regex = error_input.error_type, error_input.error_regex
            expect = pytest.warns if issubclass(kind, Warning) else pytest.raises
            if error_input.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
                with expect(kind, match=regex):
                    case.cls(params, **kwargs)
            else:
                optimizer = case.cls(params, **kwargs)
                with expect(kind, match=regex):
                    optimizer.step()

    _check(case, run)


# -- the update goes the right way -----------------------------------------------------------------


@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
@EVERY
def test_forloop_goes_right_direction(impl, info, contiguous, with_lrsched):
    case = Case(
        impl,
        info,
        "test_forloop_goes_right_direction",
        torch.float32,
        contiguous=contiguous,
        with_lrsched=with_lrsched,
    )

    def run():
        for schedulers_c in info.scheduler_inputs if with_lrsched else [None]:
            for inp in info.optim_inputs_func(device=DEVICE):
                if "foreach" in info.supported_impls:
                    inp.kwargs["foreach"] = False
                weight, bias, x = _linear(torch.float32, contiguous)
                only = _only_2d(info)
                optimizer = case.cls([weight] if only else [weight, bias], **inp.kwargs)
                schedulers = [s(optimizer) for s in (schedulers_c or [])]

                def closure():
                    optimizer.zero_grad()
                    loss = (weight.mv(x) + (0 if only else bias)).pow(2).sum()
                    loss.backward()
                    _sparse(case, weight, bias)
                    return loss

                initial = closure().item()
                _drive(case, optimizer, closure, 20, schedulers)
                if inp.kwargs.get("maximize", False):
                    assert closure().item() > initial, inp.desc
                else:
                    assert closure().item() < initial, inp.desc

    _check(case, run)


@EVERY
def test_param_group_with_lrscheduler_goes_right_direction(impl, info):
    case = Case(impl, info, "test_param_group_with_lrscheduler_goes_right_direction", torch.float32)

    def run():
        for schedulers_c in info.scheduler_inputs:
            weight, _, x = _linear(torch.float32)
            weight2 = Parameter(torch.randn((10, 5)))
            optimizer = case.cls([{"params": [weight]}, {"params": [weight2], "lr": 0.01}])
            schedulers = [s(optimizer) for s in schedulers_c]

            def closure():
                optimizer.zero_grad()
                loss = (weight.mv(x) + weight2.mv(x)).pow(2).sum()
                loss.backward()
                _sparse(case, weight, weight2)
                return loss

            initial = closure().item()
            for _ in range(20):
                loss = optimizer.step(closure)
                for s in schedulers:
                    s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()
            assert closure().item() < initial

    _check(case, run)


@pytest.mark.parametrize("num_dim", [0, 1, 2])
@EVERY
def test_tensor_lr(impl, info, num_dim):
    """A tensor lr (0-d, or of shape (1,) or (1, 1)) steps as the same float lr, or is refused
    with torch's message."""
    case = Case(impl, info, "test_tensor_lr", torch.float32, num_dim=num_dim)
    only = _only_2d(info)

    def run():
        for inp in case.inputs(skip=("differentiable",)):
            weight, bias, x = _linear(torch.float32)
            weight_c = weight.detach().clone().requires_grad_(True)
            bias_c = bias.detach().clone().requires_grad_(True)
            kwargs = inp.kwargs
            kwargs.pop("lr", None)
            kwargs["lr"] = 1.0 if info.step_requires_closure else 1e-3
            optimizer_r = case.cls([weight] if only else [weight, bias], **kwargs)
            try:
                kwargs["lr"] = torch.tensor(kwargs["lr"]).reshape([1] * num_dim)
                optimizer = case.cls([weight_c] if only else [weight_c, bias_c], **kwargs)
            except ValueError as e:
                assert "lr as a Tensor is not supported" in str(e)
                continue

            def closure(opt, w, b):
                opt.zero_grad()
                loss = (w.mv(x) + (0 if only else b)).pow(2).sum()
                loss.backward()
                _sparse(case, w, b)
                return loss

            for _ in range(5):
                if info.step_requires_closure:
                    optimizer_r.step(functools.partial(closure, optimizer_r, weight, bias))
                    optimizer.step(functools.partial(closure, optimizer, weight_c, bias_c))
                else:
                    closure(optimizer_r, weight, bias)
                    optimizer_r.step()
                    closure(optimizer, weight_c, bias_c)
                    optimizer.step()
                case.assertEqual(weight, weight_c, msg=inp.desc)
                if not only:
                    case.assertEqual(bias, bias_c, msg=inp.desc)

    _check(case, run)


def _rosenbrock(t):
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _drosenbrock(t):
    x, y = t
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


@pytest.mark.parametrize("with_lrsched", [True, False])
@_params(lambda info: info.supports_sparse or info.only_supports_sparse_grads)
def test_rosenbrock_sparse(impl, info, with_lrsched):
    """Cyclic coordinate descent on Rosenbrock with uncoalesced sparse gradients (float64), the
    same steps as dense gradients, towards the minimum."""
    dtype = torch.float64
    case = Case(impl, info, "test_rosenbrock_sparse", dtype, with_lrsched=with_lrsched)
    updates, schedulers_c = info.metadata_for_sparse
    if with_lrsched and not schedulers_c:
        return

    def run():
        inputs = case.inputs(skip=("differentiable", "fused"))
        if updates:
            chosen, seen = [], set()
            for i in inputs:
                for k in updates:
                    i.kwargs.pop(k, None)
                key = tuple(sorted(i.kwargs.items()))
                if i.kwargs and key not in seen:
                    chosen.append(i)
                    seen.add(key)
                    if "lr" in updates:
                        i.kwargs["lr"] = updates["lr"]
            inputs = chosen
        for inp in inputs:
            kwargs = inp.kwargs
            multi = kwargs.get("foreach", False)
            start = [torch.tensor([1.5, 1.5])] + ([torch.tensor([1.5, 1.5], dtype=dtype)] * multi)
            params = [Parameter(t.clone()) for t in start]
            optimizer = case.cls(params, **kwargs)
            scheds = [s(optimizer) for s in (schedulers_c if with_lrsched else [])]
            dense = not info.only_supports_sparse_grads
            if dense:
                params_c = [Parameter(t.clone()) for t in start]
                optimizer_c = case.cls(params_c, **kwargs)
                scheds_c = [s(optimizer_c) for s in (schedulers_c if with_lrsched else [])]
            solution = torch.tensor([1, 1])
            with torch.no_grad():
                initial = sum(p.dist(solution) for p in params)

            def grad_of(p, sparse, w):
                g = _drosenbrock(p)
                if sparse:  # uncoalesced: the coordinate's gradient split in two entries
                    if w:
                        i, v = torch.tensor([[0, 0]]), torch.tensor([g[0] / 4.0, g[0] - g[0] / 4.0])
                    else:
                        i, v = torch.tensor([[1, 1]]), torch.tensor([g[1] - g[1] / 4.0, g[1] / 4.0])
                    return torch.sparse_coo_tensor(i, v, (2,), dtype=v.dtype)
                return (
                    torch.tensor([g[0], 0], dtype=p.dtype)
                    if w
                    else torch.tensor([0, g[1]], dtype=p.dtype)
                )

            def evaluate(opt, ps, sparse, w):
                opt.zero_grad()
                loss = sum(_rosenbrock(p) for p in ps) if multi else _rosenbrock(ps[0])
                loss.backward()
                gs = [grad_of(p, sparse, w) for p in ps]
                with torch.no_grad():
                    ps[0].grad = gs[0]
                    if multi:
                        ps[1].grad = gs[1].to(dtype=dtype)
                return loss

            for i in range(1800):
                w = i % 2
                optimizer.step(functools.partial(evaluate, optimizer, params, True, w))
                for s in scheds:
                    s.step(_rosenbrock(params[0])) if isinstance(s, ReduceLROnPlateau) else s.step()
                if dense:
                    optimizer_c.step(functools.partial(evaluate, optimizer_c, params_c, False, w))
                    for s in scheds_c:
                        if isinstance(s, ReduceLROnPlateau):
                            s.step(_rosenbrock(params_c[0]))
                        else:
                            s.step()
                    case.assertEqual(params, params_c, atol=5e-6, rtol=5e-6, msg=inp.desc)
            if not kwargs.get("maximize", False):
                assert sum(p.dist(solution) for p in params) <= initial
            else:
                assert sum(_rosenbrock(p) for p in params) >= sum(_rosenbrock(t) for t in start)

    _check(case, run)


# -- complex parameters ----------------------------------------------------------------------------


@_params(lambda info: info.supports_complex)
def test_complex(impl, info):
    """Complex parameters step as their view_as_real twins (a real one mixed in)."""
    dtype = torch.complex64
    case = Case(impl, info, "test_complex", dtype)

    def run():
        for inp in case.inputs(skip=("differentiable", "fused")):
            complex_params = [
                torch.randn(10, 5, dtype=dtype, requires_grad=True),
                torch.randn(10, dtype=dtype, requires_grad=True),
                torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
            ]
            real_params = [
                (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                for p in complex_params
            ]
            complex_opt = case.cls(complex_params, **inp.kwargs)
            real_opt = case.cls(real_params, **inp.kwargs)
            real_steps, complex_steps, queue = [], [], []

            def real_closure():
                for p in real_params:
                    g = torch.randn_like(p)
                    p.grad = g
                    real_steps.append(p.detach().clone())
                    queue.append(g.clone())
                loss = torch.randn(1)
                queue.append(loss.clone())
                return loss

            def complex_closure():
                for p in complex_params:
                    if torch.is_complex(p):
                        g = torch.view_as_complex(queue.pop(0))
                        complex_steps.append(torch.view_as_real_copy(p.detach()))
                    else:
                        g = queue.pop(0)
                        complex_steps.append(p.detach().clone())
                    p.grad = g
                return queue.pop(0)

            for _ in range(3):
                if info.step_requires_closure:
                    real_opt.step(real_closure)
                    complex_opt.step(complex_closure)
                else:
                    real_closure()
                    complex_closure()
                    real_opt.step()
                    complex_opt.step()
            as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
            case.assertEqual(real_params, as_real, msg=inp.desc)
            case.assertEqual(complex_steps, real_steps, msg=inp.desc)

    _check(case, run)


@_params(lambda info: info.supports_complex)
def test_complex_2d(impl, info):
    """A complex Rosenbrock step by step against its real and imaginary parts as two params."""
    dtype = torch.complex64
    case = Case(impl, info, "test_complex_2d", dtype)

    def run():
        for inp in case.inputs(skip=("differentiable", "fused")):
            if info.step_requires_closure:
                torch.manual_seed(2024)
            a1 = torch.randn(2, dtype=dtype, requires_grad=True)
            a1_real = a1.real.detach().clone().requires_grad_()
            a1_imag = a1.imag.detach().clone().requires_grad_()
            optim1 = case.cls([a1], **inp.kwargs)
            optim2 = case.cls([a1_real, a1_imag], **inp.kwargs)
            reals, imags, greals, gimags, losses = (co.TensorTracker() for _ in range(5))

            def closure1():
                optim1.zero_grad()
                loss = _rosenbrock(a1).abs()
                loss.backward()
                reals.add(a1.real)
                imags.add(a1.imag)
                greals.add(a1.grad.real)
                gimags.add(a1.grad.imag)
                losses.add(loss)
                return loss

            def closure2():
                optim2.zero_grad()
                reals.pop_check_set(a1_real, case)
                imags.pop_check_set(a1_imag, case)
                loss = _rosenbrock(torch.complex(a1_real, a1_imag)).abs()
                losses.pop_check_set(loss, case)
                loss.backward()
                greals.pop_check_set(a1_real.grad, case)
                gimags.pop_check_set(a1_imag.grad, case)
                return loss

            for _ in range(3):
                if info.step_requires_closure:
                    optim1.step(closure1)
                    optim2.step(closure2)
                else:
                    closure1()
                    closure2()
                    optim1.step()
                    optim2.step()
                case.assertEqual(a1.real, a1_real, msg=inp.desc)
                case.assertEqual(a1.imag, a1_imag, msg=inp.desc)
            assert all(t.all_popped() for t in (reals, imags, greals, gimags, losses))

    _check(case, run)


# -- implementations agree -------------------------------------------------------------------------


def _compare_between(case: Case, inputs, models, optimizers, eq: Dict[str, Any]) -> None:
    tracker = co.TensorTracker(eq)
    for i in range(7):
        states, updated = [], []
        for x, model, optimizer in zip(inputs, models, optimizers):
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)  # a frozen layer: no gradient
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:  # all gradients None: the step is a no-op
                model(x).sum().backward()
            optimizer.step()
            states.append(optimizer.state)
            updated.append(model.parameters())
        for p, q in zip(updated[0], updated[1]):
            tracker.add(p)
            tracker.pop_check_set(q, case)
            for k in states[0][p]:
                tracker.add(states[0][p][k])
                tracker.pop_check_set(states[1][q][k], case)
    assert tracker.all_popped()


def _derived(case: Case, flag: str, dtype) -> None:
    """``flag`` (foreach or fused) off and on give the same parameters and state, step by step,
    on a small model with a 0-d parameter last."""
    for inp in case.info.optim_inputs_func(device=DEVICE, dtype=dtype):
        kwargs = copy.deepcopy(inp.kwargs)
        if kwargs.get("capturable", False):
            continue  # capturable is not supported on the CPU
        models, optimizers = [], []
        x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
        for value in (False, True):
            kwargs[flag] = value
            torch.manual_seed(1)
            model = torch.nn.Sequential(
                torch.nn.Linear(2, 3),
                torch.nn.Sigmoid(),
                torch.nn.Linear(3, 1),
                torch.nn.Sigmoid(),
            ).to(dtype=dtype)
            empty = torch.empty((), dtype=dtype, requires_grad=True)
            empty.grad = torch.rand_like(empty)
            optimizers.append(case.cls(list(model.parameters()) + [empty], **kwargs))
            models.append(model)
        eq = {}
        if case.tolerance is not None:
            eq = {"atol": case.tolerance.atol, "rtol": case.tolerance.rtol}
        _compare_between(case, [x, x], models, optimizers, eq)


@_params(lambda info: "foreach" in info.supported_impls)
def test_foreach_matches_forloop(impl, info):
    case = Case(impl, info, "test_foreach_matches_forloop", torch.float64)
    _check(case, lambda: _derived(case, "foreach", torch.float64))


FUSED_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@_params(lambda info: "fused" in info.supported_impls and DEVICE in info.supports_fused_on)
def test_fused_matches_forloop(impl, info, dtype):
    case = Case(impl, info, "test_fused_matches_forloop", dtype)
    _check(case, lambda: _derived(case, "fused", dtype))


@_params(lambda info: "fused" in info.supported_impls and DEVICE in info.supports_fused_on)
def test_fused_error_on_params_on_meta(impl, info):
    """A model built on the meta device (deferred initialisation): the fused optimizer is made
    over it, refuses only at the step, and steps once the model is materialised."""
    case = Case(impl, info, "test_fused_error_on_params_on_meta", torch.float32)

    def run():
        with torch.device("meta"):
            model = torch.nn.Sequential(
                torch.nn.Linear(2, 3),
                torch.nn.Sigmoid(),
                torch.nn.Linear(3, 1),
                torch.nn.Sigmoid(),
            ).to(torch.float32)
        optimizer = case.cls(model.parameters(), fused=True)
        with torch.device("meta"):
            for p in model.parameters():
                p.grad = torch.rand_like(p)
        with pytest.raises(RuntimeError, match="`fused=True` requires all the params"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.to_empty(device=DEVICE)
        for p in model.parameters():
            p.grad = torch.rand_like(p)
        optimizer.step()

    _check(case, run)


# -- param groups ----------------------------------------------------------------------------------


@EVERY
def test_param_groups_weight_decay(impl, info):
    case = Case(impl, info, "test_param_groups_weight_decay", torch.float32)

    def run():
        for inp in case.inputs(skip=("differentiable",)):
            bias_kwargs = copy.deepcopy(inp.kwargs)
            bias_kwargs["weight_decay"] = 0.0
            weight, bias, x = _linear(torch.float32)
            if _only_2d(info):  # the second group's parameter a matrix too
                bias, x2 = Parameter(torch.randn(10, 5)), torch.randn(5)
            optimizer = case.cls(
                [dict(params=[weight], **inp.kwargs), dict(params=[bias], **bias_kwargs)]
            )

            def output():
                return weight.mv(x) + (bias.mv(x2) if bias.dim() == 2 else bias)

            initial = output().pow(2).sum().item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = output().pow(2).sum()
                loss.backward()
                _sparse(case, weight, bias)
                optimizer.step()
            if inp.kwargs.get("maximize", False):
                assert loss.item() > initial, inp.desc
            else:
                assert loss.item() < initial, inp.desc

    _check(case, run)


@EVERY
def test_param_groups_lr(impl, info):
    """A group's lr overrides the optimizer's (1e-28: the other group does not move)."""
    case = Case(impl, info, "test_param_groups_lr", torch.float32)

    def run():
        for inp in case.inputs(skip=("differentiable",)):
            if "lr" not in inp.kwargs or inp.kwargs["lr"] == 0:
                inp.kwargs["lr"] = 1e-3
            outer = {"lr": 1e-28}
            if info.name == "Rprop":
                outer["step_sizes"] = (0, 50)  # a minimum step size of 0
            weight, bias, x = _linear(torch.float32)
            only = _only_2d(info)
            irrelevant = Parameter(torch.randn(2, 2) if only else torch.randn(2))
            before = irrelevant.clone()
            optimizer = case.cls(
                [
                    dict(params=[weight] if only else [weight, bias], **inp.kwargs),
                    dict(params=[irrelevant]),
                ],
                **outer,
            )
            initial = (weight.mv(x) + (0 if only else bias)).pow(2).sum().item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = (weight.mv(x) + (0 if only else bias)).pow(2).sum()
                loss.backward()
                irrelevant.grad = torch.rand_like(irrelevant)
                _sparse(case, weight, bias, irrelevant)
                optimizer.step()
            if inp.kwargs.get("maximize", False):
                assert loss.item() > initial, inp.desc
            else:
                assert loss.item() < initial, inp.desc
            case.assertEqual(irrelevant, before, msg=inp.desc)

    _check(case, run)


@EVERY
def test_step_is_noop_when_params_have_no_grad(impl, info):
    case = Case(impl, info, "test_step_is_noop_when_params_have_no_grad", torch.float32)

    def run():
        params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
        for inp in case.inputs():
            case.cls(params, **inp.kwargs).step(lambda: torch.tensor([1.0]))

    _check(case, run)


@EVERY
def test_step_is_noop_for_zero_grads(impl, info):
    case = Case(impl, info, "test_step_is_noop_for_zero_grads", torch.float32)

    def run():
        param = torch.randn((5, 1), requires_grad=True)
        old = param.detach().clone()
        for inp in case.inputs():
            kwargs = inp.kwargs
            if kwargs.get("weight_decay", 0) != 0:
                continue  # weight decay moves the parameter without a gradient
            if info.name in ("AdamW", "Muon"):  # their lr moves the parameter regardless
                kwargs["lr"] = (
                    torch.tensor(1e-5) if isinstance(kwargs.get("lr", 1e-5), torch.Tensor) else 1e-5
                )
            params = [param.detach()] if kwargs.get("differentiable", False) else [param]
            optimizer = case.cls(params, **kwargs)
            if info.only_supports_sparse_grads:
                i, v = torch.empty((1, 0)), torch.empty((0, 1))
                params[0].grad = torch.sparse_coo_tensor(i, v, (5, 1))
            else:
                params[0].grad = torch.zeros_like(params[0])
            optimizer.step(lambda: torch.tensor([1.0]))
            case.assertEqual(old, params[0], msg=inp.desc)

    _check(case, run)


@EVERY
def test_optimizer_can_be_printed(impl, info):
    case = Case(impl, info, "test_optimizer_can_be_printed", torch.float32)

    def run():
        params = [Parameter(torch.randn(2, 3, requires_grad=True)) for _ in range(2)]
        for inp in case.inputs():
            assert case.cls.__name__ in repr(case.cls(params, **inp.kwargs))

    _check(case, run)


# -- state dicts -----------------------------------------------------------------------------------


def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_names(sd):
    sd = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        g.pop("param_names", None)
    return sd


@pytest.mark.parametrize("named1", [True, False])
@pytest.mark.parametrize("named0", [True, False])
@EVERY
def test_state_dict_deterministic(impl, info, named0, named1):
    """A state dict loaded into a new optimizer over equal parameters continues identically,
    and both then give the same state dict."""
    case = Case(
        impl,
        info,
        "test_state_dict_deterministic",
        torch.float32,
        is_named_optim0=named0,
        is_named_optim1=named1,
    )

    def run():
        weight = Parameter(torch.randn(2, 3, requires_grad=True))
        bias = Parameter(torch.randn(2, requires_grad=True))
        x = torch.randn(3, requires_grad=True)

        def fwd_bwd(opt, w, b):
            opt.zero_grad()
            loss = (w.mv(x) + b).pow(2).sum()
            loss.backward()
            _sparse(case, w, b)
            return loss

        only = _only_2d(info)
        for inp in case.inputs(skip=("differentiable",)):
            optimizer = case.cls(_named([weight] if only else [weight, bias], named0), **inp.kwargs)
            closure = functools.partial(fwd_bwd, optimizer, weight, bias)
            _drive(case, optimizer, closure, 10)
            with torch.no_grad():
                weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
            params_c = [weight_c] if only else [weight_c, bias_c]
            optimizer_c = case.cls(_named(params_c, named1), **inp.kwargs)
            closure_c = functools.partial(fwd_bwd, optimizer_c, weight_c, bias_c)
            optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            for _ in range(10):
                if info.step_requires_closure:
                    optimizer.step(closure)
                    optimizer_c.step(closure_c)
                else:
                    closure()
                    closure_c()
                    optimizer.step()
                    optimizer_c.step()
                case.assertEqual(weight, weight_c, msg=inp.desc)
                case.assertEqual(bias, bias_c, msg=inp.desc)
            case.assertEqual(
                _without_names(optimizer.state_dict()),
                _without_names(optimizer_c.state_dict()),
                msg=inp.desc,
            )
            optimizer_c.param_groups.extend(optimizer_c.param_groups)
            case.assertEqual(
                _without_names(optimizer.state_dict())["param_groups"][-1],
                _without_names(optimizer_c.state_dict())["param_groups"][-1],
                msg=inp.desc,
            )

    _check(case, run)


def _conv_bn(dtype, info):
    torch.manual_seed(1)
    if _only_2d(info):
        return torch.nn.Linear(10, 4, bias=False).to(dtype=dtype), torch.rand(10, dtype=dtype)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)
    ).to(dtype=dtype)
    return model, torch.rand(1, 4, 16, 16, dtype=dtype)


def _fwd_bwd(opt, model, x):
    opt.zero_grad()
    loss = model(x).sum()
    loss.backward()
    return loss


@EVERY
def test_can_load_older_state_dict(impl, info):
    """A state dict without the flags later versions added (foreach, maximize, ...) loads and
    steps."""
    case = Case(impl, info, "test_can_load_older_state_dict", torch.float32)

    def run():
        for inp in case.inputs(skip=("differentiable",)):
            model, x = _conv_bn(torch.float32, info)
            optimizer = case.cls(model.parameters(), **inp.kwargs)
            closure = functools.partial(_fwd_bwd, optimizer, model, x)
            _drive(case, optimizer, closure, 3)
            old = copy.deepcopy(optimizer.state_dict())
            for group in old["param_groups"]:
                for flag in info.not_og_supported_flags:
                    group.pop(flag, None)
            optimizer.load_state_dict(old)
            _drive(case, optimizer, closure, 1)

    _check(case, run)


@pytest.mark.parametrize("named1", [True, False])
@pytest.mark.parametrize("named0", [True, False])
@_params(lambda info: not info.only_supports_sparse_grads)
def test_can_load_from_to_named_state_dict(impl, info, named0, named1):
    case = Case(
        impl,
        info,
        "test_can_load_from_to_named_state_dict",
        torch.float32,
        is_named_optim0=named0,
        is_named_optim1=named1,
    )

    def run():
        for inp in case.inputs(skip=("differentiable",)):
            model, x = _conv_bn(torch.float32, info)
            given = model.named_parameters() if named0 else model.parameters()
            optimizer = case.cls(given, **inp.kwargs)
            _drive(case, optimizer, functools.partial(_fwd_bwd, optimizer, model, x), 3)
            old = copy.deepcopy(optimizer.state_dict())
            given2 = model.named_parameters() if named1 else model.parameters()
            optimizer2 = case.cls(given2, **inp.kwargs)
            optimizer2.load_state_dict(old)
            _drive(case, optimizer2, functools.partial(_fwd_bwd, optimizer2, model, x), 1)
            if named0 or named1:
                names = optimizer2.state_dict()["param_groups"][0]["param_names"]
                assert names == [n for n, _ in model.named_parameters()]

    _check(case, run)


@pytest.mark.parametrize("named", [True, False])
@EVERY
def test_save_load_equality_with_weights_only(impl, info, named):
    """torch.save of a state dict loads back equal, with weights_only=True too."""
    case = Case(
        impl, info, "test_save_load_equality_with_weights_only", torch.float32, is_named_optim=named
    )

    def run():
        weight = Parameter(torch.randn(2, 3, requires_grad=True))
        bias = Parameter(torch.randn(2, requires_grad=True))
        x = torch.randn(3, requires_grad=True)

        only = _only_2d(info)

        def fwd_bwd(opt):
            opt.zero_grad()
            loss = (weight.mv(x) + (0 if only else bias)).pow(2).sum()
            loss.backward()
            _sparse(case, weight, bias)
            return loss

        for inp in case.inputs(skip=("differentiable",)):
            optimizer = case.cls(_named([weight] if only else [weight, bias], named), **inp.kwargs)
            for _ in range(3):
                optimizer.step(functools.partial(fwd_bwd, optimizer))
            sd = optimizer.state_dict()
            with tempfile.TemporaryFile() as f:
                torch.save(sd, f)
                f.seek(0)
                case.assertEqual(torch.load(f), sd, msg=inp.desc)
                f.seek(0)
                case.assertEqual(torch.load(f, weights_only=True), sd, msg=inp.desc)

    _check(case, run)


@EVERY
def test_load_nontensor_step(impl, info):
    """A state dict whose step counts are plain numbers (older checkpoints) loads and steps."""
    case = Case(impl, info, "test_load_nontensor_step", torch.float32)

    def run():
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        _sparse(case, *params)
        loss = torch.rand(1)

        def closure():
            return loss if info.step_requires_closure else None

        for inp in case.inputs(skip=("differentiable",)):
            optimizer = case.cls(params, **inp.kwargs)
            for _ in range(3):
                optimizer.step(closure)
            sd = copy.deepcopy(optimizer.state_dict())
            for st in sd["state"].values():
                if "step" in st and torch.is_tensor(st["step"]):
                    st["step"] = st["step"].item()
            optimizer.load_state_dict(sd)
            optimizer.step(closure)

    _check(case, run)


# -- hooks -----------------------------------------------------------------------------------------


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(optimizer, state_dict):
    mine = copy.deepcopy(state_dict)
    mine["param_groups"][0]["lr"] = 0.003
    return mine


def _load_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def _each_optimizer(case: Case):
    for inp in case.inputs():
        param = torch.rand(2, 3, requires_grad=True)
        yield case.cls([param], **inp.kwargs)


@EVERY
def test_state_dict_hooks(impl, info):
    """state_dict's pre and post hooks, alone and together (torch's three checks)."""
    case = Case(impl, info, "test_state_dict_pre_post_hook", torch.float32)

    def run():
        for optim in _each_optimizer(case):
            optim.register_state_dict_pre_hook(_state_dict_pre_hook)
            assert optim.state_dict()["state"]["test"] == 1
        for optim in _each_optimizer(case):
            optim.register_state_dict_post_hook(_state_dict_post_hook)
            assert not optim.state_dict()["ran_state_dict_pre_hook"]
        for optim in _each_optimizer(case):
            optim.register_state_dict_pre_hook(_state_dict_pre_hook)
            optim.register_state_dict_post_hook(_state_dict_post_hook)
            sd = optim.state_dict()
            assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"]

    _check(case, run)


@EVERY
def test_load_state_dict_hooks(impl, info):
    """load_state_dict's pre hooks (in order, prepend), post hook, and both."""
    case = Case(impl, info, "test_load_state_dict_pre_post_hook", torch.float32)

    def run():
        for optim in _each_optimizer(case):
            sd = optim.state_dict()
            optim.register_load_state_dict_pre_hook(_load_pre_hook1)
            optim.load_state_dict(sd)
            assert optim.param_groups[0]["lr"] == 0.002
            optim.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
            optim.load_state_dict(sd)
            assert optim.param_groups[0]["lr"] == 0.002  # the prepended hook ran first
        for optim in _each_optimizer(case):
            optim.register_load_state_dict_post_hook(_load_post_hook)
            optim.load_state_dict(optim.state_dict())
            assert not optim.state["ran_load_state_dict_pre_hook2"]
            assert optim.state["ran_load_state_dict_post_hook"]
        for optim in _each_optimizer(case):
            optim.register_load_state_dict_pre_hook(_load_pre_hook2)
            optim.register_load_state_dict_post_hook(_load_post_hook)
            optim.load_state_dict(optim.state_dict())
            assert optim.state["ran_load_state_dict_pre_hook2"]
            assert optim.state["ran_load_state_dict_post_hook"]

    _check(case, run)


@EVERY
def test_step_hooks(impl, info):
    """Step pre and post hooks fire once per step until removed; with global hooks and a second
    optimizer (torch's SGD) they fire in torch's order."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    case = Case(impl, info, "test_step_all_hooks", torch.float32)
    closure = (lambda: 1) if info.step_requires_closure else None

    def run():
        for inp in case.inputs():
            params = [torch.tensor([[1.0, 1.0]] if _only_2d(info) else [1.0, 1.0])]
            data = [0]
            optim = case.cls(params, **inp.kwargs)
            pre = optim.register_step_pre_hook(lambda *a: data.__setitem__(0, data[0] + 2))
            post = optim.register_step_post_hook(lambda *a: data.__setitem__(0, data[0] + 3))
            optim.step(closure)
            optim.step(closure)
            assert data[0] == 10
            pre.remove()
            post.remove()
            optim.step(closure)
            assert data[0] == 10
            order = []
            optim2 = torch.optim.SGD(params)
            handles = [
                register_optimizer_step_pre_hook(lambda *a: order.append(0)),
                register_optimizer_step_post_hook(lambda *a: order.append(5)),
                optim.register_step_pre_hook(lambda *a: order.append(1)),
                optim.register_step_post_hook(lambda *a: order.append(2)),
                optim2.register_step_pre_hook(lambda *a: order.append(1)),
                optim2.register_step_post_hook(lambda *a: order.append(2)),
            ]
            try:
                optim.step(closure)
                assert order == [0, 1, 2, 5]
                optim2.step(closure)
                assert order == [0, 1, 2, 5] * 2
                optim.step(closure)
                assert order == [0, 1, 2, 5] * 3
            finally:
                for h in handles:
                    h.remove()
            optim.step(closure)
            optim2.step(closure)
            assert order == [0, 1, 2, 5] * 3

    _check(case, run)


# -- copies, return types, state -------------------------------------------------------------------


@EVERY
def test_deepcopy_copies_all_public_attrs(impl, info):
    case = Case(impl, info, "test_deepcopy_copies_all_public_attrs", torch.float32)

    def run():
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        _sparse(case, *params)

        def public(obj):
            return {k for k in obj.__dict__ if not k.startswith("_")}

        closure = (lambda: 1) if info.step_requires_closure else None
        for inp in case.inputs(skip=("differentiable",)):
            optimizer = case.cls(params, **inp.kwargs)
            for _ in range(3):
                optimizer.step(closure)
            assert public(optimizer) == public(copy.deepcopy(optimizer)), inp.desc

    _check(case, run)


@_params(lambda info: info.step_requires_closure)
def test_second_order_optims_return_consistent_types(impl, info):
    case = Case(impl, info, "test_second_order_optims_return_consistent_types", torch.float32)

    def run():
        params = [torch.randn(10, 5), torch.randn(10)]
        for inp in info.optim_inputs_func(device=DEVICE):
            kwargs = inp.kwargs
            kwargs["tolerance_grad"] = math.inf
            res1 = case.cls(params, **kwargs).step(lambda: torch.tensor([10.0]))
            kwargs["tolerance_grad"] = -math.inf
            res2 = case.cls(params, **kwargs).step(lambda: torch.tensor([10.0]))
            assert type(res1) is type(res2)

    _check(case, run)


@EVERY
def test_non_empty_state(impl, info):
    """After a step every parameter's state holds something."""
    case = Case(impl, info, "test_non_empty_state", torch.float32)

    def run():
        model = torch.nn.Linear(5, 5, bias=not _only_2d(info))
        x = torch.rand(2, 5)
        for inp in info.optim_inputs_func(device=DEVICE):
            optim = case.cls(model.parameters(), **inp.kwargs)
            optim.zero_grad()
            model(x).sum().backward()
            _sparse(case, *model.parameters())
            if info.step_requires_closure:
                optim.step(lambda: 1.0)
            else:
                optim.step()
            for st in optim.state.values():
                assert len(st) > 0, inp.desc

    _check(case, run)


def test_the_optkern_lane_covers_every_class_optkern_has():
    """Every optim_db entry whose optimizer optkern.torch has runs in the optkern lane."""
    names = {info.name for info in INFOS}
    assert {n for n in okt.RULES if okt.RULES[n].torch_name == n} <= names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(getattr(okt, n, None) is not None for n in okt.RULES)
