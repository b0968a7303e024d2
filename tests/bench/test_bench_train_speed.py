"""bench/train_speed.py's counting and FLOPs helpers, and its GPU section run on CPU with a small config.

The benchmark itself is run by hand (bench/README.md). Its GPU section only runs where CUDA is,
and device time is scarce: the smoke test keeps that code path working in between.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import train_speed  # noqa: E402

from tests.fixtures.ml import LABELS


def test_published_sample_has_their_shape():
    text = train_speed.published_sample("where is my parcel", "shipping", LABELS)
    assert text.startswith("### Instruction:\n")
    assert all(f"\n- {label}\n" in text for label in LABELS)
    assert text.endswith("### Input:\nwhere is my parcel\n \n### Output:\nshipping")


def test_counting_collator_counts_padding_and_sequences():
    def padded(features):
        return {
            "input_ids": torch.tensor([[5, 6, 7], [5, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
            "labels": torch.tensor([[-100, 6, 7], [-100, -100, -100]]),
        }

    def padding_free(features):
        return {
            "input_ids": torch.tensor([[5, 6, 7, 5, 6]]),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
            "labels": torch.tensor([[-100, 6, 7, -100, 6]]),
        }

    counter = train_speed.CountingCollator(padded)
    counter([])
    counter([])
    assert (counter.fed, counter.real, counter.loss, counter.sequences, counter.batches) == (12, 8, 4, 4, 2)
    counter = train_speed.CountingCollator(padding_free)
    counter([])
    assert (counter.fed, counter.real, counter.loss, counter.sequences) == (5, 5, 3, 2)


def test_counting_collator_counts_a_shared_prefix_once():
    """A shared-prefix batch (components/modeling/prefix_cache.py) runs its 2 shared tokens once, then 2 rows of 3."""
    from ftloop.components.modeling.prefix_cache import SHARED_PREFIX_KEY

    def shared(features):
        return {
            SHARED_PREFIX_KEY: torch.tensor([[1, 2]]),
            "input_ids": torch.tensor([[5, 6, 7], [5, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
            "labels": torch.tensor([[-100, 6, 7], [-100, 6, -100]]),
        }

    counter = train_speed.CountingCollator(shared)
    counter([])
    assert (counter.fed, counter.real, counter.loss, counter.sequences) == (2 + 6, 2 + 4, 3, 2)


def test_tokenizer_granularity_counts_question_tokens_per_word(tiny_model_dir, formatted_dir):
    g = train_speed.tokenizer_granularity(tiny_model_dir, formatted_dir)
    assert g["vocab"] > 0 and g["tokens_per_question"] > 0
    assert g["tokens_per_question_word"] >= 1.0  # a BPE never packs two words into one token here


def _counted_training_flops(d_in, d_out, r, vocab, tokens, loss_tokens, checkpointing=False):
    """FLOPs torch itself counts (FlopCounterMode: every matmul, forward and backward) for one LoRA'd frozen
    linear layer over ``tokens`` rows, then a frozen head over the first ``loss_tokens`` rows, as training runs them."""
    from torch.utils.checkpoint import checkpoint
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    body = torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    lora_a, lora_b = torch.nn.Linear(d_in, r, bias=False), torch.nn.Linear(r, d_out, bias=False)
    head = torch.nn.Linear(d_out, vocab, bias=False).requires_grad_(False)
    x = torch.randn(tokens, d_in, requires_grad=True)  # activations from layers below: the input gradient is needed

    def block(inp):
        return body(inp) + lora_b(lora_a(inp))

    with FlopCounterMode(display=False) as counter:
        # reentrant checkpointing reruns the whole block forward in the backward, as a checkpointed layer does
        h = checkpoint(block, x, use_reentrant=True) if checkpointing else block(x)
        head(h[:loss_tokens]).logsumexp(-1).sum().backward()
    params = {"body": d_in * d_out, "head": d_out * vocab, "lora": r * (d_in + d_out)}
    return counter.get_total_flops(), params


def test_training_flops_match_hand_counted_numbers():
    """A 8->6 frozen layer with r=2 adapters and a 6->10 head; 5 tokens, 3 of them in the loss, no attention.
    Frozen weights: 2 FLOPs forward + 2 for the input gradient = 4 per weight per token: 5 * 4 * 48 = 960.
    Adapters: forward, input gradient and weight gradient = 6 per weight per token: 5 * 6 * 28 = 840.
    Head on loss tokens only, frozen: 3 * 4 * 60 = 720. Total 2520; the recompute adds 5 * 2 * (48 + 28) = 760."""
    params = {"body": 48, "head": 60, "lora": 28}
    f = train_speed.training_flops(params, layers=0, hidden=6, real_tokens=5, loss_tokens=3, sequences=1, checkpointing=False)
    assert f == {"model": 2520.0, "hardware": 2520.0}
    g = train_speed.training_flops(params, layers=0, hidden=6, real_tokens=5, loss_tokens=3, sequences=1, checkpointing=True)
    assert g == {"model": 2520.0, "hardware": 2520.0 + 760.0}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_flops_match_what_torch_counts(checkpointing):
    measured, params = _counted_training_flops(d_in=8, d_out=6, r=2, vocab=10, tokens=5, loss_tokens=3, checkpointing=checkpointing)
    f = train_speed.training_flops(params, layers=0, hidden=6, real_tokens=5, loss_tokens=3, sequences=1, checkpointing=checkpointing)
    assert f["hardware"] == measured
    assert measured == (2520 + 760 if checkpointing else 2520)  # the hand count above, from torch's own counter


def test_attention_flops_are_half_of_full_attention_for_causal_masks():
    """QK^T and AV over a sequence, forward and backward, as torch counts them (full T x T matrices); a causal
    mask halves the useful work, which is what the formula's ctx/2 keys per query says."""
    from torch.utils.flop_counter import FlopCounterMode

    layers, hidden, seq_len, sequences = 2, 4, 10, 3
    q, k, v = (torch.randn(sequences, seq_len, hidden, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        for _ in range(layers):
            (torch.softmax(q @ k.transpose(1, 2), -1) @ v).sum().backward()
    full = counter.get_total_flops()
    assert full == layers * sequences * 3 * (2 * seq_len * seq_len * hidden) * 2  # fwd + 2x bwd, two matmuls
    f = train_speed.training_flops(
        {"body": 0, "head": 0, "lora": 0},
        layers=layers,
        hidden=hidden,
        real_tokens=sequences * seq_len,
        loss_tokens=0,
        sequences=sequences,
        checkpointing=False,
    )
    assert f["model"] == full / 2


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


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("Tesla T4", None),
    ],
)
def test_bf16_peak_by_device_name(name, peak):
    assert train_speed.bf16_peak_tflops(name) == peak


