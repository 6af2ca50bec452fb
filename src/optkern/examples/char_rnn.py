"""A small character-level RNN in NumPy (one tanh layer, truncated backpropagation through time),
for the precision study (``python -m optkern bench --studies precision-accuracy``).

The text is made in code (nothing is downloaded): sentences of a small random grammar over a
few dozen words, so a model learns spelling, spacing and word order. The model reads a batch of
parallel streams of the training text, ``steps`` characters at a time, carrying its hidden
state from one chunk to the next; the held-out text is scored the same way, without training,
in bits per character.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

_NOUNS = "cat dog bird fish horse mouse teacher farmer river garden house window".split()
_ADJS = "small quick lazy green old bright quiet heavy".split()
_VERBS = "sees chases finds likes carries follows watches".split()
_PREPS = "near under behind over beside".split()


def make_text(n_chars: int, seed: int) -> str:
    """Sentences of a small grammar (``the [adj] noun verb the [adj] noun [prep the noun].``)
    until ``n_chars`` characters."""
    rng = np.random.default_rng(seed)
    out: List[str] = []
    size = 0

    def phrase() -> str:
        words = ["the"]
        if rng.random() < 0.5:
            words.append(_ADJS[rng.integers(len(_ADJS))])
        words.append(_NOUNS[rng.integers(len(_NOUNS))])
        return " ".join(words)

    while size < n_chars:
        s = f"{phrase()} {_VERBS[rng.integers(len(_VERBS))]} {phrase()}"
        if rng.random() < 0.4:
            s += f" {_PREPS[rng.integers(len(_PREPS))]} {phrase()}"
        s = s[0].upper() + s[1:] + ". "
        out.append(s)
        size += len(s)
    return "".join(out)[:n_chars]


class CharRNN:
    """h_t = tanh(E[x_t] + h_{t-1} Whh + bh), logits_t = h_t Why + by; float32 parameters
    ``params = [E, Whh, Why, bh, by]``."""

    def __init__(self, vocab: int, hidden: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.hidden = hidden
        self.params = [
            (rng.standard_normal((vocab, hidden)) * 0.1).astype(np.float32),
            (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32),
            (rng.standard_normal((hidden, vocab)) / np.sqrt(hidden)).astype(np.float32),
            np.zeros(hidden, np.float32),
            np.zeros(vocab, np.float32),
        ]

    def loss_and_gradients(
        self, x: np.ndarray, y: np.ndarray, h: np.ndarray
    ) -> Tuple[float, List[np.ndarray], np.ndarray]:
        """Mean cross-entropy (nats per character) of chunk ``x`` -> ``y`` (int arrays of shape
        (batch, steps)) from hidden state ``h``; the gradients and the last hidden state."""
        E, Whh, Why, bh, by = self.params
        B, T = x.shape
        hs = [h]
        probs = []
        loss = 0.0
        for t in range(T):
            h = np.tanh(E[x[:, t]] + hs[-1] @ Whh + bh)
            hs.append(h)
            z = h @ Why + by
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            probs.append(p)
            loss -= float(np.log(p[np.arange(B), y[:, t]] + 1e-30).sum())
        grads = [np.zeros_like(a) for a in self.params]
        dE, dWhh, dWhy, dbh, dby = grads
        dh_next = np.zeros_like(h)
        scale = np.float32(1.0 / (B * T))
        for t in reversed(range(T)):
            dz = probs[t]
            dz[np.arange(B), y[:, t]] -= 1.0
            dz *= scale
            dWhy += hs[t + 1].T @ dz
            dby += dz.sum(axis=0)
            dh = dz @ Why.T + dh_next
            draw = (1.0 - hs[t + 1] ** 2) * dh
            dbh += draw.sum(axis=0)
            np.add.at(dE, x[:, t], draw)
            dWhh += hs[t].T @ draw
            dh_next = draw @ Whh.T
        return loss / (B * T), grads, hs[-1]

    def bits_per_char(self, ids: np.ndarray, batch: int = 16) -> float:
        """Mean cross-entropy of predicting each next character of ``ids``, in bits, over
        ``batch`` parallel streams (the model's state carried along each)."""
        E, Whh, Why, bh, by = self.params
        n = (len(ids) - 1) // batch
        x = ids[: n * batch].reshape(batch, n)
        y = ids[1 : n * batch + 1].reshape(batch, n)
        h = np.zeros((batch, self.hidden), np.float32)
        total = 0.0
        for t in range(n):
            h = np.tanh(E[x[:, t]] + h @ Whh + bh)
            z = h @ Why + by
            z -= z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            total -= float(logp[np.arange(batch), y[:, t]].sum())
        return total / (n * batch) / np.log(2.0)


def chunks(ids: np.ndarray, batch: int, steps: int):
    """(x, y) chunks of ``batch`` parallel streams over ``ids``, ``steps`` characters each, in
    order (one pass)."""
    n = (len(ids) - 1) // batch
    x = ids[: n * batch].reshape(batch, n)
    y = ids[1 : n * batch + 1].reshape(batch, n)
    for s in range(0, n - steps + 1, steps):
        yield x[:, s : s + steps], y[:, s : s + steps]
