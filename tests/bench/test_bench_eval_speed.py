"""bench/eval_speed.py runs end to end on a small budget, and its GPU section runs on CPU with a small config.

The GPU section only runs where CUDA is, and device time is scarce: this keeps its code
path working between the sessions that have a GPU (bench/README.md has the real results).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import eval_speed  # noqa: E402


def test_cpu_batch_size_is_the_demo_configs():
    demo = yaml.safe_load(eval_speed.DEMO_CONFIG.read_text(encoding="utf-8"))
    assert eval_speed.demo_eval_batch_size() == demo["eval"]["batch_size"]


def test_scoring_invalid_counts_rows_that_are_not_a_distribution_over_the_labels():
    labels = ["a", "b"]
    good = {"a": 0.25, "b": 0.75}
    assert eval_speed._scoring_invalid([good, good], labels) == 0
    bad = [{"a": 0.5, "b": 0.6}, {"b": 0.5, "a": 0.5}, {"a": float("nan"), "b": 1.0}, {"a": 1.0}]
    assert eval_speed._scoring_invalid([good, *bad], labels) == len(bad)


def test_cpu_section_end_to_end_on_a_small_budget(tmp_path, capsys):
    out = tmp_path / "eval_speed.json"
    code = eval_speed.main(
        [
            "--rows",
            "16",
            "--train-rows",
            "16",
            "--epochs",
            "1",
            "--repeats",
            "1",
            "--no-gpu",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    cpu = json.loads(out.read_text())["cpu"]
    assert cpu["rows"] == 16 and cpu["batch_size"] == eval_speed.demo_eval_batch_size()
    assert set(cpu["seconds"]) == {"score", "published", "per_row", "batched"}
    assert all(seconds > 0 for seconds in cpu["seconds"].values())
    assert cpu["invalid_rate"]["score"] == 0.0  # label scoring never produces an invalid output
    assert cpu["speedup_vs_published"] == cpu["seconds"]["published"] / cpu["seconds"]["score"]
    assert len(cpu["targets"]) == 3
    report = capsys.readouterr().out
    assert "published per-row generate (5 tokens)" in report and "[cpu] score >= 20x" in report


def test_model_option_fine_tunes_that_base_with_the_real_models_recipe(tmp_path, tiny_llama_dir, capsys):
    """--model: a given base (here the tiny Llama standing in for SmolLM2) with configs/demo-smollm2.yaml's recipe."""
    from bench.real_model import REAL_RECIPE

    out = tmp_path / "eval_speed.json"
    argv = ["--model", str(tiny_llama_dir), "--rows", "16", "--train-rows", "16", "--epochs", "1", "--repeats", "1", "--no-gpu"]
    assert eval_speed.main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    meta = json.loads((tmp_path / "work" / "adapter" / "ftloop_model.json").read_text())
    assert meta["base_model"]["name_or_path"] == str(tiny_llama_dir)
    recipe = yaml.safe_load(REAL_RECIPE.read_text(encoding="utf-8"))
    assert meta["lora"]["r"] == recipe["lora"]["r"] and meta["base_model"]["dtype"] == recipe["model"]["dtype"]
    assert result["cpu"]["batch_size"] == recipe["eval"]["batch_size"]
    assert result["gpu_skipped"].startswith("--model")
    assert f"CPU, {tiny_llama_dir} + LoRA" in capsys.readouterr().out

    adapter_file = tmp_path / "work" / "adapter" / "adapter_model.safetensors"
    trained = adapter_file.stat().st_mtime_ns
    assert eval_speed.main([*argv, "--workdir", str(tmp_path / "work"), "--reuse-adapter"]) == 0  # times it again, no training
    assert adapter_file.stat().st_mtime_ns == trained
    assert f"reusing the fine-tuned adapter in {tmp_path / 'work' / 'adapter'}" in capsys.readouterr().out


def small_phi3_config(tiny_model_dir):
    """A one-layer Phi-3 on the tiny model's tokenizer: the GPU section, run on the CPU in seconds."""
    from transformers import AutoTokenizer, Phi3Config

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return Phi3Config(
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


def test_gpu_section_runs_on_cpu_with_a_small_config(tiny_model_dir):
    config = small_phi3_config(tiny_model_dir)
    args = argparse.Namespace(seed=0, gpu_rows=12, gpu_generate_rows=4, gpu_batch_size=8, gpu_max_new_tokens=2, repeats=1)
    result = eval_speed.bench_gpu(args, tiny_model_dir, log=lambda line: None, device="cpu", config=config)
    assert result["rows"] == 12 and result["generate_sample_rows"] == 4
    assert result["attn_implementation"] == "sdpa"
    assert result["generate_seconds_extrapolated"] == result["generate_sample_seconds"] * 12 / 4
    assert result["speedup_vs_published"] == result["published_seconds_extrapolated"] / result["score_seconds"]
    assert result["peak_memory_gib"] is None  # only measured on CUDA
    assert len(result["targets"]) == 2


def test_gpu_section_times_a_token_budget(tiny_model_dir):
    """--gpu-batch-tokens, run on the CPU with a small config (the GPU session measures it)."""
    args = argparse.Namespace(
        seed=0, gpu_rows=12, gpu_generate_rows=2, gpu_batch_size=4, gpu_batch_tokens=64, gpu_max_new_tokens=1, repeats=1
    )
    result = eval_speed.bench_gpu(args, tiny_model_dir, log=lambda line: None, device="cpu", config=small_phi3_config(tiny_model_dir))
    budget = result["budget"]
    assert budget["batch_tokens"] == 64 and budget["seconds"] > 0
    assert budget["speedup_vs_row_batches"] == result["score_seconds"] / budget["seconds"]
    assert budget["max_abs_diff_vs_row_batches"] <= 1e-3  # bf16: different batch shapes round differently
    assert len(result["targets"]) == 4
