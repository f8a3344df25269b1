"""Multi-head self-attention, the token-mixing layer of a transformer block (Vaswani et al., 2017).

Samples are sequences of shape (T, D): T positions of D features. With H heads of dh = D / H features::

    [Q | K | V] = x @ qkv_weight + qkv_bias                  (B*T, D) @ (D, 3D): q, k, v in that order
    S = Q K^T / sqrt(dh)  (+ mask)                           per head: (T, dh) @ (dh, T)
    A = softmax(S) over the last axis                        the attention weights, rows summing to 1
    O = A V, heads side by side again                        (T, T) @ (T, dh) -> (B, T, D)
    y = O @ proj_weight + proj_bias

With ``causal=True`` position t attends only to positions <= t (a language model's mask): the masked
scores are -inf, so their weights are exactly zero, and no row is all masked (t sees itself).

Backward (per head, dO the gradient of O, from dy through the output projection)::

    dV = A^T dO;  dA = dO V^T;  dS = A * (dA - rowsum(dA * A));  dQ = dS K / sqrt(dh);  dK = dS^T Q / sqrt(dh)

where rowsum(dA * A)_t = dO_t . O_t (as FlashAttention computes it: a pass over (T, dh), not (T, T)).
"""

from __future__ import annotations

import math

import numpy as np

from .layers import INITS, Layer, init_weight, positive_int


def check_init_or_std(init) -> str | float:
    """``init`` if it names a weight initialisation ("xavier", "he"), or a positive finite number (the
    std of a normal initialisation, as float); else ValueError."""
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}: expected 'xavier', 'he' or a std > 0")
        return init
    if isinstance(init, bool) or not isinstance(init, (int, float, np.integer, np.floating)) \
            or not math.isfinite(init) or init <= 0:
        raise ValueError(f"init must be 'xavier', 'he' or a std > 0, got {init!r}")
    return float(init)


