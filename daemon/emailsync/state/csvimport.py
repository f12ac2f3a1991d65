"""Reading the ``group,address`` CSV files that ``emailsync groups import`` loads."""

from __future__ import annotations

import csv
from pathlib import Path

from emailsync.mail.address import normalise_address

GROUP_COLUMN = "group"
ADDRESS_COLUMN = "address"
# A file with thousands of bad rows is one mistake repeated; list the first few.
MAX_REPORTED_PROBLEMS = 20


def read_group_csv(path: Path) -> list[tuple[str, str]]:
    """Read ``(group, address)`` rows from a CSV file whose header row names those columns.

    The header is matched case-insensitively and may name other columns too, which are
    ignored; blank lines are skipped; a UTF-8 byte-order mark (Excel) is fine. Addresses come
    back normalised. Raises ``ValueError`` listing every bad row as ``FILE:LINE: problem``
    (nothing is returned then), and ``OSError`` when the file cannot be read.
    """
    rows: list[tuple[str, str]] = []
    problems: list[str] = []
    # newline="": the csv module handles line ends itself, including inside quoted fields.
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file)
        columns: tuple[int, int] | None = None
        try:
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{path}:{reader.line_num}"
                if columns is None:
                    columns = _header_columns(where, row)
                    continue
                width = max(columns) + 1
                if len(row) < width:
                    problems.append(f"{where}: expected {width} columns, found {len(row)}")
                    continue
                group, address = row[columns[0]].strip(), row[columns[1]].strip()
                normalised = normalise_address(address)
                if not group:
                    problems.append(f"{where}: empty group name")
                elif normalised is None:
                    problems.append(f"{where}: not an email address: {address!r}")
                else:
                    rows.append((group, normalised))
        except csv.Error as exc:
            raise ValueError(f"{path}:{reader.line_num}: not valid CSV: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text: {exc.reason}") from exc
    if columns is None:
        raise ValueError(
            f"{path}: empty file; expected a header row {GROUP_COLUMN},{ADDRESS_COLUMN}"
        )
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more bad rows")
        raise ValueError("\n".join(shown))
    return rows


def _header_columns(where: str, header: list[str]) -> tuple[int, int]:
    """The indexes of the group and address columns named by the header row."""
    names = [cell.strip().lower() for cell in header]
    if GROUP_COLUMN not in names or ADDRESS_COLUMN not in names:
        raise ValueError(
            f"{where}: the header row must name the columns {GROUP_COLUMN},{ADDRESS_COLUMN};"
            f" found {','.join(header)!r}"
        )
    return names.index(GROUP_COLUMN), names.index(ADDRESS_COLUMN)
