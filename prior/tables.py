"""Reading the tables the commands take: a text column of a Parquet or CSV file, and a folder
of Parquet files read as one table (clip-retrieval's `metadata/`, in sorted-name order).

`batch` reads its prompts, `search` its index metadata and `eval` its captions here. Nothing
here imports torch; pyarrow is imported when a table is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .contract import ArgumentError

TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


def read_text_column(path: Path, kind: str, column: str, field: str = "input") -> list[str | None]:
    """The values of the text column `column` of a `kind` ("parquet" or "csv") file, nulls as None.
    An unreadable file is an ArgumentError naming `field`; a missing or non-text column one naming
    `column`."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            names = pq.read_schema(path).names
            if column not in names:
                raise missing_column(column, names, path)
            table = pq.read_table(path, columns=[column])
        else:
            # every column as text: a prompt column of digits stays text
            options = pa_csv.ConvertOptions(column_types={column: pa.string()}, strings_can_be_null=True)
            table = pa_csv.read_csv(path, convert_options=options)
            if column not in table.column_names:
                raise missing_column(column, table.column_names, path)
    except ArgumentError:
        raise
    except (OSError, pa.ArrowException) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArgumentError(field, f"not a readable {kind} file, got {str(path)!r} ({first_line})") from None
    values = table.column(column)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ArgumentError("column", f"must name a text column, got {column!r} (holds {values.type})")
    return values.to_pylist()


def missing_column(column: str, names: Sequence[str], path: Path, field: str = "column") -> ArgumentError:
    shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
    return ArgumentError(field, f"must be a column of {str(path)!r}, got {column!r} (columns: {shown})")


def parquet_files(folder: Path, unreadable: Callable[[Path, str], Exception]) -> list[tuple[Path, int, int]]:
    """(file, first row, row count) for each *.parquet in `folder`, in sorted-name order (row
    order, as clip-retrieval assumes); [] when there is no such folder. A file whose footer
    cannot be read raises unreadable(file, problem)."""
    import pyarrow.parquet as pq

    if not folder.is_dir():
        return []
    files, first = [], 0
    for path in sorted(folder.glob("*.parquet")):
        try:
            count = pq.read_metadata(path).num_rows
        except Exception as e:  # pyarrow raises several kinds for a damaged footer
            raise unreadable(path, f"not a readable Parquet file ({str(e).strip().splitlines()[0]})") from None
        files.append((path, first, count))
        first += count
    return files
