"""The run config: one pydantic model that drives local and cluster runs alike.

Every section forbids unknown keys, so a typo fails loudly instead of being
silently ignored. Paths in the YAML are resolved relative to the YAML file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftloop.components.errors import ConfigError, InputFileError
from ftloop.components.records import decode_text

TINY_MODEL_REF = "builtin:tiny-phi3"
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Exactly one source: labeled articles (questions get generated) or labeled questions."""

    articles: str | None = None
    questions: str | None = None
    labels: list[str] | None = Field(
        default=None, description="Allowed labels; defaults to the labels found in the data."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
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
    questions_per_article: PositiveInt = 8


class OkareoConfig(_Section):
    """The ``okareo`` backend (official SDK) and the optional evaluation upload. The key comes from OKAREO_API_KEY only."""

    base_url: str | None = Field(default=None, description="API base URL; default: the SDK's (OKAREO_BASE_URL or api.okareo.com).")
    project: str | None = Field(default=None, description="Okareo project name or id; default: the account's default project.")
    tone: Literal["neutral", "formal", "informal", "abbreviated_informal", "persuasive", "empathetic"] = "informal"
    name_prefix: str = "ftloop"
    max_retries: Annotated[int, Field(ge=0, le=10)] = 4
    backoff_seconds: Annotated[float, Field(ge=0)] = 2.0
    timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        default=120.0, description="Per HTTP request (the SDK itself sets none; generation calls can be slow)."
    )
    upload_eval: bool = Field(default=False, description="Also upload the splits as scenarios and report predictions as test runs.")


# The July 2024 re-release of Phi-3-mini-4k-instruct (notes/finetune.md §6.3).
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
    if ref.startswith(("builtin:", "/", ".")):
        return
    if not is_hub_id(ref):
        raise ValueError(f"name_or_path: {ref!r} is neither a local directory nor a valid hub id ('name' or 'org/name')")
    if not is_pinned(revision):
        raise ValueError(f"name_or_path: {ref!r} is not a local directory; as a hub id it needs {section}.revision pinned "
                         f"to a 40-character commit hash, got {revision!r}")


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
    batch_size: PositiveInt = 8
    max_new_tokens: PositiveInt = 256
    temperature: Annotated[float, Field(gt=0, le=2)] = 0.9
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3

    @model_validator(mode="before")
    @classmethod
    def _default_model_is_pinned(cls, data):
        return _pin_default_model(data)

    @model_validator(mode="after")
    def _hub_models_are_pinned(self) -> "HFGeneratorConfig":
        check_model_ref_value(self.name_or_path, self.revision, "generators.hf")
        return self


class OpenAIConfig(_Section):
    """The ``openai`` backend: any OpenAI-compatible chat-completions server (e.g. vLLM in the cluster)."""

    base_url: str = "http://localhost:8000/v1"
    model: str = "microsoft/Phi-3-mini-4k-instruct"
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = Field(
        default="OPENAI_API_KEY", description="Name of the env var holding the key (optional: unset sends no key)."
    )
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    max_retries: Annotated[int, Field(ge=0, le=10)] = 4
    backoff_seconds: Annotated[float, Field(ge=0)] = 1.0
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.9
    max_tokens: PositiveInt = 512
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
    """Quality filters applied to every generated question and rephrasing (components/filters.py)."""

    min_chars: PositiveInt = 8
    max_chars: PositiveInt = 300
    min_words: PositiveInt = 2
    min_alpha_ratio: Annotated[float, Field(ge=0, le=1)] = 0.6
    near_duplicate_threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.9, description="Jaccard similarity of character 4-gram shingles at or above which a row is a near-duplicate."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "FiltersConfig":
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must be <= max_chars")
        return self


class SplitConfig(_Section):
    train: Fraction = 0.7
    dev: Fraction = 0.15
    test: Fraction = 0.15

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.dev + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + dev + test must sum to 1.0, got {total:g}")
        return self


class FormatConfig(_Section):
    system_prompt: str | None = Field(
        default=None,
        description="Overrides the default instruction; '{labels}' is replaced by the label list.",
    )


