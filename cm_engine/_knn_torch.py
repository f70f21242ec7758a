"""torch kernels of `knn.knn_graph`: tiled exact search and the GEMM-shaped approximate self-join.

Private: arguments are validated by `knn_graph`. One code path for CPU and CUDA; only the
device of the tensors differs. Every result's distances are recomputed in float32 from the
rows themselves (so float16/bfloat16 matrix products only rank candidates).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ._device import log_memory_estimate, rows_per_block
from .knn import _prep, default_nlist, exact_distances, finish_rows, gather_rows

log = logging.getLogger("cm_engine")

#: Extra candidates kept per row when ranking in reduced precision, re-ranked in float32.
_REDUCED_PAD = 8


def _compute_dtype(name, dev: torch.device, pool) -> torch.dtype:
    """float32 on the CPU (half matmuls are slow there); on CUDA the pool's own half dtype."""
    if name is not None:
        return getattr(torch, name)
    if dev.type == "cuda":
        if pool.dtype in (np.float16, torch.float16):
            return torch.float16
        if pool.dtype in ("bfloat16", torch.bfloat16):
            return torch.bfloat16
    return torch.float32


def _work_bytes(budget: int, dev: torch.device) -> int:
    """Working memory for tiles: the budget; on CUDA at least 30% of the free device memory
    (the host budget is about host RAM; a GPU is wasted on 256 MiB tiles)."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return max(budget, int(free * 0.3))
    return budget


def _key(S: torch.Tensor, metric: str, dn: torch.Tensor | None) -> torch.Tensor:
    """Ranking key from similarities (smaller is nearer): -cos, or |b|^2 - 2ab for l2."""
    S = S.float()
    return S.neg_() if metric == "cosine" else S.mul_(-2.0).add_(dn)


def exact_knn(pool, *, k, metric, dev, budget, out, progress, compute_dtype=None, query_rows=None):
    """Tiled brute force: database chunks resident on the device, query blocks x tiles,
    top-k per tile, merged into a running top-k per query; distances recomputed in float32.
    `query_rows` (sorted int64) restricts the queries to those rows (out has one row per query)."""
    n, d = pool.shape
    nq = n if query_rows is None else len(query_rows)

    def queries(qs, qe):
        if query_rows is None:
            return np.arange(qs, qe), _prep(pool.block(qs, qe, device=dev), metric)
        r = query_rows[qs:qe]
        return r, _prep(gather_rows(pool, r, device=dev), metric)
    cdt = _compute_dtype(compute_dtype, dev, pool)
    es = torch.empty((), dtype=cdt).element_size()
    kc = min(n, k + 1 + (0 if cdt == torch.float32 else _REDUCED_PAD))
    work = _work_bytes(budget, dev)
    chunk = min(n, max(kc, (work // 2) // (d * (es + 4))))
    tile = min(chunk, 65536 if dev.type == "cuda" else 16384)
    bq = rows_per_block(tile * 12 + d * 8, work // 4, maximum=nq)
    nchunks = math.ceil(n / chunk)
    log_memory_estimate("knn_graph torch exact", chunk * d * (es + 4) + bq * tile * 12)
    acc = None
    if nchunks > 1:
        acc = (torch.full((nq, kc), math.inf, device=dev), torch.full((nq, kc), -1, dtype=torch.int64, device=dev))
    for cs in range(0, n, chunk):
        ce = min(n, cs + chunk)
        dbf = _prep(pool.block(cs, ce, device=dev), metric)
        db = dbf.to(cdt)
        dn = dbf.pow(2).sum(1) if metric == "l2" else None
        if nchunks > 1:
            del dbf  # the float32 copy is only kept when it serves the final recomputation
        for qs in range(0, nq, bq):
            qe = min(nq, qs + bq)
            rows, qf = queries(qs, qe)
            q = qf.to(cdt)
            vals, idxs = [], []
            if acc is not None:
                vals.append(acc[0][qs:qe])
                idxs.append(acc[1][qs:qe])
            for ts in range(0, ce - cs, tile):
                te = min(ce - cs, ts + tile)
                key = _key(q @ db[ts:te].T, metric, None if dn is None else dn[ts:te])
                v, i = key.topk(min(kc, te - ts), dim=1, largest=False, sorted=False)
                vals.append(v)
                idxs.append(i + (cs + ts))
            v, i = torch.cat(vals, 1), torch.cat(idxs, 1)
            if v.shape[1] > kc:
                v, sel = v.topk(kc, dim=1, largest=False, sorted=False)
                i = i.gather(1, sel)
            if acc is not None:
                acc[0][qs:qe], acc[1][qs:qe] = v, i
            else:
                cand = dbf[i] if cdt == torch.float32 else _prep(gather_rows(pool, i.cpu().numpy(), device=dev), metric).reshape(*i.shape, d)
                _write(out, rows, i, exact_distances(qf, cand, metric), k, progress, pos=slice(qs, qe))
    if acc is not None:
        for qs in range(0, nq, bq):
            qe = min(nq, qs + bq)
            rows, qf = queries(qs, qe)
            i = acc[1][qs:qe]
            cand = _prep(gather_rows(pool, i.cpu().numpy(), device=dev), metric).reshape(*i.shape, d)
            _write(out, rows, i, exact_distances(qf, cand, metric), k, progress, pos=slice(qs, qe))
    return {"compute_dtype": str(cdt).replace("torch.", ""), "db_chunk_rows": chunk, "query_block_rows": bq}


def _merge_into(out, rows: np.ndarray, ii: np.ndarray, dd: np.ndarray, k: int) -> None:
    """Merge candidates ii/dd [m, c] (never the row itself, never already listed) into the
    finished rows `rows` of out, keeping each row's k nearest, ties by index."""
    ci = np.concatenate([np.asarray(out[0][rows], np.int64), ii.astype(np.int64)], 1)
    cd = np.concatenate([np.asarray(out[1][rows], np.float32), dd.astype(np.float32)], 1)
    cd = np.where(ci < 0, np.float32(np.inf), cd)
    o = np.lexsort((np.where(ci < 0, np.iinfo(np.int64).max, ci), cd), axis=1)[:, :k]
    out[0][rows] = np.take_along_axis(ci, o, 1)
    out[1][rows] = np.take_along_axis(cd, o, 1)


