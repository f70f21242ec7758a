"""Stateful selectors for training loops: pick a batch, record it, survive a crash.

A training pipeline calls, once per labeling round::

    sel = ClusterMarginSelector(embeddings, state_dir="al_state", target_mean_size=10, km_ratio=10)
    sel.mark_labeled(seed_indices)            # the initial labeled set (first run only)
    new = sel.select(model_logits_on_pool, budget)   # int64 pool indices to send for labels

The selector holds the pool, the clustering (built once with `cluster`, its labels saved in the
state directory), the indices picked or labeled so far, the seed and the round number. After every
selection the state is written atomically: the picked indices go to a new `.npy` (temporary file +
rename) and then the JSON manifest that names it is replaced (temporary file + `os.replace`), so a
crash at any point leaves either the previous round's state or the new one, never a mix. Round r
draws its randomness from (seed, r), so a round re-run after a crash picks what the lost run would
have picked. Reopening the same `state_dir` (in any process) resumes; a state directory made for a
different pool (fingerprint mismatch) or with different selection parameters is refused with a
ValueError. An advisory lock (`fcntl.flock`) keeps two processes from selecting into one state
directory at the same time.

`Selector` offers the same state handling for the baselines (random, margin, entropy,
least_confidence, coreset, badge).

Near-duplicate filter (`redundancy`): `ClusterMarginSelector(..., dedup=True)` and
`Selector("margin", dedup_graph=graph)` drop candidates within `delta` of a labeled or earlier-kept
point over the pool's k-NN graph (the clustering's graph, or `graph=`). The graph is saved in the
state directory (graph_indices.npy, graph_distances.npy) and delta (given, or `auto_delta` of the
graph) in the manifest, both once, so every round and every resume filters alike. Each process
builds the graph's `NearCopies` table once (first select) and every round's filter walks it.
`redundancy(batch)` reports the near-copy fractions of a round's picks.

Classes here only chain stage functions (cluster, margin scores, cluster_margin, baselines).
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ._validate import as_index_array, as_labels, check_choice, check_float, check_int
from .pool import Pool, save_npy

log = logging.getLogger("cm_engine")

STATE_VERSION = 1
MANIFEST = "manifest.json"
STRATEGIES = ("random", "margin", "entropy", "least_confidence", "coreset", "badge")


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _StateStore:
    """The on-disk state of a selector: manifest.json + picked_<round>.npy (+ labels.npy)."""

    def __init__(self, state_dir):
        if not isinstance(state_dir, (str, os.PathLike)):
            raise TypeError(f"state_dir: expected a path, got {type(state_dir).__name__}")
        self.dir = Path(state_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"state_dir: expected a directory, got the file {str(self.dir)!r}")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.dir, os.W_OK):
            raise ValueError(f"state_dir: expected a writable directory, got {str(self.dir)!r}")

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def read(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            with open(self.manifest_path) as f:
                man = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"state_dir: {str(self.manifest_path)!r} is not a readable selector manifest ({e})") from None
        if not isinstance(man, dict) or man.get("format") != "cm_engine.selector":
            raise ValueError(f"state_dir: {str(self.dir)!r} holds a manifest that is not a cm_engine selector's")
        if man.get("version") != STATE_VERSION:
            raise ValueError(f"state_dir: expected state version {STATE_VERSION}, got {man.get('version')!r}")
        return man

    def load_picked(self, man: dict) -> np.ndarray:
        name = man.get("picked_file")
        if name is None:
            return np.zeros(0, np.int64)
        path = self.dir / name
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"state_dir: picked indices {str(path)!r} missing or unreadable ({e})") from None
        arr = np.asarray(arr, dtype=np.int64)
        if arr.shape != (man["n_picked"],):
            raise ValueError(f"state_dir: expected {man['n_picked']} picked indices in {name}, got shape {arr.shape}")
        return arr

    def commit(self, man: dict, picked: np.ndarray) -> dict:
        """Write picked indices to a new file, then switch the manifest to it; remove the old file."""
        old = man.get("picked_file")
        name = f"picked_{man['round']:05d}_{man['n_picked_events']:05d}.npy"
        save_npy(self.dir / name, np.asarray(picked, dtype=np.int64))
        man = dict(man, picked_file=name, n_picked=int(picked.size), updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _write_json_atomic(self.manifest_path, man)
        _fsync_dir(self.dir)
        if old and old != name:
            try:
                (self.dir / old).unlink()
            except OSError:
                pass
        return man

    @contextmanager
    def lock(self):
        """Exclusive advisory lock on the state directory (one selecting process at a time)."""
        import fcntl

        f = open(self.dir / ".lock", "a+")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RuntimeError(f"state_dir: {str(self.dir)!r} is in use by another process") from None
            yield
        finally:
            f.close()


class _StatefulSelector:
    """State handling shared by the selectors: the pool, picked indices, round, atomic saves."""

    kind = "base"

    def __init__(self, embeddings, *, state_dir, seed: int, params: dict, n=None):
        self._seed = check_int("seed", seed, min=0)
        self.store = _StateStore(state_dir)
        self._src = embeddings
        if embeddings is not None:
            self.pool = Pool(embeddings, name="embeddings")
            if len(self.pool.shape) != 2:
                raise ValueError(f"embeddings: expected a 2-D array, got shape {self.pool.shape}")
            self.n = self.pool.n
            fp = self.pool.fingerprint()
        else:
            self.pool = None
            self.n = check_int("n", n, min=1)
            fp = f"n={self.n}"
        self.params = dict(params, seed=self._seed)
        man = self.store.read()
        if man is None:
            man = {"format": "cm_engine.selector", "version": STATE_VERSION, "kind": self.kind,
                   "fingerprint": fp, "n": self.n, "params": self.params, "round": 0,
                   "n_picked": 0, "n_picked_events": 0, "picked_file": None, "rounds": [],
                   "n_seed_labeled": 0,
                   "embeddings_path": str(Path(embeddings).resolve()) if isinstance(embeddings, (str, os.PathLike)) else None}
            self._picked = np.zeros(0, np.int64)
            self._man = self.store.commit(man, self._picked)
            log.info("selector: new state in %s (N=%d)", self.store.dir, self.n)
        else:
            self._check_resume(man, fp)
            self._man = man
            self._picked = self.store.load_picked(man)
            log.info("selector: resumed %s at round %d with %d picked", self.store.dir, man["round"], self._picked.size)
        self._mask = np.zeros(self.n, np.bool_)
        self._mask[self._picked] = True

    def _check_resume(self, man, fp):
        if man.get("kind") != self.kind:
            raise ValueError(f"state_dir: expected state of a {self.kind} selector, got one of a {man.get('kind')!r} selector")
        if man.get("n") != self.n or man.get("fingerprint") != fp:
            raise ValueError(f"state_dir: {str(self.store.dir)!r} was made for a different pool "
                             f"(fingerprint {man.get('fingerprint')}, N={man.get('n')}), got fingerprint {fp}, N={self.n}")
        saved = man.get("params", {})
        for key, val in self.params.items():
            if key in saved and saved[key] != val:
                raise ValueError(f"{key}: the state in {str(self.store.dir)!r} was made with {key}={saved[key]!r}, "
                                 f"got {val!r} (use a new state_dir, or reopen with the same settings / .load())")
        on, was = bool(self.params.get("dedup", False)), bool(saved.get("dedup", False))
        if on != was:  # absent when off, so the loop above cannot see it
            raise ValueError(f"dedup: the state in {str(self.store.dir)!r} was made with the near-duplicate filter "
                             f"{'on' if was else 'off'}, got it {'on' if on else 'off'} (reopen with the same "
                             f"settings / .load())")

    # -- public state

    @property
    def picked(self) -> np.ndarray:
        """int64 pool indices labeled or picked so far, in the order they were recorded (a copy)."""
        return self._picked.copy()

    @property
    def round(self) -> int:
        """Number of completed `select` calls."""
        return int(self._man["round"])

    @property
    def state_dir(self) -> Path:
        return self.store.dir

    @property
    def history(self) -> list:
        """One dict per completed round: round, budget, n_new, seconds."""
        return list(self._man["rounds"])

    def mark_labeled(self, indices) -> np.ndarray:
        """Record indices labeled outside the selector (e.g. the seed set); returns the new ones.

        Indices already recorded are ignored (so re-running a seeding step after a crash is safe).
        """
        idx = as_index_array("indices", indices, n=self.n, unique=False)
        idx = np.unique(idx)
        new = idx[~self._mask[idx]]
        if new.size:
            with self.store.lock():
                self._record(new, event=None)
        return new

    def _record(self, new: np.ndarray, event: dict | None) -> None:
        assert not self._mask[new].any(), "internal: an index would be picked twice"
        picked = np.concatenate([self._picked, new.astype(np.int64)])
        man = dict(self._man, n_picked_events=self._man["n_picked_events"] + 1)
        if event is None:
            man["n_seed_labeled"] = man.get("n_seed_labeled", 0) + int(new.size)
        else:
            man["round"] = man["round"] + 1
            man["rounds"] = man["rounds"] + [event]
        self._man = self.store.commit(man, picked)
        self._picked = picked
        self._mask[new] = True

    def _round_seed(self):
        # round r's randomness depends only on (seed, r): a re-run after a crash repeats it
        return np.random.default_rng([self._seed, self.round, 0x5E1])

    def _select_with(self, budget, choose):
        budget = check_int("budget", budget, min=0)
        t0 = time.perf_counter()
        with self.store.lock():
            fresh = self.store.read()  # another process may have advanced the state: never pick twice
            if fresh is not None and fresh.get("n_picked_events") != self._man.get("n_picked_events"):
                raise RuntimeError(f"state_dir: {str(self.store.dir)!r} was changed by another selector "
                                   f"since this one opened it; reopen it to continue")
            new = np.asarray(choose(budget, self._picked, self._round_seed()), dtype=np.int64)
            if new.size and self._mask[new].any():
                raise RuntimeError("internal: the strategy returned an already picked index")
            event = {"round": self.round + 1, "budget": budget, "n_new": int(new.size),
                     "seconds": round(time.perf_counter() - t0, 4)}
            self._record(new, event)
        log.info("selector: round %d picked %d (total %d) in %.2f s", self.round, new.size, self._picked.size,
                 event["seconds"])
        return new


def _check_dedup_args(dedup, delta):
    if not isinstance(dedup, (bool, np.bool_)):
        raise TypeError(f"dedup: expected a bool, got {type(dedup).__name__}")
    if delta is not None:
        if not dedup:
            raise ValueError(f"delta: applies only with the near-duplicate filter on, got delta={delta!r}")
        delta = check_float("delta", delta, min=0.0)
    return delta


class _Dedup:
    """The near-duplicate filter's graph and delta for a selector (mixed into both selectors)."""

    GRAPH_FILES = ("graph_indices.npy", "graph_distances.npy")

    def _graph_arrays_for(self, graph, *, need, **build):
        """(indices, distances) of the pool's graph: `graph`, else the state directory's copy, else
        built (only when `need`); saved to the state directory when the filter is on."""
        from .redundancy import _graph_arrays

        gi, gd = (self.store.dir / f for f in self.GRAPH_FILES)
        if graph is None and gi.exists() and gd.exists():
            graph = (np.load(gi, mmap_mode="r", allow_pickle=False), np.load(gd, mmap_mode="r", allow_pickle=False))
        elif graph is None and need:
            graph = self._build_graph(**build)
        if graph is None:
            return None
        ind, dist = _graph_arrays(graph)
        if ind.shape[0] != self.n:
            raise ValueError(f"graph: expected {self.n} rows (the pool's size), got {ind.shape[0]}")
        if need and not (gi.exists() and gd.exists()):
            save_npy(gd, np.asarray(dist))
            save_npy(gi, np.asarray(ind))
        return ind, dist

    def _build_graph(self, **build):
        raise ValueError("dedup_graph: expected the pool's k-NN graph, got None")

    def _resolve_delta(self):
        """delta: from the manifest when recorded, else the given one or auto_delta; recorded once."""
        if "dedup_delta" in self._man:
            return
        from .redundancy import auto_delta

        d = self._delta if self._delta is not None else auto_delta(self._graph)
        self._man = self.store.commit(dict(self._man, dedup_delta=float(d)), self._picked)

    @property
    def delta(self) -> float | None:
        """The near-duplicate threshold in use (None when the filter is off)."""
        return self._man.get("dedup_delta") if self.dedup else None

    def _near_copies(self):
        """The graph's `redundancy.NearCopies` table at the filter's delta: built on the first
        select (one pass over the graph), then reused by every round, so that a round's filter walks
        only the near-copies (same picks as the graph)."""
        from .redundancy import NearCopies

        t = getattr(self, "_near", None)
        if t is None or t.delta != self.delta:
            t = self._near = NearCopies.from_graph(self._graph, delta=self.delta)
        return t

    @property
    def graph(self):
        """(indices [N, k], distances [N, k]) of the pool's graph, or None when neither given nor needed."""
        return self._graph

    def redundancy(self, batch=None, *, delta=None) -> dict:
        """`redundancy.redundancy_report` of a batch against what was labeled or picked before it.

        batch: None (the last round's picks) or int pool indices (e.g. a batch from elsewhere,
        checked against everything recorded so far). delta: default the filter's delta, else
        `auto_delta` of the graph."""
        from .redundancy import redundancy_report

        if self._graph is None:
            raise ValueError("graph: the redundancy report needs the pool's k-NN graph; pass graph= (or turn the filter on)")
        if batch is None:
            if not self._man["rounds"]:
                raise ValueError("batch: no round selected yet; pass the indices to report on")
            b = int(self._man["rounds"][-1]["n_new"])
            batch, before = self._picked[self._picked.size - b:], self._picked[:self._picked.size - b]
        else:
            batch = as_index_array("batch", batch, n=self.n, unique=True)
            before = self._picked[~np.isin(self._picked, batch)]
        if delta is None:
            delta = self.delta
        src = self._near_copies() if self.dedup and delta == self.delta else self._graph
        return redundancy_report(batch, src, delta=delta, labeled=before)


