import pytest

from tasks.errors import StageError
from tasks.storage import ArtifactStore, open_input


@pytest.fixture(params=["local", "s3"])
def store(request, artifact_root):
    if request.param == "local":
        return ArtifactStore(artifact_root)
    return ArtifactStore(request.getfixturevalue("s3_root"))


def test_write_read_list_delete(store):
    store.write_bytes("a/one.bin", b"1")
    store.write_json("a/two.json", {"x": 2})
    store.write_text("b/three.txt", "3")

    assert store.read_bytes("a/one.bin") == b"1"
    assert store.read_json("a/two.json") == {"x": 2}
    assert store.list("a/") == ["a/one.bin", "a/two.json"]
    assert store.exists("b/three.txt")
    store.delete_prefix("a/")
    assert store.list("a/") == []
    assert not store.exists("a/one.bin")


def test_staged_file_published_only_on_success(store):
    with store.staged_file("out/ok.txt") as path:
        path.write_text("done")
    with pytest.raises(RuntimeError), store.staged_file("out/failed.txt") as path:
        path.write_text("partial")
        raise RuntimeError("stage crashed")

    assert store.read_text("out/ok.txt") == "done"
    assert not store.exists("out/failed.txt")


def test_local_copy_and_missing_key(store):
    store.write_bytes("x/data.bin", b"abc")
    with store.local_copy("x/data.bin") as path:
        assert path.read_bytes() == b"abc"
    with pytest.raises(StageError, match="missing artifact"):
        store.read_bytes("x/absent.bin")


def test_local_write_leaves_no_temporary_files(artifact_root):
    store = ArtifactStore(artifact_root)
    store.write_bytes("k/v.bin", b"v" * 1000)
    store.write_bytes("k/v.bin", b"w")

    assert store.list("k/") == ["k/v.bin"]
    assert store.read_bytes("k/v.bin") == b"w"


def test_unwritable_root_names_the_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = ArtifactStore(str(blocker / "root"))

    with pytest.raises(StageError, match="not writable"):
        store.ensure_writable()


def test_s3_root_with_wrong_credentials_fails_clearly(s3_root, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StageError, match="not writable"):
        ArtifactStore(s3_root).ensure_writable()


def test_open_input_missing_file(tmp_path):
    with pytest.raises(StageError, match="not found"), open_input(str(tmp_path / "nope.tsv")):
        pass


def test_unsupported_scheme():
    with pytest.raises(StageError, match="unsupported URI scheme"):
        ArtifactStore("gs://bucket/prefix")


def test_empty_root_is_rejected():
    with pytest.raises(StageError, match="artifact root is empty"):
        ArtifactStore("")


def test_truncated_json_names_the_file(artifact_root):
    store = ArtifactStore(artifact_root)
    store.write_bytes("x/plan.json", b'{"shards": [')

    with pytest.raises(StageError, match="plan.json is not valid JSON"):
        store.read_json("x/plan.json")


def test_folder_as_input_file(tmp_path):
    with pytest.raises(StageError, match="is a folder"), open_input(str(tmp_path)):
        pass