def sequence_shape(layer: str, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """(T, D) of samples of shape ``in_shape``; ValueError unless they are sequences (T, D)."""
    if len(in_shape) != 2 or min(in_shape) < 1:
        raise ValueError(f"{layer} takes sequence samples of shape (T, D), got {tuple(in_shape)}")
    return int(in_shape[0]), int(in_shape[1])


class MultiHeadSelfAttention(Layer):
    """Multi-head self-attention: x (batch, T, D) -> y (batch, T, D).

    heads : H, dividing D (ValueError otherwise); each head attends with dh = D / H features.
    causal : position t attends to positions <= t only (GPT); else to every position (BERT, ViT).
    init : the weights' initialisation: ``"xavier"`` (default: normal, std sqrt(2 / (fan_in + fan_out)),
        i.e. sqrt(1 / (2D)) for qkv_weight as one (D, 3D) matrix, as torch's MultiheadAttention, and
        sqrt(1 / D) for proj_weight), ``"he"`` (std sqrt(2 / D)), or a number: the std of every weight
        (0.02 is GPT-2's and nanoGPT's). Biases start at zero.
    bias : False leaves both biases out.

    Parameters (stored (in, out) as Dense's: y = x @ W + b):
        qkv_weight (D, 3D), columns [q | k | v], each D columns holding the heads in order;
        qkv_bias (3D,); proj_weight (D, D); proj_bias (D,).
    From torch (nanoGPT's ``c_attn``/``c_proj``, nn.Linear with weight (out, in)): qkv_weight =
    c_attn.weight.T, qkv_bias = c_attn.bias, proj_weight = c_proj.weight.T, proj_bias = c_proj.bias.
    """

    def __init__(self, heads: int, causal: bool = False, init: str | float = "xavier", bias: bool = True) -> None:
        super().__init__()
        self.heads = positive_int(heads, "MultiHeadSelfAttention: heads")
        self.causal = bool(causal)
        self.init = check_init_or_std(init)
        self.bias = bool(bias)
        self._mask: np.ndarray | None = None  # the causal mask, (T, 1, 1, T): see _causal_mask
        self._cache: tuple | None = None

    # -- shapes and parameters ---------------------------------------------------------------------

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        _, d = sequence_shape("MultiHeadSelfAttention", in_shape)
        if d % self.heads:
            raise ValueError(f"MultiHeadSelfAttention: {self.heads} heads do not divide the {d} features")
        return tuple(in_shape)

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        d = self.output_shape(in_shape)[1]
        if not self.bias:
            return {"qkv_weight": (d, 3 * d), "proj_weight": (d, d)}
        return {"qkv_weight": (d, 3 * d), "qkv_bias": (3 * d,), "proj_weight": (d, d), "proj_bias": (d,)}

    def init_params(self, rng: np.random.Generator) -> None:
        for key in ("qkv_weight", "proj_weight"):
            w = self.params[key]
            if isinstance(self.init, str):
                init_weight(w, *w.shape, self.init, rng)
            else:
                w[...] = rng.standard_normal(w.shape) * self.init
        if self.bias:
            self.params["qkv_bias"][...] = 0.0
            self.params["proj_bias"][...] = 0.0

    def _causal_mask(self, t: int, dtype) -> np.ndarray:
        """(T, 1, 1, T) additive mask of the transposed scores S^T[key, ..., query]: 0 where the query may
        attend to the key (key <= query), -inf elsewhere."""
        mask = self._mask
        if mask is None or mask.shape[0] != t or mask.dtype != dtype:
            mask = self._mask = np.tril(np.full((t, t), -np.inf, dtype=dtype), k=-1)[:, None, None, :]
        return mask

    # -- the math ----------------------------------------------------------------------------------
    #
    # Layout (measured, float32, one thread): the attention weights are kept transposed, keys outermost,
    # as at (T_key, B, H, T_query), so that the softmax's max and sum over the keys are reductions over
    # the first axis (long contiguous rows: 10x faster than over a last axis of 64), and so that each
    # product's second operand has unit stride along its columns (OpenBLAS is ~2x slower on a transposed
    # second operand at these sizes): hence the transposed copies of Q (forward) and dO (backward), into
    # which the 1/sqrt(dh) scale is folded for free.

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (batch, T, D) -> y : (batch, T, D)."""
        w_qkv = self.params["qkv_weight"]
        if x.ndim != 3 or x.shape[2] != w_qkv.shape[0]:
            raise ValueError(f"MultiHeadSelfAttention built for samples (T, {w_qkv.shape[0]}) got input {x.shape}")
        B, T, D = x.shape
        H = self.heads
        dh = D // H
        f = x.dtype
        x2 = x.reshape(B * T, D)
        qkv = np.matmul(x2, w_qkv, out=self.workspace("qkv", (B * T, 3 * D), f))
        if self.bias:
            qkv += self.params["qkv_bias"]
        heads = qkv.reshape(B, T, 3, H, dh)
        q, k, v = (heads[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, H, T, dh) views
        qt = np.multiply(q.transpose(0, 1, 3, 2), 1.0 / math.sqrt(dh), out=self.workspace("qt", (B, H, dh, T), f))
        at = self.workspace("at", (T, B, H, T), f)  # S^T, then A^T: [key, b, h, query]
        np.matmul(k, qt, out=at.transpose(1, 2, 0, 3))  # S^T = K Q^T / sqrt(dh)
        if self.causal:
            at += self._causal_mask(T, f)
        m = np.max(at, axis=0, out=self.workspace("m", (B, H, T), f))
        at -= m  # each query's max is 0: exp cannot overflow; masked -inf -> exactly 0
        np.exp(at, out=at)
        np.sum(at, axis=0, out=m)
        np.reciprocal(m, out=m)
        at *= m  # A^T
        o = self.workspace("o", (B, T, H, dh), f)  # heads side by side: (B*T, D) rows for the projection
        np.matmul(at.transpose(1, 2, 3, 0), v, out=o.transpose(0, 2, 1, 3))  # O = A V
        o2 = o.reshape(B * T, D)
        y = self.workspace("y", (B, T, D), f)
        np.matmul(o2, self.params["proj_weight"], out=y.reshape(B * T, D))
        if self.bias:
            y += self.params["proj_bias"]
        self._cache = (x2, qkv, at, o)
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dy : (batch, T, D) -> dx : (batch, T, D); writes the four parameter gradients."""
        x2, qkv, at, o = self._cache
        T, B, H, _ = at.shape
        D = x2.shape[1]
        dh = D // H
        f = dy.dtype
        scale = 1.0 / math.sqrt(dh)
        dy2 = dy.reshape(B * T, D)
        np.matmul(o.reshape(B * T, D).T, dy2, out=self.grads["proj_weight"])
        if self.bias:
            np.sum(dy2, axis=0, out=self.grads["proj_bias"])
        do = self.workspace("do", (B, T, H, dh), f)
        np.matmul(dy2, self.params["proj_weight"].T, out=do.reshape(B * T, D))
        heads = qkv.reshape(B, T, 3, H, dh)
        q, k, v = (heads[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        dheads = self.workspace("dqkv", (B * T, 3 * D), f).reshape(B, T, 3, H, dh)
        dq, dk, dv = (dheads[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        a_t = at.transpose(1, 2, 0, 3)  # (B, H, key, query)
        np.matmul(a_t, do.transpose(0, 2, 1, 3), out=dv)  # dV = A^T dO
        # dst = dS^T / sqrt(dh) = A^T * (dA^T - rowsum(dA * A)) / sqrt(dh), with dA^T = V dO^T and
        # rowsum(dA * A) = dO . O per query, the scale folded into dO^T and the rows: dQ = dst^T K, dK = dst Q
        dot = np.multiply(do.transpose(0, 2, 3, 1), scale, out=self.workspace("dot", (B, H, dh, T), f))
        dst = self.workspace("dst", (T, B, H, T), f)  # [key, b, h, query]
        np.matmul(v, dot, out=dst.transpose(1, 2, 0, 3))
        prod = np.multiply(do, o, out=self.workspace("prod", (B, T, H, dh), f))
        scales = self.workspace("scales", (dh,), f)
        scales.fill(scale)
        rows = np.matmul(prod.reshape(-1, dh), scales, out=self.workspace("rows", (B * T * H,), f))
        rows_bht = self.workspace("rows_bht", (B, H, T), f)
        np.copyto(rows_bht, rows.reshape(B, T, H).transpose(0, 2, 1))
        dst -= rows_bht
        dst *= at
        ds_t = dst.transpose(1, 2, 0, 3)
        np.matmul(ds_t.transpose(0, 1, 3, 2), k, out=dq)
        np.matmul(ds_t, q, out=dk)
        dqkv = dheads.reshape(B * T, 3 * D)
        np.matmul(x2.T, dqkv, out=self.grads["qkv_weight"])
        if self.bias:
            np.sum(dqkv, axis=0, out=self.grads["qkv_bias"])
        if not input_grad:
            return None
        dx = self.workspace("dx", (B, T, D), f)
        np.matmul(dqkv, self.params["qkv_weight"].T, out=dx.reshape(B * T, D))
        return dx

    def matmuls(self, in_shape: tuple[int, ...], batch: int, input_grad: bool = True) -> list[tuple[int, int, int]]:
        """The projections as 2-D products over the batch*T rows; each per-head product, made by one batched
        np.matmul over the batch*H heads, as one product with m multiplied by batch*H (the same flops):
        qkv, Q K^T, A V, proj; dproj_weight, dO, dV, dA, dQ, dK, dqkv_weight, and dx."""
        T, D = sequence_shape("MultiHeadSelfAttention", in_shape)
        dh = D // self.heads
        n, m = batch * T, batch * self.heads * T
        products = [(n, D, 3 * D), (m, dh, T), (m, T, dh), (n, D, D),
                    (D, n, D), (n, D, D), (m, T, dh), (m, dh, T), (m, T, dh), (m, T, dh), (D, n, 3 * D)]
        return products + ([(n, 3 * D, D)] if input_grad else [])

    def describe(self) -> str:
        extra = ", causal" if self.causal else ""
        if self.init != "xavier":
            extra += f", init={self.init}"
        if not self.bias:
            extra += ", bias=False"
        return f"MultiHeadSelfAttention(heads={self.heads}{extra})"
