"""Exact-teacher KD on the streamed pass (docs/SPEC.md section 9): impl="chunked" (torch row steps) and
impl="triton" (``triton_hidden``'s row kernels), one autograd Function for both.

The student and teacher hidden rows are interleaved, hs = [h_0; t_0; h_1; t_1; ...] (2N, H), so each
(row block, vocabulary chunk) takes ONE vendor GEMM s = hs W_c^T (2R, C) fp32 for both logits, x = s[0::2] / T
(student) and y = s[1::2] / T (teacher), and ONE addmm acc += E W_c for both accumulator rows of each row
(acc (N, 2, H) fp32). Per row the state is the student's running max x_a and argmax a, y_a, the maxima mo (student)
and mt (teacher) over the columns other than a, the off-a sums lz = sum_{v != a} e^{x_v - mo} and
lt = sum_{v != a} e^{y_v - mt}, a shift c0 (d = y - x at the row's first argmax) and one loss sum u. Sums and
accumulators exclude a: when a later chunk holds a new argmax, its column gets E = 0 and the old a re-enters every
sum and both accumulator rows (a rank-1 add of W_a), after the usual rescale by exp(m_old - m_new).

    forward_kl  E = [e^{x - mo}, e^{y - mt}],          u = sum e^{y - mt} (d - c0)
    reverse_kl  E = [e^{x - mo}, e^{x - mo} (d - c0)], u = sum e^{x - mo} (d - c0)
    jsd         pass 1: the sums only; pass 2 with both LSEs known: E = [e^{x - mo}, e^{x - mo} r],
                r = log p - log m, u = sum of the loss terms, p0 = sum e^{x - mo}, r1 = sum e^{x - mo} r

``finish`` turns them into each row's loss and G = sum_v g_v W_v (N, H) in float64 row math, written so that rows
whose student and teacher are both confident on a keep their e^-60-sized loss and gradient (SPEC section 9).
Backward is dh = w G, a per-row scale (w = upstream grad x reduction x T): no recomputation. Cost: 8NHV FLOPs for
forward and reverse KL, 12NHV for JSD (2NHV more per pass for bf16 Triton, whose E is split in two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .options import KDOptions
from .rowmath import log_mixture, math_dtype
from .streamed import Blocking, addmm_acc_, blocking, logit_chunks

NINF = float("-inf")


@dataclass
class HiddenState:
    """Running per-row state of a pass (module docstring), (N,) tensors in the math dtype: the student's max xa
    (its argmax a, long), the off-a maxima mo (student) and mt (teacher), the off-a sums lz = sum e^{x - mo} and
    lt = sum e^{y - mt}, y_a, the shift c0, the loss sum u, and acc (N, 2, H) in units of ``e_scale``."""

    xa: torch.Tensor
    mo: torch.Tensor
    mt: torch.Tensor
    lz: torch.Tensor
    lt: torch.Tensor
    ya: torch.Tensor
    c0: torch.Tensor
    u: torch.Tensor
    a: torch.Tensor
    acc: torch.Tensor | None
    p0: torch.Tensor | None = None  # jsd pass 2: sum_{v != a} p
    r1: torch.Tensor | None = None  # jsd pass 2: sum_{v != a} p r
    e_scale: tuple[float, float] = (1.0, 1.0)  # constant factors the row step put on the two E rows (fp16 range)
    scratch: dict = field(default_factory=dict)


def new_state(n: int, hd: int, dt: torch.dtype, dev, with_acc: bool) -> HiddenState:
    z = lambda: torch.zeros(n, dtype=dt, device=dev)  # noqa: E731
    ninf = lambda: torch.full((n,), NINF, dtype=dt, device=dev)  # noqa: E731
    acc = torch.zeros(n, 2, hd, dtype=dt, device=dev) if with_acc else None
    a = torch.zeros(n, dtype=torch.long, device=dev)
    return HiddenState(ninf(), ninf(), ninf(), z(), z(), ninf(), z(), z(), a, acc)


def _scratch(st: HiddenState, name: str, shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
    """A per-pass buffer of ``shape``, sized for the largest (block, chunk) and reused by the next."""
    n = math.prod(shape)
    if name not in st.scratch or st.scratch[name].numel() < n:
        st.scratch[name] = torch.empty(n, dtype=dt, device=st.u.device)
    return st.scratch[name][:n].view(shape)


def top2(x: torch.Tensor):
    """Per row: the max, its column, and the max of the other columns (-inf when C = 1). Shape: (R, C) -> 3 x (R,)"""
    if x.shape[1] == 1:
        return x[:, 0], torch.zeros_like(x[:, 0], dtype=torch.long), torch.full_like(x[:, 0], NINF)
    v, i = x.topk(2, 1)
    return v[:, 0], i[:, 0], v[:, 1]


def torch_online_step(s, st: HiddenState, r0: int, v0: int, weight, mode: str, inv_t: float):
    """One chunk of the one-pass step in tensor ops (impl="chunked"); ``mode`` "forward_kl", "reverse_kl" or
    "lse" (sums only). Returns E (2R, C) in the logit buffer (None for "lse"); rescales and re-enters the old a
    in ``st.acc`` before the caller's addmm.

    Shape: s (2R, C) raw logits of rows r0.. (student, teacher interleaved), weight (V, H)
    """
    r = s.shape[0] // 2
    rows = slice(r0, r0 + r)
    s.mul_(inv_t)
    x, y = s[0::2], s[1::2]  # (R, C) views
    xm, j, x2 = top2(x)
    ym, yi, y2 = top2(y)
    xa, mo, mt, ya = st.xa[rows], st.mo[rows], st.mt[rows], st.ya[rows]
    new = xm > xa  # a moves to column j of this chunk
    had = new & (xa > NINF)  # ... and an old a exists: it joins the off-a set
    yj = y.gather(1, j[:, None])[:, 0]
    cand_x = torch.where(new, x2, xm)  # the chunk's off-a maxima
    cand_y = torch.where(new, torch.where(yi == j, y2, ym), ym)
    old_x, old_y = torch.where(had, xa, NINF), torch.where(had, ya, NINF)
    mo_new = torch.maximum(torch.maximum(mo, cand_x), old_x)
    mt_new = torch.maximum(torch.maximum(mt, cand_y), old_y)
    mo_new = torch.where(mo_new > NINF, mo_new, 0.0)  # no off-a column yet: any finite reference
    mt_new = torch.where(mt_new > NINF, mt_new, 0.0)
    az, at = torch.exp(mo - mo_new), torch.exp(mt - mt_new)
    st.c0[rows] = torch.where(xa == NINF, yj - xm, st.c0[rows])  # the row's first chunk
    c0 = st.c0[rows]
    w_z, w_t = torch.exp(old_x - mo_new), torch.exp(old_y - mt_new)  # the old a's weights (0 unless `had`)
    dold = torch.where(had, ya - xa - c0, 0.0)  # d - c0 at the old a
    rn = new.nonzero()[:, 0]
    jn = j[rn]  # the new a's column in the rows where a moved: excluded from every sum (E = 0)
    d = None
    if mode != "lse":  # (R, C) d - c0, in a buffer kept across chunks (a fresh one per chunk costs ~10x the sub)
        d = torch.sub(y, x, out=_scratch(st, "d", x.shape, x.dtype)).sub_(c0[:, None])
    ez = x.sub_(mo_new[:, None]).exp_()
    ez[rn, jn] = 0.0
    et = y.sub_(mt_new[:, None]).exp_()
    et[rn, jn] = 0.0
    st.lz[rows] = st.lz[rows] * az + ez.sum(1) + w_z
    st.lt[rows] = st.lt[rows] * at + et.sum(1) + w_t
    if mode == "forward_kl":
        st.u[rows] = st.u[rows] * at + d.mul_(et).sum(1) + w_t * dold
    elif mode == "reverse_kl":
        e1 = d.mul_(ez)
        st.u[rows] = st.u[rows] * az + e1.sum(1) + w_z * dold
        y.copy_(e1)  # E's second row per row: e^{x - mo} (d - c0)
    if mode != "lse":
        acc = st.acc[rows]  # (R, 2, H)
        acc[:, 0].mul_(az[:, None])
        acc[:, 1].mul_((at if mode == "forward_kl" else az)[:, None])
        hit = had.nonzero()[:, 0]
        if hit.numel():
            w_old = weight[st.a[rows][hit]].to(acc.dtype)  # (hits, H) head rows of the old a
            second = w_t[hit] if mode == "forward_kl" else w_z[hit] * dold[hit]
            acc[hit, 0] += w_z[hit, None] * w_old
            acc[hit, 1] += second[:, None] * w_old
    st.a[rows] = torch.where(new, v0 + j, st.a[rows])
    st.ya[rows] = torch.where(new, yj, ya)
    st.xa[rows], st.mo[rows], st.mt[rows] = torch.maximum(xa, xm), mo_new, mt_new
    return None if mode == "lse" else s


def torch_jsd_step(s, st: HiddenState, r0: int, v0: int, inv_t: float, lse_z, lse_t, beta: float):
    """One chunk of JSD's second pass in tensor ops: both LSEs are known, so every column's log p, log q, log m
    and loss term are final (no rescaling). Returns E = [e^{x - mo}, e^{x - mo} r] (2R, C) in the logit buffer,
    0 at a (r = log p - log m; relative to the off-a max mo, so a confident student's tail stays in range).

    Shape: s (2R, C) raw logits, lse_z / lse_t (N,) LSE of x and y
    """
    r, c = s.shape[0] // 2, s.shape[1]
    rows = slice(r0, r0 + r)
    s.mul_(inv_t)
    x, y = s[0::2], s[1::2]
    lp, lq = x - lse_z[rows, None], y.sub_(lse_t[rows, None])  # (R, C)
    ratio = lp - torch.logaddexp(math.log(beta) + lq, math.log1p(-beta) + lp)  # r = log p - log m
    ell = (ratio - lp).add_(lq).mul_(lq.exp()).mul_(beta)  # beta q (lq - lm)
    ell.add_(lp.exp_().mul_(ratio), alpha=1.0 - beta)  # + (1 - beta) p r
    at = st.a[rows] - v0
    rn = ((at >= 0) & (at < c)).nonzero()[:, 0]  # rows whose a is in this chunk: excluded
    ell[rn, at[rn]] = 0.0
    e0 = x.sub_(st.mo[rows, None]).exp_()
    e0[rn, at[rn]] = 0.0
    e1 = ratio.mul_(e0)
    st.u[rows] += ell.sum(1)
    st.p0[rows] += e0.sum(1)
    st.r1[rows] += e1.sum(1)
    y.copy_(e1)
    return s


def finish(st: HiddenState, mode: str, weight: torch.Tensor, beta: float):
    """Each row's divergence (fp64) and G = sum_v g_v W_v with g = dD/dx (N, H) in acc's dtype, formed in
    acc[:, 0]. Float64 row math; the cancellation-free forms of SPEC section 9.

    Shape: -> loss (N,) fp64, G (N, H)
    """
    f = lambda t: t.double()  # noqa: E731
    lz, lt, u, xa, mo, ya, mt, c0 = map(f, (st.lz, st.lt, st.u, st.xa, st.mo, st.ya, st.mt, st.c0))
    acc = st.acc
    for i, sc in enumerate(st.e_scale):
        if sc != 1.0:
            acc[:, i].div_(sc)
    lzr = lz * torch.exp(mo - xa)  # sum_{v != a} e^{x_v - x_a}
    a_xa = torch.log1p(lzr)  # A - x_a (the student's LSE over its max)
    b_ya = torch.logaddexp(torch.zeros_like(lt), torch.log(lt) + mt - ya)  # B - y_a
    p_a = torch.exp(-a_xa)
    sz = torch.exp(mo - xa) * p_a  # e^{mo - A}: acc row 0 times sz is sum_{v != a} p_v W_v
    scale_t = torch.exp(mt - ya - b_ya)  # e^{mt - B}
    dac = ya - xa - c0  # d - c0 at a
    wa = weight[st.a].to(acc.dtype)  # (N, H) head rows at each row's a
    k = lambda t: t.to(acc.dtype)[:, None]  # noqa: E731
    if mode == "forward_kl":
        loss = scale_t * (u - lt * dac) - (b_ya - a_xa)
        q_off, p_off = lt * scale_t, lzr * p_a
        g = acc[:, 0].mul_(k(sz)).sub_(acc[:, 1] * k(scale_t)).add_(wa * k(q_off - p_off))
    elif mode == "reverse_kl":
        r1 = (u - lz * dac) * sz  # sum_{v != a} p_v (d_v - d_a)
        loss = (b_ya - a_xa) - r1
        g = acc[:, 0].mul_(k((r1 + dac) * sz)).sub_(acc[:, 1] * k(sz)).add_(wa * k(r1 * p_a))
    else:
        lp_a, lq_a = -a_xa, -b_ya
        lm_a = log_mixture(lp_a, lq_a, beta)
        r_a = lp_a - lm_a
        loss = u + beta * lq_a.exp() * (lq_a - lm_a) + (1 - beta) * p_a * r_a
        p0, r1 = f(st.p0) * sz, f(st.r1) * sz  # sum_{v != a} p and p r
        rbar = r1 + p_a * r_a
        s = 1.0 - beta
        g = acc[:, 1].mul_(k(s * sz)).sub_(acc[:, 0] * k(s * rbar * sz)).sub_(wa * k(s * p_a * (r1 - r_a * p0)))
        acc[:, 0].copy_(g)
        g = acc[:, 0]
    return loss, g


def operands(hidden, weight, teacher_hidden, rows: str):
    """(hs (2n, H) interleaved student/teacher rows, the head) in the pass's dtypes: torch rows widen to the math
    dtype (fp32, fp64 for the oracle); Triton rows keep one input dtype (fp32 / fp16 / bf16) for the vendor GEMM."""
    if rows == "torch":
        dt, w = math_dtype(hidden, weight, teacher_hidden), weight
    else:
        from .triton_rows import check_triton_device

        check_triton_device(hidden)
        dt = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), teacher_hidden.dtype)
        if dt == torch.float64:
            raise ValueError("impl='triton' takes fp32/fp16/bf16 inputs; use impl='chunked' for float64")
        w = weight.to(dt)
    hs = torch.stack([hidden.detach().to(dt), teacher_hidden.detach().to(dt)], 1).reshape(-1, hidden.shape[1])
    return hs, w


def run_pass(hs, weight, st: HiddenState, b: Blocking, step) -> None:
    """One pass over the head: per (row block, chunk) the stacked logit GEMM, the row ``step``, and (when the step
    returns E) acc += E W_c for both accumulator rows of every row in one addmm (two for a split bf16 E)."""
    dt = st.lz.dtype
    b2 = Blocking(2 * b.rows, b.cols, b.tile_c, b.tile_h)
    for _, r0, _, v0, _, wc, s in logit_chunks(hs, weight, b2, dt):
        e = step(s, st, r0 // 2, v0)
        if e is not None:
            r = s.shape[0] // 2
            for part in e if e.dim() == 3 else (e,):  # bf16 Triton E: the rounded part and its residue
                addmm_acc_(st.acc[r0 // 2 : r0 // 2 + r].view(2 * r, -1), part, wc)


def stream_hidden(hs, weight, opts: KDOptions, rows: str):
    """Every pass of one loss (module docstring): returns each row's divergence (fp64) and G (n, H)."""
    n, hd = hs.shape[0] // 2, hs.shape[1]
    dt = math_dtype(hs, weight) if rows == "torch" else torch.float32
    b = blocking(n, weight.shape[0], hs.device, opts.chunk_size, opts.row_block, cpu_elems=CPU_ELEMS)
    inv_t, mode = 1.0 / opts.temperature, opts.divergence
    if rows == "triton":
        from .triton_hidden import triton_jsd_step, triton_online_step

        online, jsd_step = triton_online_step, triton_jsd_step
    else:
        online, jsd_step = torch_online_step, torch_jsd_step
    st = new_state(n, hd, dt, hs.device, with_acc=True)
    st.scratch.update(tiles=(b.tile_c, b.tile_h), e_dtype=weight.dtype)
    first = "lse" if mode == "jsd" else mode
    run_pass(hs, weight, st, b, lambda s, st_, r0, v0: online(s, st_, r0, v0, weight, first, inv_t))
    if mode == "jsd":  # second pass: both LSEs known
        lse_z = st.xa + torch.log1p(st.lz * torch.exp(st.mo - st.xa))  # A
        lse_t = st.ya + torch.logaddexp(torch.zeros_like(st.lt), torch.log(st.lt) + st.mt - st.ya)  # B
        st.u.zero_()
        st.p0, st.r1 = torch.zeros_like(st.u), torch.zeros_like(st.u)
        run_pass(hs, weight, st, b, lambda s, st_, r0, v0: jsd_step(s, st_, r0, v0, inv_t, lse_z, lse_t, opts.beta))
    return finish(st, mode, weight, opts.beta)


# CPU chunk size in elements of ONE of the two logit tiles: the stacked (2R, C) fp32 tile is then 8 MB, as the
# sparse pass's (R, C) one (streamed.CPU_CHUNK_ELEMS)
CPU_ELEMS = 1 << 20


class _HiddenKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, mask, opts: KDOptions, rows: str):
        n_all, hd = hidden.shape
        idx = None if mask is None else mask.bool().nonzero()[:, 0]
        h, t = (hidden, teacher_hidden) if idx is None else (hidden[idx], teacher_hidden[idx])
        hs, w = operands(h, weight, t, rows)
        n = h.shape[0]
        out_dt = math_dtype(hidden, weight, teacher_hidden)
        loss = torch.zeros(n_all, dtype=out_dt, device=hidden.device)
        g = torch.zeros(0, hd, dtype=out_dt, device=hidden.device)
        if n:
            rl, g = stream_hidden(hs, w, opts, rows)
            rl = rl.to(out_dt) * opts.temperature**2
            loss = rl if idx is None else loss.index_copy(0, idx, rl)
        ctx.opts, ctx.n_valid, ctx.n_all, ctx.dtype = opts, n, n_all, hidden.dtype
        ctx.save_for_backward(g, idx)
        if opts.reduction == "none":
            return loss
        return loss.sum() if opts.reduction == "sum" else loss.sum() / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out):
        g, idx = ctx.saved_tensors
        opts: KDOptions = ctx.opts
        # per-row factor: upstream grad x reduction x T^2 x (1/T) from x = z / T
        wr = grad_out * opts.temperature / (max(ctx.n_valid, 1) if opts.reduction == "mean" else 1)
        if wr.dim() == 0:
            wr = wr.expand(g.shape[0] if idx is None else idx.shape[0])
        elif idx is not None:
            wr = wr[idx]
        dh = g * wr.to(g.dtype)[:, None]
        if idx is not None:
            dh = g.new_zeros(ctx.n_all, g.shape[1]).index_copy_(0, idx, dh)
        return dh.to(ctx.dtype), None, None, None, None, None


def hidden_kd_streamed(hidden, weight, teacher_hidden, mask, opts: KDOptions, rows: str) -> torch.Tensor:
    """Streamed exact-teacher KD (module docstring); ``rows`` "torch" (impl="chunked") or "triton". Same contract
    as ``hidden_kd_loss`` after validation."""
    return _HiddenKD.apply(hidden, weight, teacher_hidden, mask, opts, rows)