class ModelConfig(_Section):
    name_or_path: str = DEFAULT_BASE_MODEL
    revision: str | None = Field(
        default=None, description="Hub commit to pin; required for hub ids, ignored for local paths."
    )
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # nf4 = QLoRA (4-bit NF4 base, double quantization, bf16 compute). Needs CUDA and bitsandbytes;
    # bf16 LoRA is the default because Phi-3-mini fits an L4 unquantized (notes/finetune.md §7).
    quantization: Literal["none", "nf4"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _default_model_is_pinned(cls, data):
        return _pin_default_model(data)

    @model_validator(mode="after")
    def _hub_models_are_pinned(self) -> "ModelConfig":
        check_model_ref_value(self.name_or_path, self.revision, "model")
        return self


class LoraConfig(_Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class TrainConfig(_Section):
    epochs: Annotated[float, Field(gt=0)] = 3
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 2e-4
    batch_size: PositiveInt = 16
    gradient_accumulation_steps: PositiveInt = 1
    max_length: PositiveInt = 256
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    gradient_checkpointing: bool = False
    share_prompt_prefix: bool = Field(
        default=True,
        description="Run the prompt tokens all rows of a batch share (the system turn) once per batch, not once "
        "per row: the same loss and gradients from about half the tokens. Applies to padded batches on SDPA or "
        "eager attention without gradient checkpointing; elsewhere every row runs whole.",
    )
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    logging_steps: PositiveInt = 10
    # Dev-set evaluation during training: the best checkpoint by this metric is kept,
    # and training stops after `early_stopping_patience` evaluations without improvement.
    early_stopping_metric: Literal["dev_macro_f1", "dev_loss", "none"] = "dev_macro_f1"
    early_stopping_patience: PositiveInt = 3
    eval_every_steps: PositiveInt | None = Field(
        default=None, description="Evaluate (and checkpoint) every N optimizer steps; default: every epoch."
    )
    checkpoint_uri: str | None = Field(
        default=None,
        description="Directory or gs:// prefix that checkpoints are mirrored to as they are written; "
        "a rerun of the same training (e.g. a retry after a Spot preemption) resumes from the newest one. "
        "Unset: checkpoints stay in a temporary directory and nothing can resume.",
    )
    keep_checkpoints: Annotated[int, Field(ge=1, le=20)] = 2
    export_merged: bool = Field(
        default=False, description="Also write the adapter merged into the base weights (merged/), for serving."
    )

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
    def _effective_batch(self) -> "TrainConfig":
        # LoRA degrades with large batches (notes/finetune.md §2b).
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
    batch_size: PositiveInt = 32
    max_new_tokens: PositiveInt = 8


class AugmentConfig(_Section):
    backend: GeneratorBackend = "offline"
    rephrasings_per_error: PositiveInt = 3
    max_per_class: PositiveInt = Field(default=50, description="Most rows added per class in one round.")
    rounds: Annotated[int, Field(ge=1, le=5)] = Field(
        default=1, description="Augment-retrain rounds, unrolled at compile time; later rounds stop early."
    )
    label_filter: Literal["tfidf", "model", "none"] = Field(
        default="tfidf", description="Keep a rephrasing only if this judge gives its intended label the top score by a margin."
    )
    label_margin: Annotated[float, Field(ge=0, lt=1)] = 0.1
    min_dev_improvement: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="Stop when the last round's dev macro-F1 gain over the round before is not above this."
    )


class ClusterConfig(_Section):
    """Cluster-only settings; ignored by the local runner."""

    pipeline_root: str | None = None
    cpu_image: str = "ftloop-cpu:dev"
    gpu_image: str = "ftloop-gpu:dev"
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_node_label: str = "nvidia-l4"
    spot: bool = False
    gpu_cpu_request: str = "6"
    gpu_memory_request: str = "24G"
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


class RunConfig(_Section):
    name: Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")] = "ftloop"
    seed: Annotated[int, Field(ge=0)] = 42
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
    def from_json(cls, text: str) -> "RunConfig":
        return cls.model_validate_json(text)

    def with_model_path(self, path: str) -> "RunConfig":
        return self.model_copy(update={"model": self.model.model_copy(update={"name_or_path": path})})


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Best-effort line number (1-based) of a key path in a composed YAML tree."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
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


def _format_errors(path: str, exc: ValidationError, tree: yaml.Node | None) -> str:
    lines = [f"{path}: invalid run config"]
    for err in exc.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "<top level>"
        line = _line_of(tree, loc)
        where = f"{path}:{line}" if line else path
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {where}: {key}: {msg}")
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
    try:
        tree = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
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

