"""Program shapes for the training-loop study: three small NumPy training programs of the kinds
people write by hand, each run with its own NumPy update lines and with optkern in their place.

- ``charrnn``: a character-level RNN (hidden 100, 25-step unroll through time, gradients clipped
  to [-5, 5]) trained with Adagrad on a short text of its own, in float64. Its NumPy update is
  the textbook Adagrad with eps inside the square root, ``p -= lr * g / sqrt(G + eps)``, and
  optkern's takes the same form (``eps_inside_sqrt=True``).
- ``fcnet``: a six-layer fully connected ReLU net (144-100-100-100-80-60-10, 48K parameters,
  softmax loss with L2) trained by a ``Solver`` that samples mini-batches of 100, applies an
  update rule to every parameter and decays the learning rate after every epoch, in float32,
  with Adam, RMSprop and SGD-momentum. Its NumPy rules return new arrays (``next_w = w + v``) as
  such solvers do; its SGD-momentum is classic momentum (``v = mu * v - lr * dw``), and so is
  optkern's (``lr_in_velocity=True``).
- ``mlp64``: a 64-30-10 sigmoid MLP (quadratic cost) on 8x8 digits, trained with mini-batch SGD
  (batch 10) whose learning rate is set before every batch, in float64.

Every program computes fresh gradient arrays each iteration, as such programs do, and keeps its
own dtype: optkern steps the float64 programs' arrays in float64, with no conversion. Each one is
written for this benchmark; none is copied from anywhere.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["PROGRAMS", "Program", "measure_program"]

VARIANTS = ["numpy", "optkern", "optkern_1t"]


# -- a character-level RNN with Adagrad (float64) ------------------------------------------------------

TEXT = (
    "The ferry left the harbour an hour before dawn, when the water was still the colour of "
    "slate and the gulls had not yet found their voices. Mara stood at the rail and counted "
    "the lights along the shore: the bakery, the boat shed, the long window of the school "
    "where her mother had taught arithmetic for thirty winters. Each light went out as the "
    "boat turned north, one after another, until only the lighthouse was left, turning its "
    "slow white arm across the waves. She had packed two shirts, a tin of biscuits, a map "
    "drawn in pencil and a letter she had not opened. The letter was from her uncle, who "
    "kept bees on the island and wrote once a year, always in green ink, always about the "
    "weather. The engine hummed under her feet. A man in a yellow coat asked if she was "
    "going home or leaving it, and she said she did not know yet, which was the truth. By "
    "the time the sun came up over the low hills the mainland was a grey line, then a "
    "thought, then nothing at all. The island rose out of the mist like the back of a "
    "sleeping animal, green and patient, with a white house on its shoulder and a thin "
    "thread of smoke climbing from the chimney. Somebody had lit the stove. Somebody was "
    "waiting. She opened the letter at last and read the single line written inside: the "
    "bees are quiet this year, come and listen to them with me.\n"
)


class CharRNN:
    """Elman RNN over characters: h_t = tanh(Wxh x_t + Whh h_{t-1} + bh), p_t = softmax(Why
    h_t + by); truncated backpropagation through ``SEQ`` steps, the hidden state carried over."""

    HIDDEN = 100
    SEQ = 25
    LR = 0.1
    EPS = 1e-8
    dtype = np.float64
    optimizers = ("adagrad",)

    def __init__(self, seed: int) -> None:
        chars = sorted(set(TEXT))
        self.vocab = len(chars)
        index = {c: i for i, c in enumerate(chars)}
        self.data = np.array([index[c] for c in TEXT], np.int64)
        rng = np.random.default_rng(seed)
        H, V = self.HIDDEN, self.vocab
        self.params = [
            rng.standard_normal((H, V)) * 0.01,  # Wxh
            rng.standard_normal((H, H)) * 0.01,  # Whh
            rng.standard_normal((V, H)) * 0.01,  # Why
            np.zeros((H, 1)),  # bh
            np.zeros((V, 1)),  # by
        ]
        self.grads: List[np.ndarray] = [np.zeros_like(p) for p in self.params]
        self.h = np.zeros((H, 1))
        self.at = 0
        self.loss = math.log(V) * self.SEQ

    def forward_backward(self) -> None:
        n = self.SEQ
        if self.at + n + 1 > len(self.data):  # back to the start, with a fresh memory
            self.at = 0
            self.h = np.zeros_like(self.h)
        xs = self.data[self.at : self.at + n]
        ys = self.data[self.at + 1 : self.at + n + 1]
        Wxh, Whh, Why, bh, by = self.params
        hs = [self.h]
        probs = []
        loss = 0.0
        for t in range(n):
            h = np.tanh(Wxh[:, xs[t] : xs[t] + 1] + Whh @ hs[-1] + bh)
            z = Why @ h + by
            e = np.exp(z - z.max())
            p = e / e.sum()
            hs.append(h)
            probs.append(p)
            loss -= math.log(p[ys[t], 0])
        dWxh, dWhh, dWhy = np.zeros_like(Wxh), np.zeros_like(Whh), np.zeros_like(Why)
        dbh, dby = np.zeros_like(bh), np.zeros_like(by)
        carry = np.zeros_like(self.h)
        for t in reversed(range(n)):
            dz = probs[t].copy()
            dz[ys[t]] -= 1.0
            dWhy += dz @ hs[t + 1].T
            dby += dz
            da = (1.0 - hs[t + 1] * hs[t + 1]) * (Why.T @ dz + carry)
            dbh += da
            dWxh[:, xs[t]] += da[:, 0]
            dWhh += da @ hs[t].T
            carry = Whh.T @ da
        self.grads = [dWxh, dWhh, dWhy, dbh, dby]
        for d in self.grads:
            np.clip(d, -5.0, 5.0, out=d)
        self.h = hs[-1]
        self.at += n
        self.loss = loss

    def numpy_update(self, optimizer: str) -> Callable[[], None]:
        memory = [np.zeros_like(p) for p in self.params]

        def update() -> None:
            for p, d, m in zip(self.params, self.grads, memory):
                m += d * d
                p -= self.LR * d / np.sqrt(m + self.EPS)

        return update

    def optkern_update(self, optimizer: str) -> Callable[[], None]:
        import optkern as ok

        opt = ok.Adagrad(self.params, lr=self.LR, eps=self.EPS, eps_inside_sqrt=True)
        return lambda: opt.step(self.grads)


# -- a six-layer fully connected net trained by a Solver (float32) ---------------------------------


class FCNet:
    """ReLU layers, softmax cross-entropy with L2 on the weights; ``params`` is a dict W1, b1,
    ..., as solver-style code keeps it. ``loss`` returns the loss and new gradient arrays."""

    def __init__(self, dims: Sequence[int], reg: float, dtype, rng: np.random.Generator) -> None:
        self.layers = len(dims) - 1
        self.reg = reg
        self.params: Dict[str, np.ndarray] = {}
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]), 1):
            self.params[f"W{i}"] = (rng.standard_normal((a, b)) * math.sqrt(2.0 / a)).astype(dtype)
            self.params[f"b{i}"] = np.zeros(b, dtype)

    def scores(self, X: np.ndarray) -> List[np.ndarray]:
        outs = [X]
        for i in range(1, self.layers + 1):
            z = outs[-1] @ self.params[f"W{i}"] + self.params[f"b{i}"]
            outs.append(np.maximum(z, 0) if i < self.layers else z)
        return outs

    def loss(self, X: np.ndarray, y: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
        outs = self.scores(X)
        s = outs[-1] - outs[-1].max(axis=1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        rows = np.arange(len(y))
        weights = [self.params[f"W{i}"] for i in range(1, self.layers + 1)]
        loss = -float(logp[rows, y].mean()) + 0.5 * self.reg * sum(
            float(np.sum(w * w)) for w in weights
        )
        d = np.exp(logp)
        d[rows, y] -= 1
        d /= len(y)
        grads: Dict[str, np.ndarray] = {}
        for i in range(self.layers, 0, -1):
            W = self.params[f"W{i}"]
            grads[f"W{i}"] = outs[i - 1].T @ d + self.reg * W
            grads[f"b{i}"] = d.sum(axis=0)
            if i > 1:
                d = d @ W.T
                d[outs[i - 1] <= 0] = 0
        return loss, grads


def _sgd_momentum(w, dw, config):
    v = config.get("velocity")
    v = np.zeros_like(w) if v is None else v
    v = config["momentum"] * v - config["learning_rate"] * dw
    config["velocity"] = v
    return w + v, config


def _rmsprop(w, dw, config):
    cache = config.get("cache")
    cache = np.zeros_like(w) if cache is None else cache
    rho = config["decay_rate"]
    cache = rho * cache + (1 - rho) * dw * dw
    config["cache"] = cache
    return w - config["learning_rate"] * dw / (np.sqrt(cache) + config["epsilon"]), config


def _adam(w, dw, config):
    m = config.get("m")
    v = config.get("v")
    m = np.zeros_like(w) if m is None else m
    v = np.zeros_like(w) if v is None else v
    b1, b2, t = config["beta1"], config["beta2"], config["t"] + 1
    m = b1 * m + (1 - b1) * dw
    v = b2 * v + (1 - b2) * dw * dw
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    config.update(m=m, v=v, t=t)
    return w - config["learning_rate"] * m_hat / (np.sqrt(v_hat) + config["epsilon"]), config


_RULES = {"sgd-momentum": _sgd_momentum, "rmsprop": _rmsprop, "adam": _adam}
_CONFIGS = {
    "sgd-momentum": dict(learning_rate=2e-2, momentum=0.9),
    "rmsprop": dict(learning_rate=1e-3, decay_rate=0.99, epsilon=1e-8),
    "adam": dict(learning_rate=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8, t=0),
}


class Solver:
    """Mini-batch training of a model with ``loss(X, y) -> (loss, grads)``: each iteration
    samples a batch, computes the gradients and applies ``update_rule`` to every parameter;
    after each epoch the learning rate is multiplied by ``lr_decay`` and the validation accuracy
    is checked, the best parameters kept as copies."""

    def __init__(
        self,
        model: FCNet,
        data: Dict[str, np.ndarray],
        update_rule: str,
        *,
        lr_decay: float = 0.95,
        batch_size: int = 100,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.data = data
        self.rule = _RULES[update_rule]
        self.configs = {k: dict(_CONFIGS[update_rule]) for k in model.params}
        self.lr_decay = lr_decay
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.per_epoch = max(1, len(data["y_train"]) // batch_size)
        self.iteration = 0
        self.grads: Dict[str, np.ndarray] = {}
        self.loss = float("nan")
        self.best_acc = -1.0
        self.best_params: Dict[str, np.ndarray] = {}

    def sample_and_backward(self) -> None:
        picks = self.rng.integers(0, len(self.data["y_train"]), self.batch_size)
        self.loss, self.grads = self.model.loss(
            self.data["X_train"][picks], self.data["y_train"][picks]
        )

    def update(self) -> None:
        for name, w in self.model.params.items():
            self.model.params[name], self.configs[name] = self.rule(
                w, self.grads[name], self.configs[name]
            )
        self.iteration += 1
        if self.iteration % self.per_epoch == 0:
            for config in self.configs.values():
                config["learning_rate"] *= self.lr_decay

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(np.argmax(self.model.scores(X)[-1], axis=1) == y))

    def train(self, epochs: int) -> None:
        for _ in range(epochs * self.per_epoch):
            self.sample_and_backward()
            self.update()
            if self.iteration % self.per_epoch == 0:
                acc = self.accuracy(self.data["X_val"], self.data["y_val"])
                if acc > self.best_acc:
                    self.best_acc = acc
                    self.best_params = {k: v.copy() for k, v in self.model.params.items()}
        # Copies into the arrays the model (and an optimizer) holds: rebinding model.params to
        # the copies would leave an optimizer stepping arrays nobody reads.
        for k, v in self.best_params.items():
            np.copyto(self.model.params[k], v)


class OptkernSolver(Solver):
    """The same Solver with its update lines replaced by one optkern optimizer over every
    parameter; the per-epoch decay writes each group's lr."""

    def __init__(self, model: FCNet, data: Dict[str, np.ndarray], update_rule: str, **kw) -> None:
        import optkern as ok

        super().__init__(model, data, update_rule, **kw)
        cfg = _CONFIGS[update_rule]
        params = list(model.params.values())
        if update_rule == "sgd-momentum":
            self.opt = ok.SGD(
                params, lr=cfg["learning_rate"], momentum=cfg["momentum"], lr_in_velocity=True
            )
        elif update_rule == "rmsprop":
            self.opt = ok.RMSprop(
                params, lr=cfg["learning_rate"], alpha=cfg["decay_rate"], eps=cfg["epsilon"]
            )
        else:
            self.opt = ok.Adam(
                params,
                lr=cfg["learning_rate"],
                betas=(cfg["beta1"], cfg["beta2"]),
                eps=cfg["epsilon"],
            )
        self.names = list(model.params)

    def update(self) -> None:
        self.opt.step([self.grads[k] for k in self.names])
        self.iteration += 1
        if self.iteration % self.per_epoch == 0:
            for group in self.opt.param_groups:
                group["lr"] *= self.lr_decay


