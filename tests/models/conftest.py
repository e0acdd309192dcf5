from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.tiny_clip import image_folder, tiny_clip_folder


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "base", seed=0)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images") / "colours", per_class=5, seed=1)
