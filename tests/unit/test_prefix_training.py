"""Training with the shared prompt prefix run once per batch must equal training on whole rows.

The split and the equality of loss, gradients and the trained adapter are checked on the tiny
Phi-3 and the tiny Llama (ChatML template; ``tiny_arch_dir`` in tests/fixtures/ml.py).
"""

from __future__ import annotations

import pytest
import torch

from ftloop.components.modeling.prefix_cache import (
    MIN_SHARED_PREFIX,
    SHARED_PREFIX_KEY,
    SharedPrefixCollator,
    common_prefix_length,
    unshare,
)
from ftloop.components.modeling.trainer import build_trainer
from tests.fixtures.ml import demo_config


def _brute_force_common_prefix(seqs):
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def test_common_prefix_length_matches_a_position_by_position_scan():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        shared = torch.randint(0, 4, (int(torch.randint(0, 6, (1,), generator=generator)),), generator=generator).tolist()
        seqs = [
            shared + torch.randint(0, 3, (int(torch.randint(0, 5, (1,), generator=generator)),), generator=generator).tolist()
            for _ in range(int(torch.randint(1, 6, (1,), generator=generator)))
        ]
        assert common_prefix_length(seqs) == _brute_force_common_prefix(seqs), seqs
    assert common_prefix_length([[1, 2, 3], [1, 2], [1, 2, 3, 4]]) == 2  # one sequence is a prefix of another
    assert common_prefix_length([[5, 1], [4, 1], [5, 1]]) == 0


def _trainer(tmp_path, tiny_model_dir, formatted_dir, **train):
    config = demo_config(tiny_model_dir, early_stopping_metric="none", **train)
    return build_trainer(config, formatted_dir, tmp_path, progress=lambda line: None)


@pytest.fixture(scope="module")
def sharing(tmp_path_factory, tiny_arch_dir, formatted_dir):
    return _trainer(tmp_path_factory.mktemp("sharing"), tiny_arch_dir, formatted_dir)


def _features(trainer, n):
    return [trainer.train_dataset[i] for i in range(n)]


def test_the_batch_is_split_after_the_system_turn(sharing):
    trainer, info = sharing
    assert info["shared_prefix"] is True
    collator = trainer.data_collator
    assert isinstance(collator, SharedPrefixCollator)
    features = _features(trainer, 6)
    plain = collator.inner(features)
    split = collator(features)
    prompt_start = trainer.processing_class.apply_chat_template([{"role": "system", "content": "x"}], tokenize=True, return_dict=True)[
        "input_ids"
    ][:1]
    shared = split[SHARED_PREFIX_KEY]
    assert shared.shape[0] == 1 and shared[0, :1].tolist() == prompt_start
    # everything up to the user's question is shared: the system turn and the user tag
    lengths = [len(f["input_ids"]) for f in features]
    common = 0
    while all(f["input_ids"][common] == features[0]["input_ids"][common] for f in features):
        common += 1
    assert shared.shape[1] == common > MIN_SHARED_PREFIX
    assert split["input_ids"].shape == (6, max(lengths) - common)
    assert split["attention_mask"].shape == plain["attention_mask"].shape  # rows attend to the shared columns
    # no loss token was cut off, and the split is lossless
    assert (plain["labels"][:, :common] == -100).all()
    restored = unshare(split)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(restored[key], plain[key])


class _FixedBatch:
    def __init__(self, batch):
        self.batch = batch

    def __call__(self, features):
        return {k: v.clone() for k, v in self.batch.items()}


def test_the_shared_part_keeps_the_first_loss_tokens_predecessor_in_each_row():
    """Position t predicts token t + 1: the predecessor of the first loss token must stay per row."""
    ids = torch.arange(1, 21).repeat(3, 1)  # identical rows: everything is "shared"
    labels = torch.full_like(ids, -100)
    labels[:, 15:] = ids[:, 15:]
    labels[1, 12:] = ids[1, 12:]  # one row's answer starts earlier
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    split = SharedPrefixCollator(_FixedBatch(batch))([{}])
    assert split[SHARED_PREFIX_KEY].shape[1] == 11
    assert (split["labels"][:, 0] == -100).all()

    # Padding ends the shared part at the shortest row's last real token but one.
    ids2, mask2 = ids.clone(), torch.ones_like(ids)
    ids2[2, 10:], mask2[2, 10:] = 0, 0
    labels2 = torch.full_like(ids, -100)
    labels2[:, 9] = ids[:, 9]
    split2 = SharedPrefixCollator(_FixedBatch({"input_ids": ids2, "attention_mask": mask2, "labels": labels2}))([{}])
    assert split2[SHARED_PREFIX_KEY].shape[1] == 8


