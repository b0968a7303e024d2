import re
from pathlib import Path

import pytest

from ftloop.components.config import RunConfig, load_config
from ftloop.components.errors import ConfigError
from tests.fixtures.data import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "webbizz-gke.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert Path(config.data.articles).is_file()


def test_paths_resolve_relative_to_the_config_file(tmp_path):
    (tmp_path / "data").mkdir()
    config = load_config(write(tmp_path, "data:\n  articles: data/a.jsonl\n"))
    assert config.data.articles == str(tmp_path / "data" / "a.jsonl")


def test_unknown_top_level_key_is_named_with_its_line(tmp_path):
    path = write(tmp_path, "data:\n  articles: a.jsonl\nepochz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:3: epochz: unknown key" in str(err.value)


def test_unknown_nested_key_names_the_key_path(tmp_path):
    path = write(tmp_path, "data:\n  articles: a.jsonl\ntrain:\n  epochs: 2\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:5: train.learnin_rate: unknown key" in str(err.value)


@pytest.mark.parametrize(
    "snippet, key",
    [
        ("train:\n  learning_rate: -1\n", "train.learning_rate"),
        ("lora:\n  r: 0\n", "lora.r"),
        ("split:\n  train: 0.5\n  dev: 0.2\n  test: 0.2\n", "split"),
        ("name: Not_A_Valid_Name\n", "name"),
        ("generate:\n  backend: gpt-17\n", "generate.backend"),
    ],
)
def test_bad_values_name_the_key(tmp_path, snippet, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "data:\n  articles: a.jsonl\n" + snippet))
    assert f": {key}:" in str(err.value)


def test_exactly_one_data_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'articles' or 'questions'"):
        load_config(write(tmp_path, "data:\n  articles: a.jsonl\n  questions: q.csv\n"))
    with pytest.raises(ConfigError, match="data: Field required"):
        load_config(write(tmp_path, "seed: 1\n"))


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "data:\n  articles: [a.jsonl\n")
    with pytest.raises(ConfigError, match=f"{path}:\\d+: not valid YAML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_json_round_trip_is_lossless():
    config = load_config(REPO / "configs" / "webbizz-gke.yaml")
    assert RunConfig.from_json(config.to_json()) == config


PIN = "0a67737cc96d2554230f90338b163bc6380a2a85"


def test_the_gitops_run_config_loads():
    config = load_config(REPO / "manifests" / "gitops" / "retrain" / "run.yaml")
    assert config.model.revision == PIN and config.generators.hf.revision == PIN


@pytest.mark.parametrize("ref", ["gpt2", "mymodel", "models/x", "org/name", "microsoft/Phi-3-mini-4k-instruct"])
def test_a_hub_id_that_is_not_a_local_directory_must_be_pinned(tmp_path, ref):
    """Single-part ids too; and the message says why a folder name like models/x is read as a hub id."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"data:\n  articles: a.jsonl\nmodel:\n  name_or_path: {ref}\n  revision: main\n"))
    assert (
        f"run.yaml:3: model: name_or_path: '{ref}' is not a local directory; as a hub id it needs model.revision "
        "pinned to a 40-character commit hash, got 'main'"
    ) in str(err.value)
    config = load_config(write(tmp_path, f"data:\n  articles: a.jsonl\nmodel:\n  name_or_path: {ref}\n  revision: {PIN}\n"))
    assert config.model.name_or_path == ref and config.model.revision == PIN


@pytest.mark.parametrize("ref", ["models/a/b", "gs://bucket/model", "my model", "org/a--b", "a/../b", "x.git", "''"])
def test_a_model_that_is_neither_a_path_nor_a_hub_id_is_refused_even_when_pinned(tmp_path, ref):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"data:\n  articles: a.jsonl\nmodel:\n  name_or_path: {ref}\n  revision: {PIN}\n"))
    assert "is neither a local directory nor a valid hub id ('name' or 'org/name')" in str(err.value)


def test_a_model_folder_next_to_the_config_is_a_local_directory(tmp_path):
    (tmp_path / "models" / "x").mkdir(parents=True)
    config = load_config(
        write(tmp_path, "data:\n  articles: a.jsonl\nmodel:\n  name_or_path: models/x\ngenerators:\n  hf:\n    name_or_path: models/x\n")
    )
    assert config.model.name_or_path == config.generators.hf.name_or_path == str(tmp_path / "models" / "x")
    assert config.model.revision is None


def test_the_hf_generator_model_follows_the_same_pin_rule(tmp_path):
    default = load_config(write(tmp_path, "data:\n  articles: a.jsonl\n")).generators.hf
    assert (default.name_or_path, default.revision) == ("microsoft/Phi-3-mini-4k-instruct", PIN)  # pinned for you
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "data:\n  articles: a.jsonl\ngenerators:\n  hf:\n    name_or_path: gpt2\n"))
    assert (
        "run.yaml:4: generators.hf: name_or_path: 'gpt2' is not a local directory; as a hub id it needs "
        "generators.hf.revision pinned to a 40-character commit hash, got None"
    ) in str(err.value)


def test_the_early_model_check_refuses_what_cannot_be_a_model_without_touching_the_network(tmp_path):
    from ftloop.components.errors import FtloopError
    from ftloop.components.modeling.loading import check_model_ref

    with pytest.raises(FtloopError, match=r"^model.name_or_path: 'models/a/b' is neither a local directory nor a valid hub id"):
        check_model_ref("models/a/b")
    with pytest.raises(FtloopError, match=r"^generators.hf.name_or_path: .*/gone: no such model directory"):
        check_model_ref(str(tmp_path / "gone"), key="generators.hf.name_or_path")
    check_model_ref("microsoft/Phi-3-mini-4k-instruct")  # a hub id: loaded (and checked) where it is used


def test_a_local_run_checks_the_hf_generator_model_before_any_stage(tmp_path):
    from ftloop.components.errors import FtloopError
    from ftloop.pipelines.local import check_base_model

    (tmp_path / "a.jsonl").write_text("")
    config = load_config(
        write(
            tmp_path,
            "data:\n  articles: a.jsonl\nmodel:\n  name_or_path: builtin:tiny-phi3\n"
            "augment:\n  backend: hf\ngenerators:\n  hf:\n    name_or_path: ./no-model\n",
        )
    )
    with pytest.raises(FtloopError, match=r"^generators.hf.name_or_path: .*/no-model: no such model directory"):
        check_base_model(config.with_model_path("microsoft/Phi-3-mini-4k-instruct"))
    # augment.rounds 0: no round runs, so the augmentation backend's model is not needed
    off = config.model_copy(update={"augment": config.augment.model_copy(update={"rounds": 0})})
    check_base_model(off.with_model_path("microsoft/Phi-3-mini-4k-instruct"))


# ---------------------------------------------------------------- issue 16: values and YAML the schema used to let through

BASE = "data:\n  articles: a.jsonl\n"


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    return str(err.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("epochs", ".inf"),
        ("weight_decay", ".inf"),
        ("epochs", "-.inf"),
        ("learning_rate", ".nan"),
        ("epochs", "'inf'"),
        ("max_grad_norm", "1.0e400"),
    ],
)
def test_every_float_must_be_finite(tmp_path, key, value):
    message = config_error(tmp_path, BASE + f"train:\n  {key}: {value}\n")
    assert f"run.yaml:4: train.{key}: must be a finite number, got " in message


def test_nan_is_named_as_nan_not_as_out_of_range(tmp_path):
    message = config_error(tmp_path, BASE + "split:\n  train: .nan\n")
    assert "split.train: must be a finite number, got nan" in message and "less than" not in message


def test_the_json_round_trip_never_carries_infinity():
    with pytest.raises(Exception, match="finite number"):
        RunConfig.from_json('{"data": {"articles": "a.jsonl"}, "train": {"epochs": Infinity}}')


@pytest.mark.parametrize(
    "section, key, value, bound",
    [
        ("train", "epochs", "1000", "100"),
        ("lora", "r", "100000", "1024"),
        ("train", "max_length", "10000000", "131072"),
        ("generate", "questions_per_article", "100000000", "100"),
        ("train", "batch_size", "1000", "64"),
        ("augment", "rounds", "50", "5"),
        ("augment", "rephrasings_per_error", "1000", "50"),
        ("eval", "batch_size", "100000", "4096"),
        ("train", "weight_decay", "5", "1"),
    ],
)
def test_counts_have_sane_upper_bounds(tmp_path, section, key, value, bound):
    message = config_error(tmp_path, BASE + f"{section}:\n  {key}: {value}\n")
    assert f"run.yaml:4: {section}.{key}: must be at most {bound}, got {value}" in message


def test_augment_rounds_0_turns_augmentation_off_and_the_range_is_0_to_5(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    assert load_config(write(tmp_path, BASE + "augment:\n  rounds: 0\n")).augment.rounds == 0
    assert load_config(write(tmp_path, BASE + "augment:\n  rounds: 5\n")).augment.rounds == 5
    assert "run.yaml:4: augment.rounds: Input should be greater than or equal to 0" in config_error(
        tmp_path, BASE + "augment:\n  rounds: -1\n"
    )
    assert "run.yaml:4: augment.rounds: must be at most 5, got 6" in config_error(tmp_path, BASE + "augment:\n  rounds: 6\n")
    assert "0 turns augmentation off" in (RunConfig.model_fields["augment"].annotation.model_fields["rounds"].description or "")


def test_a_huge_questions_per_article_fails_fast(tmp_path):
    import time

    started = time.monotonic()
    config_error(tmp_path, BASE + "generate:\n  questions_per_article: 100000000\n")
    assert time.monotonic() - started < 5


def test_a_seed_past_numpys_range_is_refused(tmp_path):
    assert "seed: must be at most 4294967295, got 99999999999999999999999999" in config_error(
        tmp_path, BASE + "seed: 99999999999999999999999999\n"
    )
    assert "seed: must be at most 4294967295, got a 400-digit number" in config_error(tmp_path, BASE + f"seed: {'9' * 400}\n")


@pytest.mark.parametrize("value", ["yes", "true", "off"])
def test_a_boolean_is_not_a_number(tmp_path, value):
    message = config_error(tmp_path, BASE + f"train:\n  epochs: {value}\n")
    assert "train.epochs: must be a number, got " in message


def test_negative_zero_is_zero(tmp_path):
    config = load_config(write(tmp_path, BASE + "seed: -0\ntrain:\n  weight_decay: -0.0\n"))
    assert config.seed == 0 and config.train.weight_decay == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  epochs: 1\n" + BASE + "train:\n  epochs: 2\n", "run.yaml:5: duplicate key 'train' (first at line 1)"),
        ("seed: 1\n" + BASE + "seed: 2\n", "run.yaml:4: duplicate key 'seed' (first at line 1)"),
        (BASE + "train:\n  epochs: 1\n  epochs: 2\n", "run.yaml:5: duplicate key 'epochs' (first at line 4)"),
        ("data: {articles: a.jsonl, articles: b.jsonl}\n", "run.yaml:1: duplicate key 'articles' (first at line 1)"),
    ],
)
def test_duplicate_keys_are_refused_with_both_lines(tmp_path, text, expected):
    assert expected in config_error(tmp_path, text)


def test_a_merge_key_still_works_and_may_be_overridden(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    config = load_config(write(tmp_path, BASE + "eval: &e {batch_size: 4}\ntrain:\n  <<: *e\n  epochs: 3\n"))
    assert config.train.epochs == 3 and config.train.batch_size == 4 and config.eval.batch_size == 4


@pytest.mark.parametrize(
    "nested",
    ["[" * 20000 + "]" * 20000, "{a: " * 20000 + "1" + "}" * 20000, "\n".join("  " * (i + 1) + f"k{i}:" for i in range(200)) + " 1"],
)
def test_deep_nesting_is_a_one_line_error(tmp_path, nested):
    message = config_error(tmp_path, BASE + "format:\n  system_prompt:" + ("\n" if nested.startswith(" ") else " ") + nested + "\n")
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'run.yaml'))}:\d+: nested too deeply \(limit 50 levels\)", message)


def test_an_alias_bomb_fails_fast(tmp_path):
    import time

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    started = time.monotonic()
    message = config_error(tmp_path, "\n".join(lines) + "\ndata:\n  articles: a.jsonl\n  labels: *a9\n")
    assert "data.labels.0: Input should be a valid string" in message and time.monotonic() - started < 5


@pytest.mark.parametrize(
    "section, key, url, kind",
    [
        ("generators.openai", "base_url", "https://user:pass@llm.example.com/v1", "a user name or password"),
        ("generators.openai", "base_url", "http://token@llm.example.com/v1", "a user name or password"),
        ("generators.okareo", "base_url", "https://api.okareo.com/?api_key=s3cr3t", "a secret in its query (api_key=...)"),
        ("train", "checkpoint_uri", "gs://me:s3cr3t@bucket/ckpt", "a user name or password"),
        ("cluster", "kfp_host", "https://me:s3cr3t@kfp.example.com", "a user name or password"),
        ("cluster", "pipeline_root", "gs://bucket/root?token=s3cr3t", "a secret in its query (token=...)"),
        ("data", "articles", "https://me:s3cr3t@example.com/a.jsonl", "a user name or password"),
    ],
)
def test_credentials_in_a_url_are_refused_without_echoing_them(tmp_path, section, key, url, kind):
    *outer, inner = section.split(".")
    text = "name: x\n" if section == "data" else BASE
    indent = ""
    for part in [*outer, inner]:
        text += f"{indent}{part}:\n"
        indent += "  "
    message = config_error(tmp_path, text + f"{indent}{key}: {url}\n")
    assert f"{section}.{key}: the URL contains {kind}" in message and "api_key_env" in message
    assert "s3cr3t" not in message and "pass@" not in message


def test_a_url_without_credentials_is_fine(tmp_path):
    config = load_config(write(tmp_path, BASE + "generators:\n  openai:\n    base_url: http://vllm.ns.svc:8000/v1?model=x\n"))
    assert config.generators.openai.base_url.startswith("http://vllm")


def test_invisible_characters_in_a_key_are_shown(tmp_path):
    message = config_error(tmp_path, BASE + "\ufefftrain:\n  epochs: 1\n")
    assert "run.yaml:3: \\ufefftrain: unknown key (it contains the invisible character U+FEFF; delete it)" in message


@pytest.mark.parametrize("key", ["1", "true", "~"])
def test_a_key_that_is_not_a_name(tmp_path, key):
    assert ": a key must be a name" in config_error(tmp_path, BASE + f"{key}: x\n")


@pytest.mark.parametrize("char, line", [("\x00", 2), ("\x01", 2), ("\x7f", 2)])
def test_control_characters_are_named_with_their_line(tmp_path, char, line):
    path = tmp_path / "run.yaml"
    path.write_bytes(f"data:\n  articles: a{char}.jsonl\n".encode())
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and "\n" not in str(err.value)


def test_a_huge_system_prompt_is_refused(tmp_path):
    assert "format.system_prompt: must be at most 20000 characters, got 5000000" in config_error(
        tmp_path, BASE + "format:\n  system_prompt: " + "a" * 5_000_000 + "\n"
    )