class FCNetProgram:
    DIMS = (144, 100, 100, 100, 80, 60, 10)
    dtype = np.float32
    optimizers = ("adam", "rmsprop", "sgd-momentum")

    def __init__(self, seed: int, optimizer: str, use_optkern: bool) -> None:
        from ..examples.datasets import make_digits

        X, y = make_digits(1200, size=12, seed=seed)
        data = {"X_train": X[:1000], "y_train": y[:1000], "X_val": X[1000:], "y_val": y[1000:]}
        model = FCNet(self.DIMS, reg=1e-4, dtype=self.dtype, rng=np.random.default_rng(seed))
        cls = OptkernSolver if use_optkern else Solver
        self.solver = cls(model, data, optimizer, seed=seed + 1)
        self.params = list(model.params.values())  # the arrays as built (optkern keeps them)

    @property
    def loss(self) -> float:
        return self.solver.loss

    def forward_backward(self) -> None:
        self.solver.sample_and_backward()

    def current_params(self) -> List[np.ndarray]:
        return list(self.solver.model.params.values())


# -- a 64-30-10 sigmoid MLP with per-batch learning rates (float64) ----------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class SigmoidMLP:
    """Sigmoid layers and a quadratic cost on one-hot targets; mini-batch SGD (batch 10) with
    lr = LR0 / (1 + DECAY * batch), set before every batch."""

    DIMS = (64, 30, 10)
    BATCH = 10
    LR0 = 3.0
    DECAY = 1e-3
    dtype = np.float64
    optimizers = ("sgd",)

    def __init__(self, seed: int) -> None:
        from ..examples.datasets import make_digits

        X, y = make_digits(2000, size=8, seed=seed)
        self.X = X.astype(np.float64)
        self.Y = np.eye(10)[y]
        rng = np.random.default_rng(seed)
        self.params = []
        for a, b in zip(self.DIMS[:-1], self.DIMS[1:]):
            self.params += [rng.standard_normal((a, b)) / math.sqrt(a), rng.standard_normal(b)]
        self.grads: List[np.ndarray] = [np.zeros_like(p) for p in self.params]
        self.order = rng.permutation(len(self.X))
        self.batch_index = 0
        self.loss = float("nan")

    def lr(self) -> float:
        return self.LR0 / (1.0 + self.DECAY * self.batch_index)

    def forward_backward(self) -> None:
        per_epoch = len(self.X) // self.BATCH
        k = self.batch_index % per_epoch
        rows = self.order[k * self.BATCH : (k + 1) * self.BATCH]
        X, Y = self.X[rows], self.Y[rows]
        W1, b1, W2, b2 = self.params
        a1 = _sigmoid(X @ W1 + b1)
        a2 = _sigmoid(a1 @ W2 + b2)
        err = a2 - Y
        self.loss = 0.5 * float(np.mean(np.sum(err * err, axis=1)))
        d2 = err * a2 * (1.0 - a2) / len(rows)
        d1 = (d2 @ W2.T) * a1 * (1.0 - a1)
        self.grads = [X.T @ d1, d1.sum(axis=0), a1.T @ d2, d2.sum(axis=0)]

    def numpy_update(self, optimizer: str) -> Callable[[], None]:
        def update() -> None:
            lr = self.lr()
            for p, d in zip(self.params, self.grads):
                p -= lr * d
            self.batch_index += 1

        return update

    def optkern_update(self, optimizer: str) -> Callable[[], None]:
        import optkern as ok

        opt = ok.SGD(self.params, lr=self.lr())
        group = opt.param_groups[0]

        def update() -> None:
            group["lr"] = self.lr()
            opt.step(self.grads)
            self.batch_index += 1

        return update


