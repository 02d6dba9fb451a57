"""One registry of data sources: which source reads a URI, what the service may read, and how both are worded."""

from __future__ import annotations

from pathlib import Path

import pytest

from xray.data.sources import registry
from xray.data.sources.base import Allowed, Place
from xray.data.sources.local import ROOTS
from xray.data.sources.s3_source import BUCKETS
from xray.entity.config_entity import IngestionConfig
from xray.errors import DataError

from .data_builders import class_folder, npz_file


def allowed(tmp_path: Path, roots: tuple[Path, ...] = (), buckets: tuple[str, ...] = ()) -> Allowed:
    lists = {ROOTS.env: tuple(str(r) for r in roots), BUCKETS.env: buckets}
    return Allowed(workdir=tmp_path, artifacts_dir=tmp_path / "artifacts", lists=lists)


def test_each_uri_goes_to_its_source(tmp_path: Path) -> None:
    folder = class_folder(tmp_path / "data", {"a": 2, "b": 2})
    archive = npz_file(tmp_path / "d.npz")
    kinds = {uri: registry.source_for(str(uri)).kind for uri in ("demo", folder, archive, "s3://bucket/prefix")}
    assert list(kinds.values()) == ["demo", "folder", "npz", "s3"]
    with pytest.raises(DataError, match="data source not found"):
        registry.source_for(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="data source not found"):
        registry.source_for("http://example.com/data")


def test_a_file_that_is_not_an_npz_is_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("x")
    source = registry.source_for(str(text))
    with pytest.raises(DataError, match="is a file but not an .npz archive"):
        source.snapshot(str(text), IngestionConfig(), Place(tmp_path, tmp_path))


def test_every_kind_is_known_once_and_read_back_by_name() -> None:
    kinds = [s.kind for s in registry.SOURCES]
    assert len(set(kinds)) == len(kinds)
    assert all(registry.source_named(k).kind == k for k in kinds)
    with pytest.raises(DataError, match="unknown data source kind 'tape'"):
        registry.source_named("tape")


def test_the_wording_comes_from_the_registry() -> None:
    assert registry.spelled() == "demo, a folder, a manifest of sources (.yaml), an .npz file, or s3://bucket/prefix"
    assert registry.outside() == (
        "data is outside the data this service may read "
        "(the folders in XRAY_DATA_ROOTS, the buckets in XRAY_DATA_BUCKETS, or 'demo')"
    )
    assert registry.served() == (
        "demo, a folder or an .npz file under the server's XRAY_DATA_ROOTS, or s3://bucket/prefix in XRAY_DATA_BUCKETS"
    )
    assert registry.allowlists() == (ROOTS, BUCKETS)


def test_the_service_reads_only_what_the_allowlists_name(tmp_path: Path) -> None:
    folder = class_folder(tmp_path / "data" / "set", {"a": 2, "b": 2})
    archive = npz_file(tmp_path / "data" / "d.npz")
    (tmp_path / "data" / "notes.txt").write_text("x")
    policy = allowed(tmp_path, roots=(tmp_path / "data",), buckets=("ok-bucket",))
    assert registry.confine("demo", policy) == "demo"
    assert registry.confine("data/set", policy) == str(folder.resolve())
    assert registry.confine(str(archive), policy) == str(archive.resolve())
    assert registry.confine("s3://ok-bucket/x", policy) == "s3://ok-bucket/x"
    assert registry.confine("s3://other/x", policy) is None
    assert registry.confine(str(tmp_path / "elsewhere"), policy) is None  # outside: not told whether it exists
    with pytest.raises(DataError, match="must be a folder or an .npz file"):
        registry.confine("data/notes.txt", policy)
    with pytest.raises(DataError, match="does not exist on the server"):
        registry.confine("data/missing", policy)
    with pytest.raises(DataError, match="unsupported data URI 'http://x/y': use demo, a folder"):
        registry.confine("http://x/y", policy)
    with pytest.raises(DataError, match="invalid S3 bucket name"):
        registry.confine("s3://bad_bucket!/x", policy)


def test_another_runs_snapshot_is_never_training_data(tmp_path: Path) -> None:
    snapshot = class_folder(tmp_path / "artifacts" / "run" / "snapshot", {"a": 2, "b": 2})
    assert registry.confine(str(snapshot), allowed(tmp_path, roots=(tmp_path,))) is None


def test_the_training_service_does_not_read_a_manifest(tmp_path: Path) -> None:
    """A manifest's entries could name folders outside the data roots, so a service run is refused one."""
    from xray.data.sources.base import Allowed

    manifest = tmp_path / "sources.yaml"
    manifest.write_text("- {uri: .}\n")
    allowed = Allowed(workdir=tmp_path, artifacts_dir=tmp_path / "artifacts", lists={ROOTS.env: (str(tmp_path),)})
    with pytest.raises(DataError, match="must be a folder or an .npz file"):
        registry.confine(str(manifest), allowed)
    assert "manifest" not in registry.served()
