"""The run config: one pydantic model that drives local and cluster runs alike.

Every section forbids unknown keys, so a typo fails loudly instead of being
silently ignored. Paths in the YAML are resolved relative to the YAML file.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ftloop.components.errors import ConfigError, InputFileError
from ftloop.components.records import decode_text

TINY_MODEL_REF = "builtin:tiny-phi3"  # random-init, built per run from its data (components/modeling/tiny.py)
SMOLLM2_MODEL_REF = "builtin:smollm2-135m-instruct"  # pretrained, fetched and cached (components/modeling/builtin.py)
# Every ``builtin:`` reference a run config may name; `ftloop run --local` resolves each to a model directory.
BUILTIN_MODEL_REFS = (TINY_MODEL_REF, SMOLLM2_MODEL_REF)
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
# Upper bounds: a value past them is a typo (an extra zero, a pasted id), never a setting; without them a
# huge count spins for hours (questions_per_article: 100000000) or overflows a library (seed past 2**32).
Count = Annotated[int, Field(gt=0, le=1_000_000)]
Seconds = Annotated[float, Field(gt=0, le=3600)]
Backoff = Annotated[float, Field(ge=0, le=600)]
MAX_YAML_DEPTH = 50  # a run config is 3 levels deep; a deeper one is a mistake (or an attack on the parser)
# Query parameters that carry a secret in a URL.
_SECRET_PARAMS = re.compile(r"(api[-_]?key|key|token|access[-_]?token|secret|password|passwd|pwd|auth|signature|sig)", re.IGNORECASE)


def _is_number_field(annotation) -> bool:
    """int or float (optional or not), but not bool: the fields where YAML's ``yes``/``true`` is a mistake."""
    # An optional constrained number (``Count | None``) keeps its Annotated wrapper inside the union.
    types = {typing.get_args(t)[0] if typing.get_origin(t) is Annotated else t for t in (*typing.get_args(annotation), annotation)}
    return bool(types & {int, float}) and bool not in types


def url_credentials(value: str) -> str | None:
    """What secret a URL carries (a user name or password, a key in the query), or None."""
    if "://" not in value:
        return None
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return None
    if "@" in parts.netloc:
        return "a user name or password (user:password@host)"
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_PARAMS.fullmatch(name):
            return f"a secret in its query ({name}=...)"
    return None


class _Section(BaseModel):
    # allow_inf_nan: YAML's .inf/.nan (and "inf" strings) are refused by every float field; JSON has no
    # infinity, so an infinite value would round-trip to the pipeline's tasks as null.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_surprises(cls, value, info: ValidationInfo):
        """Values pydantic would otherwise take quietly: a boolean as a number, a credential in a URL."""
        if isinstance(value, bool) and _is_number_field(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"must be a number, got {str(value).lower()} (YAML reads yes/no/on/off as booleans)")
        if isinstance(value, str):
            secret = url_credentials(value)
            if secret:
                raise ValueError(
                    f"the URL contains {secret}: credentials never go in the config (it is compiled "
                    "into the pipeline YAML and logged); keep the key in a Kubernetes Secret and name "
                    "its variable in generators.openai.api_key_env (okareo: OKAREO_API_KEY)"
                )
        return value


