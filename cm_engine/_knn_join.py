"""The grouped search's self-join as batched tensor work (steps 3 and 4 of `gemm_ivf_knn` on CUDA,
or on a CPU without FAISS): no Python loop over cells.

Private: called by `_knn_torch._grouped_search` with resolved options. Rows are in cell order
throughout (cell c holds positions off[c]:off[c + 1] of xs); results are mapped back to pool
indices at the end.

Why batched: one Python iteration per cell (a few small kernels and a host sync each) cost
~2 ms per cell on an H200, so the 39K cells of a 10M pool took 80 s for ~0.1 s of arithmetic.
Here the work is cut into units (a cell's queries in chunks of at most `_UNIT_ROWS` rows, with
the candidates of that cell), units of similar candidate counts are batched into one padded
batched matrix product + top-k, and the per-row bookkeeping is done once over all rows.
"""
from __future__ import annotations

import math

import torch

from ._device import rows_per_block
from .knn import finish_torch

#: Query rows per unit: a cell's queries are cut into chunks of at most this many rows, so a
#: batch pads each unit to at most this many rows (cells average ~256 rows, with a long tail).
_UNIT_ROWS = 128


def probe_table(req: torch.Tensor, counts: torch.Tensor, cap: int):
    """Which cells each cell searches, and which requests that leaves to the second pass.

    req [N, P] int64: each row's P requested cells, rows in cell order (the row's own cell
    first); counts [nlist] int64 cell sizes. A cell searches the non-empty cells its rows request
    most (count descending, then cell id), itself first, at most `cap` of them.
    Returns (probes [nlist, cap] int64, -1 padded; cut [N, P] bool: a request for a non-empty
    cell that its row's cell does not search).
    """
    n, p = req.shape
    nlist = counts.numel()
    dev = req.device
    own = torch.repeat_interleave(torch.arange(nlist, device=dev), counts)  # [N] each row's cell
    key = (own[:, None] * nlist + req).reshape(-1)
    uk, inv, cnt = torch.unique(key, return_inverse=True, return_counts=True)
    uc, up = uk // nlist, uk % nlist
    cnt = torch.where(uc == up, torch.full_like(cnt, n * p + 1), cnt)  # the cell itself first
    cnt = torch.where(counts[up] > 0, cnt, torch.zeros_like(cnt))  # empty cells are never searched
    # order: by cell, then count descending, then requested cell (uk is sorted by (cell, requested))
    o = torch.argsort(-cnt, stable=True)
    o = o[torch.argsort(uc[o], stable=True)]
    per = torch.bincount(uc, minlength=nlist)
    start = torch.cumsum(per, 0) - per
    rank = torch.empty_like(o)
    rank[o] = torch.arange(o.numel(), device=dev) - start[uc[o]]
    keep = (rank < cap) & (cnt > 0)
    probes = torch.full((nlist, cap), -1, dtype=torch.int64, device=dev)
    probes[uc[keep], rank[keep]] = up[keep]
    cut = (~keep[inv]).reshape(n, p) & (counts[req] > 0)
    return probes, cut


def _segments(lengths: torch.Tensor):
    """For segments of the given lengths [S] (int64 >= 0): (segment id [T], index within its
    segment [T]) of each of the T = sum(lengths) elements."""
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    return seg, torch.arange(seg.numel(), device=lengths.device) - first[seg]


def _batches(cost: torch.Tensor, budget: int):
    """Consecutive [start, end) ranges of units whose summed `cost` (bytes, units sorted by cost
    descending, so a batch's first unit is its largest) stays within budget (one unit at least)."""
    c = cost.tolist()
    s = 0
    while s < len(c):
        e, tot = s, 0
        while e < len(c) and (e == s or tot + c[s] <= budget):  # padded to the first (largest) unit
            tot += c[s]
            e += 1
        yield s, e
        s = e


