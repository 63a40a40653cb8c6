#!/usr/bin/env python3
"""Independent check of the Iceberg statistics of every data file of a table.

For each data file of the current snapshot (PyIceberg's scan plan), reads the Parquet file
with pyarrow and compares what the manifest says with what the file holds: the record count,
and per top-level primitive column the value and null counts and the lower and upper bounds
(a bound may be absent; one that is present must be the column's exact minimum or maximum,
NaN left out, or for a string or binary value longer than 16 characters (bytes) Iceberg's
default truncation of it: the first 16 for a lower bound, the first 16 with the last one
incremented for an upper bound). A wrong bound makes engines skip files that hold matching
rows. Also reports the most row groups a file has. Prints one JSON object; nothing here uses
Philotes code.
"""
import argparse
import json
import math
import os

from verify import add_catalog_args, open_catalog


def comparable(v):
    """Python values from pyarrow and from Iceberg's single-value form, made comparable."""
    import datetime as dt
    import uuid

    if isinstance(v, uuid.UUID):
        return v.bytes
    if isinstance(v, dt.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return round((v - dt.datetime(1970, 1, 1)).total_seconds() * 1_000_000)
    if isinstance(v, dt.date):
        return (v - dt.date(1970, 1, 1)).days
    if isinstance(v, dt.time):
        return ((v.hour * 60 + v.minute) * 60 + v.second) * 1_000_000 + v.microsecond
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    return v


TRUNCATE = 16


def truncated(v, upper):
    """Iceberg's truncate(16) form of a string or binary bound (None: no bound possible)."""
    if isinstance(v, str) and len(v) > TRUNCATE:
        cut = list(v[:TRUNCATE])
        if not upper:
            return "".join(cut)
        while cut:
            c = ord(cut.pop()) + 1
            if 0xD800 <= c <= 0xDFFF:
                c = 0xE000
            if c <= 0x10FFFF:
                return "".join(cut) + chr(c)
        return None
    if isinstance(v, bytes) and len(v) > TRUNCATE:
        cut = bytearray(v[:TRUNCATE])
        if not upper:
            return bytes(cut)
        while cut:
            b = cut.pop()
            if b < 0xFF:
                return bytes(cut) + bytes([b + 1])
        return None
    return v


def column_facts(arr):
    """(values, nulls, min, max) of a pyarrow column, NaN left out of min and max."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = arr.combine_chunks() if hasattr(arr, "combine_chunks") else arr
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    nulls = arr.null_count
    present = arr.drop_null()
    if pa.types.is_floating(present.type):
        present = present.filter(pc.invert(pc.is_nan(present)))
    if len(present) == 0:
        return len(arr), nulls, None, None
    if pa.types.is_fixed_size_binary(present.type) or pa.types.is_binary(present.type):
        vals = [bytes(x) for x in present.to_pylist()]
        return len(arr), nulls, min(vals), max(vals)
    mm = pc.min_max(present)
    return len(arr), nulls, mm["min"].as_py(), mm["max"].as_py()


def main():
    ap = argparse.ArgumentParser()
    add_catalog_args(ap)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    from pyiceberg.conversions import from_bytes
    from pyiceberg.types import FixedType, PrimitiveType, UUIDType

    table = open_catalog(args).load_table(args.table)
    schema = table.schema()
    files = 0
    bounds = 0
    row_groups = 0
    mismatches = []
    for task in table.scan().plan_files():
        f = task.file
        files += 1
        path = f.file_path.removeprefix("file://")
        pf = pq.read_table(path)
        row_groups = max(row_groups, pq.ParquetFile(path).metadata.num_row_groups)
        if f.record_count != pf.num_rows:
            mismatches.append(f"{path}: record_count {f.record_count} != {pf.num_rows}")
        for i, name in enumerate(pf.column_names):
            meta = pf.schema.field(i).metadata or {}
            fid = meta.get(b"PARQUET:field_id")
            if fid is None:
                continue
            fid = int(fid)
            field = schema.find_field(fid)
            if not isinstance(field.field_type, PrimitiveType):
                continue
            values, nulls, lo, hi = column_facts(pf.column(i))
            if not isinstance(field.field_type, (FixedType, UUIDType)):
                lo, hi = truncated(lo, False), truncated(hi, True)
            where = f"{os.path.basename(path)} {name}"
            if (f.value_counts or {}).get(fid) != values:
                mismatches.append(f"{where}: value_count {(f.value_counts or {}).get(fid)} != {values}")
            if (f.null_value_counts or {}).get(fid) != nulls:
                mismatches.append(f"{where}: null_count {(f.null_value_counts or {}).get(fid)} != {nulls}")
            for side, want, stored in (("lower", lo, f.lower_bounds), ("upper", hi, f.upper_bounds)):
                raw = (stored or {}).get(fid)
                if raw is None:
                    continue
                bounds += 1
                got = from_bytes(field.field_type, raw)
                if want is None:
                    mismatches.append(f"{where}: {side} bound {got!r} on a column without values")
                    continue
                a, b = comparable(got), comparable(want)
                if isinstance(a, float) and isinstance(b, float) and (math.isnan(a) or math.isnan(b)):
                    mismatches.append(f"{where}: {side} bound NaN")
                elif a != b:
                    mismatches.append(f"{where}: {side} bound {got!r} != {want!r}")
    print(json.dumps({
        "files": files,
        "bounds_checked": bounds,
        "row_groups_max": row_groups,
        "mismatches": mismatches[:50],
    }))


if __name__ == "__main__":
    main()