class DataConfig(_Section):
    """Exactly one source: labeled articles (questions get generated) or labeled questions."""

    articles: str | None = None
    questions: str | None = None
    labels: list[str] | None = Field(default=None, description="Allowed labels; defaults to the labels found in the data.")
    conflicting_labels: Literal["error", "drop"] = Field(
        default="error",
        description="Imported questions whose text (or a near-duplicate of it) appears again with another label: "
        "'error' stops with both lines; 'drop' removes every row of that text and counts them.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.articles is None) == (self.questions is None):
            raise ValueError("set exactly one of 'articles' or 'questions'")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("'labels' contains duplicates")
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("'labels' needs at least two labels")
        return self

    @property
    def source_path(self) -> str:
        return self.articles or self.questions  # type: ignore[return-value]


GeneratorBackend = Literal["offline", "okareo", "hf", "openai"]


class GenerateConfig(_Section):
    backend: GeneratorBackend = "offline"
    questions_per_article: Annotated[int, Field(gt=0, le=100)] = 8


class OkareoConfig(_Section):
    """The ``okareo`` backend (official SDK) and the optional evaluation upload. The key comes from OKAREO_API_KEY only."""

    base_url: str | None = Field(default=None, description="API base URL; default: the SDK's (OKAREO_BASE_URL or api.okareo.com).")
    project: str | None = Field(default=None, description="Okareo project name or id; default: the account's default project.")
    tone: Literal["neutral", "formal", "informal", "abbreviated_informal", "persuasive", "empathetic"] = "informal"
    name_prefix: str = "ftloop"
    max_retries: Annotated[int, Field(ge=0, le=10)] = 4
    backoff_seconds: Backoff = 2.0
    timeout_seconds: Seconds = Field(
        default=120.0, description="Per HTTP request (the SDK itself sets none; generation calls can be slow)."
    )
    upload_eval: bool = Field(default=False, description="Also upload the splits as scenarios and report predictions as test runs.")


# The July 2024 re-release of Phi-3-mini-4k-instruct (pinned: its chat template differs between revisions).
DEFAULT_BASE_MODEL = "microsoft/Phi-3-mini-4k-instruct"
DEFAULT_BASE_REVISION = "0a67737cc96d2554230f90338b163bc6380a2a85"
# Hugging Face repo ids, as huggingface_hub's validate_repo_id checks them: 'name' or 'org/name'.
_HUB_ID = re.compile(r"(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b")


def is_hub_id(ref: str) -> bool:
    """``name`` or ``org/name`` by the hub's naming rules (letters, digits, ``-_.``; no ``--`` or ``..``)."""
    return bool(_HUB_ID.fullmatch(ref)) and "--" not in ref and ".." not in ref and not ref.endswith(".git")


def is_pinned(revision: str | None) -> bool:
    return bool(revision and re.fullmatch(r"[0-9a-f]{40}", revision))


def check_model_ref_value(ref: str, revision: str | None, section: str) -> None:
    """Refuse a model reference that cannot be loaded reproducibly (a ValueError for the validators).

    A local directory is an absolute path or starts with '.' (load_config resolves
    relative ones); anything else is a hub id, and a hub id without a commit can change
    under a scheduled run (Phi-3-mini's chat template did in July 2024).
    """
    if ref.startswith("builtin:"):
        if ref not in BUILTIN_MODEL_REFS:
            raise ValueError(f"name_or_path: unknown built-in model {ref!r}; known: {', '.join(BUILTIN_MODEL_REFS)}")
        return
    if ref.startswith(("/", ".")):
        return
    if not is_hub_id(ref):
        raise ValueError(f"name_or_path: {ref!r} is neither a local directory nor a valid hub id ('name' or 'org/name')")
    if not is_pinned(revision):
        raise ValueError(
            f"name_or_path: {ref!r} is not a local directory; as a hub id it needs {section}.revision pinned "
            f"to a 40-character commit hash, got {revision!r}"
        )


def _pin_default_model(data):
    """The default model is pinned for you."""
    if isinstance(data, dict) and data.get("name_or_path", DEFAULT_BASE_MODEL) == DEFAULT_BASE_MODEL:
        data = {"revision": DEFAULT_BASE_REVISION, **data}
    return data


class HFGeneratorConfig(_Section):
    """The ``hf`` backend: an instruction-tuned causal LM sampled with transformers (meant for the L4 node)."""

    name_or_path: str = "microsoft/Phi-3-mini-4k-instruct"
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    batch_size: Annotated[int, Field(gt=0, le=1024)] = 8
    max_new_tokens: Annotated[int, Field(gt=0, le=32768)] = 256
    temperature: Annotated[float, Field(gt=0, le=2)] = 0.9
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3

    @model_validator(mode="before")
    @classmethod
    def _default_model_is_pinned(cls, data):
        return _pin_default_model(data)

    @model_validator(mode="after")
    def _hub_models_are_pinned(self) -> HFGeneratorConfig:
        check_model_ref_value(self.name_or_path, self.revision, "generators.hf")
        return self


class OpenAIConfig(_Section):
    """The ``openai`` backend: any OpenAI-compatible chat-completions server (e.g. vLLM in the cluster)."""

    base_url: str = "http://localhost:8000/v1"
    model: str = "microsoft/Phi-3-mini-4k-instruct"
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = Field(
        default="OPENAI_API_KEY", description="Name of the env var holding the key (optional: unset sends no key)."
    )
    timeout_seconds: Seconds = 60.0
    max_retries: Annotated[int, Field(ge=0, le=10)] = 4
    backoff_seconds: Backoff = 1.0
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.9
    max_tokens: Annotated[int, Field(gt=0, le=32768)] = 512
    max_attempts: Annotated[int, Field(ge=1, le=10)] = Field(
        default=3, description="Tries per request when the reply cannot be parsed into the asked-for list."
    )
    secret_name: str | None = Field(
        default=None, description="Kubernetes secret (key 'api-key') exposed as api_key_env on the cluster; none if unset."
    )


class GeneratorsConfig(_Section):
    """Per-backend settings; ``generate.backend`` and ``augment.backend`` pick which one is used."""

    okareo: OkareoConfig = OkareoConfig()
    hf: HFGeneratorConfig = HFGeneratorConfig()
    openai: OpenAIConfig = OpenAIConfig()


class FiltersConfig(_Section):
    """Quality filters applied to every generated question and rephrasing (components/generators/filters.py)."""

    min_chars: Annotated[int, Field(gt=0, le=100_000)] = 8
    max_chars: Annotated[int, Field(gt=0, le=100_000)] = 300
    min_words: Annotated[int, Field(gt=0, le=10_000)] = 2
    min_alpha_ratio: Annotated[float, Field(ge=0, le=1)] = 0.6
    near_duplicate_threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.9, description="Jaccard similarity of character 4-gram shingles at or above which a row is a near-duplicate."
    )

    @model_validator(mode="after")
    def _bounds(self) -> FiltersConfig:
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must be <= max_chars")
        return self


