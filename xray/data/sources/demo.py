"""``demo``: synthetic phantoms (not patients), generated into the run, so a fresh clone has data to train on."""

from __future__ import annotations

from xray.data.sources.base import Allowed, Place, Snapshot, Source
from xray.data.sources.folder import FolderFilms
from xray.entity.config_entity import IngestionConfig


class DemoSource(FolderFilms, Source):
    kind = "demo"
    noun = "demo"

    def names(self, uri: str) -> bool:
        return uri == "demo"

    def snapshot(self, uri: str, config: IngestionConfig, place: Place) -> Snapshot:
        from xray.data.demo_data import generate_demo_dataset

        root = place.stage_dir / "snapshot"
        generate_demo_dataset(root, images_per_class=config.demo_images_per_class)
        return Snapshot(root=root, copied=True)

    def confine(self, uri: str, allowed: Allowed) -> str | None:
        return uri
