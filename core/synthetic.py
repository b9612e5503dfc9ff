"""Synthetic data in the exact format of the 1C "Predict Future Sales" competition.

Writes the five competition files (``sales_train.csv``, ``test.csv``, ``items.csv``,
``item_categories.csv``, ``shops.csv``) so that the whole pipeline, its tests and the demo run
without the real data. The generator mimics the structure that makes the real problem hard and
learnable:

- Zipf item popularity, item launches (a spike in the first months, then decay to a floor) and
  items going out of sale; a catalogue that shrinks over time, as the real one does;
- shops of very different sizes that open late or close, and duplicate shop ids (the same shop
  under two ids, following ``core.config.DEFAULT_SHOP_MERGE_MAP``): the duplicate id sells for a
  few early months, then the canonical id carries on;
- December peaks (stronger for games and gifts), a summer dip, weekly cycles inside each month,
  per-shop and per-category trends, price markdowns, promotions that lift demand, inflation;
- returns (negative daily counts, about the real rate) and a handful of planted outliers
  (a huge price, a daily count over 1000, a price of -1).

Demand for a (shop, item, month) cell is a gamma-Poisson draw around
``base * shop size * shop trend * item popularity * category effect * category trend
* life-cycle(age) * season(category, month) * promotion * shop-item affinity``, so a model that sees
the history and the covariates can beat "same as last month". Everything is vectorised per month;
the same seed gives byte-identical files.

``test.csv`` is built as the competition built it: every shop open in the forecast month (the month
after the last one in ``sales_train.csv``) crossed with every item sold in that month. The forecast
month is simulated (its truth is available from :func:`generate`) but never written.

The scale specs and the catalogue (categories, items, shops) live in :mod:`core.synthetic_catalogue`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from core.files import write_bytes_atomic
from core.synthetic_catalogue import (
    SCALES,
    Scale,
    ScaleSpec,
    draw_categories,
    draw_items,
    draw_shops,
    nice_price,
)

FIRST_DAY = np.datetime64("2013-01-01", "D")

SALES_COLUMNS = ["date", "date_block_num", "shop_id", "item_id", "item_price", "item_cnt_day"]
TEST_COLUMNS = ["ID", "shop_id", "item_id"]
ITEMS_COLUMNS = ["item_name", "item_id", "item_category_id"]
CATEGORIES_COLUMNS = ["item_category_name", "item_category_id"]
SHOPS_COLUMNS = ["shop_name", "shop_id"]
FILE_NAMES = ("sales_train.csv", "test.csv", "items.csv", "item_categories.csv", "shops.csv")

# Planted outliers, the values the real training file carries.
OUTLIER_PRICE = 307980.0
OUTLIER_NEGATIVE_PRICE = -1.0
OUTLIER_COUNT = 2169.0


class SyntheticSummary(BaseModel):
    """What :func:`write_competition_files` wrote."""

    model_config = ConfigDict(frozen=True)

    scale: str
    seed: int
    rows: int
    n_shops: int
    n_items: int
    n_categories: int
    months: int
    forecast_month: int
    test_rows: int
    files: list[str]


@dataclass
class SyntheticData:
    """The generated tables, typed; ``forecast_truth`` is the simulated forecast month (never written)."""

    spec: ScaleSpec
    seed: int
    sales: pd.DataFrame
    """date (dd.mm.yyyy), date_block_num, shop_id, item_id, item_price, item_cnt_day."""
    test: pd.DataFrame
    items: pd.DataFrame
    categories: pd.DataFrame
    shops: pd.DataFrame
    forecast_truth: pd.DataFrame
    """shop_id, item_id, item_cnt_month for every test.csv pair with a sale in the forecast month."""
    info: dict[str, object] = field(default_factory=dict)


# --- helpers ------------------------------------------------------------------------------------

def _rng(seed: int, *stream: int) -> np.random.Generator:
    # Independent streams per component so changing one part of the generator leaves the rest intact.
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _month_start(month: int) -> np.datetime64:
    return (np.datetime64("2013-01", "M") + month).astype("datetime64[D]")


def _days_in_month(month: int) -> int:
    return int((_month_start(month + 1) - _month_start(month)).astype(int))


def _resolve(scale: Scale | ScaleSpec) -> ScaleSpec:
    if isinstance(scale, ScaleSpec):
        return scale
    try:
        return SCALES[scale]
    except KeyError:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}") from None


# --- the generator ------------------------------------------------------------------------------

def _day_weights(month: int) -> np.ndarray:
    """Weekly cycle (weekend peaks); in December demand climbs towards the holidays."""
    n = _days_in_month(month)
    dates = _month_start(month) + np.arange(n)
    weekday = (dates.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
    w = np.array([0.8, 0.8, 0.85, 0.9, 1.1, 1.25, 1.15])[weekday]
    if month % 12 == 11:
        w = w * np.linspace(0.8, 2.0, n)
    return w / w.sum()


_SEASON = np.array([0.9, 0.8, 0.9, 0.8, 0.8, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.0])


def generate(scale: Scale | ScaleSpec = "demo", seed: int = 0) -> SyntheticData:
    """Simulate months 0..forecast month and build the competition tables (nothing is written)."""
    spec = _resolve(scale)
    f = spec.forecast_month
    cats = draw_categories(spec, _rng(seed, 1))
    items = draw_items(spec, cats, _rng(seed, 2))
    shops = draw_shops(spec, _rng(seed, 3))
    rng_pairs = _rng(seed, 4)
    n_p = len(shops["canon_id"])

    # Which shops stock which items (big shops more of the catalogue), how well each sells each category / item.
    stock_p = np.clip(spec.carry_share * (0.7 + 0.6 * shops["size"] / shops["size"].max()), 0.05, 1.0)
    carries = rng_pairs.random((n_p, spec.n_items)) < stock_p[:, None]
    affinity = (rng_pairs.lognormal(0.0, 0.6, (n_p, spec.n_items)) * carries).astype(np.float32)
    shop_cat = rng_pairs.lognormal(0.0, 0.4, (n_p, spec.n_categories))

    months = [_simulate_month(spec, seed, m, cats, items, shops, affinity, shop_cat) for m in range(f + 1)]

    # The forecast month is simulated like any other; only its item set may be forced to the spec's size.
    last = months[f]
    if spec.forecast_items is not None:
        last = _force_item_count(spec, seed, last, items, shops)
    sales = _assemble_rows(spec, seed, months[:f])

    test, truth_df = _test_frame(spec, seed, last, shops)
    items_df = pd.DataFrame({
        "item_name": items["name"],
        "item_id": np.arange(spec.n_items, dtype=np.int64),
        "item_category_id": items["category"],
    })
    cats_df = pd.DataFrame({
        "item_category_name": cats["name"],
        "item_category_id": np.arange(spec.n_categories, dtype=np.int64),
    })
    shops_df = pd.DataFrame({"shop_name": shops["names"], "shop_id": np.array(spec.shop_ids, dtype=np.int64)})
    info: dict[str, object] = {
        "item_launch_month": items["launch"].tolist(),
        "item_end_month": items["end"].tolist(),
        "shop_open_month": dict(zip(shops["canon_id"].tolist(), shops["open"].tolist(), strict=True)),
        "shop_close_month": dict(zip(shops["canon_id"].tolist(), shops["close"].tolist(), strict=True)),
        "duplicate_switch_month": {
            int(e): int(s) for e, c, s in zip(shops["early_id"], shops["canon_id"], shops["switch"], strict=True)
            if e != c
        },
    }
    return SyntheticData(spec, seed, sales, test, items_df, cats_df, shops_df, truth_df, info)


def _simulate_month(
    spec: ScaleSpec,
    seed: int,
    m: int,
    cats: dict[str, np.ndarray],
    items: dict[str, np.ndarray],
    shops: dict[str, np.ndarray],
    affinity: np.ndarray,
    shop_cat: np.ndarray,
) -> dict[str, np.ndarray]:
    """One month's daily rows of every open shop and every item on sale, as arrays."""
    # One stream for the whole month, drawn in a fixed order (item rates, cells, days): the same seed, same rows.
    rng = _rng(seed, 10, m)
    shop_idx = np.flatnonzero((shops["open"] <= m) & (m < shops["close"]))
    item_idx = np.flatnonzero((items["launch"] <= m) & (m < items["end"]))
    item_rate, promo = _item_rates(m, item_idx, cats, items, rng)
    lam = (spec.base_rate * _shop_rates(m, shop_idx, shops)[:, None] * item_rate[None, :]).astype(np.float32)
    lam *= affinity[np.ix_(shop_idx, item_idx)]
    lam *= shop_cat[np.ix_(shop_idx, items["category"][item_idx])].astype(np.float32)
    lam *= rng.gamma(2.0, 0.5, lam.shape).astype(np.float32)
    counts = rng.poisson(lam)
    si, ii = np.nonzero(counts)
    cell_count = counts[si, ii]
    cell_shop = shop_idx[si]
    cell_item = item_idx[ii]

    cell_age = m - items["launch"][cell_item]
    price = _cell_prices(m, cell_item, cell_age, item_idx[promo], items)
    row_cell, row_day, row_count = _split_over_days(m, cell_count, cell_age == 0,
                                                    items["launch_day"][cell_item], rng)
    shop_id = np.where(m < shops["switch"], shops["early_id"], shops["canon_id"])[cell_shop]
    return {
        "month": np.full(len(row_cell), m, dtype=np.int64),
        "day": row_day,
        "shop": cell_shop[row_cell],
        "shop_id": shop_id[row_cell],
        "item_id": cell_item[row_cell],
        "price": price[row_cell],
        "count": row_count.astype(np.float64),
    }


