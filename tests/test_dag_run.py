"""A real `airflow dags test` run of the whole pipeline on the embedded sample."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.storage import ArtifactStore

REPOSITORY = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def airflow(args, env, timeout=120):
    return subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPOSITORY)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    root = tmp_path_factory.mktemp("dag-run") / "artifacts"
    env = {**os.environ, "AIRFLOW_HOME": str(home), "CLEAR_ARTIFACT_ROOT": str(root),
           "CLEAR_RUNTIME": "local", "PYTHON": sys.executable,
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    for args in (["db", "migrate"], ["pools", "set", "clear_gpu", "1", "GPU slots"]):
        result = airflow(args, env)
        assert result.returncode == 0, result.stderr[-3000:]
    result = run_pipeline(env, home / "dags-test.log")
    return result, root, env, home


def run_pipeline(env, log):
    # Each call starts the sample mirror on a new port, as a second `make run` would.
    result = subprocess.run(
        [str(REPOSITORY / "scripts" / "with-sample-mirror.sh"), str(BIN / "airflow"), "dags",
         "test", "clear_pipeline"],
        env=env, capture_output=True, text=True, timeout=1500, cwd=REPOSITORY,
    )
    log.write_text(result.stdout + result.stderr)
    return result


def test_dag_run_succeeds(pipeline_run):
    result, *_ = pipeline_run
    output = result.stdout + result.stderr

    assert result.returncode == 0, output[-5000:]
    assert "failed" not in [line.split()[-1] for line in output.splitlines() if
                            "state=" in line and line.split()]


def test_dag_run_writes_every_stage_output(pipeline_run):
    _, root, *_ = pipeline_run
    report = subprocess.run([sys.executable, "-m", "tasks.report", "--artifact-root",
                             str(root), "--check"], capture_output=True, text=True)

    assert report.returncode == 0, report.stdout + report.stderr
    assert "Labeled images per bucket and class" in report.stdout


def test_dag_run_dataset_layout(pipeline_run):
    _, root, *_ = pipeline_run
    store = ArtifactStore(str(root))
    datasets = {key.split("/")[1] for key in store.list("datasets/")}

    assert len(datasets) == 1
    name = datasets.pop()
    keys = store.list(f"datasets/{name}/")
    assert f"datasets/{name}/class_names.txt" in keys
    assert any(key.startswith(f"datasets/{name}/labeled_images/") for key in keys)
    assert any(key.startswith(f"datasets/{name}/filelists/") for key in keys)
    assert any("/features/" in key for key in keys)
    assert store.list("models/moco/")


def test_second_dag_run_changes_nothing(pipeline_run):
    _, root, env, home = pipeline_run
    outputs = [path for pattern in ("images/*.tar", "features/*/*/*/chunk-*.npz",
                                    "models/moco/*/checkpoint_*.pth.tar",
                                    "datasets/*/labeled_images/*/*/*")
               for path in root.glob(pattern)]
    before = {path: path.stat().st_mtime_ns for path in outputs}

    result = run_pipeline(env, home / "dags-test-second.log")

    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert before
    assert {path: path.stat().st_mtime_ns for path in outputs} == before
