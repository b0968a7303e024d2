"""Config validation (components/config.py), pinned where mutation testing (`make mutation
MUTANTS='ftloop.components.config.*'`, bench/README.md) can break it quietly: the boolean-as-number and
credential checks, the hub-id and pin rules, the cross-field bounds, resource quantities, the YAML
loader's limits, and the exact wording of the errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ftloop.components import config as c
from ftloop.components.config import (
    DEFAULT_BASE_REVISION,
    MAX_YAML_DEPTH,
    ClusterConfig,
    DataConfig,
    FiltersConfig,
    ModelConfig,
    SplitConfig,
    TrainConfig,
    check_model_ref_value,
    is_hub_id,
    is_pinned,
    load_config,
    url_credentials,
)
from ftloop.components.errors import ConfigError

PIN = "a" * 40


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    return str(err.value)


def value_error(model, data) -> str:
    with pytest.raises(ValidationError) as err:
        model.model_validate(data)
    return err.value.errors()[0]["msg"].removeprefix("Value error, ")


# ------------------------------------------------------------------ booleans, credentials


def test_a_boolean_is_refused_only_where_a_number_goes(tmp_path):
    text = error_of(tmp_path, "data:\n  articles: a.jsonl\ntrain:\n  eval_every_steps: yes\n")  # optional int
    assert text.endswith("train.eval_every_steps: must be a number, got true (YAML reads yes/no/on/off as booleans)")
    assert "got false" in error_of(tmp_path, "data:\n  articles: a.jsonl\ntrain:\n  epochs: off\n")
    config = load_config(write(tmp_path, "data:\n  articles: a.jsonl\ntrain:\n  gradient_checkpointing: yes\n  compile: no\n"))
    assert config.train.gradient_checkpointing is True and config.train.compile is False
    assert c._is_number_field(int) and c._is_number_field(float) and c._is_number_field(int | None)
    assert not c._is_number_field(bool) and not c._is_number_field(str) and not c._is_number_field(bool | int)


@pytest.mark.parametrize(
    "url, found",
    [
        ("no scheme at all with a key=x", None),
        ("https://host/v1", None),
        ("https://user@host/v1", "a user name or password (user:password@host)"),
        ("https://host/v1?api_key=s", "a secret in its query (api_key=...)"),
        ("https://host/v1?x=1&Token=", "a secret in its query (Token=...)"),  # blank values count
        ("https://host/v1?monkey=1&keys=2", None),  # the whole name must match
        ("http://[::1/v1?key=s", None),  # unparsable: pydantic or the client says so
    ],
)
def test_url_credentials(url, found):
    assert url_credentials(url) == found


def test_the_credential_message_says_where_keys_go(tmp_path):
    text = error_of(tmp_path, "data:\n  articles: a.jsonl\ngenerators:\n  openai:\n    base_url: https://u:p@h/v1\n")
    assert (
        "generators.openai.base_url: the URL contains a user name or password (user:password@host): credentials "
        "never go in the config (it is compiled into the pipeline YAML and logged); keep the key in a Kubernetes "
        "Secret and name its variable in generators.openai.api_key_env (okareo: OKAREO_API_KEY)"
    ) in text
    assert "u:p" not in text


# ------------------------------------------------------------------ data, models


def test_data_labels():
    assert value_error(DataConfig, {"questions": "q", "labels": ["a", "a", "b"]}) == "'labels' contains duplicates"
    assert value_error(DataConfig, {"questions": "q", "labels": ["a"]}) == "'labels' needs at least two labels"
    assert value_error(DataConfig, {"questions": "q", "articles": "a"}) == "set exactly one of 'articles' or 'questions'"
    assert value_error(DataConfig, {}) == "set exactly one of 'articles' or 'questions'"
    assert DataConfig(questions="q", labels=["a", "b"]).source_path == "q"
    assert DataConfig(articles="a").source_path == "a"


def test_hub_ids_and_pins():
    assert is_hub_id("name") and is_hub_id("org/name.v2_x-y") and is_hub_id("o/" + "n" * 96)
    assert not is_hub_id("o/" + "n" * 97) and not is_hub_id("a--b") and not is_hub_id("a..b") and not is_hub_id("x.git")
    assert not is_hub_id("a/b/c") and not is_hub_id("")
    assert is_pinned("0123456789abcdef" * 2 + "01234567") and not is_pinned("a" * 39) and not is_pinned("A" * 40)
    assert not is_pinned(None) and not is_pinned("") and not is_pinned("a" * 41)


def test_model_ref_messages():
    def msg(ref, revision=None):
        with pytest.raises(ValueError) as err:
            check_model_ref_value(ref, revision, "generators.hf")
        return str(err.value)

    assert msg("builtin:nope") == (
        "name_or_path: unknown built-in model 'builtin:nope'; known: builtin:tiny-phi3, builtin:smollm2-135m-instruct"
    )
    assert msg("a b") == "name_or_path: 'a b' is neither a local directory nor a valid hub id ('name' or 'org/name')"
    assert msg("org/m", "main") == (
        "name_or_path: 'org/m' is not a local directory; as a hub id it needs "
        "generators.hf.revision pinned to a 40-character commit hash, got 'main'"
    )
    for ok in ("builtin:tiny-phi3", "builtin:smollm2-135m-instruct", "/abs", "./rel", "../up"):
        check_model_ref_value(ok, None, "model")
    check_model_ref_value("org/m", PIN, "model")


def test_only_the_default_model_is_pinned_for_you():
    assert ModelConfig().revision == DEFAULT_BASE_REVISION
    assert ModelConfig(name_or_path=c.DEFAULT_BASE_MODEL).revision == DEFAULT_BASE_REVISION
    assert ModelConfig(name_or_path=c.DEFAULT_BASE_MODEL, revision=PIN).revision == PIN  # yours wins
    assert ModelConfig(name_or_path="/m").revision is None
    assert c.HFGeneratorConfig().revision == DEFAULT_BASE_REVISION
    assert c._pin_default_model("not a dict") == "not a dict"


# ------------------------------------------------------------------ cross-field bounds


def test_filters_and_split_bounds():
    assert FiltersConfig(min_chars=20, max_chars=20).max_chars == 20
    assert value_error(FiltersConfig, {"min_chars": 21, "max_chars": 20}) == "min_chars must be <= max_chars"
    assert value_error(SplitConfig, {"train": 0.5, "dev": 0.2, "test": 0.2}) == "train + dev + test must sum to 1.0, got 0.9"
    assert SplitConfig(train=0.5, dev=0.25, test=0.2500005).test == 0.2500005  # within 1e-6
    assert value_error(SplitConfig, {"train": 0.5, "dev": 0.25, "test": 0.250002}).startswith("train + dev + test")


def test_checkpoint_uri_and_effective_batch():
    assert TrainConfig(checkpoint_uri="gs://abc").checkpoint_uri == "gs://abc"
    assert TrainConfig(checkpoint_uri="gs://my-bucket/runs/x").checkpoint_uri == "gs://my-bucket/runs/x"
    assert TrainConfig(checkpoint_uri="/mnt/ckpt").checkpoint_uri == "/mnt/ckpt"
    assert TrainConfig().checkpoint_uri is None
    assert value_error(TrainConfig, {"checkpoint_uri": "gs://ab"}) == "'gs://ab' is not a valid gs://bucket/prefix URI"
    assert value_error(TrainConfig, {"checkpoint_uri": "gs://Bucket/x"}).endswith("is not a valid gs://bucket/prefix URI")
    assert value_error(TrainConfig, {"checkpoint_uri": "s3://b/x"}) == "'s3://b/x': only gs:// URIs and directories are supported"
    assert TrainConfig(batch_size=32, gradient_accumulation_steps=2).batch_size == 32  # exactly 64
    assert (
        value_error(TrainConfig, {"batch_size": 33, "gradient_accumulation_steps": 2})
        == "batch_size * gradient_accumulation_steps must be <= 64 for LoRA"
    )


def test_resource_quantities_and_limits():
    assert c._cpu_cores("500m") == 0.5 and c._cpu_cores("2") == 2.0 and c._cpu_cores("1.5") == 1.5
    assert c._memory_bytes("1Gi") == 2**30 and c._memory_bytes("1.5G") == 1.5e9 and c._memory_bytes("512") == 512
    assert c._memory_bytes("2Ki") == 2048 and c._memory_bytes("3k") == 3000
    assert ClusterConfig(gpu_cpu_request="6", gpu_cpu_limit="6000m", gpu_memory_limit="24G").gpu_cpu_limit == "6000m"
    assert value_error(ClusterConfig, {"gpu_cpu_limit": "5"}) == "gpu_cpu_limit 5 is below gpu_cpu_request 6"
    assert value_error(ClusterConfig, {"cpu_task_cpu_limit": "999m"}) == "cpu_task_cpu_limit 999m is below cpu_task_cpu_request 1"
    assert (
        value_error(ClusterConfig, {"gpu_memory_request": "1Gi", "gpu_memory_limit": "1G"})
        == "gpu_memory_limit 1G is below gpu_memory_request 1Gi"
    )
    assert value_error(ClusterConfig, {"cpu_task_memory_limit": "1G"}) == "cpu_task_memory_limit 1G is below cpu_task_memory_request 2G"
    assert ClusterConfig(cpu_task_cpu_limit=None).cpu_task_cpu_limit is None


# ------------------------------------------------------------------ the YAML loader and error text


def nested(depth: int) -> str:
    return "data:\n  articles: a.jsonl\nname: " + "[" * depth + "]" * depth + "\n"


def test_the_depth_limit_is_exact(tmp_path):
    # the top mapping is level 1 and the value under `name` level 2, so a value nested this deep is the last allowed
    allowed = MAX_YAML_DEPTH - 1
    assert "nested too deeply" not in error_of(tmp_path, nested(allowed))
    assert error_of(tmp_path, nested(allowed + 1)) == f"{tmp_path / 'run.yaml'}:3: nested too deeply (limit {MAX_YAML_DEPTH} levels)"


def test_yaml_problems_name_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    assert error_of(tmp_path, "") == f"{path}: a run config must be a YAML mapping, got NoneType"
    assert error_of(tmp_path, "- a\n") == f"{path}: a run config must be a YAML mapping, got list"
    assert error_of(tmp_path, "data:\n  articles: a.jsonl\nname: x\nname: y\n") == (
        f"{path}:4: duplicate key 'name' (first at line 3); YAML would keep only the last one: merge them"
    )
    assert error_of(tmp_path, "data:\n  articles: a.jsonl\nname: [\n").startswith(f"{path}:4: not valid YAML: ")
    assert error_of(tmp_path, 'data:\n  articles: a.jsonl\nname: "a\x07"\n') == (
        f"{path}:3: not valid YAML: control character U+0007 is not allowed in YAML text; delete it "
        "(a copy-paste from a binary file or a terminal?)"
    )
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.yaml: cannot read config: "):
        load_config(tmp_path / "dir.yaml")


def test_error_lines_inside_lists_and_shown_values(tmp_path):
    path = tmp_path / "run.yaml"
    text = error_of(tmp_path, "data:\n  articles: a.jsonl\n  labels:\n    - a\n    - [b]\n")
    assert f"{path}:5: data.labels.1: " in text
    assert error_of(tmp_path, "data:\n  articles: a.jsonl\ntrain:\n  learning_rate: 1\n").endswith(
        f"{path}:4: train.learning_rate: must be less than 1, got 1"
    )
    assert error_of(tmp_path, "data:\n  articles: a.jsonl\ntrain:\n  epochs: 100.5\n").endswith(
        "train.epochs: must be at most 100, got 100.5"
    )
    assert error_of(tmp_path, f"data:\n  articles: a.jsonl\nseed: {10**30}\n").endswith("got a 31-digit number")
    assert error_of(tmp_path, f"data:\n  articles: a.jsonl\nseed: {10**29}\n").endswith(f"got {10**29}")
    assert c._show(1.5) == "1.5" and c._show(True) == "True" and c._show("x" * 60) == repr("x" * 58)[:57] + "..."
    assert c._show("x" * 58) == repr("x" * 58)
    assert c._key_name("ok") == "ok" and c._key_name("a\u200bb") == "a\\u200bb"


def test_relative_paths_resolve_but_urls_and_builtins_do_not(tmp_path):
    (tmp_path / "mymodel").mkdir()
    config = load_config(
        write(
            tmp_path,
            "data:\n  questions: gs://b/q.jsonl\nmodel:\n  name_or_path: mymodel\n"
            "generators:\n  hf:\n    name_or_path: builtin:tiny-phi3\n"
            "train:\n  checkpoint_uri: ckpt\n",
        )
    )
    assert config.data.questions == "gs://b/q.jsonl" and config.model.name_or_path == str(tmp_path / "mymodel")
    assert config.generators.hf.name_or_path == "builtin:tiny-phi3" and config.train.checkpoint_uri == str(tmp_path / "ckpt")
    config = load_config(write(tmp_path, "data:\n  articles: a.jsonl\ntrain:\n  checkpoint_uri: gs://bucket/x\n"))
    assert config.train.checkpoint_uri == "gs://bucket/x"
    assert not c._is_relative_model_dir(tmp_path, "builtin:tiny-phi3") and not c._is_relative_model_dir(tmp_path, " ")
    assert not c._is_relative_model_dir(tmp_path, "hf://mymodel") and c._is_relative_model_dir(tmp_path, "./nothing")
    assert c._is_relative_model_dir(tmp_path, "mymodel") and not c._is_relative_model_dir(tmp_path, "org/absent")


def test_whole_error_reports_word_for_word(tmp_path):
    path = tmp_path / "run.yaml"
    assert error_of(tmp_path, "name: x\nepochz: 1\n") == (
        f"{path}: invalid run config\n  {path}: data: Field required\n  {path}:2: epochz: unknown key"
    )
    assert error_of(tmp_path, "data:\n  articles: a.jsonl\nname: [\n") == (
        f"{path}:4: not valid YAML: expected the node content, but found '<stream end>'"
    )
    assert error_of(tmp_path, '\ndata:\n  articles: a.jsonl\nname: "a\x07"\n').startswith(f"{path}:4: not valid YAML: control")
    assert error_of(tmp_path, "data:\n  articles: a.jsonl\n1: x\n").endswith(
        "1: a key must be a name (YAML read this one as a number, a boolean or null; quote it if it is meant)"
    )
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "dir.yaml")
    assert str(err.value) == f"{tmp_path / 'dir.yaml'}: cannot read config: Is a directory"


def test_duplicates_after_a_merge_key_are_still_found(tmp_path):
    text = error_of(tmp_path, "data:\n  <<: {articles: a.jsonl}\n  questions: q\n  questions: r\n")
    assert text == (
        f"{tmp_path / 'run.yaml'}:4: duplicate key 'questions' (first at line 3); YAML would keep only the last one: merge them"
    )


def test_shown_values_and_key_names_at_their_edges():
    assert c._show("x" * 59) == repr("x" * 59)[:57] + "..."  # 61 characters as repr: cut
    assert c._key_name("café") == "café"  # printable, if not ASCII: as written


def test_what_counts_as_a_model_directory_next_to_the_config(tmp_path):
    assert c._is_relative_model_dir(tmp_path, "/no/such/absolute/dir")  # a path, even before it exists
    (tmp_path / "builtin:tiny-phi3").mkdir()  # a folder named like a built-in never shadows it
    (tmp_path / "hf:" / "mymodel").mkdir(parents=True)  # nor one that reads like a URL
    assert not c._is_relative_model_dir(tmp_path, "builtin:tiny-phi3")
    assert not c._is_relative_model_dir(tmp_path, "hf://mymodel")