class ClusterMarginSelector(_Dedup, _StatefulSelector):
    """Cluster-Margin between labeling rounds, with its state in `state_dir`.

    embeddings: [N, d] pool (array, memmap, tensor or .npy path); clustered once.
    state_dir: directory for the manifest, the picked indices and the cluster labels.
    k, metric, target_mean_size | epsilon, cache_dir, cluster_options: passed to `cluster`
      (target_mean_size=10 by default: the paper's mean cluster size). labels: optional int [N]
      cluster labels to use instead of clustering (e.g. an exact HAC's).
    km_ratio, order, label_aware: passed to `cluster_margin` (label_aware counts everything picked
      or marked labeled so far as labeled).
    from_logits, multilabel, device, budget_bytes: how `select` turns model outputs into margins.
    seed: int >= 0; round r uses a generator seeded by (seed, r).
    dedup: bool; the near-duplicate filter on the candidates (`cluster_margin(dedup_graph=...)`).
    delta: float >= 0 or None (`auto_delta` of the graph, computed once); only with dedup.
    graph: optional k-NN graph of the pool (KNNGraph or (indices [N, k], distances [N, k])) for
      the filter and for `redundancy`; default: the clustering's graph (built if labels were given).
    """

    kind = "cluster_margin"

    def __init__(self, embeddings, *, state_dir, k=16, metric="cosine", target_mean_size=None, epsilon=None,
                 km_ratio=10.0, cache_dir=None, seed=0, order="smallest", label_aware=False, from_logits=True,
                 multilabel=False, device="auto", budget_bytes=None, labels=None, cluster_options=None,
                 dedup=False, delta=None, graph=None):
        if epsilon is None and target_mean_size is None and labels is None:
            target_mean_size = 10.0
        from .sampler import ORDERS

        check_choice("order", order, ORDERS)
        km_ratio = check_float("km_ratio", km_ratio, min=1.0)
        for name, v in (("label_aware", label_aware), ("from_logits", from_logits), ("multilabel", multilabel)):
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
        delta = _check_dedup_args(dedup, delta)
        params = {"k": int(k), "metric": metric, "target_mean_size": target_mean_size, "epsilon": epsilon,
                  "km_ratio": km_ratio, "order": order, "label_aware": bool(label_aware),
                  "multilabel": bool(multilabel), "labels_given": labels is not None}
        if dedup:  # absent when off: states made before the option resume unchanged
            params.update(dedup=True, delta=delta)
        super().__init__(embeddings, state_dir=state_dir, seed=seed, params=params)
        self.from_logits, self.multilabel = bool(from_logits), bool(multilabel)
        self.device, self.budget_bytes = device, budget_bytes
        self.km_ratio, self.order, self.label_aware = km_ratio, order, bool(label_aware)
        self._clustering = None
        self.labels = self._labels(labels, k, metric, target_mean_size, epsilon, cache_dir, seed,
                                   dict(cluster_options or {}))
        self.dedup = bool(dedup)
        self._graph = self._graph_arrays_for(graph, need=self.dedup, k=k, metric=metric)
        self._delta = delta
        if self.dedup:
            self._resolve_delta()

    def _labels(self, labels, k, metric, target, eps, cache_dir, seed, opts):
        path = self.store.dir / "labels.npy"
        if labels is not None:
            lab = as_labels("labels", labels, n=self.n, other="embeddings")
            if not path.exists():
                save_npy(path, lab)
            return lab
        if path.exists():  # built by an earlier run: the clustering is paid once
            return as_labels("labels", np.load(path, allow_pickle=False), n=self.n, other="embeddings")
        from .cluster import cluster

        cl = cluster(self._src, epsilon=eps, target_mean_size=target, k=k, metric=metric, cache_dir=cache_dir,
                     seed=seed, device=self.device, budget_bytes=self.budget_bytes, **opts)
        save_npy(path, cl.labels)
        self._man = self.store.commit(dict(self._man, n_clusters=int(cl.n_clusters), epsilon=float(cl.epsilon)),
                                      self._picked)
        self._clustering = cl  # its graph serves the near-duplicate filter
        return cl.labels

    def _build_graph(self, k, metric):
        if self._clustering is not None:
            return self._clustering.graph
        from .knn import knn_graph  # labels given, or clustered by an earlier run: build it once

        return knn_graph(self._src, k=k, metric=metric, device=self.device, budget_bytes=self.budget_bytes)

    @classmethod
    def load(cls, state_dir, embeddings=None, **overrides) -> "ClusterMarginSelector":
        """Reopen a saved selector with the parameters it was made with (embeddings: the pool, or
        None to reopen the `.npy` path recorded in the manifest)."""
        man = _StateStore(state_dir).read()
        if man is None:
            raise ValueError(f"state_dir: expected a saved selector in {str(state_dir)!r}, found no {MANIFEST}")
        if embeddings is None:
            embeddings = man.get("embeddings_path")
            if embeddings is None:
                raise ValueError("embeddings: the saved selector's pool was not a file; pass embeddings=")
        p = dict(man["params"])
        labels_given = p.pop("labels_given", False)
        kw = dict(k=p["k"], metric=p["metric"], target_mean_size=p["target_mean_size"], epsilon=p["epsilon"],
                  km_ratio=p["km_ratio"], order=p["order"], label_aware=p["label_aware"],
                  multilabel=p["multilabel"], seed=p["seed"])
        if p.get("dedup"):
            kw.update(dedup=True, delta=p.get("delta"))
        if labels_given:
            kw["labels"] = np.load(Path(state_dir) / "labels.npy", allow_pickle=False)
        kw.update(overrides)
        return cls(embeddings, state_dir=state_dir, **kw)

    def scores(self, outputs) -> np.ndarray:
        """float32 [N] margins of model outputs [N, C] (lower = more uncertain)."""
        try:
            from .margin import margin_scores
        except ImportError:  # until the fused scorer lands: the baselines' block-wise scorer
            margin_scores = None
        if margin_scores is not None:
            return np.asarray(margin_scores(outputs, from_logits=self.from_logits, multilabel=self.multilabel,
                                            device=self.device, budget_bytes=self.budget_bytes))
        if self.multilabel:
            raise ValueError("multilabel: needs cm_engine.margin (not available in this build)")
        from .baselines import uncertainty_scores

        return uncertainty_scores(outputs, measure="margin", from_logits=self.from_logits, device=self.device,
                                  budget_bytes=self.budget_bytes)

    def select(self, outputs, budget) -> np.ndarray:
        """Pick `budget` new pool indices from model outputs [N, C] on the whole pool; record and save.

        Returns int64 [min(budget, unpicked)] indices never picked or labeled before.
        """
        return self.select_scores(self.scores(outputs), budget)

    def select_scores(self, scores, budget) -> np.ndarray:
        """As `select`, from precomputed margin scores [N] (lower = more uncertain)."""
        from .strategies import cluster_margin

        dd = {"dedup_graph": self._near_copies(), "delta": self.delta} if self.dedup else {}

        def choose(b, picked, rng):
            return cluster_margin(scores, self.labels, b, km_ratio=self.km_ratio, exclude=picked, seed=rng,
                                  order=self.order, label_aware=self.label_aware, **dd)

        return self._select_with(budget, choose)


