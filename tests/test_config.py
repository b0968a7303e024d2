from pathlib import Path

import pytest

from ftloop.components.config import RunConfig, load_config
from ftloop.components.errors import ConfigError

from conftest import REPO


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
    assert (f"run.yaml:3: model: name_or_path: '{ref}' is not a local directory; as a hub id it needs model.revision "
            "pinned to a 40-character commit hash, got 'main'") in str(err.value)
    config = load_config(write(tmp_path, f"data:\n  articles: a.jsonl\nmodel:\n  name_or_path: {ref}\n  revision: {PIN}\n"))
    assert config.model.name_or_path == ref and config.model.revision == PIN


@pytest.mark.parametrize("ref", ["models/a/b", "gs://bucket/model", "my model", "org/a--b", "a/../b", "x.git", "''"])
def test_a_model_that_is_neither_a_path_nor_a_hub_id_is_refused_even_when_pinned(tmp_path, ref):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"data:\n  articles: a.jsonl\nmodel:\n  name_or_path: {ref}\n  revision: {PIN}\n"))
    assert "is neither a local directory nor a valid hub id ('name' or 'org/name')" in str(err.value)


def test_a_model_folder_next_to_the_config_is_a_local_directory(tmp_path):
    (tmp_path / "models" / "x").mkdir(parents=True)
    config = load_config(write(tmp_path, "data:\n  articles: a.jsonl\nmodel:\n  name_or_path: models/x\n"
                                         "generators:\n  hf:\n    name_or_path: models/x\n"))
    assert config.model.name_or_path == config.generators.hf.name_or_path == str(tmp_path / "models" / "x")
    assert config.model.revision is None


def test_the_hf_generator_model_follows_the_same_pin_rule(tmp_path):
    default = load_config(write(tmp_path, "data:\n  articles: a.jsonl\n")).generators.hf
    assert (default.name_or_path, default.revision) == ("microsoft/Phi-3-mini-4k-instruct", PIN)  # pinned for you
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "data:\n  articles: a.jsonl\ngenerators:\n  hf:\n    name_or_path: gpt2\n"))
    assert ("run.yaml:4: generators.hf: name_or_path: 'gpt2' is not a local directory; as a hub id it needs "
            "generators.hf.revision pinned to a 40-character commit hash, got None") in str(err.value)


def test_the_early_model_check_refuses_what_cannot_be_a_model_without_touching_the_network(tmp_path):
    from ftloop.components.errors import FtloopError
    from ftloop.components.finetune import check_model_ref

    with pytest.raises(FtloopError, match=r"^model.name_or_path: 'models/a/b' is neither a local directory nor a valid hub id"):
        check_model_ref("models/a/b")
    with pytest.raises(FtloopError, match=r"^generators.hf.name_or_path: .*/gone: no such model directory"):
        check_model_ref(str(tmp_path / "gone"), key="generators.hf.name_or_path")
    check_model_ref("microsoft/Phi-3-mini-4k-instruct")  # a hub id: loaded (and checked) where it is used


def test_a_local_run_checks_the_hf_generator_model_before_any_stage(tmp_path):
    from ftloop.components.errors import FtloopError
    from ftloop.pipelines.local import check_base_model

    (tmp_path / "a.jsonl").write_text("")
    config = load_config(write(tmp_path, "data:\n  articles: a.jsonl\nmodel:\n  name_or_path: builtin:tiny-phi3\n"
                                         "augment:\n  backend: hf\ngenerators:\n  hf:\n    name_or_path: ./no-model\n"))
    with pytest.raises(FtloopError, match=r"^generators.hf.name_or_path: .*/no-model: no such model directory"):
        check_base_model(config.with_model_path("microsoft/Phi-3-mini-4k-instruct"))
