"""The char-RNN of the precision study (optkern.examples.char_rnn): its gradients against finite
differences, its text made the same way each time, and training that lowers its held-out loss."""

import numpy as np

import optkern as ok
from optkern.examples.char_rnn import CharRNN, chunks, make_text


def test_text_is_made_in_code_deterministically():
    a, b = make_text(2000, 3), make_text(2000, 3)
    assert a == b and len(a) == 2000 and a != make_text(2000, 4)
    assert a[0].isupper() and ". " in a


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    m = CharRNN(7, 5, seed=1)
    m.params = [p.astype(np.float64) + 0.1 * rng.standard_normal(p.shape) for p in m.params]
    x, y = rng.integers(0, 7, (3, 6)), rng.integers(0, 7, (3, 6))
    h0 = 0.5 * rng.standard_normal((3, 5))
    _, grads, _ = m.loss_and_gradients(x, y, h0)
    for p, g in zip(m.params, grads):
        for idx in [tuple(rng.integers(0, d) for d in p.shape) for _ in range(4)]:
            old = p[idx]
            p[idx] = old + 1e-6
            up, _, _ = m.loss_and_gradients(x, y, h0)
            p[idx] = old - 1e-6
            down, _, _ = m.loss_and_gradients(x, y, h0)
            p[idx] = old
            assert abs((up - down) / 2e-6 - g[idx]) < 1e-6 * max(1.0, abs(g[idx]))


def test_training_lowers_the_held_out_loss():
    train, held = make_text(8000, 0), make_text(2000, 1)
    vocab = {c: i for i, c in enumerate(sorted(set(train) | set(held)))}
    ids = np.array([vocab[c] for c in train])
    held_ids = np.array([vocab[c] for c in held])
    m = CharRNN(len(vocab), 32, seed=0)
    before = m.bits_per_char(held_ids)
    opt = ok.Adam(m.params, lr=3e-3)
    for _ in range(3):
        h = np.zeros((8, 32), np.float32)
        for x, y in chunks(ids, 8, 16):
            _, grads, h = m.loss_and_gradients(x, y, h)
            opt.step(grads, max_grad_norm=1.0)
    after = m.bits_per_char(held_ids)
    assert before > 4.0 and after < 0.75 * before
