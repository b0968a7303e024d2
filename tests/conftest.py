"""Test settings for every layer; the shared fixtures live in tests/fixtures/ and load as plugins."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures.data", "tests.fixtures.ml"]