def _item_rates(
    m: int, item_idx: np.ndarray, cats: dict[str, np.ndarray], items: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Item side of the intensity: popularity, launch spike decaying to a floor, season, trend, promotions.

    Returns the rate of each item on sale and which of them are on promotion this month.
    """
    cat = items["category"][item_idx]
    age = m - items["launch"][item_idx]
    life = 1.0 + cats["spike"][cat] * np.exp(-age / cats["tau"][cat])
    first = age == 0
    life[first] *= 1.0 - 0.5 * items["launch_day"][item_idx][first]  # launched part-way into the month
    moy = m % 12
    season = np.where(moy == 11, cats["december"][cat], _SEASON[moy])
    trend = np.exp(cats["trend"][cat] * (m - 16))
    promo = rng.random(len(item_idx)) < 0.04
    item_shock = rng.gamma(4.0, 0.25, len(item_idx))
    item_rate = items["pop"][item_idx] * cats["effect"][cat] * life * season * trend * item_shock
    item_rate *= np.where(promo, 1.6, 1.0)
    return item_rate, promo


def _shop_rates(m: int, shop_idx: np.ndarray, shops: dict[str, np.ndarray]) -> np.ndarray:
    """Shop side of the intensity: size, trend, ramp-up after opening."""
    since_open = np.where(shops["open"][shop_idx] > 0, m - shops["open"][shop_idx], 99)  # only new shops ramp up
    shop_rate = shops["size"][shop_idx] * np.exp(shops["trend"][shop_idx] * (m - 16))
    shop_rate *= 1.0 - 0.5 * np.exp(-since_open / 2.0)
    return shop_rate


def _cell_prices(
    m: int, cell_item: np.ndarray, cell_age: np.ndarray, promo_items: np.ndarray, items: dict[str, np.ndarray]
) -> np.ndarray:
    """Prices: markdown with age, 20 % off in promotions, inflation from 2015 on."""
    price = items["price"][cell_item].copy()
    price = np.where(cell_age >= items["markdown_age"][cell_item], price * 0.7, price)
    price = price * (1.0 + 0.012 * max(0, m - 23))
    cell_promo = np.zeros(len(items["pop"]), dtype=bool)
    cell_promo[promo_items] = True
    price = np.where(cell_promo[cell_item], price * 0.8, price)
    return np.minimum(nice_price(price, items["ending"][cell_item]), 59_990.0)  # outliers are planted, not drawn


def _split_over_days(
    m: int, cell_count: np.ndarray, cell_first: np.ndarray, cell_launch_day: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each cell's units over the days of month ``m``: (row's cell, row's day, row's units).

    Mostly spread by the weekly cycle, partly on one busy day (more so in the launch month); units of
    a cell on one day form one row, as in the real file.
    """
    n_days = _days_in_month(m)
    unit_cell = np.repeat(np.arange(len(cell_count)), cell_count)
    cdf = np.cumsum(_day_weights(m))
    lo_day = np.where(cell_first, np.floor(cell_launch_day * n_days), 0).astype(np.int64)
    lo_cdf = np.where(lo_day > 0, cdf[np.maximum(lo_day - 1, 0)], 0.0)
    busy = np.minimum(np.searchsorted(cdf, lo_cdf + rng.random(len(cell_count)) * (1 - lo_cdf)), n_days - 1)
    u = lo_cdf[unit_cell] + rng.random(len(unit_cell)) * (1 - lo_cdf[unit_cell])
    day = np.minimum(np.searchsorted(cdf, u), n_days - 1)
    # The busy day takes a share of the units but never hundreds: real daily counts rarely pass 100.
    p_busy = np.minimum(np.where(cell_first, 0.5, 0.2), 40.0 / np.maximum(cell_count, 1))[unit_cell]
    day = np.where(rng.random(len(unit_cell)) < p_busy, busy[unit_cell], day)
    key, row_count = np.unique(unit_cell * 32 + day, return_counts=True)
    return key // 32, key % 32, row_count


def _force_item_count(
    spec: ScaleSpec, seed: int, month: dict[str, np.ndarray], items: dict[str, np.ndarray],
    shops: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Make exactly ``spec.forecast_items`` items sell in the forecast month.

    Surplus items go out of sale that month; missing ones (on sale but unsold, else recently ended)
    sell one unit in a random open shop. Only the forecast month changes; it is never written.
    """
    rng = _rng(seed, 20)
    f = spec.forecast_month
    target = int(spec.forecast_items or 0)
    sold = np.unique(month["item_id"])
    if len(sold) > target:
        drop = rng.choice(sold, size=len(sold) - target, replace=False)
        keep = ~np.isin(month["item_id"], drop)
        return {k: v[keep] for k, v in month.items()}
    if len(sold) == target:
        return month
    on_sale = np.flatnonzero((items["launch"] <= f) & (f < items["end"]))
    unsold = rng.permutation(np.setdiff1d(on_sale, sold))
    ended = np.setdiff1d(np.flatnonzero(items["end"] <= f), sold)
    ended = ended[np.argsort(-items["end"][ended], kind="stable")]
    extra = np.concatenate([unsold, ended])[: target - len(sold)]
    if len(sold) + len(extra) < target:
        raise ValueError(f"cannot sell {target} items in the forecast month: only {spec.n_items} exist")
    open_shops = np.flatnonzero((shops["open"] <= f) & (f < shops["close"]))
    shop = open_shops[rng.integers(0, len(open_shops), len(extra))]
    add = {
        "month": np.full(len(extra), f, dtype=np.int64),
        "day": rng.integers(0, 28, len(extra)),
        "shop": shop,
        "shop_id": shops["canon_id"][shop],
        "item_id": extra,
        "price": items["price"][extra],
        "count": np.ones(len(extra)),
    }
    return {k: np.concatenate([month[k], add[k]]) for k in month}


def _assemble_rows(spec: ScaleSpec, seed: int, months: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """Concatenate the months, add returns, fractional prices and the planted outliers."""
    rng = _rng(seed, 30)
    cols = {k: np.concatenate([mo[k] for mo in months]) for k in months[0]}
    n = len(cols["month"])
    order = np.lexsort((cols["day"], cols["item_id"], cols["shop_id"], cols["month"]))
    cols = {k: v[order] for k, v in cols.items()}

    count = cols["count"]
    price = cols["price"].astype(np.float64)
    # Returns: a small share of rows are a unit (rarely a few) coming back.
    ret = rng.random(n) < spec.returns_rate
    count = np.where(ret, -np.minimum(rng.geometric(0.75, n), 5).astype(np.float64), count)
    # Card discounts and bundles leave some prices with kopecks.
    frac = rng.random(n) < 0.015
    price = np.where(frac, np.round(price * rng.uniform(0.85, 0.99, n), 2), price)

    n_big_price, n_neg_price, n_big_count = spec.n_outliers
    planted = rng.choice(n, size=min(n, n_big_price + n_neg_price + n_big_count), replace=False)
    price[planted[:n_big_price]] = OUTLIER_PRICE
    price[planted[n_big_price: n_big_price + n_neg_price]] = OUTLIER_NEGATIVE_PRICE
    count[planted[n_big_price + n_neg_price:]] = OUTLIER_COUNT

    month_start_day = np.array([(_month_start(m) - FIRST_DAY).astype(int) for m in range(spec.n_months + 1)])
    day_index = month_start_day[cols["month"]] + cols["day"]
    date_strings = pd.DatetimeIndex(FIRST_DAY + np.arange(int(day_index.max()) + 1)).strftime("%d.%m.%Y")
    return pd.DataFrame({
        "date": np.asarray(date_strings, dtype=object)[day_index],
        "date_block_num": cols["month"],
        "shop_id": cols["shop_id"],
        "item_id": cols["item_id"],
        "item_price": price,
        "item_cnt_day": count,
    })


def _test_frame(
    spec: ScaleSpec, seed: int, month: dict[str, np.ndarray], shops: dict[str, np.ndarray]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """test.csv = open shops x items sold in the forecast month, in a shuffled order as in the competition."""
    rng = _rng(seed, 40)
    f = spec.forecast_month
    open_shops = np.flatnonzero((shops["open"] <= f) & (f < shops["close"]))
    shop_ids = rng.permutation(shops["canon_id"][open_shops])
    item_ids = rng.permutation(np.unique(month["item_id"]))
    test = pd.DataFrame({
        "ID": np.arange(len(shop_ids) * len(item_ids), dtype=np.int64),
        "shop_id": np.repeat(shop_ids, len(item_ids)),
        "item_id": np.tile(item_ids, len(shop_ids)),
    })
    monthly = (
        pd.DataFrame({"shop_id": month["shop_id"], "item_id": month["item_id"], "item_cnt_month": month["count"]})
        .groupby(["shop_id", "item_id"], as_index=False)["item_cnt_month"].sum()
    )
    return test, monthly


# --- writing ------------------------------------------------------------------------------------

def _csv_bytes(frame: pd.DataFrame) -> bytes:
    # pandas writes float64 with repr(), which is the competition's format: 999.0, 1.0, 398.95.
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue().encode("utf-8")


def _write_if_changed(target: Path, data: bytes) -> Path:
    # Identical bytes are left alone, so a rerun does not even touch modification times.
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return target
    return write_bytes_atomic(target, data)


def write_competition_files(
    out_dir: str | Path, scale: Scale | ScaleSpec = "demo", seed: int = 0
) -> SyntheticSummary:
    """Write the five competition CSVs into ``out_dir`` (created), atomically and deterministically."""
    data = generate(scale, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = {
        "sales_train.csv": data.sales[SALES_COLUMNS],
        "test.csv": data.test[TEST_COLUMNS],
        "items.csv": data.items[ITEMS_COLUMNS],
        "item_categories.csv": data.categories[CATEGORIES_COLUMNS],
        "shops.csv": data.shops[SHOPS_COLUMNS],
    }
    written = [str(_write_if_changed(out / name, _csv_bytes(frame))) for name, frame in frames.items()]
    spec = data.spec
    return SyntheticSummary(
        scale=spec.name,
        seed=seed,
        rows=len(data.sales),
        n_shops=spec.n_shops,
        n_items=spec.n_items,
        n_categories=spec.n_categories,
        months=spec.n_months,
        forecast_month=spec.forecast_month,
        test_rows=len(data.test),
        files=written,
    )


def custom_spec(base: Scale = "tiny", **changes: object) -> ScaleSpec:
    """A scale spec derived from a named one (for tests and benchmarks)."""
    return replace(SCALES[base], **changes)  # type: ignore[arg-type]
