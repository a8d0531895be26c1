"""Every case of bad_inputs_cases through schemas.mapping.load_rows: a clear SchemaError naming
the file / row / column with a fix, or counted quarantine reasons with every input row accounted for."""

import polars as pl
import pytest

from schemas import SchemaError
from schemas.mapping import REASONS, load_rows

from .bad_inputs_cases import CASES


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case(case, tmp_path):
    path = case.write(tmp_path)
    if case.error is not None:
        with pytest.raises(SchemaError) as err:
            load_rows(str(path), mapping=case.mapping, kind=case.kind)
        text = str(err.value)
        assert __import__("re").search(case.error, text), text
        assert "Fix:" in text and str(path) in text, text  # names the file, says how to fix it
        if case.error_column is not None:
            assert err.value.column == case.error_column, text
        if case.error_row is not None:
            assert err.value.row == case.error_row, text
        return
    df = load_rows(str(path), mapping=case.mapping, kind=case.kind)
    reasons = dict(df.filter(~pl.col("keep"))["drop_reason"].value_counts().iter_rows())
    assert int(df["keep"].sum()) == case.kept, reasons
    assert reasons == case.reasons
    assert df.height == case.input_rows  # kept + quarantined == input rows
    assert df["id"].n_unique() == df.height
    for reason in reasons:
        assert not reason.startswith("import:") or reason.removeprefix("import:") in REASONS


def test_cases_cover_every_reason_and_many_inputs():
    given = {r.removeprefix("import:") for case in CASES for r in case.reasons}
    assert given >= set(REASONS) - {"unrepresentable", "no_user_turn"}
    assert len(CASES) >= 30
