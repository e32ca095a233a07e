"""Train a small MLP on scikit-learn's digits (ships offline) with adamkit.AdamW.

    python examples/train_mlp.py

Prints the training loss falling and the held-out accuracy.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import adamkit


def main(epochs: int = 30, seed: int = 0) -> float:
    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:1500], perm[1500:]

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = adamkit.AdamW(adamkit.param_groups(model, weight_decay=0.01), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        order = train[torch.randperm(len(train))]
        total = 0.0
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 0 or epoch == epochs - 1:
            with torch.no_grad():
                acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
            print(f"epoch {epoch:3d}  train loss {total / len(order):.4f}  test acc {acc:.3f}")
    return total / len(order)


if __name__ == "__main__":
    main()
