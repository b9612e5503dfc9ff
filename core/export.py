"""Step 6: the checked, atomic submission export of the forecast the gate (``core.gate``) chose.

The submission is the competition's exact format (``ID,item_cnt_month``, one row per ``test.csv`` row,
sorted by ID). It is checked in memory before anything touches the disk, so a failed check leaves
no file and no temporary behind. An earlier, different submission of the same month is kept, with its sidecar,
under ``submissions/history/<month>/<written_at>.csv`` rather than overwritten; the same bytes written again
(a rerun) keep nothing extra.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from core import quantiles
from core.config import DEFAULT_CLIP
from core.errors import ExportCheckError
from core.files import write_bytes_atomic, write_parquet_atomic
from core.lake import forecast_month_label

SUBMISSION_COLUMNS: tuple[str, str] = ("ID", "item_cnt_month")
# Six decimals keep float32 predictions exact to their own precision while every value still reads as a float.
FLOAT_FORMAT = "%.6f"
# How many offending IDs an error message quotes; the counts say how many there are in all.
_QUOTE = 5
#: ``submissions/history/<month>/``: the earlier submissions of a month (accountability reads ``submissions/*.csv``).
HISTORY_DIR = "history"


def _quote(values: Sequence[Any] | np.ndarray) -> str:
    shown = ", ".join(str(v) for v in list(values[:_QUOTE]))
    return shown + (", ..." if len(values) > _QUOTE else "")


def check_submission(frame: pd.DataFrame, test: pd.DataFrame, clip: tuple[float, float] = DEFAULT_CLIP) -> None:
    """Raise :class:`ExportCheckError` naming every problem of a submission frame against ``test``.

    Checks: exactly the columns ``ID,item_cnt_month``; integer IDs; numeric values; one row per test ID
    (no duplicate, missing or extra ID); no NaN or inf; every value within ``clip``.
    """
    _check_columns(frame, test)
    ids, values = frame["ID"], frame["item_cnt_month"]
    problems = _dtype_problems(ids, values)
    if problems:
        # The ID and value checks below need integers and numbers to mean anything.
        raise ExportCheckError("submission failed its checks: " + "; ".join(problems))
    if ids.isna().any():
        raise ExportCheckError(f"submission failed its checks: {int(ids.isna().sum())} missing (NA) ID value(s)")
    frame_ids = ids.to_numpy(dtype=np.int64)
    problems = _id_problems(frame_ids, test) + _value_problems(values, frame_ids, clip)
    if problems:
        raise ExportCheckError("submission failed its checks: " + "; ".join(problems))


def _check_columns(frame: pd.DataFrame, test: pd.DataFrame) -> None:
    """A DataFrame of exactly ``ID,item_cnt_month``, against a test frame with IDs; else the first problem."""
    if not isinstance(frame, pd.DataFrame):
        raise ExportCheckError(f"submission must be a pandas DataFrame, got {type(frame).__name__}")
    if "ID" not in getattr(test, "columns", ()):
        raise ExportCheckError("test frame has no ID column; cannot check the submission against it")
    columns = [str(c) for c in frame.columns]
    if columns != list(SUBMISSION_COLUMNS):
        missing = [c for c in SUBMISSION_COLUMNS if c not in columns]
        extra = [c for c in columns if c not in SUBMISSION_COLUMNS]
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"unexpected {extra}")
        if not missing and not extra:
            detail.append("wrong order or repeated names")
        raise ExportCheckError(
            f"submission columns must be exactly {list(SUBMISSION_COLUMNS)}, got {columns} ({'; '.join(detail)})"
        )


def _dtype_problems(ids: pd.Series, values: pd.Series) -> list[str]:
    problems = []
    if not pd.api.types.is_integer_dtype(ids.dtype) or pd.api.types.is_bool_dtype(ids.dtype):
        problems.append(f"ID must have an integer dtype, got {ids.dtype}")
    numeric = pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype)
    if not numeric:
        problems.append(f"item_cnt_month must have a numeric dtype, got {values.dtype}")
    return problems


def _id_problems(frame_ids: np.ndarray, test: pd.DataFrame) -> list[str]:
    """Duplicate, missing and extra IDs; a row count off from test's when no ID explains it."""
    problems = []
    test_ids = pd.Index(test["ID"].to_numpy())
    duplicated = pd.Index(frame_ids[pd.Index(frame_ids).duplicated()]).unique()
    if len(duplicated):
        problems.append(f"{len(duplicated)} duplicate ID(s): {_quote(np.sort(duplicated.to_numpy()))}")
    unique_ids = pd.Index(frame_ids).unique()
    missing_ids = test_ids.unique().difference(unique_ids)
    if len(missing_ids):
        problems.append(f"{len(missing_ids)} test ID(s) missing: {_quote(missing_ids.to_numpy())}")
    extra_ids = unique_ids.difference(test_ids)
    if len(extra_ids):
        problems.append(f"{len(extra_ids)} ID(s) not in test.csv: {_quote(extra_ids.to_numpy())}")
    if len(frame_ids) != len(test) and not (len(duplicated) or len(missing_ids) or len(extra_ids)):
        problems.append(f"{len(frame_ids)} rows for {len(test)} test rows")
    return problems