class BatchedJoin:
    """Batched nearest-candidate search over xs [N, d] float32 (prepped, cell order) on `dev`.

    kc: candidates kept per query; cdt: matmul dtype (ranking only; distances are recomputed in
    float32); work: bytes of working memory per batch.
    """

    def __init__(self, xs: torch.Tensor, *, metric: str, kc: int, cdt: torch.dtype, dev: torch.device, work: int):
        self.xs, self.metric, self.kc, self.cdt, self.dev, self.work = xs, metric, kc, cdt, dev, work
        self.d = xs.shape[1]
        # The matmul copy of the pool, on the device when it fits (else rows are gathered on the host).
        self.xh = xs if (cdt == torch.float32) else xs.to(cdt)
        self.norm = xs.pow(2).sum(1) if metric == "l2" else None

    def _rows(self, pos: torch.Tensor, half: bool) -> torch.Tensor:
        src = self.xh if half else self.xs
        return src[pos.to(src.device)].to(self.dev, non_blocking=True)

    def unit_bytes(self, m_rows: int, M) -> torch.Tensor:
        """Working bytes of a unit of m_rows queries against M candidates (tensor of M's)."""
        es = torch.empty((), dtype=self.cdt).element_size()
        per_candidate = m_rows * (es + 4 + 4) + self.d * es + 16  # scores, float key, the gathered row
        return M * per_candidate + m_rows * self.kc * (self.d * 4 + 24) + m_rows * self.d * 8

    def search(self, qpos: torch.Tensor, cpos: torch.Tensor):
        """Queries qpos [B, Q] and candidates cpos [B, M] (positions in xs, -1 = padding), per unit
        b: (positions of the nearest candidates [B, Q, kk] int64 (-1 where fewer), float32
        distances [B, Q, kk] (inf there)), kk = min(kc, M)."""
        B, Q = qpos.shape
        M = cpos.shape[1]
        kk = min(self.kc, M)
        cvalid = cpos >= 0
        C = self._rows(cpos.clamp(min=0).reshape(-1), True).reshape(B, M, self.d)
        Xq = self._rows(qpos.clamp(min=0).reshape(-1), True).reshape(B, Q, self.d)
        S = torch.bmm(Xq, C.transpose(1, 2)).float()  # [B, Q, M]
        del C
        if self.metric == "cosine":
            key = S.neg_()
        else:
            dn = self.norm[cpos.clamp(min=0).to(self.norm.device)].to(self.dev)
            key = S.mul_(-2.0).add_(dn[:, None, :])
        key.masked_fill_(~cvalid[:, None, :], math.inf)
        v, sel = key.topk(kk, dim=2, largest=False, sorted=False)
        del key, S
        pos = cpos.gather(1, sel.reshape(B, Q * kk)).reshape(B, Q, kk)
        pos = torch.where(torch.isinf(v), torch.full_like(pos, -1), pos)
        qf = self._rows(qpos.clamp(min=0).reshape(-1), False).reshape(B, Q, self.d)
        cf = self._rows(pos.clamp(min=0).reshape(-1), False).reshape(B, Q, kk, self.d)
        if self.metric == "cosine":
            dist = (1.0 - torch.einsum("bqd,bqkd->bqk", qf, cf)).clamp_(0.0, 2.0)
        else:
            dist = (cf - qf[:, :, None, :]).pow_(2).sum(-1).sqrt_()
        dist = torch.where(pos < 0, torch.full_like(dist, math.inf), dist)
        return pos, dist

    def run_units(self, unit_q: torch.Tensor, unit_m: torch.Tensor, unit_cells: torch.Tensor, off: torch.Tensor,
                  counts: torch.Tensor, qlist: torch.Tensor | None, sink, progress=None) -> int:
        """Search every unit: unit u's queries are positions unit_q[u] .. unit_q[u] + unit_m[u] - 1
        (of xs, or of the list `qlist` when given), its candidates the rows of the cells
        unit_cells[u] ([U, P] int64, -1 padded). sink(queries [b] positions in xs, pos [b, kk],
        dist [b, kk]) takes each batch's valid query rows. Returns the pairs searched."""
        U = unit_q.numel()
        if U == 0:
            return 0
        csize = torch.where(unit_cells >= 0, counts[unit_cells.clamp(min=0)], torch.zeros_like(unit_cells))
        M = csize.sum(1)  # [U] candidates per unit
        order = torch.argsort(M, descending=True, stable=True)
        cost = self.unit_bytes(_UNIT_ROWS, M[order])
        searched = int((M * unit_m).sum())
        ar = torch.arange(_UNIT_ROWS, device=self.dev)
        for s, e in _batches(cost, max(1, self.work // 2)):  # half: the temporaries are estimates
            u = order[s:e]
            B, Mmax = u.numel(), int(M[u[0]])
            if Mmax == 0:
                continue
            # candidates: each unit's cells' rows, laid end to end, padded to Mmax
            cs = csize[u]  # [B, P]
            lens = cs.reshape(-1)
            seg, within = _segments(lens)
            src = off[unit_cells[u].clamp(min=0).reshape(-1)][seg] + within
            unit_base = (torch.arange(B, device=self.dev) * Mmax).repeat_interleave(cs.shape[1])
            dst_start = (torch.cumsum(cs, 1) - cs).reshape(-1) + unit_base
            cpos = torch.full((B * Mmax,), -1, dtype=torch.int64, device=self.dev)
            cpos[dst_start[seg] + within] = src
            cpos = cpos.reshape(B, Mmax)
            m = unit_m[u]
            qi = unit_q[u][:, None] + ar[None, :]
            qvalid = ar[None, :] < m[:, None]
            qi = torch.where(qvalid, qi, torch.zeros_like(qi))
            qpos = qi if qlist is None else qlist[qi]
            qpos = torch.where(qvalid, qpos, torch.full_like(qpos, -1))
            pos, dist = self.search(qpos, cpos)
            sink(qpos[qvalid], pos[qvalid], dist[qvalid])
            if progress is not None:
                progress(int(m.sum()))
        return searched


def _units(starts: torch.Tensor, sizes: torch.Tensor):
    """Cut segments (start, size) into units of at most _UNIT_ROWS rows: (unit start [U], unit
    rows [U], segment of each unit [U])."""
    nu = (sizes + _UNIT_ROWS - 1) // _UNIT_ROWS
    seg, j = _segments(nu)
    q0 = starts[seg] + j * _UNIT_ROWS
    m = torch.minimum(sizes[seg] - j * _UNIT_ROWS, torch.full_like(q0, _UNIT_ROWS))
    return q0, m, seg


def batched_self_join(xs: torch.Tensor, req, counts, off, perm, *, cap: int, k: int, kc: int, metric: str,
                      cdt: torch.dtype, dev: torch.device, work: int, out, progress, lap) -> tuple[int, int]:
    """Steps 3 and 4 of the grouped search, batched. xs [N, d] float32 prepped pool in cell order
    (on dev, or on the host when it does not fit); req [N, P] int (numpy) each row's cells, cell
    order; counts [nlist], off [nlist + 1], perm [N] (numpy): cell sizes, starts, pool index of
    each cell-order row. Writes out (indices [N, k], distances [N, k], pool order). Returns
    (pairs searched, cut requests)."""
    n = xs.shape[0]
    t = lambda a: torch.as_tensor(a, dtype=torch.int64).to(dev)  # noqa: E731
    counts_t, off_t, perm_t = t(counts), t(off), t(perm)
    req_t = t(req)
    probes, cut = probe_table(req_t, counts_t, cap)
    join = BatchedJoin(xs, metric=metric, kc=kc, cdt=cdt, dev=dev, work=work)
    best_pos = torch.full((n, kc), -1, dtype=torch.int64, device=dev)  # per cell-order row
    best_d = torch.full((n, kc), math.inf, dtype=torch.float32, device=dev)

    def into_best(q, pos, dist):
        best_pos[q, :pos.shape[1]] = pos
        best_d[q, :dist.shape[1]] = dist

    # 3. each cell's queries (in units) against the rows of the cells it searches
    nz = torch.nonzero(counts_t).squeeze(1)
    q0, m, seg = _units(off_t[nz], counts_t[nz])
    searched = join.run_units(q0, m, probes[nz[seg]], off_t, counts_t, None, into_best, progress)
    del probes
    lap("join")

    # 4. the cut requests, grouped by requested cell: each such row against that cell's rows,
    #    merged into the row's list, one request per row at a time (a row's requests are disjoint)
    rr, jj = torch.nonzero(cut, as_tuple=True)
    n_left = int(rr.numel())
    if n_left:
        cell = req_t[rr, jj]
        o = torch.argsort(cell, stable=True)
        rr, cell = rr[o], cell[o]
        uniq, ccount = torch.unique_consecutive(cell, return_counts=True)
        q0, m, seg = _units(torch.cumsum(ccount, 0) - ccount, ccount)

        def merge(q, pos, dist):
            # A row can come twice in one batch (two of its cut requests): merge in rounds, one
            # occurrence of each row per round.
            o = torch.argsort(q, stable=True)
            q, pos, dist = q[o], pos[o], dist[o]
            _, per_row = torch.unique_consecutive(q, return_counts=True)
            _, rank = _segments(per_row)
            for j in range(int(per_row.max())):
                sel = rank == j
                r = q[sel]
                P = torch.cat([best_pos[r], pos[sel]], 1)
                D, pick = torch.cat([best_d[r], dist[sel]], 1).topk(kc, dim=1, largest=False, sorted=False)
                best_pos[r], best_d[r] = P.gather(1, pick), D

        searched += join.run_units(q0, m, uniq[seg][:, None], off_t, counts_t, rr, merge)
    lap("second_pass")

    # finish in pool order: ids, sort by (distance, id), drop the row itself, keep k
    inv = torch.empty_like(perm_t)
    inv[perm_t] = torch.arange(n, device=dev)
    step = rows_per_block(kc * 64, max(1, work // 4), maximum=n)
    for s in range(0, n, step):
        e = min(n, s + step)
        cp = best_pos[inv[s:e]]
        ids = torch.where(cp >= 0, perm_t[cp.clamp(min=0)], cp)
        ii, dd = finish_torch(torch.arange(s, e, device=dev), ids, best_d[inv[s:e]], k)
        out[0][s:e] = ii.cpu().numpy()
        out[1][s:e] = dd.cpu().numpy()
    return searched, n_left

