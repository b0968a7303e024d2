"""The ``hf`` backend: self-hosted generation with transformers (meant for the L4 node).

The data never leaves the cluster. Prompts are rendered with the model's chat
template, batched with left padding and sampled (temperature / top-p) under a
fixed torch seed per batch and attempt, so a CPU run is reproducible. Replies
are parsed as a JSON array or numbered lines (``generate.parse_list``); a batch
whose replies do not parse is sampled again, up to ``max_attempts``.

Its prompts (below) differ from the openai backend's: one worked example as an
earlier chat turn, the intent named as the topic, and numbered lines instead of
a JSON array. On SmolLM2-135M-Instruct the shared JSON prompt left 2 of 16
question and 7 of 16 rephrasing requests unparseable after 3 attempts (which
fails the stage); these parsed 64 of 64 at the first attempt (bench/README.md,
hf_generator). Nothing in them is specific to a small model.
"""

from __future__ import annotations

from pathlib import Path

from ftloop.components.config import HFGeneratorConfig
from ftloop.components.generators.base import PromptedGenerator
from ftloop.components.prompts import Message
from ftloop.components.records import Article, Example

CONFIG_KEY = "generators.hf.name_or_path"  # named in load errors: the user fixes this field, not model.name_or_path

SYSTEM = "You write short, realistic messages that customers type into an online shop's help chat."
# The worked example: a topic no help center's intents are likely to share, so a copied
# detail is easy to spot (bench/hf_generator.py counts rows that borrow its words).
EXAMPLE_ARTICLE = Article(
    id="example",
    title="Assembling flat-pack furniture",
    text=(
        "Most of our furniture arrives flat-packed with an instruction leaflet and every screw you need. "
        "An Allen key is included; larger items also need a screwdriver. If a part is missing or broken, "
        "order a free replacement on the Spare Parts page with the code printed on the leaflet."
    ),
    label="furniture assembly",
)
EXAMPLE_QUESTIONS = (
    "a screw is missing from my wardrobe, how do I get a new one?",
    "do I need my own tools to put the bookcase together?",
    "Where is the part code for a spare part?",
)
EXAMPLE_MESSAGE = Example("example", "my bookcase came without screws, what now?", "furniture assembly", "example", "imported")
EXAMPLE_CONFUSED_WITH = "product reviews"
EXAMPLE_REPHRASINGS = (
    "there were no screws in the box with my bookcase, what should I do?",
    "How do I get the missing screws for a bookcase?",
    "bookcase delivered but the screws aren't there",
)
# Words of the example's topic: a generated row that holds one its source lacks borrowed it from the example.
EXAMPLE_TOPIC_WORDS = ("furniture", "flat-pack", "assembl", "screw", "allen key", "wardrobe", "bookcase", "leaflet", "spare part")


def topic(label: str) -> str:
    """A label as words: ``card_payments`` -> ``card payments``."""
    return " ".join(label.replace("_", " ").replace("-", " ").split())


def numbered(items: tuple[str, ...] | list[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, start=1))


def _question_request(article: Article, n: int) -> str:
    about = topic(article.label)
    title = f"Title: {article.title}\n" if article.title else ""
    return (
        f"Help-center article about {about}:\n{title}{article.text}\n\n"
        f"Write {n} different questions a customer could ask about {about} that this article answers. One per line, numbered."
    )


def _rephrase_request(example: Example, n: int, confused_with: str | None) -> str:
    about = topic(example.label)
    contrast = f" It is about {about}, not {topic(confused_with)}." if confused_with else ""
    return f'Customer message about {about}: "{example.text}"{contrast}\nWrite {n} other ways a customer could ask this. One per line, numbered.'


def question_messages(article: Article, n: int) -> list[Message]:
    """The worked example as an earlier turn, then the article; the reply is numbered lines."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": _question_request(EXAMPLE_ARTICLE, len(EXAMPLE_QUESTIONS))},
        {"role": "assistant", "content": numbered(EXAMPLE_QUESTIONS)},
        {"role": "user", "content": _question_request(article, n)},
    ]


def rephrase_messages(example: Example, n: int, confused_with: str | None) -> list[Message]:
    """As ``question_messages``, for rephrasing a misclassified row (with the label it was taken for, if known)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": _rephrase_request(EXAMPLE_MESSAGE, len(EXAMPLE_REPHRASINGS), EXAMPLE_CONFUSED_WITH)},
        {"role": "assistant", "content": numbered(EXAMPLE_REPHRASINGS)},
        {"role": "user", "content": _rephrase_request(example, n, confused_with)},
    ]


class HFGenerator(PromptedGenerator):
    name = "hf"

    def __init__(self, cfg: HFGeneratorConfig, seed: int, checkpoint: str | Path | None = None):
        identity = cfg.name_or_path if not cfg.revision else f"{cfg.name_or_path}@{cfg.revision}"
        super().__init__(identity, seed, cfg.max_attempts, checkpoint)
        self.cfg = cfg
        self._model = None
        self._tokenizer = None

    def question_messages(self, article: Article, n: int) -> list[Message]:
        return question_messages(article, n)

    def rephrase_messages(self, example: Example, n: int, confused_with: str | None) -> list[Message]:
        return rephrase_messages(example, n, confused_with)

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
