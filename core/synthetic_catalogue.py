"""The synthetic data's scales and its catalogue: categories, items and shops drawn for one scale.

:mod:`core.synthetic` simulates the monthly sales of this catalogue and writes the competition files; the
scale specs live here so both modules can name them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from core.config import DEFAULT_SHOP_MERGE_MAP

Scale = Literal["tiny", "demo", "full"]


@dataclass(frozen=True)
class ScaleSpec:
    """Sizes and demand levels of one synthetic data set."""

    name: str
    shop_ids: tuple[int, ...]
    """Every shop id in shops.csv, duplicates included (ids need not be contiguous, as in real slices)."""
    n_items: int
    n_categories: int
    n_months: int
    """Months written to sales_train.csv (0..n_months-1); the forecast month is n_months."""
    duplicate_pairs: tuple[tuple[int, int], ...]
    """(duplicate id, canonical id): the duplicate sells the first few months, then the canonical id."""
    n_closing_shops: int
    """Shops that close before the forecast month."""
    n_late_shops: int
    """Shops that open after month 0."""
    forecast_items: int | None
    """Exact number of items sold in the forecast month (test.csv's items); None: as simulated."""
    base_rate: float
    """Overall demand level: expected monthly units of an average (shop, item) pair at its floor."""
    mean_lifetime: float
    """Mean months an ordinary item stays on sale."""
    staple_share: float = 0.12
    """Share of items that never go out of sale (bags, gift cards, evergreen titles)."""
    preexisting_share: float = 0.35
    """Share of items already on sale before month 0."""
    zipf_exponent: float = 1.0
    carry_share: float = 0.75
    """Share of (shop, item) pairs the average shop stocks at all."""
    n_outliers: tuple[int, int, int] = (1, 1, 1)
    """Rows planted with (a huge price, a price of -1, a daily count over 1000)."""
    returns_rate: float = 0.0025
    """Share of daily rows that are returns (negative counts)."""

    @property
    def n_shops(self) -> int:
        return len(self.shop_ids)

    @property
    def forecast_month(self) -> int:
        return self.n_months


def _pairs(*dups: int) -> tuple[tuple[int, int], ...]:
    return tuple((d, DEFAULT_SHOP_MERGE_MAP[d]) for d in dups)


SCALES: dict[str, ScaleSpec] = {
    # Tests: one December, two duplicate shops, one late and one closing shop; a few thousand rows.
    "tiny": ScaleSpec(
        name="tiny",
        shop_ids=(0, 10, 11, 25, 28, 31, 46, 57),
        n_items=60,
        n_categories=6,
        n_months=16,
        duplicate_pairs=_pairs(0, 10),
        n_closing_shops=1,
        n_late_shops=1,
        forecast_items=None,
        base_rate=1.2,
        mean_lifetime=8.0,
        staple_share=0.3,
        carry_share=0.9,
        zipf_exponent=0.8,
    ),
    # `make run`: a monthly grid of ~10-15k (shop, item) pairs, ~200k rows over months 0..33.
    "demo": ScaleSpec(
        name="demo",
        shop_ids=(0, 1, 2, 6, 10, 11, 15, 18, 22, 25, 28, 31, 37, 39, 40, 42, 46, 52, 57, 58),
        n_items=1500,
        n_categories=30,
        n_months=34,
        duplicate_pairs=_pairs(0, 1, 10, 39),
        n_closing_shops=2,
        n_late_shops=2,
        forecast_items=None,
        base_rate=0.5,
        mean_lifetime=16.0,
        staple_share=0.4,
        preexisting_share=0.4,
        zipf_exponent=0.75,
    ),
    # Competition size: 60 shops, 22 170 items, 84 categories, ~2.9 M rows, test = 42 shops x 5 100 items.
    "full": ScaleSpec(
        name="full",
        shop_ids=tuple(range(60)),
        n_items=22170,
        n_categories=84,
        n_months=34,
        duplicate_pairs=_pairs(0, 1, 10, 39),
        n_closing_shops=14,
        n_late_shops=6,
        forecast_items=5100,
        base_rate=0.222,
        mean_lifetime=9.0,
        zipf_exponent=0.75,
    ),
}


# --- vocabulary ---------------------------------------------------------------------------------

# (group, sub-types, median price, December multiplier, launch spike, decay months, weight of items)
_GROUPS: tuple[tuple[str, tuple[str, ...], float, float, float, float, float], ...] = (
    ("Games", ("PS3", "PS4", "XBOX 360", "XBOX ONE", "PC - Standard editions", "PSVita", "PSP"),
     1500.0, 1.6, 7.0, 1.0, 3.0),
    ("Movies", ("DVD", "Blu-Ray", "Blu-Ray 3D", "Collector's editions", "Blu-Ray 4K"), 350.0, 1.4, 3.0, 1.5, 4.0),
    ("Music", ("CD local production", "CD brand production", "Vinyl", "MP3", "Music video", "Gift edition"),
     300.0, 1.35, 2.5, 2.0, 2.5),
    ("Books", ("Artbooks, encyclopedias", "Audiobooks", "Comics, manga", "Educational", "Guides", "Fiction"),
     400.0, 1.4, 2.0, 3.0, 2.0),
    ("Gifts", ("Board games", "Soft toys", "Figurines", "Bags, albums, mouse pads", "Souvenirs", "Gadgets"),
     600.0, 1.9, 1.5, 3.0, 2.0),
    ("Accessories", ("PS3", "PS4", "XBOX 360", "XBOX ONE", "PSVita"), 2200.0, 1.5, 2.0, 3.0, 0.6),
    ("Game consoles", ("PS3", "PS4", "XBOX 360", "XBOX ONE", "PSVita"), 14000.0, 1.8, 3.0, 3.0, 0.2),
    ("Programs", ("For home and office", "Educational", "1C:Enterprise 8", "MAC"), 1200.0, 1.2, 2.0, 3.0, 0.8),
    ("Payment cards", ("PSN", "Xbox Live", "Windows", "Cinema, music, games"), 700.0, 1.3, 1.0, 6.0, 0.1),
    ("Clean media", ("spire", "piece"), 40.0, 1.1, 0.5, 6.0, 0.1),
)
_EDITIONS = ("", " (Digital)", " - Collector's edition", " - Import")

_CITIES = ("Yakutsk", "Adygea", "Balashikha", "Volzhsky", "Vologda", "Voronezh", "Zhukovsky", "Kazan",
           "Kaluga", "Kolomna", "Krasnoyarsk", "Kursk", "Moscow", "Mytishchi", "N.Novgorod", "Novosibirsk",
           "Omsk", "Rostov-on-Don", "St. Petersburg", "Samara", "Sergiev Posad", "Surgut", "Tomsk", "Tyumen",
           "Ufa", "Khimki", "Chekhov", "Yaroslavl")
_MALLS = ("Central", "Mega", "Galaxy", "Aviapark", "Semenovsky", "Europe", "Atrium", "Raduga", "Parus",
          "Gorizont", "Rio", "Kristall", "Park House", "Festival", "Piterland", "Gallery")
_MALL_KINDS = ("TC", "TRC", "SEC", "TK", "MTRC", "Mall")
_WORDS_A = ("Dark", "Last", "Great", "Little", "Silent", "Lost", "Red", "Golden", "Wild", "Secret", "Ancient",
            "Final", "Broken", "Crystal", "Iron", "Northern", "Eternal", "Hidden", "Black", "Bright")
_WORDS_B = ("Kingdom", "Journey", "Legend", "Station", "River", "Empire", "Garden", "Machine", "Winter",
            "Symphony", "Hunter", "Dragon", "Planet", "Shadow", "City", "Island", "Heart", "Storm", "Road", "Star")
_SUFFIXES = ("", "", "", " (BD)", " [PC, Digital version]", " (region)", ", part 2", ": Special edition",
             ' "Deluxe"', " (2CD)", " [PS3, Russian version]", " (mp3-CD) (Jewel)")


# --- pricing -----------------------------------------------------------------------------------

def nice_price(price: np.ndarray, ending: np.ndarray) -> np.ndarray:
    """Round to shop-shelf prices (299, 349, 990, 1499 …); ``ending`` is each item's habit (1, 10 or 0 off)."""
    price = np.maximum(price, 10.0)
    step = np.where(price < 100, 10.0, np.where(price < 1000, 50.0, 100.0))
    base = np.ceil(price / step) * step
    return np.maximum(base - np.minimum(ending, base / 10), 1.0)


# --- the catalogue ------------------------------------------------------------------------------

def draw_categories(spec: ScaleSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Category names and demand parameters (price level, December lift, launch spike and decay, trend)."""
    # Round-robin over groups so that even a handful of categories spans games, movies, gifts ...
    order: list[tuple[int, str]] = []
    depth = max(len(g[1]) for g in _GROUPS)
    for edition in _EDITIONS:
        for k in range(depth):
            for gi, group in enumerate(_GROUPS):
                if k < len(group[1]):
                    order.append((gi, f"{group[0]} - {group[1][k]}{edition}"))
    if spec.n_categories > len(order):
        raise ValueError(f"at most {len(order)} categories are supported")
    chosen = order[: spec.n_categories]
    group = np.array([g for g, _ in chosen])
    names = np.array([n for _, n in chosen], dtype=object)
    params = np.array([_GROUPS[g][2:] for g in group])
    n = spec.n_categories
    return {
        "group": group,
        "name": names,
        "price": params[:, 0] * rng.lognormal(0.0, 0.3, n),
        "december": 1.0 + (params[:, 1] - 1.0) * rng.uniform(0.7, 1.3, n),
        "spike": params[:, 2] * rng.uniform(0.6, 1.4, n),
        "tau": params[:, 3] * rng.uniform(0.7, 1.3, n),
        "weight": params[:, 4] * rng.lognormal(0.0, 0.8, n),
        "effect": rng.lognormal(0.0, 0.4, n),
        # Platforms rise and fall: a log-linear trend per category.
        "trend": rng.normal(0.0, 0.025, n),
    }


def draw_items(spec: ScaleSpec, cats: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Items: category, Zipf popularity, launch and end month, shelf price and markdown age, name."""
    n, f = spec.n_items, spec.forecast_month
    weight = cats["weight"] / cats["weight"].sum()
    category = rng.choice(spec.n_categories, size=n, p=weight)
    category[: spec.n_categories] = rng.permutation(spec.n_categories)  # every category has items
    rank = rng.permutation(n) + 1
    pop = rank.astype(float) ** -spec.zipf_exponent
    pop *= n / pop.sum()

    # Launch month: some items predate the data; launches thin out over time, as the catalogue shrinks.
    top = rank <= max(3, n // 500)  # the best sellers are evergreen (bags, gift cards): no launch spike
    pre = (rng.random(n) < spec.preexisting_share) | top
    launch_weights = np.linspace(1.4, 0.6, f + 1)
    launch = np.where(pre, -rng.integers(1, 25, n),
                      rng.choice(f + 1, size=n, p=launch_weights / launch_weights.sum()))
    staple = (rng.random(n) < spec.staple_share) | top
    lifetime = np.ceil(rng.exponential(spec.mean_lifetime, n)) + 1
    # Items that predate the data have a remaining life from month 0 on (lifetimes are memoryless).
    end = np.where(staple, 10 * f + 100, np.maximum(launch, 0) + lifetime).astype(np.int64)
    launch_day = rng.random(n)  # fraction of the launch month already gone

    ending = rng.choice(np.array([1.0, 1.0, 1.0, 1.0, 10.0, 0.0]), size=n)
    price = nice_price(cats["price"][category] * rng.lognormal(0.0, 0.45, n), ending)
    markdown_age = rng.integers(3, 18, n)

    # Names: vectorised concatenation of a small vocabulary (quotes and commas as in the real file).
    a = np.array(_WORDS_A, dtype=object)[rng.integers(0, len(_WORDS_A), n)]
    b = np.array(_WORDS_B, dtype=object)[rng.integers(0, len(_WORDS_B), n)]
    s = np.array(_SUFFIXES, dtype=object)[rng.integers(0, len(_SUFFIXES), n)]
    number = rng.integers(1, 1000, n).astype(str).astype(object)
    names = a + " " + b + " " + number + s
    return {
        "category": category.astype(np.int64),
        "pop": pop,
        "launch": launch.astype(np.int64),
        "end": end,
        "launch_day": launch_day,
        "price": price,
        "ending": ending,
        "markdown_age": markdown_age,
        "name": names,
    }


def draw_shops(spec: ScaleSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Physical shops: each sells under one id, or under a duplicate id first and then its canonical id."""
    dup_of = {canon: dup for dup, canon in spec.duplicate_pairs}
    dups = set(dup_of.values())
    canon_ids = np.array([s for s in spec.shop_ids if s not in dups], dtype=np.int64)
    p = len(canon_ids)
    early_id = np.array([dup_of.get(int(s), int(s)) for s in canon_ids], dtype=np.int64)
    switch = np.where(early_id != canon_ids, rng.integers(1, 4, p), 0)
    f = spec.forecast_month
    open_m = np.zeros(p, dtype=np.int64)
    close_m = np.full(p, f + 1, dtype=np.int64)
    free = np.flatnonzero(early_id == canon_ids)  # duplicate pairs stay open to the end: the merge matters
    picked = rng.permutation(free)
    late = picked[: spec.n_late_shops]
    closing = picked[spec.n_late_shops: spec.n_late_shops + spec.n_closing_shops]
    if len(late) < spec.n_late_shops or len(closing) < spec.n_closing_shops:
        raise ValueError("not enough shops for the requested late and closing shops")
    open_m[late] = rng.integers(2, max(3, f - 2), len(late))
    close_m[closing] = rng.integers(max(2, f // 3), f, len(closing))
    both = closing[: len(closing) // 4]
    open_m[both] = 0

    size = np.clip(rng.lognormal(0.0, 0.45, p), 0.25, 2.5)
    size[rng.integers(0, p)] = 1.25 * size.max()  # one flagship shop, as the real chain has
    names = np.empty(len(spec.shop_ids), dtype=object)
    id_index = {s: k for k, s in enumerate(spec.shop_ids)}
    city = np.array(_CITIES, dtype=object)[rng.integers(0, len(_CITIES), p)]
    mall = np.array(_MALLS, dtype=object)[rng.integers(0, len(_MALLS), p)]
    kind = np.array(_MALL_KINDS, dtype=object)[rng.integers(0, len(_MALL_KINDS), p)]
    canon_names = city + " " + kind + ' "' + mall + '"'
    for k in range(p):  # tens of shops
        names[id_index[int(canon_ids[k])]] = canon_names[k]
        if early_id[k] != canon_ids[k]:
            names[id_index[int(early_id[k])]] = "!" + canon_names[k] + " fran"
    return {
        "canon_id": canon_ids,
        "early_id": early_id,
        "switch": switch,
        "open": open_m,
        "close": close_m,
        "size": size,
        "trend": rng.normal(-0.01, 0.015, p),
        "names": names,
    }
