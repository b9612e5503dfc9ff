"""The planning decision of ingest, as a pure function: no files, no Great Expectations."""

from __future__ import annotations

from typing import Any

from core.ingest.plan import IngestPlan, plan_ingest, recorded_owners

REFERENCE = {"item_categories.csv": "c1", "shops.csv": "s1", "items.csv": "i1"}
RULES = "rules-1"


def _files(**changes: str) -> dict[str, str]:
    files = {**REFERENCE, "sales_train.csv": "t1", "test.csv": "x1"}
    files.update({name.replace("__", ".").replace("_dash_", "-"): sha for name, sha in changes.items()})
    return files


def _manifest_after(plan: IngestPlan, files: dict[str, str], months: dict[str, list[int]],
                    previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest a run of ``plan`` would write when each sales file held ``months``."""
    manifest = {"files": dict((previous or {}).get("files", {})), "months": {}}
    for name in plan.validate:
        manifest["files"][name] = {"sha256": files[name], "kind": "x", "depends_on": dict(plan.depends_on[name]),
                                   "rules_sha256": RULES, "seq": plan.seq[name], "months": months.get(name, [])}
    owners = plan.month_owners(months)
    manifest["months"] = {str(m): recorded_owners(names) for m, names in owners.items()}
    return manifest


def _first_run(files: dict[str, str], months: dict[str, list[int]]) -> dict[str, Any]:
    return _manifest_after(plan_ingest(files, {}, RULES), files, months)


def test_a_fresh_lake_validates_everything_in_dependency_order() -> None:
    plan = plan_ingest(_files(**{"sales_2013-04__csv": "d1"}), {}, RULES)
    assert plan.validate == ("item_categories.csv", "shops.csv", "items.csv", "sales_train.csv",
                             "sales_2013-04.csv", "test.csv")
    assert plan.skip == () and not plan.rebuild_sales
    assert plan.seq == {name: i for i, name in enumerate(plan.validate)}
    assert plan.depends_on["items.csv"] == {"item_categories.csv": "c1"}
    assert plan.depends_on["sales_train.csv"] == {"items.csv": "i1", "item_categories.csv": "c1", "shops.csv": "s1"}
    assert plan.month_owners({"sales_train.csv": [0, 1, 2], "sales_2013-04.csv": [2, 3]}) == {
        0: ("sales_train.csv",), 1: ("sales_train.csv",), 2: ("sales_2013-04.csv",), 3: ("sales_2013-04.csv",)}


def test_unchanged_files_are_all_skipped() -> None:
    files = _files()
    manifest = _first_run(files, {"sales_train.csv": [0, 1]})
    plan = plan_ingest(files, manifest, RULES)
    assert plan.validate == () and set(plan.skip) == set(files)
    owners = plan.month_owners({})
    assert owners == {0: ("sales_train.csv",), 1: ("sales_train.csv",)}
    assert plan.deleted_months(owners) == [] and plan.replaced_months(owners) == {}


def test_a_new_drop_is_the_only_file_validated_and_replaces_its_months() -> None:
    files = _files()
    manifest = _first_run(files, {"sales_train.csv": [0, 1, 2]})
    files["sales_2013-04.csv"] = "d1"
    plan = plan_ingest(files, manifest, RULES)
    assert plan.validate == ("sales_2013-04.csv",) and not plan.rebuild_sales
    assert plan.seq == {"sales_2013-04.csv": 5}
    owners = plan.month_owners({"sales_2013-04.csv": [2, 3]})
    assert owners == {0: ("sales_train.csv",), 1: ("sales_train.csv",), 2: ("sales_2013-04.csv",),
                      3: ("sales_2013-04.csv",)}
    assert plan.replaced_months(owners) == {"sales_2013-04.csv": {2: "sales_train.csv"}}
    assert plan.deleted_months(owners) == []


def test_a_changed_known_sales_file_reapplies_all_in_arrival_order_and_deletes_lost_months() -> None:
    files = _files(**{"sales_2013-04__csv": "d1"})
    manifest = _first_run(files, {"sales_train.csv": [0, 1, 2], "sales_2013-04.csv": [2, 3]})
    files["sales_train.csv"] = "t2"
    plan = plan_ingest(files, manifest, RULES)
    assert plan.rebuild_sales
    assert plan.validate == ("sales_train.csv", "sales_2013-04.csv")
    assert plan.sales_order == ("sales_train.csv", "sales_2013-04.csv")
    assert plan.kept_months == {}
    owners = plan.month_owners({"sales_train.csv": [1, 2], "sales_2013-04.csv": [2, 3]})
    assert owners == {1: ("sales_train.csv",), 2: ("sales_2013-04.csv",), 3: ("sales_2013-04.csv",)}  # the later wins
    assert plan.deleted_months(owners) == [0]
    assert plan.replaced_months(owners) == {}
    assert plan.seq == {"sales_train.csv": 3, "sales_2013-04.csv": 4}  # arrival sequence is kept


def test_arrival_order_is_by_sequence_not_by_name() -> None:
    files = _files(**{"sales_a__csv": "a1"})
    manifest = _first_run(files, {"sales_train.csv": [0], "sales_a.csv": [0]})
    assert manifest["months"] == {"0": "sales_a.csv"}
    plan = plan_ingest({**files, "sales_0.csv": "z1"}, manifest, RULES)
    assert plan.sales_order == ("sales_train.csv", "sales_a.csv", "sales_0.csv")


def test_drops_holding_one_month_are_its_parts_whether_they_arrive_together_or_one_run_apart() -> None:
    files = _files(**{"sales_p1__csv": "a1", "sales_p2__csv": "b1"})
    plan = plan_ingest(files, {}, RULES)
    months = {"sales_train.csv": [0, 1], "sales_p1.csv": [1, 2], "sales_p2.csv": [2]}
    owners = plan.month_owners(months)
    assert owners == {0: ("sales_train.csv",), 1: ("sales_p1.csv",), 2: ("sales_p1.csv", "sales_p2.csv")}
    assert plan.shared_months(owners) == {"sales_p1.csv": {2: ("sales_p2.csv",)},
                                          "sales_p2.csv": {2: ("sales_p1.csv",)}}
    manifest = _manifest_after(plan, files, months)
    assert manifest["months"] == {"0": "sales_train.csv", "1": "sales_p1.csv", "2": ["sales_p1.csv", "sales_p2.csv"]}

    later = plan_ingest({**files, "sales_p3.csv": "c1"}, manifest, RULES)  # a third part, a run later
    assert later.validate == ("sales_p3.csv",) and not later.rebuild_sales
    owners = later.month_owners({"sales_p3.csv": [2]})
    assert owners[2] == ("sales_p1.csv", "sales_p2.csv", "sales_p3.csv") and later.replaced_months(owners) == {}

    # A changed history re-applies every file in arrival order: it came first, so the parts still hold month 2.
    history = plan_ingest({**files, "sales_train.csv": "t2"}, manifest, RULES)
    assert history.rebuild_sales
    assert history.month_owners({**months, "sales_train.csv": [0, 1, 2]})[2] == ("sales_p1.csv", "sales_p2.csv")


def test_a_new_items_file_revalidates_what_depends_on_it() -> None:
    files = _files()
    manifest = _first_run(files, {"sales_train.csv": [0]})
    plan = plan_ingest(_files(**{"items__csv": "i2"}), manifest, RULES)
    assert plan.validate == ("items.csv", "sales_train.csv", "test.csv")
    assert plan.skip == ("item_categories.csv", "shops.csv")
    assert plan.rebuild_sales


def test_new_categories_revalidate_items_sales_and_test_but_not_shops() -> None:
    files = _files()
    manifest = _first_run(files, {"sales_train.csv": [0]})
    plan = plan_ingest(_files(**{"item_categories__csv": "c2"}), manifest, RULES)
    assert plan.skip == ("shops.csv",)


def test_changed_rules_or_missing_outputs_revalidate() -> None:
    files = _files()
    manifest = _first_run(files, {"sales_train.csv": [0]})
    assert plan_ingest(files, manifest, "rules-2").skip == ()
    plan = plan_ingest(files, manifest, RULES, missing_outputs=frozenset({"shops.csv"}))
    assert plan.validate == ("shops.csv",)  # the files validated against it saw the same bytes


def test_the_plan_does_not_touch_its_inputs() -> None:
    files = _files()
    manifest = _first_run(files, {"sales_train.csv": [0, 1]})
    before = repr(manifest)
    plan = plan_ingest(files, manifest, RULES)
    plan.month_owners({"sales_train.csv": [5]})
    assert repr(manifest) == before


def test_a_removed_drop_file_is_planned_out_its_covered_months_restored_and_the_rest_deleted() -> None:
    files = _files(**{"sales_2013-04__csv": "d1"})
    manifest = _first_run(files, {"sales_train.csv": [0, 1, 2], "sales_2013-04.csv": [2, 3]})
    del files["sales_2013-04.csv"]
    plan = plan_ingest(files, manifest, RULES)
    assert plan.removed == ("sales_2013-04.csv",)
    assert plan.rebuild_sales and plan.kept_months == {} and plan.validate == ("sales_train.csv",)
    owners = plan.month_owners({"sales_train.csv": [0, 1, 2]})
    assert owners == {0: ("sales_train.csv",), 1: ("sales_train.csv",), 2: ("sales_train.csv",)}
    assert plan.deleted_months(owners) == [3]
    assert plan.removed_months(owners) == {"sales_2013-04.csv": {"deleted": [3], "restored": [2]}}


def test_a_removed_test_csv_is_planned_out_without_touching_the_sales() -> None:
    files = _files()
    manifest = _first_run(files, {"sales_train.csv": [0, 1]})
    del files["test.csv"]
    plan = plan_ingest(files, manifest, RULES)
    assert plan.removed == ("test.csv",) and plan.validate == () and not plan.rebuild_sales
    assert plan.removed_months(plan.month_owners({})) == {}
