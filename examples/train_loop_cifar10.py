"""Cluster-Margin inside a real PyTorch training loop, on frozen CIFAR-10 features.

Each round: train a small MLP head (on the device) on the labeled set, compute its logits on the
whole unlabeled pool, ask the stateful selector for the next batch, "label" it (here: reveal the
known labels), and report test accuracy. The selector's state lives in --state-dir: kill the
script at any point and run it again, and it resumes at the round it had reached (the head is
retrained from the recorded labeled set; no index is ever picked twice).

    python examples/train_loop_cifar10.py                     # 20K pool, 4 rounds of 1000
    python examples/train_loop_cifar10.py --strategy random   # the same loop with a baseline
    CM_ENGINE_DATA=/path/to/data python examples/train_loop_cifar10.py --pool-size 50000

Data: <data>/cifar10/cifar10_effnetlite0_128px_f16.npz (X_train [50000, 1280] float16, y_train,
X_test, y_test), from --data or $CM_ENGINE_DATA (default ../shared/data beside the repository).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cm_engine.selector import ClusterMarginSelector, Selector

REPO = Path(__file__).resolve().parents[1]


def train_head(X, y, n_classes, *, hidden, epochs, device, seed):
    """A 1-hidden-layer MLP trained from scratch with Adam (full retrain every round, as in the paper)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, n_classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    yt = torch.as_tensor(y, dtype=torch.int64, device=device)
    n = X.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, 256):
            idx = perm[s:s + 256]
            loss = torch.nn.functional.cross_entropy(model(X[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model, X, rows=8192):
    return torch.cat([model(X[s:s + rows]) for s in range(0, X.shape[0], rows)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CM_ENGINE_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--state-dir", default=str(REPO / "bench-data" / "example_state"))
    ap.add_argument("--fresh", action="store_true", help="delete --state-dir first (start from round 0)")
    ap.add_argument("--strategy", default="cluster_margin",
                    choices=["cluster_margin", "random", "margin", "coreset", "badge"])
    ap.add_argument("--pool-size", type=int, default=20000, help="a seeded random subset of N training images forms the pool")
    ap.add_argument("--seed-size", type=int, default=500)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--km-ratio", type=float, default=1.25, help="the paper's CIFAR-10 setting")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))

    path = Path(args.data) / "cifar10" / "cifar10_effnetlite0_128px_f16.npz"
    if not path.exists():
        raise SystemExit(f"CIFAR-10 features not found at {path} (set --data or CM_ENGINE_DATA)")
    d = np.load(path)
    # the training set is stored sorted by class: the pool is a seeded random subset
    keep = np.sort(np.random.default_rng(1234).permutation(d["y_train"].shape[0])[: args.pool_size])
    pool = d["X_train"][keep].astype(np.float32)
    y_pool = d["y_train"][keep].astype(np.int64)
    X_test, y_test = d["X_test"].astype(np.float32), d["y_test"].astype(np.int64)
    mu, sd = pool.mean(0), pool.std(0) + 1e-6  # standardize once with pool statistics
    Xp = torch.from_numpy((pool - mu) / sd).to(device)
    Xt = torch.from_numpy((X_test - mu) / sd).to(device)

    state = Path(args.state_dir) / args.strategy
    if args.fresh and state.exists():
        shutil.rmtree(state)
    t0 = time.perf_counter()
    if args.strategy == "cluster_margin":
        # clustering of the pool's embeddings: built once, cached in the state dir (and cache_dir)
        sel = ClusterMarginSelector(pool, state_dir=state, target_mean_size=10, km_ratio=args.km_ratio,
                                    k=16, metric="cosine", seed=args.seed,
                                    cache_dir=Path(args.state_dir) / "cluster_cache")
    else:
        sel = Selector(args.strategy, pool, state_dir=state, seed=args.seed)
    print(f"selector {args.strategy} ready in {time.perf_counter() - t0:.1f} s "
          f"(round {sel.round}, {sel.picked.size} labeled so far, device {device})")
    if sel.picked.size == 0:  # first run: a random seed set
        sel.mark_labeled(np.random.default_rng(args.seed).choice(args.pool_size, args.seed_size, replace=False))

    while True:
        labeled = sel.picked
        t = time.perf_counter()
        model = train_head(Xp[labeled], y_pool[labeled], 10, hidden=args.hidden, epochs=args.epochs,
                           device=device, seed=args.seed)
        acc = float((predict(model, Xt).argmax(1).cpu().numpy() == y_test).mean())
        t_train = time.perf_counter() - t
        msg = f"round {sel.round}: {labeled.size:6d} labels  test acc {acc:.4f}  (train {t_train:.1f} s"
        if sel.round >= args.rounds:
            print(msg + ")")
            break
        t = time.perf_counter()
        logits = predict(model, Xp).cpu().numpy()  # the model's outputs on the whole pool
        new = sel.select(logits, args.budget)      # recorded and saved before it returns
        print(msg + f", select {time.perf_counter() - t:.2f} s: {new.size} new)")
    print(f"total {time.perf_counter() - t0:.1f} s; state in {state}")


if __name__ == "__main__":
    main()
