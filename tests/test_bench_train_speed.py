"""bench/train_speed.py's counting and FLOPs helpers (the benchmark itself is run by hand, see bench/README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import train_speed  # noqa: E402

try:
    from tests.ml_fixtures import LABELS, formatted_dir, tiny_model_dir  # noqa: F401
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from ml_fixtures import LABELS, formatted_dir, tiny_model_dir  # noqa: F401


def test_published_sample_has_their_shape():
    text = train_speed.published_sample("where is my parcel", "shipping", LABELS)
    assert text.startswith("### Instruction:\n")
    assert all(f"\n- {label}\n" in text for label in LABELS)
    assert text.endswith("### Input:\nwhere is my parcel\n \n### Output:\nshipping")


def test_counting_collator_counts_padding_and_sequences():
    def padded(features):
        return {"input_ids": torch.tensor([[5, 6, 7], [5, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
                "labels": torch.tensor([[-100, 6, 7], [-100, -100, -100]])}

    def padding_free(features):
        return {"input_ids": torch.tensor([[5, 6, 7, 5, 6]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
                "labels": torch.tensor([[-100, 6, 7, -100, 6]])}

    counter = train_speed.CountingCollator(padded)
    counter([])
    counter([])
    assert (counter.fed, counter.real, counter.loss, counter.sequences, counter.batches) == (12, 8, 4, 4, 2)
    counter = train_speed.CountingCollator(padding_free)
    counter([])
    assert (counter.fed, counter.real, counter.loss, counter.sequences) == (5, 5, 3, 2)


def test_counting_collator_counts_a_shared_prefix_once():
    """A shared-prefix batch (components/prefix_cache.py) runs its 2 shared tokens once, then 2 rows of 3."""
    from ftloop.components.prefix_cache import SHARED_PREFIX_KEY

    def shared(features):
        return {SHARED_PREFIX_KEY: torch.tensor([[1, 2]]),
                "input_ids": torch.tensor([[5, 6, 7], [5, 0, 0]]),
                "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
                "labels": torch.tensor([[-100, 6, 7], [-100, 6, -100]])}

    counter = train_speed.CountingCollator(shared)
    counter([])
    assert (counter.fed, counter.real, counter.loss, counter.sequences) == (2 + 6, 2 + 4, 3, 2)


def test_tokenizer_granularity_counts_question_tokens_per_word(tiny_model_dir, formatted_dir):
    g = train_speed.tokenizer_granularity(tiny_model_dir, formatted_dir)
    assert g["vocab"] > 0 and g["tokens_per_question"] > 0
    assert g["tokens_per_question_word"] >= 1.0  # a BPE never packs two words into one token here


def test_training_flops_lora_accounting():
    params = {"body": 1000, "head": 100, "lora": 10}
    f = train_speed.training_flops(params, layers=2, hidden=4, real_tokens=20, loss_tokens=5, sequences=2,
                                   checkpointing=False)
    attn_fwd = 2 * 2 * 4 * 10  # ctx = 20 tokens / 2 sequences
    assert f["model"] == 20 * (4 * 1000 + 6 * 10 + 3 * attn_fwd) + 5 * 4 * 100
    assert f["hardware"] == f["model"]
    g = train_speed.training_flops(params, 2, 4, 20, 5, 2, checkpointing=True)
    assert g["model"] == f["model"]  # recompute is not model work ...
    assert g["hardware"] == f["model"] + 20 * (2 * 1010 + attn_fwd)  # ... but the hardware does it


def test_param_counts_split_body_head_and_adapters(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    cfg = model.config
    d, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=train_speed.PUBLISHED_TARGETS))
    counts = train_speed.param_counts(peft_model)
    # Phi-3: qkv (3d) + o (d) per attention, gate_up (2*inter) + down (inter) per MLP.
    assert counts["body"] == layers * (d * 3 * d + d * d + d * 2 * inter + inter * d)
    assert counts["head"] == d * vocab
    # Only o_proj and down_proj exist among the published target names: r * (in + out) each.
    assert counts["lora"] == layers * 4 * ((d + d) + (inter + d))
    assert counts["lora"] == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA L4", 121.0), ("Tesla T4", None)])
def test_bf16_peak_by_device_name(name, peak):
    assert train_speed.bf16_peak_tflops(name) == peak
