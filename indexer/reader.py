"""Reader: the dataset's records cut into fixed partitions.

Partition ``k`` always holds records ``k*size .. (k+1)*size-1`` of the
dataset's sorted listing, so a rerun recomputes exactly the same partitions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from data.readers import read_dataset
from data.records import DatasetListing, ImageRecord
from indexer.config import RunConfig


@dataclass(frozen=True)
class Partition:
    index: int
    records: tuple[ImageRecord, ...]

    @property
    def name(self) -> str:
        return partition_name(self.index)


def partition_name(index: int) -> str:
    return f"part-{index:05d}"


def read_listing(config: RunConfig) -> DatasetListing:
    listing = read_dataset(config.dataset_root, config.format, split=config.split)
    if config.limit is not None:
        listing = dataclasses.replace(listing, records=listing.records[: config.limit])
    return listing


def plan_partitions(records: tuple[ImageRecord, ...], partition_size: int) -> list[Partition]:
    return [
        Partition(index=i, records=records[start : start + partition_size])
        for i, start in enumerate(range(0, len(records), partition_size))
    ]