def _value_problems(values: pd.Series, frame_ids: np.ndarray, clip: tuple[float, float]) -> list[str]:
    """NaN, infinite and out-of-``clip`` values, each quoting the IDs they are at."""
    problems = []
    array = values.to_numpy(dtype=np.float64, na_value=np.nan)
    nan = np.isnan(array)
    if nan.any():
        problems.append(f"{int(nan.sum())} NaN value(s), at ID {_quote(frame_ids[nan])}")
    inf = np.isinf(array)
    if inf.any():
        problems.append(f"{int(inf.sum())} infinite value(s), at ID {_quote(frame_ids[inf])}")
    low, high = clip
    finite = ~(nan | inf)
    outside = finite & ((array < low) | (array > high))
    if outside.any():
        problems.append(
            f"{int(outside.sum())} value(s) outside [{low:g}, {high:g}] (min {array[finite].min():g}, "
            f"max {array[finite].max():g}), at ID {_quote(frame_ids[outside])}"
        )
    return problems


def chosen_forecast(forecast: pd.DataFrame, exported: str, clip: tuple[float, float] = DEFAULT_CLIP) -> np.ndarray:
    """The column the gate (``core.gate.decide``) chose from a run's ``forecast.parquet``, clipped to ``clip``.

    A chosen forecast with NaN or inf is an :class:`ExportCheckError` rather than being clipped, because
    clipping would turn inf into a plausible-looking 20.
    """
    if exported not in forecast.columns or exported == "ID":
        raise ExportCheckError(f"the gate chose the {exported!r} forecast, which the run's forecast does not hold "
                               f"(columns: {[c for c in forecast.columns if c != 'ID']})")
    chosen = forecast[exported].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(chosen)
    if bad.any():
        raise ExportCheckError(
            f"the {exported} forecast has {int(bad.sum())} NaN/inf value(s) at position(s) "
            f"{_quote(np.flatnonzero(bad))}"
        )
    return np.clip(chosen, clip[0], clip[1]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where the submission went and what it holds."""

    forecast_month: str
    csv_path: Path
    sidecar_path: Path
    copy_path: Path | None
    rows: int
    sha256: str
    total: float
    previous_path: Path | None = None  # where the earlier, different submission of the month was kept
    quantiles_path: Path | None = None  # submissions/<month>.quantiles.parquet
    exported: str = ""  # the forecaster the gate chose (``export_run``); empty for a frame exported as is


def submission_frame(forecast: pd.DataFrame) -> pd.DataFrame:
    """``ID,item_cnt_month`` from a forecast frame of exactly ID plus one value column, sorted by ID; no check.

    The value column may have any name (``item_cnt_month``, ``prediction``...). Any further column is an
    error rather than being dropped, so a frame mixed up with another cannot slip through.
    """
    if not isinstance(forecast, pd.DataFrame):
        raise ExportCheckError(f"forecast must be a pandas DataFrame, got {type(forecast).__name__}")
    columns = [str(c) for c in forecast.columns]
    others = [c for c in columns if c != "ID"]
    if "ID" not in columns or len(others) != 1 or len(columns) != 2:
        raise ExportCheckError(f"forecast must have exactly the columns ID and one value column, got {columns}")
    frame = pd.DataFrame({"ID": forecast["ID"].to_numpy(), "item_cnt_month": forecast[others[0]].to_numpy()})
    return frame.sort_values("ID", kind="stable").reset_index(drop=True)


def submission_csv(frame: pd.DataFrame) -> bytes:
    buffer = io.StringIO()
    out = frame.astype({"item_cnt_month": np.float64})
    out.to_csv(buffer, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    return buffer.getvalue().encode("utf-8")


def export_submission(
    forecast: pd.DataFrame,
    test: pd.DataFrame,
    out_dir: str | Path,
    forecast_month_label: str,
    sidecar: Mapping[str, Any],
    copy_to: str | Path | None = None,
    *,
    clip: tuple[float, float] = DEFAULT_CLIP,
) -> ExportResult:
    """Check and write ``<out_dir>/<forecast_month_label>.csv`` and its ``.json`` sidecar.

    ``forecast`` holds exactly ``ID`` and one value column (any name, e.g. ``item_cnt_month``), already
    clipped (see :func:`choose_forecast`); it is not clipped here, so an out-of-range value is an error.
    ``sidecar`` names the run, model, metrics, data hashes and which forecast was exported and why;
    the export adds the file name, row count, total and content hash. ``copy_to`` (a file, or an existing
    directory) receives the same CSV bytes. Both payloads are built and checked before the first write.
    """
    if not re.fullmatch(r"\d{4}-\d{2}", forecast_month_label):
        raise ValueError(f"forecast_month_label must look like YYYY-MM, got {forecast_month_label!r}")
    frame = submission_frame(forecast)
    check_submission(frame, test, clip=clip)

    payload = submission_csv(frame)
    digest = hashlib.sha256(payload).hexdigest()
    out_dir = Path(out_dir)
    csv_path = out_dir / f"{forecast_month_label}.csv"
    sidecar_path = out_dir / f"{forecast_month_label}.json"
    total = float(frame["item_cnt_month"].to_numpy(dtype=np.float64).sum())
    meta_bytes = _sidecar_bytes(sidecar, csv_path.name, forecast_month_label, len(frame), digest, total)
    copy_path = _copy_path(copy_to, csv_path.name)

    previous_path = keep_previous_submission(csv_path, sidecar_path, payload)
    write_bytes_atomic(csv_path, payload)
    write_bytes_atomic(sidecar_path, meta_bytes)
    if copy_path is not None:
        write_bytes_atomic(copy_path, payload)
    return ExportResult(
        forecast_month=forecast_month_label,
        csv_path=csv_path,
        sidecar_path=sidecar_path,
        copy_path=copy_path,
        rows=len(frame),
        sha256=digest,
        total=total,
        previous_path=previous_path,
    )


def _sidecar_bytes(sidecar: Mapping[str, Any], file: str, label: str, rows: int, digest: str, total: float) -> bytes:
    """The sidecar JSON: ``sidecar`` plus what the export wrote (file, rows, total, content hash)."""
    meta = dict(sidecar)
    meta["submission"] = {
        "file": file,
        "forecast_month": label,
        "rows": rows,
        "sha256": digest,
        "total": total,
        "mean": total / rows if rows else 0.0,
        "columns": list(SUBMISSION_COLUMNS),
    }
    # Serialise up front so an unserialisable sidecar fails before the CSV is written.
    return (json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def _copy_path(copy_to: str | Path | None, file: str) -> Path | None:
    """Where the copy of the CSV goes: ``copy_to`` itself, or ``file`` inside it when it is a directory."""
    if copy_to is None:
        return None
    copy_path = Path(copy_to)
    return copy_path / file if copy_path.is_dir() else copy_path


def _written_stamp(sidecar: Any, csv_path: Path) -> str:
    """When the earlier submission was written, as a file name (``20141204T113019Z``): its sidecar's
    ``flow_run.written_at``, else the CSV's modification time."""
    written = sidecar.get("flow_run", {}).get("written_at") if isinstance(sidecar, dict) else None
    try:
        moment = datetime.fromisoformat(written) if written else None
    except ValueError:
        moment = None
    if moment is None:
        moment = datetime.fromtimestamp(csv_path.stat().st_mtime, UTC)
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def keep_previous_submission(csv_path: Path, sidecar_path: Path, payload: bytes) -> Path | None:
    """Copy the month's current submission (and its sidecar) to ``history/<month>/<written_at>.csv`` before
    ``payload`` replaces it; nothing when there is none or it holds the same bytes (a rerun). Returns the copy."""
    if not csv_path.exists():
        return None
    earlier = csv_path.read_bytes()
    if earlier == payload:
        return None
    sidecar = sidecar_path.read_bytes() if sidecar_path.exists() else None
    folder = csv_path.parent / HISTORY_DIR / csv_path.stem
    target = folder / f"{_written_stamp(json.loads(sidecar) if sidecar else None, csv_path)}.csv"
    if target.exists() and target.read_bytes() != earlier:  # two submissions written in the same second
        target = target.with_name(f"{target.stem}-{hashlib.sha256(earlier).hexdigest()[:8]}.csv")
    write_bytes_atomic(target, earlier)
    if sidecar is not None:
        write_bytes_atomic(target.with_suffix(".json"), sidecar)
    return target


def _forecast_universe(paths: Any, store: Any, windows_dir: str | Path) -> pd.DataFrame:
    """The rows the submission must cover: test.csv's, or -- when the store forecast the last month's grid
    because there is no test.csv -- that grid's (IDs 0..n-1, as the store numbered them)."""
    source = store.meta.get("forecast_source", "test.parquet")
    target = paths.reference_table("test")
    if source != "test.parquet":
        return store.forecast_frame()[["ID", "shop_id", "item_id"]]
    if not target.exists():
        raise ExportCheckError(f"{target} is missing, but the forecast in {windows_dir} was made for test.csv's "
                               f"pairs; rerun the flow so the windows are rebuilt for the lake as it is now")
    return pd.read_parquet(target, columns=["ID", "shop_id", "item_id"])


def export_run(config: Any, windows_dir: str | Path, run_dir: str | Path, decision: Any,
               extra: Mapping[str, Any] | None = None) -> ExportResult:
    """Check and write the submission of a scored run: the column of ``forecast.parquet`` the gate step chose
    (``decision``: a ``core.gate.ExportDecision``).

    ``windows_dir`` is the store the forecast was made from (the one built without a holdout); ``extra`` goes into
    the sidecar as is (the flow run that exported it).
    """
    from core.lake import FORECAST_FILE, LakePaths
    from core.window_store import WindowStore

    paths = LakePaths.of(config)
    run_dir = Path(run_dir)
    clip = config.windows.clip
    store = WindowStore.open(windows_dir)
    forecast = pd.read_parquet(run_dir / FORECAST_FILE)
    values = chosen_forecast(forecast, str(decision.exported), clip)
    test = _forecast_universe(paths, store, windows_dir)
    sidecar = _run_sidecar(config, paths, run_dir, store.meta, decision, extra)
    label = forecast_month_label(int(store.meta["forecast_month"]), config.ingest.first_month)
    # The ranges are built and checked before the CSV is written, so a failed check still leaves nothing.
    calibration = _calibration(decision, run_dir)
    ranges = quantile_rows(store, forecast["ID"].to_numpy(), values, calibration, clip)
    quantiles_path = paths.submission_quantiles(label)
    quantiles.check_quantile_frame(ranges, forecast["ID"].to_numpy(), calibration.levels, clip, quantiles_path.name)
    sidecar["quantiles"] = {"file": quantiles_path.name, "levels": list(calibration.levels),
                            "calibration": calibration.to_dict()}
    result = export_submission(
        pd.DataFrame({"ID": forecast["ID"].to_numpy(), "item_cnt_month": values}),
        test,
        paths.submissions,
        label,
        sidecar,
        copy_to=config.export.submission_path,
        clip=clip,
    )
    # The pairs behind the IDs, kept beside the submission: accountability scores it on these when its month
    # arrives, even if test.csv has changed or gone by then. Written after the checked CSV, so a failed check
    # still leaves nothing.
    write_parquet_atomic(paths.submission_pairs(label), pa.Table.from_pandas(
        test[["ID", "shop_id", "item_id"]].sort_values("ID").reset_index(drop=True), preserve_index=False))
    quantiles.write_quantiles(quantiles_path, ranges, forecast["ID"].to_numpy(), calibration.levels, clip)
    return dataclasses.replace(result, quantiles_path=quantiles_path, exported=str(decision.exported))


def _run_sidecar(config: Any, paths: Any, run_dir: Path, meta: Mapping[str, Any], decision: Any,
                 extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the sidecar says of the run: its id and model, the holdout scores, the gate's choice and why, the data."""
    from core.files import read_json
    from core.lake import METADATA_FILE, METRICS_FILE

    scores = read_json(run_dir / METRICS_FILE, default={}).get("overall", {})
    return {
        "run_id": run_dir.name,
        "run_dir": paths.run_name(run_dir),
        "model": read_json(run_dir / "holdout" / METADATA_FILE, default={}).get(
            "model_config", {"kind": config.model.kind}
        ),
        "holdout_month": decision.holdout_month,
        "holdout_rmse": {name: values_["rmse"] for name, values_ in scores.items()},
        "exported_rmse": decision.exported_rmse,
        "exported": str(decision.exported),
        "reason": decision.reason,
        "beaten_by": decision.beaten_by,
        "decision": decision.decision.to_dict(),
        "forecast_month": int(meta["forecast_month"]),
        "data": meta.get("input_hashes", {}),
        **dict(extra or {}),
    }


def _calibration(decision: Any, run_dir: Path) -> quantiles.Calibration:
    """The ranges' calibration the gate step made (``decision.ranges``, else the run's ``ranges.json``)."""
    from core.files import read_json

    ranges = getattr(decision, "ranges", None) or read_json(run_dir / quantiles.RANGES_FILE)
    if not ranges:
        raise ExportCheckError(f"{run_dir / quantiles.RANGES_FILE} is missing: the gate step calibrates the ranges "
                               "written beside the submission; rerun the flow")
    return quantiles.Calibration.from_dict(ranges["calibration"])


def quantile_rows(store: Any, ids: np.ndarray, values: np.ndarray, calibration: quantiles.Calibration,
                  clip: tuple[float, float]) -> pd.DataFrame:
    """The quantiles file's frame: each forecast row's exported value plus its segment's offsets, by ID."""
    frame = store.forecast_frame()
    ranges = quantiles.apply(values, quantiles.forecast_codes(store), calibration, clip)
    return quantiles.quantile_frame(ids, frame["shop_id"].to_numpy(), frame["item_id"].to_numpy(), ranges,
                                    calibration.levels)
