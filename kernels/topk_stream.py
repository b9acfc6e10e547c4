"""Teacher capture on the streamed pass (docs/SPEC.md section 1): per row the k largest T = 1 log-probs of
softmax(h W^T) with their ids, and c_T = LSE_v(l_v / T) per temperature, never holding an (N, V) tensor.

Per row block and vocabulary chunk [v0, v0 + C) (``streamed.blocking``):
    z = h_b W_c^T                       logits by the vendor GEMM (``streamed.mm_acc``: fp32 out)
    row step                            m' = max(m, max_c z); per temperature (T = 1 always: it normalises)
                                        l_T = l_T exp((m - m') / T) + sum_c exp((z - m') / T); and, only for rows
                                        where some z of the chunk beats the row's current k-th value (the
                                        early-out), merge the chunk's candidates into the running top-k buffer
After the pass, with lse_1 = m + log l_1:
    logprobs = (z_top - m) - log l_1
    c_T = LSE_v(l_v / T) = lse_T - lse_1 / T = log l_T - (log l_1) / T
(the m / T terms cancel exactly, so c_T keeps fp32 relative precision however large the logits are).

The row step is ``torch_topk_step`` (tensor ops; impl="chunked") or ``triton_topk.triton_topk_step`` (the
Triton row kernel; impl="triton"). Both see the same fp32 logits, so the CPU checks everything but the GEMM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .options import TopkOptions
from .rowmath import math_dtype
from .streamed import Blocking, blocking, logit_chunks

# CPU logit chunk for capture, in elements: 2^24 (64 MB in fp32; 8,192 columns at N = 2,048, what the capture used
# before the streamed pass). Capture keeps no (N, H) accumulator, and each chunk costs ~30 small tensor ops, so
# the KD pass's 2^21 (1,024 columns at N = 2,048, 149 chunks at V = 151,936) made it 2.4x slower with 2 threads
# on a loaded 2-core machine, level again at 2^24 (measured once each, noisy).
TOPK_CPU_ELEMS = 1 << 24


def _pow2(x: int) -> int:
    return 1 << max(1, (x - 1).bit_length())  # >= 2 (Triton aranges)


@dataclass
class TopkRunning:
    """Running state of a capture pass over N rows (fp32; fp64 for the oracle):

    m (N,) max of z so far; l (N, TP) sum exp((z - m) / T) per temperature column (``temps``, padded to a power
    of 2 with T = 1); vals / ids (N, KP) the top-k buffer (KP >= k a power of 2; only the first k slots are
    live, unordered; -inf / -1 while empty); merges (N,) int32: chunks whose candidates were merged, per row
    (the early-out skips the rest; tests read it).
    """

    m: torch.Tensor
    l: torch.Tensor
    vals: torch.Tensor
    ids: torch.Tensor
    merges: torch.Tensor
    k: int
    temps: tuple[float, ...]
    inv: torch.Tensor  # (TP,) fp32 1 / T per column
    scratch: dict = field(default_factory=dict)  # the row step's own buffers, reused across chunks

    @classmethod
    def empty(cls, n: int, opts: TopkOptions, dtype: torch.dtype, device: torch.device) -> TopkRunning:
        temps = temperature_columns(opts.temperatures)
        tp, kp = _pow2(len(temps)), _pow2(opts.k)
        padded = temps + (1.0,) * (tp - len(temps))
        return cls(
            m=torch.full((n,), float("-inf"), dtype=dtype, device=device),
            l=torch.zeros(n, tp, dtype=dtype, device=device),
            vals=torch.full((n, kp), float("-inf"), dtype=dtype, device=device),
            ids=torch.full((n, kp), -1, dtype=torch.long, device=device),
            merges=torch.zeros(n, dtype=torch.int32, device=device),
            k=opts.k,
            temps=temps,
            inv=torch.tensor([1.0 / t for t in padded], dtype=torch.float32, device=device),
        )


def temperature_columns(temperatures) -> tuple[float, ...]:
    """T = 1 first (it normalises the log-probs), then each other requested temperature once."""
    out = [1.0]
    for t in temperatures:
        if float(t) not in out:
            out.append(float(t))
    return tuple(out)


Step = Callable[[torch.Tensor, TopkRunning, int, int, Blocking], None]


def _merge(st: TopkRunning, z, above, cnt, most: int, r0: int, v0: int) -> None:
    """Merge each row's candidates (``above``) into its top-k buffer, for the rows that have any. Early chunks
    (many candidates): the chunk's top-k by ``topk``. Later ones (at most k candidates per row; late in the pass
    a chunk row beats its k-th value once or twice): the candidates themselves, packed into (rows, most) by
    ``nonzero``, without sorting the chunk.

    Shape: z, above (R, C); cnt (R,) candidates per row
    """
    k, r = st.k, z.shape[0]
    need = (cnt > 0).nonzero()[:, 0]
    if 2 * need.numel() > r:  # most rows merge: all of them, by slices (a row without candidates is unchanged)
        need, g = slice(None), slice(r0, r0 + r)
    else:
        g = need + r0
    if most > k:
        cv, ci = z[need].topk(k, 1, sorted=False)  # (n_need, k) the chunk's best
    else:
        rr, cc = above.nonzero(as_tuple=True)  # row-major: each row's candidates are contiguous
        start = torch.cumsum(cnt, 0) - cnt  # (R,) first candidate of each row
        slot = torch.arange(rr.numel(), device=z.device) - start[rr]
        cv = z.new_full((z.shape[0], most), float("-inf"))
        ci = torch.full((z.shape[0], most), -1, dtype=torch.long, device=z.device)
        cv[rr, slot] = z[rr, cc]
        ci[rr, slot] = cc
        cv, ci = cv[need], ci[need]
    cat_v = torch.cat([st.vals[g, :k], cv], 1)
    cat_i = torch.cat([st.ids[g, :k], ci + v0], 1)
    best, pos = cat_v.topk(k, 1, sorted=False)
    st.vals[g, :k] = best
    st.ids[g, :k] = cat_i.gather(1, pos)
    st.merges[r0 : r0 + r] += cnt > 0


def torch_topk_step(z: torch.Tensor, st: TopkRunning, r0: int, v0: int, b: Blocking) -> None:
    """The row step in tensor ops (impl="chunked"), in place on ``st`` rows [r0, r0 + R); ``z`` is overwritten.

    Shape: z (R, C) logits of vocabulary columns [v0, v0 + C)
    """
    r, c = z.shape
    k, rows = st.k, slice(r0, r0 + r)
    mx = z.amax(1)
    above = z > st.vals[rows, :k].amin(1)[:, None]  # (R, C) beats the row's k-th value (-inf until full)
    cnt = above.sum(1)
    most = int(cnt.max()) if r else 0
    if most:  # else the early-out: no row of the chunk has a candidate
        _merge(st, z, above, cnt, most, r0, v0)
    m_old = st.m[rows]
    m_new = torch.maximum(m_old, mx)
    z.sub_(m_new[:, None])  # z - m' <= 0
    nt = len(st.temps)
    for j, t in enumerate(st.temps):
        if j == nt - 1:
            e = z if t == 1.0 else z.mul_(1.0 / t)
            e.exp_()
        else:
            key = "e"
            if key not in st.scratch:
                st.scratch[key] = torch.empty(b.rows * b.cols, dtype=z.dtype, device=z.device)
            e = torch.mul(z, 1.0 / t, out=st.scratch[key][: r * c].view(r, c)).exp_()
        st.l[rows, j] = st.l[rows, j] * torch.exp((m_old - m_new) / t) + e.sum(1)
    st.m[rows] = m_new


def topk_pass(hidden: torch.Tensor, weight: torch.Tensor, opts: TopkOptions, step: Step) -> TopkRunning:
    """One streamed pass over the head (module docstring) with row step ``step``.

    Shape: hidden (N, H), weight (V, H) -> TopkRunning over N rows, fp32 (fp64 if an input is)
    """
    n, v = hidden.shape[0], weight.shape[0]
    dt = math_dtype(hidden, weight)
    b = blocking(n, v, hidden.device, opts.chunk_size, opts.row_block, cpu_elems=TOPK_CPU_ELEMS)
    st = TopkRunning.empty(n, opts, dt, hidden.device)
    for _, r0, _, v0, _, _, z in logit_chunks(hidden, weight, b, dt):
        step(z, st, r0, v0, b)
    return st


def topk_results(st: TopkRunning, opts: TopkOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (N, k) int64 by descending log-prob, logprobs (N, k) and c_T (N, len(opts.temperatures)) in the
    state's dtype, from a finished pass."""
    vals, pos = st.vals[:, : st.k].sort(1, descending=True)
    ids = st.ids[:, : st.k].gather(1, pos)
    log_l = st.l.log()  # (N, TP)
    cols = [st.temps.index(float(t)) for t in opts.temperatures]
    inv = st.inv.to(log_l.dtype)[cols]
    lp = (vals - st.m[:, None]) - log_l[:, :1]
    return ids, lp, log_l[:, cols] - log_l[:, :1] * inv


@torch.no_grad()
def topk_logprobs_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, opts: TopkOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_logprobs`` by the streamed pass with the torch row step (the CPU default).

    Shape:
        hidden (N, H), weight (V, H) -> ids (N, k) int64, logprobs (N, k), lse_t (N, len(temperatures));
        fp32 (fp64 if an input is)
    """
    return topk_results(topk_pass(hidden, weight, opts, torch_topk_step), opts)
