"""What ingest tells its caller: one report per raw file and the run's summary (JSON-serialisable)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class FileReport(BaseModel):
    """What ingest did with one raw file."""

    file: str
    kind: str
    sha256: str
    skipped: bool = Field(description="Already ingested with the same content, dependencies and rules.")
    rows_in: int = Field(description="Records of the file counted from its bytes (a quoted newline keeps "
                                     "a record on several lines); always rows_accepted + rows_quarantined.")
    rows_accepted: int
    rows_quarantined: int
    failed_rules: dict[str, int] = Field(
        default_factory=dict, description="Quarantined rows per rule (the first rule each row broke)."
    )
    months: list[int] = Field(default_factory=list, description="Months with accepted rows (sales).")
    rows_replaced: int = Field(0, description="Lake rows of other sales files this file's months replaced.")
    months_replaced: list[int] = Field(default_factory=list, description="Months taken over from another file.")
    months_shared: list[int] = Field(default_factory=list, description="Months held together with other drops "
                                     "(parts of one month: the lake holds every part's rows).")
    shares_months_with: list[str] = Field(default_factory=list, description="The drops holding those months too.")
    warnings: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)


class RemovedFile(BaseModel):
    """A raw file ingested before and gone from raw/ now: what of it left the lake."""

    file: str
    outputs: list[str] = Field(default_factory=list, description="Lake files deleted, relative to lake/.")
    months_deleted: list[int] = Field(default_factory=list, description="Its months no present file covers.")
    rows_deleted: int = Field(0, description="Lake rows of those months.")
    months_restored: list[int] = Field(default_factory=list, description="Its months a present file covers.")
    restored_from: list[str] = Field(default_factory=list)

    def message(self) -> str:
        """The one log line that says what the removal did to the lake."""
        parts = [f"raw/{self.file} is gone"]
        if self.outputs:
            parts.append(f"removed {', '.join('lake/' + o for o in self.outputs)}")
        if self.months_deleted:
            parts.append(f"removed months {self.months_deleted} ({self.rows_deleted} rows) from lake/sales")
        if self.months_restored:
            parts.append(f"restored months {self.months_restored} from {', '.join(self.restored_from)}")
        return "; ".join(parts)


class IngestSummary(BaseModel):
    """The result of one ingest run; ``model_dump()`` is JSON-serialisable."""

    data_dir: str
    files: list[FileReport]
    rows_in: int
    rows_accepted: int
    rows_quarantined: int
    rows_replaced: int = Field(0, description="Lake rows replaced by newer sales files in this run.")
    months: list[int] = Field(description="Months present in lake/sales after the run.")
    changed: bool = Field(description="Whether the run wrote anything.")
    written: list[str] = Field(default_factory=list, description="Lake paths written, relative to lake/.")
    deleted: list[str] = Field(default_factory=list)
    removed: list[RemovedFile] = Field(default_factory=list, description="Raw files gone since last ingested.")
    manifest: str
    warnings: list[str] = Field(default_factory=list, description="Every file's warnings, for the task to log.")
    timings: dict[str, float] = Field(
        default_factory=dict, description="Seconds: ge_setup, read, validate, write, total."
    )

    def file(self, name: str) -> FileReport:
        for report in self.files:
            if report.file == name:
                return report
        raise KeyError(name)
