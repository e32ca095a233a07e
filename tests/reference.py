"""Float64 NumPy oracle: Adam (Kingma & Ba Algorithm 1), AMSGrad and AdamW.

Written from the papers' equations, not from adamkit's code: the Adam step is
``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1^t)``,
``v_hat = v / (1 - b2^t)``; AMSGrad replaces v by the running max of the raw v (torch's
convention, bias-corrected afterwards); decoupled weight decay multiplies the param by
``1 - decay`` before the Adam step, with ``decay`` scaled by lr, by lr / initial_lr (Loshchilov &
Hutter's Algorithm 2, where the schedule multiplier eta_t = lr_t / initial_lr scales the decay),
or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReferenceAdam:
    """One param's Adam state in float64; call :meth:`step` with a gradient."""

    param: np.ndarray
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay: str = "none"  # "none" | "l2" | "decoupled"
    scaling: str = "lr"  # for decoupled: "lr" | "lr_ratio" | "none"
    initial_lr: float | None = None
    amsgrad: bool = False
    maximize: bool = False
    t: int = 0
    m: np.ndarray = field(init=False)
    v: np.ndarray = field(init=False)
    vmax: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.param = np.array(self.param, dtype=np.float64)
        self.m = np.zeros_like(self.param)
        self.v = np.zeros_like(self.param)
        self.vmax = np.zeros_like(self.param)
        if self.initial_lr is None:
            self.initial_lr = self.lr

    def step(self, grad: np.ndarray, lr: float | None = None) -> np.ndarray:
        lr = self.lr if lr is None else lr
        g = np.array(grad, dtype=np.float64)
        if self.maximize:
            g = -g
        self.t += 1
        if self.decay == "l2":
            g = g + self.weight_decay * self.param
        elif self.decay == "decoupled":
            eta = {"lr": lr, "lr_ratio": lr / self.initial_lr, "none": 1.0}[self.scaling]
            self.param = self.param * (1.0 - eta * self.weight_decay)
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * g
        self.v = self.beta2 * self.v + (1.0 - self.beta2) * g * g
        if self.amsgrad:
            self.vmax = np.maximum(self.vmax, self.v)
            v_used = self.vmax
        else:
            v_used = self.v
        m_hat = self.m / (1.0 - self.beta1**self.t)
        v_hat = v_used / (1.0 - self.beta2**self.t)
        with np.errstate(divide="ignore", invalid="ignore"):  # eps = 0 and g = 0: 0/0, as torch
            self.param = self.param - lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return self.param