def test_batches_that_cannot_share_pass_through_unchanged():
    ids = torch.arange(1, 21).repeat(2, 1)
    labels = torch.full_like(ids, -100)
    labels[:, 18:] = 1
    one_row = {"input_ids": ids[:1], "attention_mask": torch.ones_like(ids[:1]), "labels": labels[:1]}
    assert SHARED_PREFIX_KEY not in SharedPrefixCollator(_FixedBatch(one_row))([{}])
    differ = ids.clone()
    differ[1, MIN_SHARED_PREFIX - 2] = 99  # fewer than MIN_SHARED_PREFIX tokens in common
    short = {"input_ids": differ, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert SHARED_PREFIX_KEY not in SharedPrefixCollator(_FixedBatch(short))([{}])
    padding_free = {"input_ids": ids[:1], "position_ids": torch.arange(20)[None], "labels": labels[:1]}
    assert SHARED_PREFIX_KEY not in SharedPrefixCollator(_FixedBatch(padding_free))([{}])


def test_loss_and_gradients_equal_the_whole_row_computation(sharing):
    trainer, _ = sharing
    model = trainer.model
    model.train()
    features = _features(trainer, 8)
    split = trainer.data_collator(features)
    plain = trainer.data_collator.inner(features)
    assert SHARED_PREFIX_KEY in split

    def loss_and_grads(batch):
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_split, grads_split = loss_and_grads(split)
    loss_plain, grads_plain = loss_and_grads(plain)
    model.zero_grad()
    assert loss_split == pytest.approx(loss_plain, rel=1e-5)
    scale = max(float(g.abs().max()) for g in grads_plain.values())
    assert scale > 0
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_split[name], grad, atol=1e-5 * scale), name

    # Callers that want the outputs (logits) get the whole-row computation.
    with torch.no_grad(), pytest.warns(FutureWarning, match="return_outputs"):
        loss_out, outputs = trainer.compute_loss(model, trainer.data_collator(features), return_outputs=True)
    assert float(loss_out) == pytest.approx(loss_plain, rel=1e-5)
    assert outputs.logits.shape[1] == plain["input_ids"].shape[1]


def test_training_with_sharing_ends_at_the_same_adapter(tmp_path, tiny_arch_dir, formatted_dir):
    adapters, losses = {}, {}
    for share in (True, False):
        trainer, info = _trainer(tmp_path / str(share), tiny_arch_dir, formatted_dir, epochs=1, share_prompt_prefix=share)
        assert info["shared_prefix"] is share
        torch.set_num_threads(1)
        losses[share] = trainer.train().training_loss
        adapters[share] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    for name, weight in adapters[False].items():
        assert torch.allclose(adapters[True][name], weight, atol=1e-4), name


def test_sharing_is_off_where_it_would_not_be_exact(tmp_path, tiny_model_dir, formatted_dir):
    _, info = _trainer(tmp_path / "gc", tiny_model_dir, formatted_dir, gradient_checkpointing=True)
    assert info["shared_prefix"] is False  # recomputed forwards would append to the cache twice
    trainer, info = _trainer(tmp_path / "off", tiny_model_dir, formatted_dir, share_prompt_prefix=False)
    assert info["shared_prefix"] is False and not isinstance(trainer.data_collator, SharedPrefixCollator)


def test_the_model_metadata_records_what_was_shared(trained):
    stats = trained["meta"]["shared_prefix"]
    assert stats["shared_batches"] > 0 and stats["tokens_not_recomputed"] > 0
    assert stats["shared_batches"] <= stats["batches"]


def test_flash_attention_is_asked_for_only_where_the_prefix_is_not_shared(tmp_path, tiny_model_dir, formatted_dir, monkeypatch):
    from ftloop.components.modeling import loading

    asked: list[bool] = []
    real = loading.attn_implementation
    monkeypatch.setattr(
        loading, "attn_implementation", lambda dtype, prefer_flash=True: asked.append(prefer_flash) or real(dtype, prefer_flash)
    )
    _trainer(tmp_path / "a", tiny_model_dir, formatted_dir)
    _trainer(tmp_path / "b", tiny_model_dir, formatted_dir, share_prompt_prefix=False)
    _trainer(tmp_path / "c", tiny_model_dir, formatted_dir, gradient_checkpointing=True)
    assert asked == [False, True, True]


def test_attention_choice_on_a_gpu_with_flash_attn_installed(monkeypatch):
    import importlib.util

    from ftloop.components.modeling import loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert loading.attn_implementation(torch.bfloat16) == "flash_attention_2"
    assert loading.attn_implementation(torch.bfloat16, prefer_flash=False) == "sdpa"
    assert loading.attn_implementation(torch.float32) == "sdpa"  # FlashAttention runs in half precision only
