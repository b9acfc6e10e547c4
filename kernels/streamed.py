"""The streamed KD pass, one algorithm for every device (docs/SPEC.md section 5).

Per row block and vocabulary chunk [v0, v0 + C):
    s   = h_b W_c^T                     logits by the vendor GEMM (fp32 out; half inputs stay half on CUDA)
    row step                            mask the chunk's excluded ids (K, or K plus the label), capture their
                                        logits, update the running off-set max m and sum l per logit scale,
                                        write E = exp(c s - m) (0 on the excluded ids)
    acc = acc * alpha + E W_c           the vendor GEMM again (alpha = exp(m_old - m_new), 1 unless m moved)
After the pass: log_off = m + log l (the off-set LSE, summed directly: never 1 - P_K) and pw = acc / l (the
off-set mean head row). With the captured logits on the excluded ids the loss and the gradient coefficients
follow from (N, k) row math, and dL/dh is a per-row scale of pw plus a K part: 4NHV FLOPs in all (2 GEMMs per
chunk), no recomputation, no atomics, O(R C + N H) memory.

The row step is the only device-specific code: ``torch_rows`` (plain tensor ops; impl="chunked") or the Triton
row kernel in ``triton_rows`` (impl="triton"). Both see the same fp32 logits, so the CPU (the Triton
interpreter included) checks everything but the vendor GEMMs themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .rowmath import math_dtype

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Blocking:
    """How one streamed pass is cut: rows per block, vocabulary columns per chunk, and the Triton row kernel's
    tiles (columns per tile of a chunk row, hidden units per tile of an accumulator row)."""

    rows: int
    cols: int
    tile_c: int
    tile_h: int


# Per-device blocking, the one place it is decided.
# CPU (chunked, and the Triton interpreter in tests): every row in one block, and C = CPU_CHUNK_ELEMS / N columns
#   (at least CPU_MIN_CHUNK), so the (N, C) fp32 chunk stays at 8 MB: at N = 2048, C = 1024 (the bare-GEMM
#   floor is fastest at 1,024-2,048 columns here, LOG.md); at N = 8192, C = 256. 2^22 was as fast but let glibc
#   keep a freed 16 MiB buffer, so the N = 8192 peak read 48-66 MiB instead of 48-50 (LOG.md, 2026-12-04).
#   Interpreter tiles are small so the kernels' own loops run several times on test shapes.
# CUDA (blind: no GPU has run this yet): rows of CUDA_ROWS, chunks of CUDA_COLS. The head is read N / rows
#   times: at V = 151,936, H = 2048 (622 MB in bf16) and N = 32k that is 8 reads, ~1.3 ms at 4 TB/s against
#   ~50 ms of GEMMs. One chunk's buffers are 4096 x 4096 fp32 logits (64 MB) plus E in bf16 (32 MB), so with
#   the (N, H) fp32 accumulator the extra memory is N H 4 + 96 MB + (N, k) row math, inside the target
#   N H 12 + 64 MB from N = 4k on. Each GEMM is (4096 x 2048) x (2048 x 4096), 69 GFLOP: large enough for cuBLAS
#   to run near its peak, and 37 chunks x 3 launches per row block keep launch overhead under 1%.
# Predicted time on an H100 (arithmetic, unmeasured), Qwen2.5-3B head, N = 8k, bf16: the floor is the two GEMMs,
#   4 N H V = 10.2 TFLOP, 12.9 ms at 790 TFLOP/s. On top, per logit, HBM traffic the GEMMs and row kernel cannot
#   keep on chip: the fp32 logit written (4 B) and read once by the row kernel (4 B; a second read only when a
#   row's lazy max moves, mostly in the first chunk), E written (2 B) and read by the second GEMM (2 B): ~12 B x
#   N V = 1.25e9 logits = 15 GB, ~5 ms at ~3 TB/s. Total ~18 ms = ~1.4x the floor (the target), with
#   the dh row kernel (N k H reads of the head, mostly L2 hits for common ids) and the fp64 row math on top.
CPU_TILES = (32, 16)
CPU_CHUNK_ELEMS = 1 << 21
CPU_MIN_CHUNK = 128
CUDA_ROWS = 4096
CUDA_COLS = 4096
CUDA_TILES = (1024, 256)


def blocking(
    n: int,
    v: int,
    device: torch.device,
    chunk_size: int,
    row_block: int | None = None,
    cpu_elems: int = CPU_CHUNK_ELEMS,
) -> Blocking:
    """The blocking of an (N rows) x (V columns) pass on ``device``; ``chunk_size`` caps the chunk width and
    ``row_block`` (None: per device) the rows per block (tests use both to span several blocks). ``cpu_elems``:
    the CPU logit chunk's size in elements (a pass without an (N, H) accumulator, top-k capture, takes wider
    chunks: fewer per-chunk ops, see ``topk_stream``)."""
    n1 = max(n, 1)
    if device.type == "cuda":
        rows, cols, tiles = min(n1, CUDA_ROWS), min(chunk_size, CUDA_COLS), CUDA_TILES
    else:
        rows, tiles = n1, CPU_TILES
        cols = min(chunk_size, max(CPU_MIN_CHUNK, cpu_elems // n1))
    rows = min(rows, row_block) if row_block else rows
    return Blocking(max(1, rows), max(1, min(cols, v)), *tiles)


def vendor_half(x: torch.Tensor) -> bool:
    """True when a half-precision GEMM goes to the vendor library with fp32 output (CUDA)."""
    return x.is_cuda and x.dtype in HALF


_CAPS: dict[str, bool] = {}


def vendor_caps(device: torch.device) -> dict[str, bool]:
    """Which fp32-output forms of the half GEMMs this torch build has on ``device`` (probed once, 2 x 2):
    "mm": ``torch.mm(..., out_dtype=float32)``; "addmm": ``torch.addmm`` into an fp32 accumulator from half
    operands (newer builds take an fp32 ``self``; older ones wanted ``self`` in the input dtype). Without
    them the pass falls back to widened fp32 GEMMs (correct, slower) or a temporary plus an add."""
    if not _CAPS:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        acc = torch.zeros(2, 2, device=device)
        for name, call in (
            ("mm", lambda: torch.mm(a, a, out_dtype=torch.float32)),
            ("addmm", lambda: torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)),
        ):
            try:
                call()
                _CAPS[name] = True
            except (RuntimeError, TypeError):
                _CAPS[name] = False
    return _CAPS


def mm_acc(a: torch.Tensor, b_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b_t.T into ``out`` (fp32, or fp64 for the float64 oracle). On CUDA, half inputs go to cuBLAS as they
    are (fp32 accumulation and output); elsewhere the inputs are widened first, which is the same arithmetic: a
    product of two bf16/fp16 values is exact in fp32, and the sums are fp32 either way (only their order may
    differ).

    Shape: a (R, H), b_t (C, H) -> out (R, C)
    """
    if vendor_half(a) and vendor_caps(a.device)["mm"]:
        return torch.mm(a, b_t.t(), out_dtype=torch.float32, out=out)
    return torch.mm(a.to(out.dtype), b_t.to(out.dtype).t(), out=out)


