import json
import subprocess
import sys

import pytest

from tasks.cli import STAGES


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tasks", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_states_defaults(stage):
    result = run_cli(stage, "--help")

    assert result.returncode == 0, result.stderr
    assert f"python -m tasks {stage}" in result.stdout
    assert "--artifact-root" in result.stdout
    assert "default" in result.stdout


def test_top_level_help_lists_every_stage():
    result = run_cli("--help")

    assert result.returncode == 0
    for stage in STAGES:
        assert stage in result.stdout


def test_unknown_stage_lists_valid_stages():
    result = run_cli("extract-clips")

    assert result.returncode == 2
    assert "unknown stage 'extract-clips'" in result.stderr
    assert "extract-clip" in result.stderr


def test_missing_metadata_source_names_path(tmp_path):
    missing = tmp_path / "no-such-file.tsv"
    result = run_cli("sync-metadata", "--artifact-root", str(tmp_path / "root"),
                     "--source", str(missing))

    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_artifact_root(tmp_path, sample_tsv):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("sync-metadata", "--artifact-root", str(blocker / "root"),
                     "--source", str(sample_tsv))

    assert result.returncode == 2
    assert "not writable" in result.stderr
    assert str(blocker / "root") in result.stderr


def test_invalid_option_value(tmp_path):
    result = run_cli("plan-shards", "--artifact-root", str(tmp_path), "--shard-size", "0")

    assert result.returncode == 2
    assert "--shard-size must be at least 1, got 0" in result.stderr


def test_summary_is_last_stdout_line(tmp_path, sample_tsv):
    result = run_cli("sync-metadata", "--artifact-root", str(tmp_path),
                     "--source", str(sample_tsv))

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["stage"] == "sync-metadata"
    assert summary["rows"] == 600


def test_missing_model_package_names_torch_image(monkeypatch, tmp_path, capsys):
    """A model stage where torch is not installed (the CPU image) exits 2 with a hint."""
    import tasks.clip
    from tasks.cli import main

    def run_without_torch(config):
        import torch  # noqa: F401

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(tasks.clip, "run", run_without_torch)

    status = main(["extract-clip", "--artifact-root", str(tmp_path), "--bucket", "0"])
    message = capsys.readouterr().err

    assert status == 2
    assert "needs torch" in message
    assert "clear-pipeline/tasks-torch" in message
