"""LoRA SFT: right targets, completion-only loss that includes the stop tokens, usable artifacts."""

from __future__ import annotations

import json
import re

import pytest

from ftloop.components.errors import FtloopError
from ftloop.components.modeling.lora import resolve_target_modules
from ftloop.components.modeling.prefix_cache import unshare
from ftloop.components.modeling.trainer import build_trainer
from tests.fixtures.ml import LABELS, demo_config

PHI3_MODULES = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


@pytest.fixture(scope="module")
def phi3_model():
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, pad_token_id=0)
    return Phi3ForCausalLM(config)


def test_all_linear_resolves_to_phi3_fused_modules(phi3_model):
    assert resolve_target_modules(phi3_model, "all-linear") == PHI3_MODULES  # never lm_head


def test_explicit_target_modules_are_checked(phi3_model):
    assert resolve_target_modules(phi3_model, ["qkv_proj", "o_proj"]) == ["qkv_proj", "o_proj"]
    # the classic copy-paste mistake for Phi-3 (PhiCookBook#185)
    with pytest.raises(FtloopError, match="q_proj.*available.*qkv_proj"):
        resolve_target_modules(phi3_model, ["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def trainer_and_info(tmp_path_factory, tiny_model_dir, formatted_dir):
    return build_trainer(demo_config(tiny_model_dir), formatted_dir, tmp_path_factory.mktemp("trainer"), progress=lambda line: None)


def test_trainer_settings_for_cpu(trainer_and_info):
    trainer, info = trainer_and_info
    args = trainer.args
    assert args.bf16 is False and args.use_cpu is True  # no CUDA here
    assert args.gradient_checkpointing is False
    assert args.report_to == []
    # dev evaluation and checkpoints at the same cadence, the best checkpoint by dev macro-F1 kept
    assert args.eval_strategy == "epoch" and args.save_strategy == "epoch"
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_macro_f1" and args.greater_is_better
    assert any(type(cb).__name__ == "EarlyStoppingCallback" for cb in trainer.callback_handler.callbacks)
    # no FlashAttention on CPU: dynamic padding, rows of similar length batched together
    assert args.train_sampling_strategy == "group_by_length" and not args.padding_free
    assert info["n_dev_rows"] == len(trainer.eval_dataset) == 8 * 8
    assert info["target_modules"] == PHI3_MODULES
    assert info["n_train_rows"] == len(trainer.train_dataset)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_only_completion_tokens_carry_loss_and_they_end_with_stop_tokens(trainer_and_info, formatted_dir):
    from ftloop.components.records import read_jsonl

    trainer, _ = trainer_and_info
    tokenizer = trainer.processing_class
    rows = read_jsonl(formatted_dir / "train.jsonl")
    end, eos = tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for i in range(5):
        example = trainer.train_dataset[i]
        row = rows[i]  # shuffle_dataset is off: dataset order == file order
        prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        labels = example["labels"]
        assert example["input_ids"][: len(prompt_ids)] == list(prompt_ids)
        assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
        completion = labels[len(prompt_ids) :]
        label_id = tokenizer.convert_tokens_to_ids(row["label"])
        assert completion == [label_id, end, *newline, eos]

    # the collator pads with the pad token, which must not mask the real eos labels
    batch = unshare(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    real = batch["attention_mask"].bool()
    assert (batch["labels"][~real] == -100).all()
    assert int((batch["labels"] == eos).sum()) == 4


def test_adapter_artifacts(trained):
    out, meta = trained["dir"], trained["meta"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == PHI3_MODULES
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    on_disk = json.loads((out / "ftloop_model.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["target_modules"] == PHI3_MODULES
    assert meta["base_model"]["name_or_path"] == trained["config"].model.name_or_path
    assert meta["n_train_rows"] == 8 * 25 and meta["labels"] == LABELS
    assert meta["device"] == "cpu" and meta["bf16"] is False and meta["tokens_seen"] > 0
    assert meta["steps"] > 0 and meta["wall_time_s"] > 0


def _losses(lines):
    return [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("train epoch")]


def test_progress_lines(trained):
    steps = [line for line in trained["lines"] if line.startswith("train epoch")]
    assert steps, trained["lines"]
    assert all(re.fullmatch(r"train epoch \d+\.\d\d/\d+ step \d+/\d+ loss \d+\.\d{3}", line) for line in steps)
    step_numbers = [int(line.split()[4].split("/")[0]) for line in steps]
    assert step_numbers == sorted(step_numbers) and len(step_numbers) > 2
    losses = _losses(trained["lines"])
    assert losses[-1] < losses[0] / 3  # it learned (first logged loss is at step 1)
    assert trained["meta"]["final_loss"] == pytest.approx(losses[-1], abs=1e-3)


def test_placeholder_model_ref_is_a_user_error(tmp_path, formatted_dir):
    config = demo_config(tmp_path).with_model_path("builtin:tiny-phi3")
    with pytest.raises(FtloopError, match="placeholder"):
        build_trainer(config, formatted_dir, tmp_path / "out")


def test_labels_outside_labels_json_are_a_user_error(tmp_path, formatted_dir, tiny_model_dir):
    import shutil

    bad = tmp_path / "formatted"
    shutil.copytree(formatted_dir, bad)
    lines = (bad / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["label"] = row["completion"][0]["content"] = "refunds"
    (bad / "train.jsonl").write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    with pytest.raises(FtloopError, match=r"train.jsonl:1: label 'refunds'"):
        build_trainer(demo_config(tiny_model_dir), bad, tmp_path / "out")


def test_rows_longer_than_max_length_are_dropped_not_truncated(tmp_path, formatted_dir, tiny_model_dir):
    with pytest.raises(FtloopError, match="every train row is longer than train.max_length=8"):
        build_trainer(demo_config(tiny_model_dir, max_length=8), formatted_dir, tmp_path / "out")


def test_tiny_models_run_single_threaded_on_cpu(phi3_model):
    import torch

    from ftloop.components.modeling.loading import cpu_threads_for

    before = torch.get_num_threads()
    with cpu_threads_for(phi3_model):
        assert torch.get_num_threads() == 1  # 2 threads on 2 busy cores ran 20-90x slower
    assert torch.get_num_threads() == before
