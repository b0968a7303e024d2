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