# -- the registry of programs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    key: str
    label: str
    dtype: type
    optimizers: Tuple[str, ...]
    #: build(seed, optimizer, variant) -> (forward_backward, update, params, loss)
    build: Callable[[int, str, str], "Instance"]


@dataclass
class Instance:
    forward_backward: Callable[[], None]
    update: Callable[[], None]
    params: Callable[[], List[np.ndarray]]  # the arrays the program reads now
    loss: Callable[[], float]


def _plain(cls) -> Callable[[int, str, str], Instance]:
    def build(seed: int, optimizer: str, variant: str) -> Instance:
        prog = cls(seed)
        update = (prog.numpy_update if variant == "numpy" else prog.optkern_update)(optimizer)
        return Instance(prog.forward_backward, update, lambda: list(prog.params), lambda: prog.loss)

    return build


def _fcnet(seed: int, optimizer: str, variant: str) -> Instance:
    prog = FCNetProgram(seed, optimizer, use_optkern=variant != "numpy")
    return Instance(prog.forward_backward, prog.solver.update, prog.current_params, lambda: prog.loss)


def _n_params(shapes: Sequence[Tuple[int, ...]]) -> int:
    return int(sum(np.prod(s) for s in shapes))


PROGRAMS: Dict[str, Program] = {
    p.key: p
    for p in [
        Program("charrnn", "char-RNN h100 (f64)", np.float64, CharRNN.optimizers, _plain(CharRNN)),
        Program("fcnet", "6-layer FC 48K (f32)", np.float32, FCNetProgram.optimizers, _fcnet),
        Program(
            "mlp64", "64-30-10 sigmoid (f64)", np.float64, SigmoidMLP.optimizers, _plain(SigmoidMLP)
        ),
    ]
}

