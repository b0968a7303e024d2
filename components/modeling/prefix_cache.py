"""Run the tokens every row shares once, and let each row attend to their cached keys/values.

Every prompt starts with the same system turn (the instruction and the label list,
more than half of a row's tokens), so a plain batch recomputes identical keys and
values for every row. Causal attention makes a position's states depend only on
earlier tokens, so running the shared tokens once (batch 1), repeating their cache
to the batch and running only each row's remainder gives the same logits, and in
training the same loss and gradients, up to float rounding. Label scoring
(``evaluate``) and fine-tuning (``finetune``) both use it; tests/unit/test_evaluate.py and
tests/unit/test_prefix_training.py compare each against the plain computation.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

# Fewer shared leading tokens than this and running them once saves less than the cache
# bookkeeping costs: such inputs take the plain path.
MIN_SHARED_PREFIX = 8
# Attention kernels whose cache + padding-mask handling the equivalence tests cover (CPU).
# FlashAttention builds its own unpadded layout from the mask and only runs on a GPU, so it
# keeps the plain path until the same tests have run there.
PREFIX_CACHE_ATTENTION = ("sdpa", "eager")
# Collated batch key holding the shared tokens (1, P); the remaining keys hold each row's rest.
SHARED_PREFIX_KEY = "shared_prefix_ids"


def common_prefix_length(seqs: Sequence[list[int]]) -> int:
    """Number of leading tokens every sequence shares.

    The lexicographically smallest and largest sequences share the least with each
    other, so comparing those two is enough (one pass, not one per sequence).
    """
    lowest, highest = min(seqs), max(seqs)
    n = min(len(lowest), len(highest))
    k = 0
    while k < n and lowest[k] == highest[k]:
        k += 1
    return k


def _transformers_model(model):
    """The transformers model under PEFT and accelerate wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_params(model) -> set[str]:
    """Keyword names the underlying transformers model's forward accepts (PEFT wrappers take **kwargs)."""
    return set(inspect.signature(_transformers_model(model).forward).parameters)


def cache_argument(model) -> str:
    """The forward's KV-cache keyword: transformers 5.24 renamed past_key_values to cache."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def supports_prefix_cache(model, longest: int) -> bool:
    """Whether ``model`` computes the same thing from a shared-prefix cache as from whole sequences.

    Excluded: prompt-learning PEFT adapters (virtual tokens before the prefix), models
    whose forward takes no cache, attention kernels outside ``PREFIX_CACHE_ATTENTION``,
    and sequences longer than a sliding window or a long-RoPE switch point, where a
    prefix-only forward could see different attention windows or rotary factors.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    if not ({"cache", "past_key_values"} & forward_params(model)):
        return False
    config = getattr(_transformers_model(model), "config", None)
    if getattr(config, "_attn_implementation", None) not in PREFIX_CACHE_ATTENTION:
        return False
    for limit in ("sliding_window", "original_max_position_embeddings"):
        value = getattr(config, limit, None)
        if isinstance(value, int) and longest > value:
            return False
    return True


def shared_prefix_cache(model, prefix_ids: torch.Tensor, batch: int):
    """The KV cache of ``prefix_ids`` (1, P), repeated to ``batch`` rows.

    Runs the decoder body only (no LM head: nothing is predicted from the shared
    positions). Under autograd the cache stays connected, so gradients from every
    row flow back through the one prefix computation.
    """
    lm = _transformers_model(model)
    out = lm.base_model(input_ids=prefix_ids, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_repeat_interleave(batch)
    return cache


# ------------------------------------------------------------------ training


class SharedPrefixCollator:
    """Wraps TRL's padded collator: splits each batch into the tokens all rows share and the rest.

    The shared part stops before the first position that predicts a loss token, so
    every position whose hidden state the loss needs is still computed per row.
    Batches that share too little, single-row batches and batches longer than
    ``max_shared_length`` are returned unchanged (the plain path).
    """

    def __init__(self, inner, max_length: int | None = None):
        self.inner = inner
        self.max_length = max_length
        self.shared_tokens = 0  # tokens not recomputed thanks to sharing, for the run's metadata
        self.batches = 0
        self.shared_batches = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        self.batches += 1
        shared = self.shared_length(batch)
        if not shared:
            return batch
        rows = batch["input_ids"].shape[0]
        self.shared_batches += 1
        self.shared_tokens += shared * (rows - 1)
        return {
            **batch,
            SHARED_PREFIX_KEY: batch["input_ids"][:1, :shared],
            "input_ids": batch["input_ids"][:, shared:],
            "labels": batch["labels"][:, shared:],
            # the mask keeps the shared columns: each row attends to the cached prefix
        }

    def shared_length(self, batch: dict[str, Any]) -> int:
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
        if mask is None or labels is None or ids.shape[0] < 2:
            return 0  # padding-free batches have no mask: rows are already concatenated
        if self.max_length is not None and ids.shape[1] > self.max_length:
            return 0
        loss_positions = (labels != -100).int().argmax(dim=1)
        has_loss = (labels != -100).any(dim=1)
        # Position t's hidden state predicts token t + 1, so the first loss token's
        # predecessor must stay in each row's own part.
        limit = int(loss_positions[has_loss].min()) - 1 if bool(has_loss.any()) else ids.shape[1] - 1
        real = mask.bool()
        agree = (ids == ids[:1]) & real
        shared = int(agree.all(dim=0).int().cumprod(dim=0).sum())
        shared = min(shared, limit, int(real.sum(dim=1).min()) - 1)
        return shared if shared >= MIN_SHARED_PREFIX else 0


def unshare(inputs: dict[str, Any]) -> dict[str, Any]:
    """The plain batch a shared-prefix batch was split from."""
    if SHARED_PREFIX_KEY not in inputs:
        return inputs
    out = dict(inputs)
    prefix = out.pop(SHARED_PREFIX_KEY)
    rows = out["input_ids"].shape[0]
    out["input_ids"] = torch.cat([prefix.expand(rows, -1), out["input_ids"]], dim=1)
    ignored = torch.full((rows, prefix.shape[1]), -100, dtype=out["labels"].dtype, device=out["labels"].device)
    out["labels"] = torch.cat([ignored, out["labels"]], dim=1)
    return out


def shared_prefix_trainer(base: type) -> type:
    """A trainer class whose loss runs a batch's shared prefix once (see ``SharedPrefixCollator``)."""

    class SharedPrefixTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            prefix_ids = inputs.get(SHARED_PREFIX_KEY)
            if prefix_ids is None or return_outputs:
                # Callers asking for the outputs get full-width logits from the plain path.
                return super().compute_loss(model, unshare(inputs), return_outputs, num_items_in_batch)
            inputs = {k: v for k, v in inputs.items() if k != SHARED_PREFIX_KEY}
            inputs[cache_argument(model)] = shared_prefix_cache(model, prefix_ids, inputs["input_ids"].shape[0])
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return SharedPrefixTrainer
