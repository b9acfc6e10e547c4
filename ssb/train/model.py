"""The student for ``ssb train``: base model (optionally 4-bit NF4), LoRA adapters, and the loss path.

The loss path never calls the LM head on the full sequence: :class:`StudentBody` returns the final
(normed) hidden states, the trainer selects the reply positions, and :func:`distill_loss_sums` hands them
with the (frozen, possibly tied) LM head weight to ``ssb_kernels.sparse_kd_loss``, or, for a hidden store (the
exact teacher, ``ssb.store.hidden``), to ``ssb_kernels.hidden_kd_loss`` with the teacher's hidden states.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from ssb.config import ModelConfig, TrainConfig
from ssb.core.models import check_model_source, load_causal_lm, resolve_dtype
from ssb.train.data import Batch


def attn_implementation(requested: str, device: torch.device) -> str:
    """flash-attention 2 on CUDA when installed, SDPA otherwise (both honour packed position ids)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def quantize_4bit_(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every ``nn.Linear`` in the decoder body by a bitsandbytes NF4 ``Linear4bit`` (double quant).

    The LM head and the embeddings stay unquantised (they are not inside the decoder layers). Returns the
    number of layers replaced. Works on random-weight models (dry run) and loaded ones alike.
    """
    import bitsandbytes as bnb

    body = model.get_decoder()
    replaced = 0
    for parent in list(body.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                compress_statistics=True,  # double quantisation of the absmax constants
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, q.to(device))  # .to() quantises the weight
            replaced += 1
    return replaced


# model_type -> Liger's patch function for that architecture (liger_kernel.transformers.apply_liger_kernel_to_*);
# all take the same rope/rms_norm/swiglu/cross-entropy switches. Other architectures train without Liger.
LIGER_PATCHES = {"qwen2": "qwen2", "llama": "llama", "mistral": "mistral", "qwen3": "qwen3"}


def apply_liger_(model: nn.Module) -> bool:
    """Liger's RMSNorm/RoPE/SwiGLU kernels for the body when installed (CUDA; Qwen2, Llama, Mistral, Qwen3); their
    CE stays off (the loss is ours)."""
    arch = LIGER_PATCHES.get(getattr(model.config, "model_type", ""))
    if arch is None or importlib.util.find_spec("liger_kernel") is None:
        return False
    import liger_kernel.transformers as liger

    patch = getattr(liger, f"apply_liger_kernel_to_{arch}", None)
    if patch is None:  # an older Liger without this architecture
        return False
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return True


def build_base(
    model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device, *, config=None
) -> tuple[nn.Module, dict]:
    """Load the base causal LM (or build it from ``config`` with random weights), quantised if QLoRA.

    Returns the model on ``device`` and a dict of facts for the log (dtype, attention backend, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = resolve_dtype(model_cfg.dtype, device)
    attn = attn_implementation(train_cfg.attn_implementation, device)
    if config is None:
        hf_config = AutoConfig.from_pretrained(
            check_model_source(model_cfg.name_or_path),
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
        )
        model = load_causal_lm(model_cfg, device, attn_implementation=attn)
    else:
        hf_config = config
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn)
    facts = {"dtype": str(dtype).replace("torch.", ""), "attn_implementation": attn, "qlora": train_cfg.qlora}
    facts["tied_embeddings"] = bool(getattr(hf_config, "tie_word_embeddings", False))
    if train_cfg.qlora:
        facts["quantised_linear_layers"] = quantize_4bit_(model, dtype, device)
    model.to(device)
    if device.type == "cuda":
        facts["liger"] = apply_liger_(model)
    model.config.use_cache = False
    return model, facts


def attach_lora(model: nn.Module, train_cfg: TrainConfig):
    """Wrap ``model`` with LoRA adapters (peft); everything else is frozen. Gradient checkpointing per config."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=train_cfg.lora_r,
        lora_alpha=train_cfg.lora_alpha,
        lora_dropout=train_cfg.lora_dropout,
        use_rslora=train_cfg.use_rslora,
        target_modules=list(train_cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if train_cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (no enable_input_require_grads hack) and with DDP
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return peft_model


class StudentBody(nn.Module):
    """The decoder without its LM head: ``(input_ids, position_ids, attention_mask) -> hidden (B, L, H)``.

    Holds the PEFT model so that DDP sees (and synchronises) exactly the LoRA parameters.
    """

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        decoder = self.peft_model.get_base_model().get_decoder()
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


def lm_head_weight(peft_model: nn.Module) -> torch.Tensor:
    """The LM head weight ``(V, H)`` (the input embedding when tied); frozen."""
    return peft_model.get_base_model().get_output_embeddings().weight


@dataclass(frozen=True)
class LossSums:
    """Per-micro-batch loss sums over distilled rows (not yet normalised). Shape: scalars."""

    kd: torch.Tensor
    ce: torch.Tensor


def distill_loss_sums(hidden: torch.Tensor, weight: torch.Tensor, batch: Batch, train_cfg: TrainConfig) -> LossSums:
    """Sum over the batch's distilled rows of the KD loss (T^2-scaled, SPEC section 3) and of the CE loss.

    CE is the label cross-entropy at T = 1. With both weights above zero, KD and CE come out of ONE pass over the
    LM head (``ssb_kernels.sparse_kd_ce_loss``, SPEC section 7); alone, CE is a sparse KD against a one-hot
    teacher (k = 1, log-prob 0, T = 1, c_1 = 0), which with the ``tail`` variant is exactly ``-log p(token)``.
    Either way no logits are materialised. A term whose weight is 0 is not computed (returns 0).

    A hidden-store batch (``batch.teacher_hidden``) takes KD from ``ssb_kernels.hidden_kd_loss``: the exact
    full-vocabulary divergence against ``softmax(W h_teacher / T)`` (``train.variant`` does not apply: with the whole
    vocabulary, tail and renorm are the same loss). Its CE, when weighted, is the one-hot pass above: a second pass
    over the head, since the hidden kernel has no fused CE.

    Shape:
        hidden (B, L, H); weight (V, H); batch.rows (N,) -> scalars
    """
    from ssb_kernels import sparse_kd_ce_loss, sparse_kd_loss

    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.rows)  # (N, H)
    zero = h.new_zeros((), dtype=torch.float32)
    kd = ce = zero
    if batch.teacher_hidden is not None:
        return hidden_loss_sums(h, weight, batch, train_cfg)
    kd_args = dict(
        lse_t=batch.lse_t,
        temperature=train_cfg.kd_temperature,
        variant=train_cfg.variant,
        reduction="sum",
        impl=train_cfg.loss_impl,
        divergence=train_cfg.divergence,
        beta=train_cfg.jsd_beta,
    )
    if train_cfg.kd_weight != 0 and train_cfg.ce_weight != 0:
        kd, ce = sparse_kd_ce_loss(h, weight, batch.topk_ids, batch.topk_logprobs, batch.token_ids.long(), **kd_args)
    elif train_cfg.kd_weight != 0:
        kd = sparse_kd_loss(h, weight, batch.topk_ids, batch.topk_logprobs, **kd_args)
    elif train_cfg.ce_weight != 0:
        ce = label_ce(h, weight, batch.token_ids, train_cfg.loss_impl)
    return LossSums(kd=kd.float(), ce=ce.float())


def label_ce(h: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, impl: str) -> torch.Tensor:
    """Summed cross-entropy of ``token_ids`` under the head, streamed: the KD loss against a one-hot teacher
    (log p = 0 on the label, c_T = 0) at T = 1 is exactly -log q(label)."""
    from ssb_kernels import sparse_kd_loss

    ids = token_ids.long()[:, None]
    zeros = torch.zeros_like(ids, dtype=torch.float32)
    return sparse_kd_loss(
        h, weight, ids, zeros, lse_t=zeros[:, 0], temperature=1.0, variant="tail", reduction="sum", impl=impl
    )


def hidden_loss_sums(h: torch.Tensor, weight: torch.Tensor, batch: Batch, train_cfg: TrainConfig) -> LossSums:
    """:func:`distill_loss_sums` for a hidden store: exact KD (``ssb_kernels.hidden_kd_loss``) and, weighted, CE
    from a separate one-hot pass. Shape: h (N, H), batch.teacher_hidden (N, H) -> scalars"""
    from ssb_kernels import hidden_kd_loss

    kd = ce = h.new_zeros((), dtype=torch.float32)
    if train_cfg.kd_weight != 0:
        kd = hidden_kd_loss(
            h,
            weight,
            batch.teacher_hidden.to(h.dtype),
            temperature=train_cfg.kd_temperature,
            divergence=train_cfg.divergence,
            beta=train_cfg.jsd_beta,
            reduction="sum",
            impl=train_cfg.loss_impl,
        )
    if train_cfg.ce_weight != 0:
        ce = label_ce(h, weight, batch.token_ids, train_cfg.loss_impl)
    return LossSums(kd=kd.float(), ce=ce.float())