OPTIMIZER_LABELS = {
    "adagrad": "Adagrad",
    "adam": "Adam",
    "rmsprop": "RMSprop",
    "sgd-momentum": "SGD momentum",
    "sgd": "SGD, lr per batch",
}
ADAPTIVE = {"adagrad", "adam", "rmsprop"}

TARGET_SEGMENT_SECONDS = 0.05  # each timed stretch of iterations lasts about this long


def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q))


def measure_program(
    program: Program,
    optimizer: str,
    rounds: int,
    steps: Optional[int],
    poke: Callable[[], None],
    seed: int = 0,
) -> Dict[str, object]:
    """One program with one optimizer: its NumPy update, optkern at default threads and optkern
    on one thread, interleaved in rounds; per iteration, forward+backward and the update timed
    apart. The update's median and p90 are over every timed iteration of every round."""
    import optkern as ok

    default_threads = ok.get_num_threads()
    variants = VARIANTS
    inst = {v: program.build(seed, optimizer, v) for v in variants}

    def segment(name: str, count: int) -> Tuple[float, List[float], List[float]]:
        run = inst[name]
        fb: List[float] = []
        up: List[float] = []
        clock = time.perf_counter
        t0 = clock()
        for _ in range(count):
            a = clock()
            run.forward_backward()
            b = clock()
            run.update()
            c = clock()
            fb.append(b - a)
            up.append(c - b)
        return (clock() - t0) / count, fb, up

    def run_segment(name: str, count: int):
        poke()
        if name == "optkern_1t":
            ok.set_num_threads(1)
        try:
            return segment(name, count)
        finally:
            if name == "optkern_1t":
                ok.set_num_threads(default_threads)

    for name in variants:  # warm: first steps make state, first calls fill caches
        run_segment(name, 3)
    if steps is None:
        wall, _, _ = run_segment("numpy", 5)
        steps = max(5, min(2000, math.ceil(TARGET_SEGMENT_SECONDS / max(wall, 1e-7))))
    raw = {name: {"wall": [], "fwd_bwd": [], "update": []} for name in variants}
    for _ in range(rounds):
        for name in variants:
            wall, fb, up = run_segment(name, steps)
            raw[name]["wall"].append(wall)
            raw[name]["fwd_bwd"].append(fb)
            raw[name]["update"].append(up)
    out: Dict[str, object] = {}
    for name in variants:
        updates = [u for seg in raw[name]["update"] for u in seg]
        out[name] = {
            "iteration": float(np.median(raw[name]["wall"])),
            "fwd_bwd": float(np.median([np.mean(s) for s in raw[name]["fwd_bwd"]])),
            "update_median": float(np.median(updates)),
            "update_mean": float(np.mean(updates)),
            "update_p90": _percentile(updates, 90),
        }
    shapes = [p.shape for p in inst["numpy"].params()]
    npy = out["numpy"]
    row: Dict[str, object] = {
        "program": program.key,
        "label": program.label,
        "optimizer": optimizer,
        "optimizer_label": OPTIMIZER_LABELS[optimizer],
        "dtype": np.dtype(program.dtype).name,
        "params": _n_params(shapes),
        "arrays": len(shapes),
        "rounds": rounds,
        "steps": steps,
        "threads": default_threads,
        "final_loss": {name: float(inst[name].loss()) for name in variants},
        "finite": all(bool(np.all(np.isfinite(p))) for r in inst.values() for p in r.params()),
        "seconds": out,
        "raw_seconds": raw,
        "loop_ratio": out["optkern"]["iteration"] / out["numpy"]["iteration"],
        "loop_ratio_1t": out["optkern_1t"]["iteration"] / out["numpy"]["iteration"],
        "update_ratio": out["optkern"]["update_median"] / out["numpy"]["update_median"],
        "p90_vs_1t": out["optkern"]["update_p90"] / out["optkern_1t"]["update_p90"],
        # The loop ratio were forward+backward the same in both loops (the NumPy loop's): what
        # the update alone changes, which a noisy forward+backward hides in loop_ratio.
        "loop_ratio_same_fb": (npy["fwd_bwd"] + out["optkern"]["update_mean"])
        / (npy["fwd_bwd"] + npy["update_mean"]),
    }
    return row


