"""Gated recurrent unit (Cho et al., 2014) with torch.nn.GRU's equations and parameter layout.

Samples are sequences of shape (T, D). With hidden size H, gates in the order r, z, n and h_0 = 0::

    r_t = sigmoid(x_t W_ir^T + b_ir + h_{t-1} W_hr^T + b_hr)
    z_t = sigmoid(x_t W_iz^T + b_iz + h_{t-1} W_hz^T + b_hz)
    n_t = tanh(x_t W_in^T + b_in + r_t * (h_{t-1} W_hn^T + b_hn))
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}

The input projections of every step are one matrix product, (batch*T, D) @ W_ih^T; only the recurrent
product h_{t-1} W_hh^T is made step by step. Backward is backpropagation through time over the
cached gates; the weight gradients are again one product each over all steps.
"""

from __future__ import annotations

import math

import numpy as np

from .attention import sequence_shape
from .layers import Layer, positive_int

OUTPUTS = ("sequence", "last")


def _sigmoid(a: np.ndarray) -> None:
    """a <- sigmoid(a) in place, as (1 + tanh(a / 2)) / 2: no exp, nothing overflows."""
    a *= 0.5
    np.tanh(a, out=a)
    a += 1.0
    a *= 0.5


class GRU(Layer):
    """GRU over sequences: x (batch, T, D) -> (batch, T, H) (``output="sequence"``: every step's hidden
    state) or (batch, H) (``output="last"``: the final one). ``bidirectional=True`` also runs the
    reversed sequence and concatenates the features, forward first: (batch, T, 2H), where position t
    holds the backward direction's state after reading x_{T-1} .. x_t; or (batch, 2H) for "last", the
    forward state after x_{T-1} and the backward state after x_0 (torch's h_n, concatenated).

    Parameters, as torch.nn.GRU(D, H, batch_first=True) names them without the ``_l0``: weight_ih (3H, D),
    weight_hh (3H, H), bias_ih (3H,), bias_hh (3H,), rows in gate order r, z, n; bidirectional adds the
    same four with a ``_reverse`` suffix. Init: uniform(-1/sqrt(H), 1/sqrt(H)) for all, as torch.
    """

    def __init__(self, hidden: int, bidirectional: bool = False, output: str = "sequence") -> None:
        super().__init__()
        self.hidden = positive_int(hidden, "GRU: hidden")
        self.bidirectional = bool(bidirectional)
        if output not in OUTPUTS:
            raise ValueError(f"GRU: output must be 'sequence' or 'last', got {output!r}")
        self.output = output
        self._suffixes = ("", "_reverse") if self.bidirectional else ("",)
        self._cache: tuple | None = None

    # -- shapes and parameters ---------------------------------------------------------------------

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        t, _ = sequence_shape("GRU", in_shape)
        features = self.hidden * len(self._suffixes)
        return (t, features) if self.output == "sequence" else (features,)

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        _, d = sequence_shape("GRU", in_shape)
        h3 = 3 * self.hidden
        shapes = {}
        for s in self._suffixes:
            shapes.update({f"weight_ih{s}": (h3, d), f"weight_hh{s}": (h3, self.hidden), f"bias_ih{s}": (h3,),
                           f"bias_hh{s}": (h3,)})
        return shapes

    def init_params(self, rng: np.random.Generator) -> None:
        bound = 1.0 / math.sqrt(self.hidden)
        for s in self._suffixes:
            for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                p = self.params[key + s]
                p[...] = rng.uniform(-bound, bound, p.shape)

    # -- the math ----------------------------------------------------------------------------------

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (batch, T, D) -> (batch, T, H x directions) or, for output="last", (batch, H x directions)."""
        d = self.params["weight_ih"].shape[1]
        if x.ndim != 3 or x.shape[2] != d:
            raise ValueError(f"GRU built for samples (T, {d}) got input {x.shape}")
        B, T, _ = x.shape
        H = self.hidden
        x2 = x.reshape(B * T, d)
        f = x.dtype
        states = [self._run(x2, B, T, s, f) for s in self._suffixes]  # (h, g, gh) per direction
        hs = [h for h, _, _ in states]
        width = H * len(hs)
        if self.output == "last":
            y = self.workspace("y", (B, width), f)
            for j, h in enumerate(hs):
                y[:, j * H:(j + 1) * H] = h[T]
        else:
            y = self.workspace("y", (B, T, width), f)
            np.copyto(y[:, :, :H], hs[0][1:].transpose(1, 0, 2))
            if len(hs) > 1:  # the reverse direction's state after step i, h[i + 1], is position T-1-i's
                np.copyto(y[:, :, H:], hs[1][:0:-1].transpose(1, 0, 2))
        self._cache = (x2, states)
        return y

    def _run(self, x2: np.ndarray, B: int, T: int, s: str, f) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One direction: the states h (T + 1, batch, H), h[0] = 0 and h[i + 1] after the i-th step; the
        gates g (T, batch, 3H) after their activations; gh = h W_hh^T + b_hh (T, batch, 3H). The reverse
        direction's i-th step reads x_{T-1-i}."""
        H = self.hidden
        w_hh, b_hh = self.params["weight_hh" + s], self.params["bias_hh" + s]
        gi = self.workspace("gi" + s, (B, T, 3 * H), f)  # x W_ih^T + b_ih, every step at once
        np.matmul(x2, self.params["weight_ih" + s].T, out=gi.reshape(B * T, 3 * H))
        gi += self.params["bias_ih" + s]
        h = self.workspace("h" + s, (T + 1, B, H), f)
        h[0] = 0.0
        g = self.workspace("g" + s, (T, B, 3 * H), f)  # r, z, n after their activations
        gh = self.workspace("gh" + s, (T, B, 3 * H), f)  # h W_hh^T + b_hh (its n part is needed by backward)
        reverse = bool(s)
        for i in range(T):
            t = T - 1 - i if reverse else i
            np.matmul(h[i], w_hh.T, out=gh[i])
            gh[i] += b_hh
            rz, n = g[i, :, :2 * H], g[i, :, 2 * H:]
            np.add(gi[:, t, :2 * H], gh[i, :, :2 * H], out=rz)
            _sigmoid(rz)
            np.multiply(g[i, :, :H], gh[i, :, 2 * H:], out=n)
            n += gi[:, t, 2 * H:]
            np.tanh(n, out=n)
            # h' = n + z * (h - n)
            np.subtract(h[i], n, out=h[i + 1])
            h[i + 1] *= g[i, :, H:2 * H]
            h[i + 1] += n
        return h, g, gh

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dy : the output's shape -> dx : (batch, T, D); writes the gradients of every parameter."""
        x2, states = self._cache
        T, B, _ = states[0][1].shape
        H = self.hidden
        f = dy.dtype
        dgis = [self._bptt(x2, dy[..., j * H:(j + 1) * H], states[j], s, f) for j, s in enumerate(self._suffixes)]
        if not input_grad:
            return None
        dx2 = self.workspace("dx", (B * T, x2.shape[1]), f)
        np.matmul(dgis[0], self.params["weight_ih"], out=dx2)
        if len(dgis) > 1:
            dx2 += np.matmul(dgis[1], self.params["weight_ih_reverse"], out=self.workspace("dx_reverse", dx2.shape, f))
        return dx2.reshape(B, T, x2.shape[1])

    def _bptt(self, x2: np.ndarray, dys: np.ndarray, state: tuple, s: str, f) -> np.ndarray:
        """Backpropagation through time of one direction, from dys (batch, T, H) (or (batch, H): the last
        state's) and the (h, g, gh) of its forward; returns d(x W_ih^T + b_ih), (batch*T, 3H)."""
        H = self.hidden
        w_hh = self.params["weight_hh" + s]
        h, g, gh = state
        T, B, _ = g.shape
        dgi = self.workspace("dgi" + s, (B, T, 3 * H), f)  # d of the input projections, as gi
        dgh = self.workspace("dgh", (T, B, 3 * H), f)  # d of the recurrent projections, as gh
        dh = self.workspace("dh", (B, H), f)  # dL/dh[i + 1], the state after step i
        tmp = self.workspace("tmp", (B, H), f)
        dh.fill(0.0)
        sequence, reverse = self.output == "sequence", bool(s)
        for i in range(T - 1, -1, -1):
            t = T - 1 - i if reverse else i
            if sequence:
                dh += dys[:, t]
            elif i == T - 1:
                dh += dys
            r, z, n, ghn = g[i, :, :H], g[i, :, H:2 * H], g[i, :, 2 * H:], gh[i, :, 2 * H:]
            dr, dz, dn = dgi[:, t, :H], dgi[:, t, H:2 * H], dgi[:, t, 2 * H:]  # pre-activation gradients
            # dz = dh * (h - n) * z * (1 - z); dn = dh * (1 - z) * (1 - n^2); dr = dn * ghn * r * (1 - r)
            np.subtract(h[i], n, out=dz)
            dz *= dh
            np.subtract(1.0, z, out=tmp)
            np.multiply(dh, tmp, out=dn)
            dz *= z
            dz *= tmp
            np.multiply(n, n, out=tmp)
            np.subtract(1.0, tmp, out=tmp)
            dn *= tmp
            np.multiply(dn, ghn, out=dr)
            np.subtract(1.0, r, out=tmp)
            dr *= r
            dr *= tmp
            dgh[i, :, :2 * H] = dgi[:, t, :2 * H]
            np.multiply(dn, r, out=dgh[i, :, 2 * H:])
            # dh[i] = dh[i + 1] * z + dgh W_hh
            dh *= z
            dh += np.matmul(dgh[i], w_hh, out=tmp)
        dgh2, dgi2 = dgh.reshape(T * B, 3 * H), dgi.reshape(B * T, 3 * H)
        np.matmul(dgh2.T, h[:T].reshape(T * B, H), out=self.grads["weight_hh" + s])
        np.sum(dgh2, axis=0, out=self.grads["bias_hh" + s])
        np.matmul(dgi2.T, x2, out=self.grads["weight_ih" + s])
        np.sum(dgi2, axis=0, out=self.grads["bias_ih" + s])
        return dgi2

    # -- what the tools show -----------------------------------------------------------------------

    def matmuls(self, in_shape: tuple[int, ...], batch: int, input_grad: bool = True) -> list[tuple[int, int, int]]:
        """Per direction: the input projections (batch*T, D, 3H), one recurrent product (batch, H, 3H) per step
        forward and one (batch, 3H, H) per step backward (as the layer makes them, one call each), dW_hh
        (3H, T*batch, H), dW_ih (3H, batch*T, D), and dx (batch*T, 3H, D)."""
        T, D = sequence_shape("GRU", in_shape)
        H3, n = 3 * self.hidden, batch * T
        products = []
        for _ in self._suffixes:
            products += [(n, D, H3)] + [(batch, self.hidden, H3)] * T + [(batch, H3, self.hidden)] * T
            products += [(H3, n, self.hidden), (H3, n, D)] + ([(n, H3, D)] if input_grad else [])
        return products

    def describe(self) -> str:
        return f"GRU({self.hidden}{', bidirectional' if self.bidirectional else ''}, output={self.output})"