def addmm_acc_(acc: torch.Tensor, e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc += e @ w in place, accumulating in acc's dtype (as ``mm_acc``). Shape: acc (R, H), e (R, C), w (C, H)."""
    if vendor_half(e):
        caps = vendor_caps(e.device)
        if caps["addmm"]:
            return torch.addmm(acc, e, w, out_dtype=torch.float32, out=acc)
        if caps["mm"]:
            return acc.add_(torch.mm(e, w, out_dtype=torch.float32))
    return acc.addmm_(e.to(acc.dtype), w.to(acc.dtype))


class Excluded:
    """Each row's excluded ids (valid K ids, or K plus the label) sorted once by (row block, chunk, row), so a
    chunk finds its own in a slice. ``slot`` is each hit's flat position in the (N, kx) id tensor, where the
    pass writes the captured logit. ``per_row`` also builds CSR offsets per (block, chunk, row) for the Triton
    row kernel (N x n_chunks entries; the torch step needs only the per-(block, chunk) bounds).
    """

    def __init__(self, idx: torch.Tensor, valid: torch.Tensor, b: Blocking, vocab_size: int, per_row: bool):
        n, kx = idx.shape
        dev = idx.device
        self.n_chunks = -(-vocab_size // b.cols)
        self.n_blocks = -(-max(n, 1) // b.rows)
        self.b = b
        row = torch.arange(n, device=dev)[:, None].expand_as(idx)
        slot = (row * kx + torch.arange(kx, device=dev)).reshape(-1)[valid.reshape(-1)]
        row, ids = row[valid], idx[valid]
        bc = (row // b.rows) * self.n_chunks + ids // b.cols  # (hits,) block-chunk key
        key = bc * b.rows + row % b.rows
        key, order = torch.sort(key)
        self.row = (row % b.rows)[order]  # local row in the block
        self.col = (ids % b.cols)[order].to(torch.int32)  # local column in the chunk
        self.slot = slot[order]
        edges = torch.arange(self.n_blocks * self.n_chunks + 1, device=dev) * b.rows
        self.bounds = torch.searchsorted(key, edges).tolist()
        self.row_offsets = None
        if per_row:
            self.row_offsets = torch.searchsorted(key, torch.arange(edges[-1] + 1, device=dev)).to(torch.int32)

    def hits(self, blk: int, chunk: int) -> tuple[int, int]:
        """[lo, hi) of the hits of (row block, chunk) in ``row`` / ``col`` / ``slot``."""
        j = blk * self.n_chunks + chunk
        return self.bounds[j], self.bounds[j + 1]

    def flat(self, blk: int, chunk: int, width: int) -> torch.Tensor:
        """Flat positions of (row block, chunk)'s hits in its (rows, ``width``) logit tile (torch steps)."""
        lo, hi = self.hits(blk, chunk)
        return self.row[lo:hi] * width + self.col[lo:hi]

    def offsets(self, blk: int, chunk: int) -> torch.Tensor:
        """(rows + 1,) int32 CSR offsets of each row's hits in (row block, chunk) (``per_row`` only)."""
        j = (blk * self.n_chunks + chunk) * self.b.rows
        return self.row_offsets[j : j + self.b.rows + 1]


@dataclass
class Running:
    """Per-scale running state of a pass over rows [r0, r1): off-set max m (S, N), sum l (S, N), accumulator
    acc (S, N, H) fp32 or None, and the captured logits s_x (N * kx,) fp32 at the excluded ids."""

    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor | None
    s_x: torch.Tensor
    scales: tuple[float, ...]
    e_scale: float = 1.0  # constant factor the row step put on E (the Triton step's fp16 range shift)
    scratch: dict = field(default_factory=dict)  # the row step's own buffers, reused across chunks


def torch_rows(s, ex: Excluded, blk: int, chunk: int, st: Running, r0: int, e_dtype) -> list[torch.Tensor]:
    """The row step in tensor ops (impl="chunked"): returns E per scale, fp32, computed in the logit buffer for
    the last scale (the others are copies). The max is taken with the excluded ids at -inf (an off-set max), so
    a student whose top logit leads by 120 still sums its off-set mass exactly."""
    lo, hi = ex.hits(blk, chunk)
    n, c = s.shape
    flat = ex.flat(blk, chunk, c)
    st.s_x[ex.slot[lo:hi]] = s.view(-1)[flat]
    s.view(-1).index_fill_(0, flat, float("-inf"))
    out, last = [], len(st.scales) - 1
    for j, sc in enumerate(st.scales):
        x = (s if sc == 1.0 else s.mul_(sc)) if j == last else s * sc
        m, l = st.m[j, r0 : r0 + n], st.l[j, r0 : r0 + n]
        m_new = torch.maximum(m, x.amax(1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)  # every column so far was excluded
        alpha = torch.exp(m - m_safe)
        e = x.sub_(m_safe[:, None]).exp_()
        l.mul_(alpha).add_(e.sum(1))
        m.copy_(m_safe)
        if st.acc is not None:
            st.acc[j, r0 : r0 + n].mul_(alpha[:, None])
        out.append(e)
    return out


def logit_chunks(h: torch.Tensor, weight: torch.Tensor, b: Blocking, dt: torch.dtype):
    """Every (row block, vocabulary chunk) of a pass, in order: yields (block, r0, chunk, v0, h_b, W_c, s) with
    s = h_b W_c^T (R, C) in ``dt`` by the vendor GEMM, in one buffer reused by the next chunk. Off CUDA (or for
    fp32/fp64 inputs) h_b and W_c come widened to ``dt``, once per block / chunk, for both GEMMs to share."""
    n, v = h.shape[0], weight.shape[0]
    buf = torch.empty(b.rows * b.cols, dtype=dt, device=h.device)
    wide = not vendor_half(h)
    for blk, r0 in enumerate(range(0, n, b.rows)):
        hb = h[r0 : r0 + b.rows]
        hb = hb.to(dt) if wide else hb
        for chunk, v0 in enumerate(range(0, v, b.cols)):
            wc = weight[v0 : v0 + b.cols]
            wc = wc.to(dt) if wide else wc
            out = buf[: hb.shape[0] * wc.shape[0]].view(hb.shape[0], wc.shape[0])
            yield blk, r0, chunk, v0, hb, wc, mm_acc(hb, wc, out=out)


def stream(h, weight, idx, valid, scales, with_acc, *, b: Blocking, step, per_row: bool = False) -> Running:
    """One pass over the head (module docstring). ``step``: the row step, ``torch_rows`` or the Triton one
    (``triton_rows.triton_row_step``, which needs ``per_row`` CSR offsets).

    Shape:
        h (N, H) math or input dtype, weight (V, H), idx (N, kx) long in [0, V), valid (N, kx)
        -> Running with m, l (S, N), acc (S, N, H) or None, s_x (N * kx,) raw logits (0 where not valid);
        fp32 (fp64 if an input is)
    """
    n, hd = h.shape
    dev = h.device
    dt = math_dtype(h, weight)
    ex = Excluded(idx, valid, b, weight.shape[0], per_row=per_row)
    st = Running(
        m=torch.full((len(scales), n), float("-inf"), dtype=dt, device=dev),
        l=torch.zeros(len(scales), n, dtype=dt, device=dev),
        acc=torch.zeros(len(scales), n, hd, dtype=dt, device=dev) if with_acc else None,
        s_x=torch.zeros(idx.numel(), dtype=dt, device=dev),
        scales=tuple(scales),
    )
    for blk, r0, chunk, _, hb, wc, s in logit_chunks(h, weight, b, dt):
        es = step(s, ex, blk, chunk, st, r0, h.dtype)
        if with_acc:
            for j, e in enumerate(es):
                addmm_acc_(st.acc[j, r0 : r0 + hb.shape[0]], e, wc)
    return st


def off_results(st: Running) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Per scale: the off-set LSE (N,) fp32 (-inf for a row with no off-set column) and the off-set mean head
    row pw = acc / l (N, H) fp32, formed in place in the accumulator (None without one)."""
    logs, pws = [], []
    for j in range(len(st.scales)):
        l = st.l[j]
        logs.append(st.m[j] + torch.log(l))
        if st.acc is None:
            pws.append(None)
        else:
            pws.append(st.acc[j].div_((l * st.e_scale).clamp(min=torch.finfo(l.dtype).tiny)[:, None]))
    return logs, pws


def head_grad(h, weight, idx, valid, dense, sparse, log_offs, scales, b: Blocking) -> torch.Tensor:
    """dW = (dL/dz)^T h, streamed again (the rare case of a trained head): off the excluded set dL/dz_v =
    sum_s dense_s exp(c_s z_v - log_off_s), on it ``sparse``. In fp32 (fp64 for the oracle) even for half
    inputs: it is not the path LoRA training takes, so it stays simple rather than fast.

    Shape:
        h (N, H), weight (V, H), idx / valid (N, kx), dense and log_offs: lists of (N,), sparse (N, kx)
        -> (V, H) fp32 (fp64 if an input is)
    """
    dt = math_dtype(h, weight)
    n, hd = h.shape
    v = weight.shape[0]
    hw = h.to(dt)
    dense = [c.to(dt) for c in dense]
    log_offs = [torch.where(torch.isfinite(x), x, 0.0).to(dt) for x in log_offs]
    dw = torch.zeros(v, hd, dtype=dt, device=h.device)
    ex = Excluded(idx, valid, b, v, per_row=False)
    for blk, r0, chunk, v0, hb, wc, s in logit_chunks(hw, weight, b, dt):  # hw is wide: fp32 GEMMs
        r1 = r0 + hb.shape[0]
        g = torch.zeros_like(s)
        for c, lo, sc in zip(dense, log_offs, scales):
            g += c[r0:r1, None] * (s * sc - lo[r0:r1, None]).exp()
        g.view(-1).index_fill_(0, ex.flat(blk, chunk, s.shape[1]), 0.0)
        dw[v0 : v0 + wc.shape[0]].addmm_(g.t(), hb)
    step = max(1, (1 << 22) // max(1, idx.shape[1] * hd))  # rows per block of the (rows, kx, H) sparse part
    for r0 in range(0, n, step):
        part = sparse[r0 : r0 + step].to(dt)[:, :, None] * hw[r0 : r0 + step, None, :]
        dw.index_add_(0, idx[r0 : r0 + step].reshape(-1), part.reshape(-1, hd))
    return dw


# Elements per (rows, k, H) block of gathered head rows W[ids] in ``sparse_matvec`` (the torch step's K part of
# dh): 2^20 (4 MB in fp32) keeps each block cache-sized on CPU. The Triton path does this in a row kernel.
GATHER_ELEMS = 1 << 20


def sparse_matvec(b: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_j b_j W[idx_j] per row, in row blocks. Shape: b (N, k), weight (V, H), idx (N, k) -> (N, H)."""
    out = b.new_empty(b.shape[0], weight.shape[1])
    rb = max(1, GATHER_ELEMS // max(1, idx.shape[1] * weight.shape[1]))
    for r in range(0, idx.shape[0], rb):
        wk = weight[idx[r : r + rb]].to(b.dtype)  # (rb, k, H)
        out[r : r + rb] = torch.bmm(b[r : r + rb, None, :], wk)[:, 0]
    return out
