"""``s3://bucket/prefix``: mirrored incrementally (xray/data/sources/s3.py), then hard-linked into the run
so the snapshot cannot change under it.

The mirror module (boto3) is imported where it is used, so the registry stays cheap to import.
"""

from __future__ import annotations

from xray.data.sources.base import Allowed, Allowlist, Place, Snapshot, Source
from xray.data.sources.folder import FolderFilms
from xray.entity.artifact_entity import SourceObject
from xray.entity.config_entity import IngestionConfig
from xray.errors import DataError, SourceError

BUCKETS = Allowlist(env="XRAY_DATA_BUCKETS", what="the buckets in XRAY_DATA_BUCKETS", where="in XRAY_DATA_BUCKETS")


class S3Source(FolderFilms, Source):
    kind = "s3"
    noun = "s3://bucket/prefix"
    allowlist = BUCKETS

    def names(self, uri: str) -> bool:
        return uri.startswith("s3://")

    def snapshot(self, uri: str, config: IngestionConfig, place: Place) -> Snapshot:
        from xray.data.sources.s3 import S3Settings, link_into, mirror_dir_for, sync_prefix

        settings = S3Settings.from_config(config.s3)
        mirror = mirror_dir_for(place.artifacts_root / ".s3-mirror", uri, settings)
        records = sync_prefix(uri, mirror, settings)
        snapshot = place.stage_dir / "snapshot"
        link_into(mirror, snapshot, records)
        objects = tuple(SourceObject(key=r.key, size=r.size, etag=r.etag, sha256=r.sha256) for r in records)
        return Snapshot(root=snapshot, copied=True, objects=objects)

    def confine(self, uri: str, allowed: Allowed) -> str | None:
        from xray.data.sources.s3 import parse_s3_uri

        try:
            bucket, _ = parse_s3_uri(uri)
        except SourceError as exc:
            raise DataError(str(exc)) from None
        return uri if bucket in allowed.lists.get(BUCKETS.env, ()) else None