class SplitConfig(_Section):
    train: Fraction = 0.7
    dev: Fraction = 0.15
    test: Fraction = 0.15

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.dev + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + dev + test must sum to 1.0, got {total:g}")
        return self


class FormatConfig(_Section):
    system_prompt: Annotated[str, Field(max_length=20_000)] | None = Field(
        default=None,
        description="Overrides the default instruction; '{labels}' is replaced by the label list.",
    )


class ModelConfig(_Section):
    name_or_path: str = DEFAULT_BASE_MODEL
    revision: str | None = Field(default=None, description="Hub commit to pin; required for hub ids, ignored for local paths.")
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # nf4 = QLoRA (4-bit NF4 base, double quantization, bf16 compute). Needs CUDA and bitsandbytes;
    # bf16 LoRA is the default because Phi-3-mini fits an L4 unquantized (7.6 GB of bf16 weights; docs/design.md).
    quantization: Literal["none", "nf4"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _default_model_is_pinned(cls, data):
        return _pin_default_model(data)

    @model_validator(mode="after")
    def _hub_models_are_pinned(self) -> ModelConfig:
        check_model_ref_value(self.name_or_path, self.revision, "model")
        return self


class LoraConfig(_Section):
    r: Annotated[int, Field(gt=0, le=1024)] = 16
    alpha: Annotated[int, Field(gt=0, le=4096)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class TrainConfig(_Section):
    epochs: Annotated[float, Field(gt=0, le=100)] = 3
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 2e-4
    batch_size: Annotated[int, Field(gt=0, le=64)] = 16
    gradient_accumulation_steps: Annotated[int, Field(gt=0, le=64)] = 1
    max_length: Annotated[int, Field(gt=0, le=131_072)] = 256
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    gradient_checkpointing: bool = False
    share_prompt_prefix: bool = Field(
        default=True,
        description="Run the prompt tokens all rows of a batch share (the system turn) once per batch, not once "
        "per row: the same loss and gradients from about half the tokens. Applies to padded batches on SDPA or "
        "eager attention without gradient checkpointing; elsewhere every row runs whole.",
    )
    compile: Literal["auto"] | bool = Field(
        default="auto",
        description="torch.compile each decoder layer for training, fusing the elementwise ops around the matmuls "
        "(~4x fewer ops per optimizer step: bench/ops_per_step.py). Compiled layers cannot reuse a shared prompt "
        "prefix, so true switches share_prompt_prefix off. auto: on with a CUDA GPU when the prefix is not shared "
        "anyway and there is no gradient checkpointing or quantization; off on CPU, where compiling takes longer "
        "than the demo's whole training.",
    )
    max_grad_norm: Annotated[float, Field(gt=0, le=1000)] = 1.0
    logging_steps: Count = 10
    # Dev-set evaluation during training: the best checkpoint by this metric is kept,
    # and training stops after `early_stopping_patience` evaluations without improvement.
    early_stopping_metric: Literal["dev_macro_f1", "dev_loss", "none"] = "dev_macro_f1"
    early_stopping_patience: Annotated[int, Field(gt=0, le=1000)] = 3
    eval_every_steps: Count | None = Field(
        default=None, description="Evaluate (and checkpoint) every N optimizer steps; default: every epoch."
    )
    checkpoint_uri: str | None = Field(
        default=None,
        description="Directory or gs:// prefix that checkpoints are mirrored to as they are written; "
        "a rerun of the same training (e.g. a retry after a Spot preemption) resumes from the newest one. "
        "Unset: checkpoints stay in a temporary directory and nothing can resume.",
    )
    keep_checkpoints: Annotated[int, Field(ge=1, le=20)] = 2
    export_merged: bool = Field(default=False, description="Also write the adapter merged into the base weights (merged/), for serving.")

    @field_validator("checkpoint_uri")
    @classmethod
    def _checkpoint_location(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("gs://"):
            if not re.fullmatch(r"gs://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/.*)?", value):
                raise ValueError(f"{value!r} is not a valid gs://bucket/prefix URI")
        elif "://" in value:
            raise ValueError(f"{value!r}: only gs:// URIs and directories are supported")
        return value

    @model_validator(mode="after")
    def _effective_batch(self) -> TrainConfig:
        # LoRA tolerates large batches worse than full fine-tuning (TRL's LoRA guidance, "LoRA Without Regret").
        if self.batch_size * self.gradient_accumulation_steps > 64:
            raise ValueError("batch_size * gradient_accumulation_steps must be <= 64 for LoRA")
        return self


class EvalConfig(_Section):
    # label_scoring: one batched forward pass, a probability per label, never invalid.
    # generate: the published generate-and-parse method, for parity; reports its invalid rate.
    mode: Literal["label_scoring", "generate"] = "label_scoring"
    # Score with the merged export (train.export_merged) instead of base + adapter.
    use_merged: bool = False
    # Base + adapter: fold the adapter into the base weights in memory before scoring
    # (same scores up to float rounding, one matmul per layer instead of three); false keeps
    # it applied as separate LoRA layers. An nf4 base always keeps it applied.
    merge_adapter: bool = True
    batch_size: Annotated[int, Field(gt=0, le=4096)] = 32
    # Label scoring: fill each forward pass up to this many tokens (rows x padded length, rows
    # sorted by length, lengths padded to a multiple of 16 so shapes repeat) instead of
    # batch_size rows. None (default) keeps row batches, which suit a CPU; on CUDA a budget
    # (e.g. 16384) is recommended: less padding and fewer, fuller passes.
    batch_tokens: Annotated[int, Field(gt=0, le=1_048_576)] | None = None
    max_new_tokens: Annotated[int, Field(gt=0, le=1024)] = 8


class AugmentConfig(_Section):
    backend: GeneratorBackend = "offline"
    rephrasings_per_error: Annotated[int, Field(gt=0, le=50)] = 3
    max_per_class: Count = Field(default=50, description="Most rows added per class in one round.")
    rounds: Annotated[int, Field(ge=0, le=5)] = Field(
        default=1,
        description=(
            "Augment-retrain rounds, unrolled at compile time; later rounds stop early. 0 turns augmentation off: "
            "the run fine-tunes the base model, evaluates it and compares it with the baselines."
        ),
    )
    label_filter: Literal["tfidf", "model", "none"] = Field(
        default="tfidf", description="Keep a rephrasing only if this judge gives its intended label the top score by a margin."
    )
    label_margin: Annotated[float, Field(ge=0, lt=1)] = 0.1
    min_dev_improvement: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="Stop when the last round's dev macro-F1 gain over the round before is not above this."
    )
    mine_splits: list[Literal["train", "dev"]] = Field(
        default=["train", "dev"],
        description=(
            "Splits whose misclassified rows are rephrased into train (test never is). Mining dev finds more errors but "
            "makes dev optimistic for the augmented model, so the keep/stop rule leans towards keeping augmentation; "
            "[train] keeps dev an honest selector."
        ),
    )

    @field_validator("mine_splits", mode="before")
    @classmethod
    def _never_test(cls, value):
        if isinstance(value, str):
            raise ValueError(f"must be a list of splits, e.g. [{value}]")
        if isinstance(value, (list, tuple)) and "test" in value:
            raise ValueError("test is never mined (it is the held-out score no stage may see); use train and/or dev")
        return value

    @field_validator("mine_splits")
    @classmethod
    def _no_duplicate_splits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one split: [train], [dev] or [train, dev]")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a split twice: {value}")
        return value


_MEMORY_UNITS = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
CPUQuantity = Annotated[str, Field(pattern=r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$")]
MemoryQuantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(k|K|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")]


def _cpu_cores(value: str) -> float:
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _memory_bytes(value: str) -> float:
    number = re.match(r"[0-9.]+", value).group()  # type: ignore[union-attr]
    return float(number) * _MEMORY_UNITS[value[len(number) :]]


class ClusterConfig(_Section):
    """Cluster-only settings; ignored by the local runner."""

    pipeline_root: str | None = None
    cpu_image: str = "ftloop-cpu:dev"
    gpu_image: str = "ftloop-gpu:dev"
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_node_label: str = "nvidia-l4"
    spot: bool = False
    # Requests and limits (Kubernetes quantities). GPU tasks are sized for one g2-standard-8 (8 vCPU, 32 GB,
    # about 28 GB allocatable): the memory limit stays under what the node can give; no CPU limit by default,
    # because a throttled container starves the tokenizer and dataloader and idles the L4.
    gpu_cpu_request: CPUQuantity = "6"
    gpu_memory_request: MemoryQuantity = "24G"
    gpu_cpu_limit: CPUQuantity | None = Field(default=None, description="CPU limit of GPU tasks; None: unthrottled.")
    gpu_memory_limit: MemoryQuantity = "26G"
    cpu_task_cpu_request: CPUQuantity = "1"
    cpu_task_memory_request: MemoryQuantity = "2G"
    cpu_task_cpu_limit: CPUQuantity | None = "2"
    cpu_task_memory_limit: MemoryQuantity = "4G"
    cache_training: bool = Field(
        default=True,
        description="Let KFP (and the local runner) reuse a cached fine-tune and its evaluations when their inputs, "
        "config slice and code are unchanged; false retrains and rescores every run.",
    )
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    # Base-model weights come from a cache volume, not from the hub on every run:
    # a PVC (e.g. backed by the GCS bucket through the GKE Cloud Storage FUSE CSI
    # driver, see manifests/base/model-cache.yaml) mounted at HF_HOME, read offline.
    model_cache_pvc: str | None = Field(
        default=None, description="PVC holding the Hugging Face cache (HF_HOME) for GPU tasks; None = download from the hub."
    )
    model_cache_mount_path: str = "/cache/hf"
    model_cache_gcsfuse: bool = Field(
        default=False, description="The PVC is a Cloud Storage FUSE volume: annotate GPU pods for the gcsfuse sidecar."
    )
    # Okareo API key: a Kubernetes Secret in the pipeline namespace, exposed as
    # OKAREO_API_KEY only to tasks whose backend is okareo. Never a parameter.
    okareo_secret_name: str = "okareo-api-key"
    okareo_secret_key: str = "api-key"
    # Defaults for `ftloop submit` / `ftloop schedule` (flags override them).
    kfp_host: str | None = None
    namespace: str = "kubeflow"
    experiment: str = "ftloop"
    service_account: str | None = None

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> ClusterConfig:
        for kind, parse in (("cpu", _cpu_cores), ("memory", _memory_bytes)):
            for task in ("gpu", "cpu_task"):
                request, limit = getattr(self, f"{task}_{kind}_request"), getattr(self, f"{task}_{kind}_limit")
                if limit is not None and parse(limit) < parse(request):
                    raise ValueError(f"{task}_{kind}_limit {limit} is below {task}_{kind}_request {request}")
        return self


class RunConfig(_Section):
    name: Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")] = "ftloop"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42  # numpy's seed range
    data: DataConfig
    generate: GenerateConfig = GenerateConfig()
    split: SplitConfig = SplitConfig()
    format: FormatConfig = FormatConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    augment: AugmentConfig = AugmentConfig()
    generators: GeneratorsConfig = GeneratorsConfig()
    filters: FiltersConfig = FiltersConfig()
    cluster: ClusterConfig = ClusterConfig()

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.model_validate_json(text)

    def with_model_path(self, path: str) -> RunConfig:
        return self.model_copy(update={"model": self.model.model_copy(update={"name_or_path": path})})

    # ------------------------------------------------------------------ per-task slices (see STAGE_SECTIONS)

    def runtime_values(self) -> dict[str, int | float | str]:
        """The run parameters as the pipeline takes them: ``{param_name: value}`` for every field in RUNTIME_FIELDS."""
        return {param_name(field): _to_param(field, _get_path(self, field)) for field in RUNTIME_FIELDS}

    def slice(self, stage: str) -> str:
        """The compile-time JSON constant a pipeline task of ``stage`` receives: the parts of this config
        ``stage_sections`` names, without the runtime fields (those come as typed run parameters), plus which
        runtime fields the task takes. Key order is fixed, so the same config always gives the same text."""
        paths = stage_sections(stage, self)
        dumped = self.model_dump(mode="json")
        sections: dict = {}
        for path in paths:
            _set_path(sections, path, _get_path(dumped, path))
        runtime = [field for field in RUNTIME_FIELDS if _covers(paths, field)]
        for field in runtime:
            _pop_path(sections, field)
        return json.dumps(
            {"stage": stage, "paths": list(paths), "config": sections, "runtime": runtime}, sort_keys=True, separators=(",", ":")
        )

    @classmethod
    def from_slice(cls, text: str, params: typing.Mapping[str, typing.Any], source_uri: str | None = None) -> RunConfig:
        """The RunConfig a stage function expects, rebuilt from its slice and its runtime parameters.

        Validated like a loaded config (a bad run parameter fails here, with the key named). Reading
        a part of the config the slice does not hold raises at once instead of returning a default.
        ``source_uri`` (the run's data) replaces the data path recorded at compile time.
        """
        data = json.loads(text)
        stage, sections = data["stage"], data["config"]
        for field in data["runtime"]:
            value = params.get(param_name(field))
            if value is None:
                raise ConfigError(f"task {stage}: run parameter {param_name(field)} ({field}) was not passed")
            _set_path(sections, field, _from_param(field, value))
        if source_uri and isinstance(sections.get("data"), dict):
            key = "articles" if sections["data"].get("articles") is not None else "questions"
            sections["data"][key] = source_uri
        full = _deep_merge(_SLICE_FILLER, sections)
        try:
            config = cls.model_validate(full)
        except ValidationError as exc:
            raise ConfigError(_format_errors(f"task {stage}", exc, None)) from None
        return _project(config, data["paths"], stage, "")


# Settings a user tunes per run: typed pipeline parameters (run form, Compare page) with the config's values as
# defaults, overridable with `ftloop submit --set KEY=VALUE`. Everything else is fixed when the pipeline is compiled.
RUNTIME_FIELDS = (
    "model.name_or_path",
    "model.revision",
    "train.learning_rate",
    "train.epochs",
    "train.batch_size",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "eval.batch_size",
    "augment.rephrasings_per_error",
    "augment.label_margin",
    "augment.min_dev_improvement",
    "seed",
)
_AUGMENT_FIELDS = (
    "augment.backend",
    "augment.rephrasings_per_error",
    "augment.max_per_class",
    "augment.label_filter",
    "augment.label_margin",
    "augment.min_dev_improvement",
    "augment.mine_splits",
)
# Which parts of the run config each stage function reads: a task gets only these (its slice) and the run
# parameters inside them, so a change anywhere else leaves its KFP cache entry valid. A dotted path is a
# sub-part. `stage_sections` adds what depends on the config (the generator backend's settings, the model judge).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare_examples": ("data", "generate", "filters", "split", "seed"),
    "split_examples": ("split", "seed"),
    "format_chat": ("format",),
    "tfidf_baseline": ("seed",),
    "evaluate_zero_shot": ("model", "eval"),
    "finetune": ("model", "lora", "train", "format", "eval.batch_size", "eval.batch_tokens", "seed"),
    "evaluate": ("model", "eval"),
    "augment_from_errors": (*_AUGMENT_FIELDS, "filters", "seed"),
    "select_final_model": ("augment.rounds", "augment.min_dev_improvement"),
    "compare_models": ("*",),  # summary.json records the whole run config
    "upload_to_okareo": ("name", "generators.okareo"),
}


def stage_sections(stage: str, config: RunConfig) -> tuple[str, ...]:
    """The config paths ``stage`` reads (``STAGE_SECTIONS``, completed from ``config``)."""
    paths = STAGE_SECTIONS[stage]
    if paths == ("*",):
        return tuple(RunConfig.model_fields)
    if stage == "prepare_examples" and config.data.articles and config.generate.backend != "offline":
        paths += (f"generators.{config.generate.backend}",)
    if stage == "augment_from_errors":
        if config.augment.backend != "offline":
            paths += (f"generators.{config.augment.backend}",)
        if config.augment.label_filter == "model":  # the judge scores labels as evaluation does
            paths += ("model", "format", "eval.batch_size", "eval.batch_tokens")
    return paths


def config_key_kind(key: str) -> str | None:
    """``"runtime"`` (a run parameter), ``"compile-time"`` (another run config key) or None (no such key)."""
    if key in RUNTIME_FIELDS:
        return "runtime"
    model: typing.Any = RunConfig
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        model = next(
            (t for t in (typing.get_args(annotation) or (annotation,)) if isinstance(t, type) and issubclass(t, BaseModel)), annotation
        )
    return "compile-time"


def with_runtime_values(config: RunConfig, values: typing.Mapping[str, str], where: str = "--set") -> RunConfig:
    """``config`` with runtime fields set from text (``{"train.learning_rate": "1e-4"}``), validated as a
    whole config so a value that breaks a rule (a range, an unpinned hub id, batch_size x accumulation) is
    refused with the key named. Every key must be a runtime field (``config_key_kind``)."""
    data = config.model_dump(mode="json")
    for key, text in values.items():
        if config_key_kind(key) != "runtime":
            raise KeyError(f"{key} is not a runtime field (see config_key_kind)")
        value, kind = _from_param(key, text), runtime_field_type(key)
        if kind is not str:
            try:
                value = kind(value)
            except ValueError:
                pass  # pydantic names the problem
        _set_path(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        given = " ".join(f"{k}={v}" for k, v in values.items() if loc == k or loc.startswith(k + ".") or k.startswith(loc))
        raise ConfigError(f"{where} {given or ' '.join(f'{k}={v}' for k, v in values.items())}: {loc}: {_message(err)}") from None


def param_name(field: str) -> str:
    """``train.learning_rate`` -> ``train_learning_rate``: the pipeline parameter of a runtime field."""
    return field.replace(".", "_")


def runtime_field_type(field: str) -> type:
    """int, float or str: the KFP parameter type of a runtime field (an optional string is '' when unset)."""
    model: type[BaseModel] = RunConfig
    *parents, leaf = field.split(".")
    for part in parents:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    annotation = model.model_fields[leaf].annotation
    types = {t for t in (typing.get_args(annotation) or (annotation,)) if t is not type(None)}
    for kind in (float, int, str):  # float before int: epochs is a float
        if kind in types or any(typing.get_origin(t) is Annotated and typing.get_args(t)[0] is kind for t in types):
            return kind
    raise TypeError(f"{field}: a runtime field must be an int, float or str, got {annotation}")


def _to_param(field: str, value):
    if value is None:
        return ""
    return runtime_field_type(field)(value)


def _from_param(field: str, value):
    return None if value == "" and runtime_field_type(field) is str else value


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _pop_path(tree: dict, path: str) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree[part]
    tree.pop(leaf, None)


def _covers(paths: typing.Iterable[str], field: str) -> bool:
    return any(field == p or field.startswith(p + ".") for p in paths)


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _deep_merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


class SliceError(RuntimeError):
    """A stage read a part of the run config that its slice does not hold: STAGE_SECTIONS is missing it (a bug)."""


_SLICED_CLASSES: dict[tuple[type, str, str], type] = {}


def _sliced_class(cls: type[BaseModel], stage: str, prefix: str) -> type[BaseModel]:
    """A subclass of ``cls`` whose instances lack some fields: reading one raises SliceError, never a default."""
    key = (cls, stage, prefix)
    if key not in _SLICED_CLASSES:

        def __getattr__(self, name: str):
            if name in cls.model_fields:
                raise SliceError(
                    f"stage {stage} read config.{prefix}{name}, which its config slice does not hold; "
                    f"add '{prefix}{name}' to STAGE_SECTIONS['{stage}'] in components/config.py"
                )
            return cls.__getattr__(self, name)

        _SLICED_CLASSES[key] = type(f"Sliced{cls.__name__}", (cls,), {"__getattr__": __getattr__, "__module__": __name__})
    return _SLICED_CLASSES[key]


def _project(model: BaseModel, paths: list[str], stage: str, prefix: str) -> BaseModel:
    """``model`` with only ``paths`` (relative to ``prefix``) kept; reading any other field raises SliceError."""
    kept, missing = {}, []
    for name in type(model).model_fields:
        path = f"{prefix}{name}"
        if path in paths:
            kept[name] = getattr(model, name)
        elif any(p.startswith(path + ".") for p in paths):
            kept[name] = _project(getattr(model, name), paths, stage, path + ".")
        else:
            missing.append(name)
    if not missing:
        return model
    projected = _sliced_class(type(model), stage, prefix).model_construct(**kept)
    for name in missing:  # model_construct filled in defaults: take them out again
        projected.__dict__.pop(name, None)
    return projected


# Fills what a slice leaves out so the whole config validates; never read (the projection hides it).
_SLICE_FILLER: dict = {"data": {"articles": "(not in this slice)"}}


class _YAMLProblem(Exception):
    """A config the YAML parser would accept but ftloop refuses (a duplicate key, runaway nesting)."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML's last-one-wins would silently drop a whole section)
    and nesting deeper than MAX_YAML_DEPTH (PyYAML composes recursively: 20,000 levels is a RecursionError)."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YAMLProblem(self.peek_event().start_mark.line + 1, f"nested too deeply (limit {MAX_YAML_DEPTH} levels)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                if key in first:
                    raise _YAMLProblem(
                        line,
                        f"duplicate key '{key_node.value}' (first at line {first[key]}); YAML would keep only the last one: merge them",
                    )
                first[key] = line
        return super().construct_mapping(node, deep)


def _parse_yaml(path: Path, text: str) -> tuple[yaml.Node | None, object]:
    """The composed tree (for line numbers) and the plain data, or a ConfigError naming the line."""
    loader = None
    try:
        loader = _ConfigLoader(text)  # the reader checks every character here
        tree = loader.get_single_node()
        return tree, (loader.construct_document(tree) if tree is not None else None)
    except _YAMLProblem as exc:
        raise ConfigError(f"{path}:{exc.line}: {exc}") from None
    except RecursionError:  # belt and braces: the depth limit above should come first
        raise ConfigError(f"{path}: nested too deeply (limit {MAX_YAML_DEPTH} levels)") from None
    except yaml.reader.ReaderError as exc:  # a control character: the reader knows the offset, not the line
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
        raise ConfigError(
            f"{path}:{line}: not valid YAML: control character U+{char:04X} is not allowed in YAML "
            "text; delete it (a copy-paste from a binary file or a terminal?)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Best-effort line number (1-based) of a key path in a composed YAML tree."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key or (not isinstance(key, str) and k.value == str(key)):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _show(value) -> str:
    """A rejected value as the user wrote it (numbers plainly), never more than a line."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
        return text if len(text) <= 30 else f"a {len(text)}-digit number"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _key_name(part) -> str:
    """A key as written, with invisible characters (a byte-order mark from joined files, a zero-width space) shown."""
    text = str(part)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _message(err: dict) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        hidden = [c for c in str(err["loc"][-1]) if not c.isprintable()]
        return "unknown key" + (f" (it contains the invisible character U+{ord(hidden[0]):04X}; delete it)" if hidden else "")
    if kind == "finite_number":
        return f"must be a finite number, got {_show(value)}"
    if kind == "less_than_equal":
        return f"must be at most {_show(ctx['le'])}, got {_show(value)}"
    if kind == "less_than":
        return f"must be less than {_show(ctx['lt'])}, got {_show(value)}"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters, got {len(value)}"
    if kind == "invalid_key":
        return "a key must be a name (YAML read this one as a number, a boolean or null; quote it if it is meant)"
    return err["msg"].removeprefix("Value error, ")


def _format_errors(path: str, exc: ValidationError, tree: yaml.Node | None) -> str:
    lines = [f"{path}: invalid run config"]
    for err in exc.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(_key_name(x) for x in loc) or "<top level>"
        line = _line_of(tree, loc)
        where = f"{path}:{line}" if line else path
        lines.append(f"  {where}: {key}: {_message(err)}")
    return "\n".join(lines)


def _is_relative_model_dir(base: Path, ref: str) -> bool:
    """A path ('./x', '/x') or a bare name that is a directory next to the config, not a hub id."""
    if ref.startswith((".", "/")):
        return True
    if not ref.strip() or ref.startswith("builtin:") or "://" in ref:
        return False
    try:
        return (base / ref).is_dir()
    except OSError:
        return False


def load_config(path: str | Path) -> RunConfig:
    """Parse and validate a run config YAML; data paths become absolute."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        text = decode_text(path, data)  # a byte-order mark is dropped; a non-UTF-8 byte is named with its line
    except InputFileError as exc:
        raise ConfigError(str(exc)) from None
    tree, raw = _parse_yaml(path, text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config must be a YAML mapping, got {type(raw).__name__}")
    base = path.resolve().parent
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("articles", "questions"):
            value = data.get(key)
            if isinstance(value, str) and "://" not in value:
                data[key] = str((base / value).resolve())
    generators = raw.get("generators")
    for model in (raw.get("model"), generators.get("hf") if isinstance(generators, dict) else None):
        if isinstance(model, dict):
            ref = model.get("name_or_path")
            if isinstance(ref, str) and _is_relative_model_dir(base, ref):
                model["name_or_path"] = str((base / ref).resolve())
    train = raw.get("train")
    if isinstance(train, dict):
        ref = train.get("checkpoint_uri")
        if isinstance(ref, str) and ref and "://" not in ref:
            train["checkpoint_uri"] = str((base / ref).resolve())
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(str(path), exc, tree)) from None
