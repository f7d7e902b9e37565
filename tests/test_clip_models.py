"""Model loading: CLEAR's names, the tiny test model and prompt embeddings."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest

from tasks import clip_models
from tasks.errors import ConfigError

from builders import tiny_clip_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return tiny_clip_checkpoint(tmp_path_factory.getbasetemp() / "models")


@pytest.mark.parametrize(("clear_name", "open_clip_name"), [
    ("RN50", "RN50"), ("RN101", "RN101"), ("RN50x4", "RN50x4"), ("ViT-B/32", "ViT-B-32")])
def test_clear_names_map_to_open_clip(clear_name, open_clip_name):
    assert clip_models.resolve_model_name(clear_name) == open_clip_name


def test_clear_names_default_to_openai():
    assert clip_models.resolve_weights("ViT-B/32", None, None) == ("openai", None)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as error:
        clip_models.resolve_model_name("ViT-B/99")
    for name in ("RN50", "RN101", "RN50x4", "ViT-B/32", "clear-tiny"):
        assert name in str(error.value)


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(ConfigError, match="openai"):
        clip_models.resolve_weights("RN50", "no-such-tag", None)


def test_tiny_model_requires_checkpoint():
    with pytest.raises(ConfigError, match="write-tiny-checkpoint"):
        clip_models.resolve_weights("clear-tiny", None, None)


def test_missing_checkpoint_file_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        clip_models.load_clip("clear-tiny", checkpoint=str(tmp_path / "absent.pt"))


@pytest.mark.parametrize("content", [b"", b"\x80\x02not a pickle" * 40, b"PK\x03\x04broken zip"])
def test_unreadable_checkpoint_one_line_error(tmp_path, content):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(content)

    with pytest.raises(ConfigError, match="cannot load checkpoint") as error:
        clip_models.load_clip("clear-tiny", checkpoint=str(garbage))

    assert str(garbage) in str(error.value)
    assert "\n" not in str(error.value)


def test_folder_checkpoint_rejected(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        clip_models.load_clip("clear-tiny", checkpoint=str(tmp_path))


def test_tiny_checkpoint_is_deterministic(tmp_path, tiny_checkpoint):
    again = clip_models.write_tiny_checkpoint(tmp_path / "again.pt")
    assert again == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()


def test_tiny_model_loads_with_warning(tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.clip_models"):
        loaded = clip_models.load_clip("clear-tiny", checkpoint=str(tiny_checkpoint))
    assert "no semantic meaning" in caplog.text
    assert loaded.embed_dim == 64
    assert loaded.image_size == 32
    assert loaded.checkpoint_sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()


def test_embed_prompts_normalized_and_ensembled(tiny_checkpoint):
    loaded = clip_models.load_clip("clear-tiny", checkpoint=str(tiny_checkpoint))
    concepts = ["bus", "laptop"]
    plain = clip_models.embed_prompts(loaded.model, loaded.tokenizer, concepts)
    assert plain.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(plain, axis=1), 1.0, atol=1e-5)

    templates = ["a photo of a {}.", "{}"]
    ensembled = clip_models.embed_prompts(loaded.model, loaded.tokenizer, concepts, templates)
    single = clip_models.embed_prompts(loaded.model, loaded.tokenizer,
                                       ["a photo of a bus."])[0]
    expected = single + plain[0]
    np.testing.assert_allclose(ensembled[0], expected / np.linalg.norm(expected), atol=1e-5)
