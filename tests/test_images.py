"""Static checks of the Dockerfiles under images/."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPOSITORY / "images").glob("*/Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_every_image_has_a_dockerfile():
    assert {path.parent.name for path in DOCKERFILES} == {"tasks-cpu", "tasks-torch", "airflow"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_hadolint_finds_nothing(dockerfile):
    result = subprocess.run([str(HADOLINT), "--failure-threshold", "warning", str(dockerfile)],
                            capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_image_base_and_user(dockerfile):
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)

    assert bases and all(base == "python:3.11-slim-bookworm" for base in bases)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "org.opencontainers.image.version" in text


@pytest.mark.parametrize("image", ["cpu", "torch", "airflow"])
def test_image_locks_follow_the_main_lock(image):
    """Every pin of an image lock that the main lock also pins has the same version."""
    def pins(path):
        lines = (REPOSITORY / "requirements" / path).read_text().splitlines()
        pairs = (line.split("==") for line in lines if "==" in line)
        return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pairs}

    main, subset = pins("lock.txt"), pins(f"{image}-lock.txt")
    differing = {name: (version, main[name]) for name, version in subset.items()
                 if name in main and main[name] != version}

    assert differing == {}
    assert "torch" not in subset or image == "torch"
