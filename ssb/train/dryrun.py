"""``ssb train --dry-run``: the largest training sequence that fits a memory cap, fused vs eager loss.

Builds the architecture of ``train.dry_run_config`` (a config.json such as ``configs/qwen2.5_3b_config.json``,
or ``model`` for ``model.name_or_path``'s own config) with random weights, or loads ``model.name_or_path``'s
real weights (``pretrained``), with the trainer's LoRA/QLoRA setup, and runs one full training step (forward to
hidden states, sparse KD loss on every reply row, backward, AdamW step) on one packed example of L tokens
(32 prompt + L-32 distilled rows, k = capture.k; token ids and top-k entries are random: memory and time do
not depend on their values). L doubles until a step fails, then is bisected to 256 tokens; on CPU, where every
probe measures its peak, the next length is the one a line through the last two peaks puts at the cap
(safeguarded by bisection), which saves the most expensive probes.

What is measured, honestly:
- CUDA: the cap is enforced with ``torch.cuda.set_per_process_memory_fraction``; a length fits when the step
  runs without OOM; the figure is ``torch.cuda.max_memory_allocated`` of that step.
- CPU: nothing can enforce a cap, so every probe runs in a fresh child process and its peak RSS (which
  includes the ~0.5 GB Python/torch baseline and the model) is compared with the cap. The probes run with
  glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``, 1 MiB unless set): with glibc's default, which
  raises the threshold as large blocks are freed, freed activations stay in the heap and the peak RSS of one
  SmolLM2-135M step at L = 1,024 grows by 927 MiB instead of 166 MiB (measured; LOG.md), i.e. the search would
  measure the allocator's retention rather than the trainer. Long-context training on CPU should set the
  same variable.
  Meant for small models (the toy, SmolLM2-135M).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ssb.config import ConfigError, SSBConfig, load_config, save_config
from ssb.core.files import atomic_write_json
from ssb.core.layout import RunLayout

GRAIN = 256
PROMPT = 32
MMAP_THRESHOLD = 1 << 20  # glibc M_MMAP_THRESHOLD for CPU probes (see the module docstring)
PRETRAINED = "pretrained"  # train.dry_run_config: the real weights of model.name_or_path


def load_arch(cfg: SSBConfig):
    from transformers import AutoConfig

    if cfg.train.dry_run_config in ("model", PRETRAINED):
        return AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision)
    path = Path(cfg.train.dry_run_config)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.dry_run_config: cannot read {path}: {e}") from None
    return AutoConfig.for_model(**data)


def n_params(arch) -> int:
    """Parameter count of a decoder-only config (embeddings once when tied)."""
    h, i, n, v = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers, arch.vocab_size
    kv = arch.num_key_value_heads * (h // arch.num_attention_heads)
    layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return n * layer + v * h * (1 if arch.tie_word_embeddings else 2)


class Prober:
    """Holds one student (random weights, or the real ones for ``pretrained``); :meth:`step` runs one training
    step on a length-L example."""

    def __init__(self, cfg: SSBConfig, device: torch.device):
        from ssb.train.model import StudentBody, attach_lora, build_base, lm_head_weight

        self.cfg, self.device = cfg, device
        self.arch = load_arch(cfg)
        torch.manual_seed(0)
        real = cfg.train.dry_run_config == PRETRAINED
        base, self.facts = build_base(cfg.model, cfg.train, device, config=None if real else self.arch)
        self.facts["weights"] = f"pretrained ({cfg.model.name_or_path})" if real else "random"
        peft_model = attach_lora(base, cfg.train)
        peft_model.train()
        self.body = StudentBody(peft_model)
        self.weight = lm_head_weight(peft_model)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")

    def step(self, length: int, impl: str) -> None:
        from dataclasses import replace

        from ssb.store import DistillExample
        from ssb.train.data import collate
        from ssb.train.model import distill_loss_sums

        k, vocab, rows = self.cfg.capture.k, self.arch.vocab_size, length - PROMPT
        gen = torch.Generator().manual_seed(length)
        ids = torch.randint(0, vocab, (length + 1,), generator=gen)
        topk = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(min(rows, 8))])
        logp = torch.log_softmax(torch.randn(rows, k, generator=gen) * 3, -1) - 0.05  # 5% tail mass
        ex = DistillExample(
            example_index=0,
            input_ids=ids[:length],
            reply_start=PROMPT - 1,  # hidden positions PROMPT-1 .. length-1 predict the reply tokens
            token_ids=ids[PROMPT : length + 1][:rows],
            topk_ids=topk.repeat((rows + 7) // 8, 1)[:rows],
            topk_logprobs=logp,
            lse_t=torch.zeros(rows),  # memory/time do not depend on the values
        )
        batch = collate([ex], packing=True).to(self.device)
        tc = replace(self.cfg.train, loss_impl=impl)
        on_cuda = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext():
            hidden = self.body(batch.input_ids, batch.position_ids, None)
        sums = distill_loss_sums(hidden, self.weight, batch, tc)
        ((tc.kd_weight * sums.kd + tc.ce_weight * sums.ce) / rows).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def search(fits, max_len: int, propose=None) -> int:
    """Largest multiple of GRAIN in [GRAIN, max_len] with ``fits(L)`` (monotone), 0 if none.

    ``propose()`` (optional) returns the length it predicts is the largest that fits, from the probes so far
    (or None). It replaces a doubling step when it is smaller than the doubled length, and every other
    bisection step (the midpoint in between keeps the search logarithmic when the prediction is poor)."""

    def guess(lo: int, hi: int) -> int | None:
        g = propose() if propose else None
        if g is None:
            return None
        return min(max(g // GRAIN * GRAIN, lo + GRAIN), hi - GRAIN)

    max_len = max_len // GRAIN * GRAIN
    if max_len < GRAIN or not fits(GRAIN):
        return 0
    lo, length = GRAIN, GRAIN
    while length < max_len:  # doubling (or the predicted length, when smaller) until a length does not fit
        nxt = min(2 * length, max_len)
        g = guess(lo, nxt + GRAIN)
        length = g if g is not None and g < nxt else nxt
        if not fits(length):
            break
        lo = length
    else:
        return max_len
    hi = length
    use_guess = True
    while hi - lo > GRAIN:
        g = guess(lo, hi) if use_guess else None
        mid = g if g is not None else (lo + hi) // 2 // GRAIN * GRAIN
        use_guess = not use_guess
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def line_at_cap(peaks: dict[int, float], cap: float) -> int | None:
    """The length at which a line through the two longest probes' peaks reaches ``cap`` (None: too few, or flat)."""
    if len(peaks) < 2:
        return None
    (l0, p0), (l1, p1) = sorted(peaks.items())[-2:]
    slope = (p1 - p0) / (l1 - l0)
    return None if slope <= 0 else int(l1 + (cap - p1) / slope)