def program_targets(rows: List[Tuple[str, Dict[str, object]]]) -> List[Dict[str, object]]:
    """The issue's targets over (condition, row) pairs."""
    checks = [
        ("program loop optkern/numpy <= 1.0", lambda r: True, "loop_ratio", 1.0),
        (
            "program loop optkern/numpy <= 0.9 (adaptive)",
            lambda r: r["optimizer"] in ADAPTIVE,
            "loop_ratio",
            0.9,
        ),
        (
            "program loop <= 0.9 (adaptive), were forward+backward equal (the update's share)",
            lambda r: r["optimizer"] in ADAPTIVE,
            "loop_ratio_same_fb",
            0.9,
        ),
        ("program update p90, default threads <= 1.5x one thread", lambda r: True, "p90_vs_1t", 1.5),
    ]
    out = []
    for name, applies, key, limit in checks:
        items = [(c, r) for c, r in rows if applies(r)]
        if not items:
            continue
        worst = max(items, key=lambda cr: cr[1][key])
        fails = [
            f"{r['program']} {r['optimizer']} {c}: {r[key]:.3f} > {limit:g}"
            for c, r in items
            if r[key] > limit
        ]
        out.append(
            {
                "target": name,
                "met": not fails,
                "failures": fails,
                "worst": {
                    "condition": worst[0],
                    "program": worst[1]["program"],
                    "optimizer": worst[1]["optimizer"],
                    "value": worst[1][key],
                    "limit": limit,
                },
            }
        )
    return out