def _write(out, rows: np.ndarray, i: torch.Tensor, dist: torch.Tensor, k: int, progress, pos=None) -> None:
    """Finish query rows `rows` (pool indices) and store them at `pos` (default: at `rows`)."""
    ii, dd = finish_rows(rows, i, dist, k)
    if pos is not None:
        out[0][pos] = ii
        out[1][pos] = dd
    elif rows.size and rows[-1] - rows[0] + 1 == rows.size:
        out[0][rows[0]:rows[-1] + 1] = ii
        out[1][rows[0]:rows[-1] + 1] = dd
    else:
        out[0][rows] = ii
        out[1][rows] = dd
    if progress is not None:
        progress(int(rows.size))


# ----------------------------------------------------------------------------- approximate

def _nearest_centroid(x: torch.Tensor, C: torch.Tensor, metric: str, cn: torch.Tensor | None, work: int,
                      p: int = 1):
    """Index of the nearest centroid of each row ([m] int64), or of the p nearest ([m, p], nearest first)."""
    out = torch.empty((x.shape[0], p), dtype=torch.int64, device=x.device)
    rows = rows_per_block(C.shape[0] * 8, work // 4, maximum=max(1, x.shape[0]))
    for s in range(0, x.shape[0], rows):
        S = x[s:s + rows] @ C.T
        key = S.neg_() if metric == "cosine" else S.mul_(-2.0).add_(cn)
        out[s:s + rows] = key.argmin(1, keepdim=True) if p == 1 else key.topk(p, dim=1, largest=False).indices
    return out[:, 0] if p == 1 else out


def kmeans(X: torch.Tensor, nlist: int, *, niter: int, seed: int, metric: str, work: int) -> torch.Tensor:
    """Lloyd's k-means on the device (spherical for cosine). Centroid sums are taken as float64
    prefix-sum differences over the rows sorted by cell: deterministic, unlike atomic adds."""
    n, d = X.shape
    g = torch.Generator().manual_seed(seed)
    C = X[torch.randperm(n, generator=g)[:nlist].to(X.device)].clone()
    for _ in range(niter):
        cn = C.pow(2).sum(1) if metric == "l2" else None
        a = _nearest_centroid(X, C, metric, cn, work)
        order = torch.argsort(a, stable=True)
        counts = torch.bincount(a, minlength=nlist)
        ends = counts.cumsum(0)
        cs = torch.cat([torch.zeros(1, d, dtype=torch.float64, device=X.device), X[order].double().cumsum(0)])
        sums = cs[ends] - cs[ends - counts]
        newC = (sums / counts.clamp(min=1)[:, None]).float()
        empty = counts == 0
        if bool(empty.any()):  # re-seed empty cells with random sample rows
            pick = torch.randint(0, n, (int(empty.sum()),), generator=g).to(X.device)
            newC[empty] = X[pick]
        C = torch.nn.functional.normalize(newC, dim=1, eps=1e-30) if metric == "cosine" else newC
    return C


def _cell_probes(req: np.ndarray, c: int, nlist: int, cap: int) -> np.ndarray:
    """The cells searched for cell c: those its points ask for (each point's nprobe nearest
    centroids), most-asked first, at most `cap`; cell c itself always first."""
    cnt = np.bincount(req.ravel(), minlength=nlist)
    cnt[c] = np.iinfo(cnt.dtype).max
    asked = np.flatnonzero(cnt)
    order = np.lexsort((asked, -cnt[asked]))  # by count descending, then cell id
    return asked[order[:cap]]


def _topk_torch(q: torch.Tensor, cand: torch.Tensor, kc: int, metric: str, cdt: torch.dtype, dn):
    """Indices [m, min(kc, M)] of the nearest candidates of each query: matmul + topk."""
    key = _key(q.to(cdt) @ cand.to(cdt).T, metric, dn)
    return key.topk(min(kc, cand.shape[0]), dim=1, largest=False, sorted=False).indices


def _topk_faiss(q: torch.Tensor, cand: torch.Tensor, kc: int, metric: str):
    """Same through faiss.knn (fused BLAS + heap): the CPU's fast search function. Returns
    (indices, cosine distances from the float32 inner products of unit rows, or None for l2)."""
    import faiss  # the caller checked it is importable

    mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    D, i = faiss.knn(q.numpy(), cand.numpy(), min(kc, cand.shape[0]), metric=mt)
    dist = torch.from_numpy(1.0 - D).clamp_(0.0, 2.0) if metric == "cosine" else None
    return torch.from_numpy(i), dist


def grouped_nlist(n: int) -> int:
    """Cells of the grouped search: about 4 sqrt(N) as for IVF, but none under ~256 points on
    average, since a cell's queries form one matrix product and small ones waste it (at 50K:
    195 cells took 18.5 s at recall 0.992 where 894 took 46.7 s at 0.985, same run)."""
    return max(1, min(default_nlist(n), n // 256))


def _train_centroids(xt: torch.Tensor, nlist: int, *, niter: int, seed: int, metric: str, work: int,
                     use_faiss: bool) -> torch.Tensor:
    """k-means centroids [nlist, d] float32 of the prepped sample xt: FAISS's k-means on the CPU
    when the kernel is FAISS (several times faster than Lloyd's loop in torch there), else ours."""
    if not use_faiss:
        return kmeans(xt, nlist, niter=niter, seed=seed, metric=metric, work=work)
    import faiss  # the caller checked it is importable

    km = faiss.Kmeans(xt.shape[1], nlist, niter=niter, seed=seed, spherical=metric == "cosine",
                      max_points_per_centroid=max(256, -(-xt.shape[0] // nlist)), verbose=False)
    km.train(np.ascontiguousarray(xt.numpy()))
    return torch.from_numpy(km.centroids.copy())


def _sample_exact(pool, rows, q, *, k, metric, dev, budget, use_faiss):
    """Exact k nearest other rows of sample `rows` (prepped q [m, d]): (indices [m, k] int64,
    float32 distances [m, k]). faiss.knn over pool blocks on the CPU (torch's CPU topk is slow),
    the tiled torch search otherwise."""
    m = rows.size
    if not use_faiss:
        ex = (np.empty((m, k), np.int64), np.empty((m, k), np.float32))
        exact_knn(pool, k=k, metric=metric, dev=dev, budget=budget, out=ex, progress=None,
                  compute_dtype="float32", query_rows=rows)
        return ex
    import faiss

    from .knn import _TuneSet

    ts = _TuneSet(rows=rows, xq=np.ascontiguousarray(q.numpy()), kk=k + 1,
                  metric=faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2)
    for s, e in pool.block_ranges(budget // 2, bytes_per_row=pool.shape[1] * 8):
        ts.scan(_prep(pool.block(s, e), metric).numpy(), s, faiss)
    return ts.exact(pool, metric, k)


def _tune_nprobe(pool, rows: np.ndarray, q: torch.Tensor, C: torch.Tensor, *, k, metric, dev, budget, work,
                 target: float, use_faiss: bool = False):
    """nprobe from the exact neighbours of sample `rows` (prepped q [m, d]): a true neighbour is
    reachable at nprobe p when its cell ranks among the p cells nearest to the query, so one
    ranking of the centroids per sample row gives recall(p) for every p at once (the recall of
    per-query IVF probing; the grouped search probes a superset unless max_cell_probes cuts it).
    Returns (smallest p of NPROBE_LADDER with recall - 2 SE >= target (else nlist), info, exact)."""
    from .knn import mean_se, nprobe_ladder, tuned

    nlist = C.shape[0]
    m = rows.size
    ex = _sample_exact(pool, rows, q, k=k, metric=metric, dev=dev, budget=budget, use_faiss=use_faiss)
    cn = C.pow(2).sum(1) if metric == "l2" else None
    valid = ex[0] >= 0
    nb = _prep(gather_rows(pool, ex[0], device=dev), metric)
    cell = _nearest_centroid(nb, C, metric, cn, work).reshape(m, k).cpu()
    key = _key(q @ C.T, metric, cn).cpu()
    rank = torch.empty_like(key, dtype=torch.int64)
    rank.scatter_(1, key.argsort(dim=1, stable=True), torch.arange(nlist).expand(m, nlist).contiguous())
    r = rank.gather(1, cell).numpy()  # [m, k]: rank of each true neighbour's cell for its query
    memo = {}
    ladder = nprobe_ladder(nlist)
    chosen = ladder[-1]
    for p in ladder:  # every p is free to measure here: the first that passes
        memo[p] = mean_se(((r < p) & valid).sum(1) / np.maximum(1, valid.sum(1)))
        if memo[p][0] - 2 * memo[p][1] >= target:
            chosen = p
            break
    chosen, info = tuned(chosen, memo, m, target)
    return chosen, info, ex


def gemm_ivf_knn(pool, *, k, metric, dev, budget, out, progress, seed, nlist=None, nprobe=None,
                 max_cell_probes=None, train_per_cell=None, niter=None, compute_dtype=None, kernel="auto",
                 target_recall=None, tune_rows=None):
    """GEMM-shaped approximate self-join.

    Cells from k-means on a sample. Each point names its `nprobe` nearest centroids; a cell's
    queries are searched, as one matrix, against the points of the cells its points name most
    (itself first, at most `max_cell_probes`, default 2 * nprobe; the requests the cap cuts
    are searched afterwards grouped by requested cell and merged, so every point searches at
    least its own nprobe cells): no per-query probing, and
    each point's own nprobe cells are covered unless the cap cuts them. The per-block search is
    one swappable function: matmul + topk in torch (CUDA, or CPU without FAISS), or faiss.knn on
    the CPU (torch's CPU topk is the slow part there; FAISS's k-means and quantizer too).
    nprobe=None tunes it to `target_recall` on `tune_rows` sample rows (see `_tune_nprobe`); the
    recall those rows reach in the finished graph is reported as info["sample_recall"].
    """
    from .knn import DEFAULT_TARGET_RECALL, DEFAULT_TUNE_ROWS, _recall_rows, KNNGraph

    n, d = pool.shape
    nlist = min(nlist or grouped_nlist(n), n)
    train_per_cell = train_per_cell or 40
    niter = 10 if niter is None else niter
    cdt = _compute_dtype(compute_dtype, dev, pool)
    kc = k + 1 + (0 if cdt == torch.float32 else _REDUCED_PAD)
    work = _work_bytes(budget, dev)
    if kernel == "auto":
        kernel = "torch"
        if dev.type == "cpu" and cdt == torch.float32:
            try:
                import faiss  # noqa: F401
                kernel = "faiss"
            except ImportError:
                pass
    use_faiss = kernel == "faiss"

    # 1. Coarse partition from a seeded sample.
    rng = np.random.default_rng([seed, 0x7E])
    ntrain = min(n, nlist * train_per_cell)
    sample = np.sort(rng.choice(n, size=ntrain, replace=False))
    xt = _prep(gather_rows(pool, sample, device=dev), metric)
    C = _train_centroids(xt, nlist, niter=niter, seed=seed, metric=metric, work=work, use_faiss=use_faiss)
    cn = C.pow(2).sum(1) if metric == "l2" else None
    info = {}
    tune = None
    if nprobe is None:
        target = DEFAULT_TARGET_RECALL if target_recall is None else target_recall
        m = min(ntrain, tune_rows or DEFAULT_TUNE_ROWS)
        pick = np.sort(np.random.default_rng([seed, 0x2A]).choice(ntrain, size=m, replace=False))
        nprobe, info, ex = _tune_nprobe(pool, sample[pick], xt[torch.from_numpy(pick).to(xt.device)], C, k=k,
                                        metric=metric, dev=dev, budget=budget, work=work, target=target,
                                        use_faiss=use_faiss)
        tune = (sample[pick], ex)
    del xt
    nprobe = min(nprobe, nlist)
    cap = min(nlist, max_cell_probes or 2 * nprobe)

    # 2. Each point's nprobe nearest cells; sorted copy of the pool (float32, prepped) so that
    #    cells are slices.
    keep_on_dev = dev.type == "cpu" or n * d * 4 <= 0.5 * torch.cuda.mem_get_info(dev)[0]
    log_memory_estimate("knn_graph torch approximate (cell-sorted pool copy + probes)", n * d * 4 + n * nprobe * 4)
    req = np.empty((n, nprobe), np.int32)
    qz = None
    if use_faiss:
        import faiss

        qz = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        qz.add(np.ascontiguousarray(C.numpy()))
    for s, e in pool.block_ranges(work // 4, bytes_per_row=d * 8):
        x = _prep(pool.block(s, e, device=dev), metric)
        if qz is not None:
            req[s:e] = qz.search(x.numpy(), nprobe)[1]
        else:
            req[s:e] = _nearest_centroid(x, C, metric, cn, work, p=nprobe).reshape(e - s, nprobe).cpu().numpy()
    assign = req[:, 0].astype(np.int64)
    perm = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=nlist)
    off = np.concatenate([[0], np.cumsum(counts)])
    inv = np.empty(n, np.int64)
    inv[perm] = np.arange(n)
    xs = torch.empty((n, d), dtype=torch.float32, device=dev if keep_on_dev else "cpu",
                     pin_memory=(dev.type == "cuda" and not keep_on_dev))
    inv_t = torch.from_numpy(inv).to(xs.device)
    for s, e in pool.block_ranges(work // 4, bytes_per_row=d * 8):
        xs[inv_t[s:e]] = _prep(pool.block(s, e, device=xs.device), metric)
    req = req[perm]  # rows now in cell order too
    perm_t = torch.from_numpy(perm).to(dev)

    # 3. The self-join, cell by cell.
    def search(qf, cand, dn):
        """(indices into cand [m, kc'], float32 distances [m, kc']) of the nearest candidates."""
        if use_faiss:
            sel, dist = _topk_faiss(qf, cand, kc, metric)
            if dist is None:  # l2: recompute from the rows (BLAS's |a|^2+|b|^2-2ab cancels)
                dist = exact_distances(qf, cand[sel], metric)
            return sel, dist
        sel = _topk_torch(qf, cand, kc, metric, cdt, dn)
        return sel, exact_distances(qf, cand[sel], metric)

    searched = 0
    buf = torch.empty((0, d), dtype=torch.float32, device=xs.device)
    xs_np = xs.numpy() if use_faiss else None
    left_pos, left_cell = [], []  # (row position in cell order, requested cell) the cap left out
    for c in range(nlist):
        m = int(counts[c])
        if m == 0:
            continue
        creq = req[off[c]:off[c + 1]]
        cells = _cell_probes(creq, c, nlist, cap)
        cells = cells[counts[cells] > 0]
        miss = ~np.isin(creq, cells) & (counts[creq] > 0)
        if miss.any():
            r, j = np.nonzero(miss)
            left_pos.append(off[c] + r)
            left_cell.append(creq[r, j])
        M = int(counts[cells].sum())
        if M > buf.shape[0]:  # one reused buffer
            buf = torch.empty((max(M, 2 * buf.shape[0]), d), dtype=torch.float32, device=xs.device)
        if use_faiss:
            # numpy copies on the FAISS path: torch's thread pool waking between FAISS's OpenMP
            # calls made these copies 15x slower than the copy itself (measured at 200K).
            np.concatenate([xs_np[off[p]:off[p + 1]] for p in cells], out=buf.numpy()[:M])
            cand = buf[:M]
            cand_ids = torch.from_numpy(np.concatenate([perm[off[p]:off[p + 1]] for p in cells]))
        else:
            cand = torch.cat([xs[off[p]:off[p + 1]] for p in cells], out=buf[:M]).to(dev, non_blocking=True)
            cand_ids = torch.cat([perm_t[off[p]:off[p + 1]] for p in cells])
        dn = cand.pow(2).sum(1) if metric == "l2" and kernel == "torch" else None
        searched += m * M
        bq = rows_per_block(M * 12 + d * 8, work // 4, maximum=m)
        for qs in range(0, m, bq):
            qe = min(m, qs + bq)
            sel, dist = search(xs[off[c] + qs:off[c] + qe].to(dev, non_blocking=True), cand, dn)
            _write(out, perm[off[c] + qs:off[c] + qe], cand_ids[sel], dist, k, progress)

    # 4. Requests the cap cut: grouped the other way round, by requested cell (a contiguous
    #    slice of xs, no copy), each row's results merged into its row. Every row has then been
    #    searched against all of its own nprobe cells, as per-query IVF probing would.
    n_left = 0
    if left_pos:
        lp, lc = np.concatenate(left_pos), np.concatenate(left_cell)
        n_left = int(lp.size)
        order = np.argsort(lc, kind="stable")
        lp, lc = lp[order], lc[order]
        bounds = np.flatnonzero(np.diff(lc)) + 1
        for pos, p in zip(np.split(lp, bounds), lc[np.concatenate([[0], bounds])]):
            cand = xs[off[p]:off[p + 1]].to(dev, non_blocking=True)
            dn = cand.pow(2).sum(1) if metric == "l2" and kernel == "torch" else None
            searched += pos.size * cand.shape[0]
            pos_t = torch.from_numpy(pos).to(xs.device)
            bq = rows_per_block(cand.shape[0] * 12 + d * 8, work // 4, maximum=pos.size)
            for qs in range(0, pos.size, bq):
                sl = slice(qs, min(pos.size, qs + bq))
                sel, dist = search(xs[pos_t[sl]].to(dev, non_blocking=True), cand, dn)
                _merge_into(out, perm[pos[sl]], perm_t[off[p] + sel.to(dev)].cpu().numpy(), dist.cpu().numpy(), k)
    info.update({"nlist": nlist, "nprobe": nprobe, "max_cell_probes": cap, "train_rows": ntrain, "niter": niter,
                 "kernel": kernel, "compute_dtype": str(cdt).replace("torch.", ""),
                 "cell_size_max": int(counts.max()), "cell_size_mean": float(n / max(1, int((counts > 0).sum()))),
                 "candidates_per_row": searched / n, "cap_cut_requests": n_left})
    if tune is not None:
        rows, ex = tune
        got = KNNGraph(np.asarray(out[0][rows]), np.asarray(out[1][rows]), metric, k)
        per_row = _recall_rows(got, KNNGraph(ex[0], ex[1], metric, k))
        info["sample_recall"] = float(per_row.mean())
        if info["sample_recall"] < info["target_recall"]:
            log.warning("knn_graph: the finished graph's recall on the tuning sample is %.4f, below target_recall "
                        "%.3f", info["sample_recall"], info["target_recall"])
    return info
