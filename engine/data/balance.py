"""Class balance of labelled sources: counts, shares and the imbalance ratio."""

import pandas as pd

from grades import GRADES


def every_grade(counts: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows (*keys, grade, count), with a zero row for every grade a group lacks."""
    full = counts[keys].drop_duplicates().merge(pd.DataFrame({"grade": GRADES}), how="cross")
    table = full.merge(counts, on=[*keys, "grade"], how="left").fillna({"count": 0})
    return table.astype({"count": int})


def balance_table(counts: pd.DataFrame) -> pd.DataFrame:
    """Rows (source, role, grade, count) -> every grade of every source, with its percent."""
    table = every_grade(counts, ["source", "role"])
    totals = table.groupby("source")["count"].transform("sum")
    table["percent"] = (100 * table["count"] / totals).round(1)
    return table


def imbalance_ratios(table: pd.DataFrame) -> pd.Series:
    """Largest over smallest class count per source; inf when a grade has no image."""
    by_source = table.groupby("source", sort=False)["count"]
    return by_source.max() / by_source.min()