def table(conditions: List[Dict[str, object]]) -> str:
    head = (
        f"{'program':<24}{'optimizer':<18}{'cond':<7}{'numpy':>8}{'optkern':>9}{'x':>6}"
        f"{'1 thr':>8}{'x':>6}{'x fb=':>7} | {'upd np':>8}{'p90':>8} | {'upd ok':>8}{'p90':>8} | "
        f"{'upd 1t':>8}{'p90':>8}{'p90/1t':>8}"
    )
    lines = [
        "per iteration and per update, us; numpy / optkern / 1 thr = the loop with the program's "
        "NumPy update, with optkern, with optkern on one thread;",
        "x = loop time over the NumPy loop's; x fb= = the same were forward+backward the NumPy "
        "loop's (the update's share alone);",
        "upd = the update's median, p90 its 90th percentile over every timed iteration; "
        "p90/1t = optkern's update p90 over its one-thread p90",
        head,
        "-" * len(head),
    ]
    for c in conditions:
        for r in c.get("program_rows", []):
            s = r["seconds"]
            npy = s["numpy"]
            line = (
                f"{r['label']:<24}{r['optimizer_label']:<18}{c['condition']:<7}"
                f"{npy['iteration'] * 1e6:8.1f}"
            )
            o, o1 = s["optkern"], s["optkern_1t"]
            line += (
                f"{o['iteration'] * 1e6:9.1f}{r['loop_ratio']:6.2f}{o1['iteration'] * 1e6:8.1f}"
                f"{r['loop_ratio_1t']:6.2f}{r['loop_ratio_same_fb']:7.3f} | "
                f"{npy['update_median'] * 1e6:8.1f}"
                f"{npy['update_p90'] * 1e6:8.1f} | {o['update_median'] * 1e6:8.1f}"
                f"{o['update_p90'] * 1e6:8.1f} | {o1['update_median'] * 1e6:8.1f}"
                f"{o1['update_p90'] * 1e6:8.1f}{r['p90_vs_1t']:8.2f}"
            )
            lines.append(line + ("" if r["finite"] else "  (non-finite!)"))
    return "\n".join(lines)