def cuda_report(cfg: SSBConfig, impls: dict[str, str]) -> dict:
    device = torch.device("cuda")
    cap = cfg.train.dry_run_mem_gib * 2**30
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    prober = Prober(cfg, device)
    max_len = int(getattr(prober.arch, "max_position_embeddings", 32768))
    out = {}
    for name, impl in impls.items():
        peaks: dict[int, float] = {}

        def fits(length: int, impl=impl, peaks=peaks) -> bool:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                prober.step(length, impl)
                torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                prober.opt.zero_grad(set_to_none=True)
                return False
            peaks[length] = torch.cuda.max_memory_allocated(device) / 2**30
            return True

        t0 = time.perf_counter()
        best = search(fits, max_len)
        out[name] = {
            "loss_impl": impl,
            "max_seq_len": best,
            "peak_gib": peaks.get(best),
            "probe_s": time.perf_counter() - t0,
        }
    return {"device": torch.cuda.get_device_name(device), "facts": prober.facts, "results": out}


def probe_env() -> dict[str, str]:
    """A CPU probe's environment: one thread, glibc's mmap threshold fixed unless the caller set it."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ, "OMP_NUM_THREADS": "1"}


def cpu_probe(cfg_path: Path, length: int, impl: str) -> tuple[bool, float]:
    """Run one step in a child process; (ok, peak RSS GiB of that child)."""
    cmd = [sys.executable, "-m", "ssb.train.dryrun", str(cfg_path), str(length), impl]
    env = probe_env()
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) as proc:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 and "MemoryError" not in err and "out of memory" not in err.lower():
        raise RuntimeError(f"dry-run probe (L={length}, {impl}) failed:\n{err[-2000:]}")
    return proc.returncode == 0, usage.ru_maxrss / 2**20  # KiB -> GiB


def cpu_report(cfg: SSBConfig, impls: dict[str, str], run_dir: Path) -> dict:
    arch = load_arch(cfg)
    if n_params(arch) > 500e6:
        raise ConfigError(
            f"train.dry_run_config: {n_params(arch) / 1e9:.1f}B parameters is too large to probe on CPU; on CPU use "
            "a tiny architecture, e.g. train.dry_run_config=model with the toy model (a GPU measures the real one)"
        )
    cap = cfg.train.dry_run_mem_gib
    cfg_path = save_config(cfg, RunLayout(run_dir).train(), "dry_run_config.yaml")  # the probe children read it
    max_len = min(int(getattr(arch, "max_position_embeddings", 4096)), 16384)
    out = {}
    for name, impl in impls.items():
        peaks: dict[int, float] = {}

        def fits(length: int, impl=impl, peaks=peaks) -> bool:
            ok, rss = cpu_probe(cfg_path, length, impl)
            peaks[length] = rss
            return ok and rss <= cap

        t0 = time.perf_counter()
        best = search(fits, max_len, propose=lambda peaks=peaks: line_at_cap(peaks, cap))
        out[name] = {
            "loss_impl": impl,
            "max_seq_len": best,
            "peak_rss_gib": peaks.get(best),
            "probed": {str(k): round(v, 3) for k, v in sorted(peaks.items())},
            "probe_s": time.perf_counter() - t0,
        }
    return {"device": "cpu", "facts": {"params": n_params(arch), "qlora": cfg.train.qlora}, "results": out}


def dry_run(cfg: SSBConfig, run_dir: Path) -> int:
    """Print and save (``RUN_DIR/train/dry_run.json``) the max-sequence report for fused vs eager loss."""
    fused = cfg.train.loss_impl if cfg.train.loss_impl != "eager" else "auto"
    impls = {"fused": fused, "eager": "eager"}
    on_cuda = torch.cuda.is_available()
    report = cuda_report(cfg, impls) if on_cuda else cpu_report(cfg, impls, run_dir)
    report.update(
        arch=cfg.train.dry_run_config,
        cap_gib=cfg.train.dry_run_mem_gib,
        qlora=cfg.train.qlora,
        k=cfg.capture.k,
        measured=(
            "CUDA: max_memory_allocated under set_per_process_memory_fraction(cap)"
            if on_cuda
            else "CPU: peak RSS of a fresh probe process per length (includes the Python/torch baseline; glibc "
            f"MALLOC_MMAP_THRESHOLD_={probe_env()['MALLOC_MMAP_THRESHOLD_']}); no GPU"
        ),
    )
    atomic_write_json(RunLayout(run_dir).train() / "dry_run.json", report)
    mode = "QLoRA" if cfg.train.qlora else "LoRA"
    print(f"ssb train --dry-run on {report['device']} ({cfg.train.dry_run_config}, cap {report['cap_gib']} GiB):")
    for name, r in report["results"].items():
        peak = r.get("peak_gib", r.get("peak_rss_gib"))
        peak_s = f"{peak:.2f} GiB" if peak is not None else "n/a"
        print(f"  {mode}+{name:5s} ({r['loss_impl']}): max sequence {r['max_seq_len']:6d} tokens, peak {peak_s}")
    print(f"  measured: {report['measured']}")
    return 0


if __name__ == "__main__":  # a CPU probe child: python -m ssb.train.dryrun CONFIG_YAML LENGTH IMPL
    torch.set_num_threads(1)
    Prober(load_config(sys.argv[1]), torch.device("cpu")).step(int(sys.argv[2]), sys.argv[3])