# ------------------------------------------------------------- GPU section on CPU

GPU_ARGS = {"seed": 0, "gpu_rows_per_label": 2, "gpu_epochs": 1.0, "gpu_peak_tflops": 0.5}


@pytest.fixture(scope="module")
def gpu_section(tiny_model_dir, tmp_path_factory):
    """bench_gpu with both recipes' GPU settings on CPU: a 1-layer Phi-3, 16 train rows, 1 epoch."""
    from transformers import AutoTokenizer, Phi3Config

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    config = Phi3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    section = train_speed.bench_gpu(
        argparse.Namespace(**GPU_ARGS), tiny_model_dir, tmp_path_factory.mktemp("train-speed-gpu"), device="cpu", config=config
    )
    return section, config


def test_gpu_section_runs_on_cpu_with_a_small_config(gpu_section):
    s, config = gpu_section
    ours, pub = s["runs"]["ours"][0], s["runs"]["published"][0]
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    for run in (ours, pub):
        assert run["gpu_recipe"] and run["device"] == "cpu" and run["epochs"] == 1
        # What needs CUDA is absent, not faked.
        assert run["quantization"] is None and run["cuda_peak_allocated_gib"] is None and not run["bf16"]
        assert run["attn_implementation"] == "sdpa"
        assert run["params"]["body"] == layers * (d * 3 * d + d * d + d * 2 * inter + inter * d)
        assert run["params"]["head"] == d * config.vocab_size
        # MFU is the counted tokens' model FLOPs / time / the given peak; HFU adds only the recompute.
        flops = train_speed.training_flops(
            run["params"],
            layers,
            d,
            run["tokens_real_per_epoch"],
            run["tokens_in_loss_per_epoch"],
            run["sequences_per_epoch"],
            run["gradient_checkpointing"],
        )
        assert math.isclose(run["model_tflops"], flops["model"] / 1e12)
        assert run["bf16_peak_tflops"] == GPU_ARGS["gpu_peak_tflops"]
        assert math.isclose(run["mfu"], flops["model"] / run["seconds"] / (GPU_ARGS["gpu_peak_tflops"] * 1e12))
        assert math.isclose(run["hfu"], flops["hardware"] / run["seconds"] / (GPU_ARGS["gpu_peak_tflops"] * 1e12))
        assert math.isclose(run["tokens_fed_per_s"], run["tokens_fed_per_epoch"] / run["seconds"])
        assert math.isclose(run["padding_fraction"], 1 - run["tokens_real_per_epoch"] / run["tokens_fed_per_epoch"])
        assert 0 < run["tokens_in_loss_per_epoch"] <= run["tokens_real_per_epoch"] <= run["tokens_fed_per_epoch"]
    # Ours with the cluster settings: 16 rows in one batch of 16, LoRA on all linears.
    assert ours["max_length"] == 256 and ours["sequences_per_epoch"] == 16 and ours["micro_batches_per_epoch"] == 1
    assert ours["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert not ours["gradient_checkpointing"] and ours["hfu"] == ours["mfu"]
    # Theirs: packed, whole-text loss, gradient checkpointing (recompute is in HFU only), r=128 on o/down.
    assert pub["packing"] and pub["gradient_checkpointing"] and pub["hfu"] > pub["mfu"]
    assert pub["target_modules"] == ["down_proj", "o_proj"]
    assert pub["params"]["lora"] == layers * 128 * ((d + d) + (inter + d))
    assert pub["tokens_in_loss_per_epoch"] == pub["tokens_real_per_epoch"]
    # The section: medians of one run each, the ratios the targets are about, three targets.
    assert s["ours"]["mfu"] == ours["mfu"] and s["published"]["mfu"] == pub["mfu"]
    assert s["token_ratio_fed"] == ours["tokens_fed_per_epoch"] / pub["tokens_fed_per_epoch"]
    assert s["token_ratio_real"] == ours["tokens_real_per_epoch"] / pub["tokens_real_per_epoch"]
    assert s["epoch_speedup"] == pub["seconds_per_epoch"] / ours["seconds_per_epoch"] == s["epoch_speedup_paired"]
    assert len(s["targets"]) == 3
    (mfu_ok,) = [ok for name, ok in s["targets"].items() if "MFU" in name]
    assert mfu_ok == (ours["mfu"] >= train_speed.MFU_TARGET)
    assert "not a GPU measurement" in s["note"]
    json.dumps(s)  # goes into --json as is


def test_gpu_section_report_prints(gpu_section, capsys):
    s, _ = gpu_section
    train_speed.print_report({"args": GPU_ARGS, "env": {}, "gpu": s})
    out = capsys.readouterr().out
    assert "GPU, cpu, random Phi-3-mini" in out and "MFU (bf16 dense peak)" in out and s["note"] in out
    assert "CUDA peak allocated" not in out  # a row with no value on either side is left out
    assert sum(line.startswith(("PASS  [gpu]", "FAIL  [gpu]")) for line in out.splitlines()) == 3


def test_a_failed_gpu_section_keeps_the_cpu_results(gpu_section, tmp_path, monkeypatch, capsys):
    """Device time is scarce: the CPU results and the error are still reported, and the exit status is 1."""
    s, _ = gpu_section
    records = iter([s["runs"]["ours"][0], s["runs"]["published"][0]])

    def gpu_fails(*args, **kwargs):
        raise RuntimeError("published worker failed (1): CUDA out of memory")

    monkeypatch.setattr(train_speed, "run_worker", lambda *args, **kwargs: next(records))
    monkeypatch.setattr(train_speed, "bench_gpu", gpu_fails)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "train_speed.json"
    code = train_speed.main(
        [
            "--repeats",
            "1",
            "--rows-per-label",
            "2",
            "--epochs",
            "1",
            "--vocab-size",
            "512",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ]
    )
    assert code == 1
    res = json.loads(out.read_text())
    assert res["gpu_error"] == "RuntimeError: published worker failed (1): CUDA out of memory"
    assert res["cpu"]["token_ratio_fed"] == s["token_ratio_fed"] and "gpu" not in res
    assert "GPU section failed: RuntimeError" in capsys.readouterr().out


def test_ours_with_model_is_the_real_recipe_on_that_model(tmp_path):
    """--model: ours trains with configs/demo-smollm2.yaml's recipe (not the tiny demo's), dev evaluation off."""
    import yaml

    from bench.real_model import REAL_RECIPE

    recipe = yaml.safe_load(REAL_RECIPE.read_text(encoding="utf-8"))
    config = train_speed._ours_config(tmp_path, 1.0, gpu_recipe=False, real=True)
    assert config.model.name_or_path == str(tmp_path) and config.model.dtype == recipe["model"]["dtype"]
    assert config.lora.r == recipe["lora"]["r"] and config.train.learning_rate == recipe["train"]["learning_rate"]
    assert config.train.epochs == 1.0 and config.train.early_stopping_metric == "none"
    tiny = train_speed._ours_config(tmp_path, 1.0, gpu_recipe=False)
    assert tiny.train.learning_rate != config.train.learning_rate  # the tiny demo's recipe differs
