"""LFW's pairs protocol (View 2 ``pairs.txt``, or View 1 ``pairsDevTest.txt``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from data.readers import DatasetError, lfw_pair_path


@dataclass(frozen=True)
class Pair:
    """Two LFW images and whether they show the same person."""

    name_a: str
    number_a: int
    name_b: str
    number_b: int
    same: bool

    @property
    def path_a(self) -> str:
        return lfw_pair_path(self.name_a, self.number_a)

    @property
    def path_b(self) -> str:
        return lfw_pair_path(self.name_b, self.number_b)


def read_pairs(path: str | os.PathLike[str]) -> list[list[Pair]]:
    """Parse a pairs file into folds.

    View 2: first line ``10 300``, then per fold 300 same-person lines
    (``Name n1 n2``) and 300 different-person lines (``Name1 n1 Name2 n2``).
    View 1 files (first line ``N``) give one fold.
    """
    with open(path, encoding="utf-8") as handle:
        lines = [line.split() for line in handle if line.strip()]
    if not lines:
        raise DatasetError(f"{path} is empty")
    header = lines[0]
    try:
        folds, per_side = (int(header[0]), int(header[1])) if len(header) == 2 else (1, int(header[0]))
    except ValueError as err:
        raise DatasetError(f"{path}: first line must be '<folds> <pairs>' or '<pairs>', got {' '.join(header)!r}") from err
    body = lines[1:]
    if len(body) != folds * per_side * 2:
        raise DatasetError(f"{path}: expected {folds * per_side * 2} pair lines, found {len(body)}")
    result: list[list[Pair]] = []
    for fold in range(folds):
        chunk = body[fold * 2 * per_side : (fold + 1) * 2 * per_side]
        pairs = []
        for parts in chunk:
            if len(parts) == 3:
                pairs.append(Pair(parts[0], int(parts[1]), parts[0], int(parts[2]), True))
            elif len(parts) == 4:
                pairs.append(Pair(parts[0], int(parts[1]), parts[2], int(parts[3]), False))
            else:
                raise DatasetError(f"{path}: bad pair line {' '.join(parts)!r}")
        result.append(pairs)
    return result
