"""MovieLens reader (ml-100k or ml-1m layout) turning the files into fmstream messages.

The project never ships MovieLens (its licence forbids redistribution): point it at a folder
holding ``u.data``/``u.user``/``u.item`` (100k) or ``ratings.dat``/``users.dat``/``movies.dat``
(1m).
A rating >= ``positive_from`` becomes a click (label 1); lower ratings are explicit negatives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ML100K_GENRES = (
    "unknown Action Adventure Animation Children Comedy Crime Documentary Drama Fantasy "
    "Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western"
).split()


class MovieLensError(FileNotFoundError):
    """The folder does not hold a MovieLens 100k or 1m data set."""


@dataclass
class MovieLens:
    """Ratings (chronological), user and item profiles, and titles of one MovieLens data set."""

    ratings: np.ndarray  # structured: user (U16), item (U16), rating (i1), ts (f8)
    users: dict[str, dict] = field(default_factory=dict)
    items: dict[str, dict] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)

    def events(self, positive_from: int = 4) -> Iterator[dict]:
        """``fm.events`` messages in time order (label 1 when rating >= ``positive_from``)."""
        for row in self.ratings:
            yield {
                "user_id": str(row["user"]),
                "item_id": str(row["item"]),
                "label": int(row["rating"] >= positive_from),
                "ts": float(row["ts"]),
            }

    def user_profiles(self) -> Iterator[dict]:
        for uid, feats in self.users.items():
            yield {"user_id": uid, "features": feats}

    def item_profiles(self) -> Iterator[dict]:
        for iid, feats in self.items.items():
            yield {"item_id": iid, "features": feats}


def _year(text: str) -> int | None:
    text = text.strip()
    return int(text[-4:]) if len(text) >= 4 and text[-4:].isdigit() else None


def load_movielens(path: str | Path) -> MovieLens:
    """Read ml-100k or ml-1m from ``path``; raises :class:`MovieLensError` if neither is there."""
    root = Path(path)
    if (root / "u.data").exists():
        return _load_100k(root)
    if (root / "ratings.dat").exists():
        return _load_1m(root)
    raise MovieLensError(
        f"{root} holds neither ml-100k (u.data) nor ml-1m (ratings.dat); "
        "download MovieLens from grouplens.org and pass its folder"
    )


def _sorted_ratings(rows: list[tuple[str, str, int, float]]) -> np.ndarray:
    arr = np.array(rows, dtype=[("user", "U16"), ("item", "U16"), ("rating", "i1"), ("ts", "f8")])
    return arr[np.argsort(arr["ts"], kind="stable")]


def _load_100k(root: Path) -> MovieLens:
    rows = []
    for line in (root / "u.data").read_text().splitlines():
        u, i, r, t = line.split("\t")
        rows.append((u, i, int(r), float(t)))
    ml = MovieLens(_sorted_ratings(rows))
    for line in (root / "u.user").read_text().splitlines():
        uid, age, gender, occupation, zipcode = line.split("|")
        ml.users[uid] = {
            "age": int(age), "gender": gender, "occupation": occupation, "zip": zipcode[:2]
        }
    for line in (root / "u.item").read_text(encoding="latin-1").splitlines():
        parts = line.split("|")
        iid, title, released = parts[0], parts[1], parts[2]
        genres = [g for g, flag in zip(ML100K_GENRES, parts[5:24], strict=False) if flag == "1"]
        feats: dict = {"genres": genres}
        if (year := _year(released)) is not None:
            feats["year"] = year
        ml.items[iid] = feats
        ml.titles[iid] = title
    return ml


def _load_1m(root: Path) -> MovieLens:
    rows = []
    for line in (root / "ratings.dat").read_text().splitlines():
        u, i, r, t = line.split("::")
        rows.append((u, i, int(r), float(t)))
    ml = MovieLens(_sorted_ratings(rows))
    for line in (root / "users.dat").read_text().splitlines():
        uid, gender, age, occupation, zipcode = line.split("::")
        ml.users[uid] = {
            "age": int(age), "gender": gender, "occupation": occupation, "zip": zipcode[:2]
        }
    for line in (root / "movies.dat").read_text(encoding="latin-1").splitlines():
        iid, title, genres = line.split("::")
        feats: dict = {"genres": genres.split("|")}
        if (year := _year(title.rstrip(")").rstrip())) is not None:
            feats["year"] = year
        ml.items[iid] = feats
        ml.titles[iid] = title
    return ml
