"""The ``hf`` backend: self-hosted generation with transformers (meant for the L4 node).

The data never leaves the cluster. Prompts are rendered with the model's chat
template, batched with left padding and sampled (temperature / top-p) under a
fixed torch seed per batch and attempt, so a CPU run is reproducible. Replies
are parsed as a JSON array or numbered lines (``generate.parse_list``); a batch
whose replies do not parse is sampled again, up to ``max_attempts``.
"""

from __future__ import annotations

from pathlib import Path

from ftloop.components.config import HFGeneratorConfig
from ftloop.components.generators.base import PromptedGenerator
from ftloop.components.prompts import Message

CONFIG_KEY = "generators.hf.name_or_path"  # named in load errors: the user fixes this field, not model.name_or_path


class HFGenerator(PromptedGenerator):
    name = "hf"

    def __init__(self, cfg: HFGeneratorConfig, seed: int, checkpoint: str | Path | None = None):
        identity = cfg.name_or_path if not cfg.revision else f"{cfg.name_or_path}@{cfg.revision}"
        super().__init__(identity, seed, cfg.max_attempts, checkpoint)
        self.cfg = cfg
        self._model = None
        self._tokenizer = None

    def _load(self):
        if self._model is None:
            import torch

            from ftloop.components.modeling.loading import load_base_model, load_tokenizer, quiet_progress_bars

            with quiet_progress_bars():
                model = load_base_model(self.cfg.name_or_path, self.cfg.revision, self.cfg.dtype, prefer_flash=True, key=CONFIG_KEY)
                tokenizer = load_tokenizer(self.cfg.name_or_path, self.cfg.revision, key=CONFIG_KEY)
            if torch.cuda.is_available():
                model.to("cuda")
            model.eval()
            self._model, self._tokenizer = model, tokenizer
        return self._model, self._tokenizer

    def complete(self, requests: list[list[Message]], attempt: int) -> list[str | Exception]:
        import torch

        from ftloop.components.modeling.loading import chat_token_ids, cpu_threads_for

        model, tokenizer = self._load()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        from ftloop.components.modeling.generate_mode import stop_token_ids

        stop_ids = stop_token_ids(tokenizer, model)  # eos, the chat template's turn end, the generation config's eos ids
        device = next(model.parameters()).device
        replies: list[str | Exception] = []
        with cpu_threads_for(model), torch.no_grad():
            for start in range(0, len(requests), self.cfg.batch_size):
                batch = [chat_token_ids(tokenizer, m, add_generation_prompt=True) for m in requests[start : start + self.cfg.batch_size]]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, ids in enumerate(batch):  # left padding: every prompt ends where generation starts
                    input_ids[i, width - len(ids) :] = torch.tensor(ids)
                    mask[i, width - len(ids) :] = 1
                torch.manual_seed(self.seed * 1_000_003 + start * 101 + attempt)
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=True,
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                    max_new_tokens=self.cfg.max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                )
                for row in out[:, width:]:
                    replies.append(tokenizer.decode(row, skip_special_tokens=True))
        return replies
