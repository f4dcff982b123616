"""Shared fixtures: the tiny model and demo data are built once per test session, in a temporary folder."""

import os

import pytest

# Tests must never reach a hub: the models and data they use are built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tgdpo_ray.models import make_tiny_model

    return str(make_tiny_model(str(tmp_path_factory.mktemp("tiny-model"))))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from tgdpo_ray.models import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from tgdpo_ray.demo_data import write_demo_data

    return write_demo_data(str(tmp_path_factory.mktemp("demo-data")), train_pairs=384, test_pairs=32)