class Selector(_Dedup, _StatefulSelector):
    """A baseline strategy with the same saved state: "random", "margin", "entropy",
    "least_confidence", "coreset" or "badge".

    embeddings: the pool [N, d] (needed by coreset and badge; for the others `n=` may be given
      instead). options: passed to the strategy function (e.g. partitions=, metric=, device=).
    dedup_graph: "margin" only: the pool's k-NN graph (KNNGraph or (indices, distances), saved in
      the state directory); margin selection then skips near-copies (`redundancy.filtered_margin`).
      delta: float >= 0 or None (`auto_delta`, computed once). graph: a graph for `redundancy` only.
    `select(outputs, budget)`: outputs [N, C] are model outputs (ignored by random and coreset).
    """

    kind = "baseline"

    def __init__(self, strategy, embeddings=None, *, state_dir, seed=0, n=None, from_logits=True, dedup_graph=None,
                 delta=None, graph=None, **options):
        check_choice("strategy", strategy, STRATEGIES)
        if dedup_graph is not None and strategy != "margin":
            raise ValueError(f"dedup_graph: applies to strategy 'margin' (or ClusterMarginSelector), got strategy {strategy!r}")
        if dedup_graph is not None and graph is not None:
            raise ValueError("graph: expected either dedup_graph or graph, got both")
        dedup = dedup_graph is not None
        delta = _check_dedup_args(dedup, delta)
        if embeddings is None and strategy in ("coreset", "badge"):
            raise ValueError(f"embeddings: strategy {strategy!r} needs the pool's embeddings, got None")
        if embeddings is None and n is None:
            raise ValueError("n: expected the pool size when no embeddings are given, got None")
        self.strategy, self.from_logits, self.options = strategy, bool(from_logits), options
        params = {"strategy": strategy, "from_logits": bool(from_logits),
                  **{k: v for k, v in options.items() if isinstance(v, (int, float, str, bool, type(None)))
                     and k not in ("device", "budget_bytes")}}
        if dedup:
            params.update(dedup=True, delta=delta)
        super().__init__(embeddings, state_dir=state_dir, seed=seed, params=params, n=n)
        self.dedup, self._delta = dedup, delta
        self._graph = self._graph_arrays_for(dedup_graph if dedup else graph, need=dedup)
        if dedup:
            self._resolve_delta()

    def select(self, outputs, budget) -> np.ndarray:
        from . import baselines as B

        def choose(b, picked, rng):
            s, opt = self.strategy, self.options
            if s == "random":
                return B.random_select(self.n, b, exclude=picked, seed=rng)
            if s == "coreset":
                return B.coreset_select(self._src, b, exclude=picked, seed=rng, **opt)
            if s == "badge":
                return B.badge_select(self._src, outputs, b, exclude=picked, seed=rng, from_logits=self.from_logits, **opt)
            if self.dedup:
                from .redundancy import filtered_margin

                sc = B.uncertainty_scores(outputs, measure="margin", from_logits=self.from_logits,
                                          **{k: v for k, v in opt.items() if k in ("device", "budget_bytes")})
                return filtered_margin(sc, self._near_copies(), b, delta=self.delta, exclude=picked)
            return B.uncertainty_select(outputs, b, measure=s, exclude=picked, from_logits=self.from_logits, **opt)

        return self._select_with(budget, choose)
