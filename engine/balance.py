"""Class balance of labelled sources: counts, shares and the imbalance ratio."""

import pandas as pd

from engine.grades import GRADES


def balance_table(counts: pd.DataFrame) -> pd.DataFrame:
    """Rows (source, role, grade, count) -> every grade of every source, with its percent."""
    sources = counts[["source", "role"]].drop_duplicates()
    full = sources.merge(pd.DataFrame({"grade": GRADES}), how="cross")
    table = full.merge(counts, on=["source", "role", "grade"], how="left").fillna({"count": 0})
    table["count"] = table["count"].astype(int)
    totals = table.groupby("source")["count"].transform("sum")
    table["percent"] = (100 * table["count"] / totals).round(1)
    return table


def imbalance_ratios(table: pd.DataFrame) -> pd.Series:
    """Largest over smallest class count per source; inf when a grade has no image."""
    by_source = table.groupby("source", sort=False)["count"]
    return by_source.max() / by_source.min()
