#!/usr/bin/env python3
"""Independent check of a Philotes mirror table (the current state of a source table).

Reads the mirror with PyIceberg and with DuckDB's iceberg_scan (both apply its delete files
themselves), and compares each, row for row and column for column, with a query run against
PostgreSQL. Also reports the kinds of delete files the current snapshot holds. Prints one JSON
object; the Rust tests assert on it. Nothing here uses Philotes code.
"""
import argparse
import json
import sys

from verify import add_catalog_args, canon_row, open_catalog, read_duckdb, uuid_columns


def by_key(rows, pk, cols):
    out = {}
    dup = 0
    for r in rows:
        k = tuple(r[c] for c in pk)
        if k in out:
            dup += 1
        out[k] = {c: r.get(c) for c in cols}
    return out, dup


def counted(rows, cols):
    """Rows with a `_copy` number per repeated value, so equal rows stay apart."""
    seen = {}
    out = []
    for r in rows:
        k = tuple(json.dumps(r.get(c), sort_keys=True, default=str) for c in cols)
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append({**{c: r.get(c) for c in cols}, "_row": "|".join(k), "_copy": n})
    return out


def diff(a, b):
    missing = [k for k in a if k not in b][:3]
    extra = [k for k in b if k not in a][:3]
    differ = [{"pg": a[k], "mirror": b[k]} for k in a if k in b and a[k] != b[k]][:3]
    return {"missing": missing, "extra": extra, "differ": differ}


def main():
    ap = argparse.ArgumentParser()
    add_catalog_args(ap)
    ap.add_argument("--pk", default="id")
    ap.add_argument("--pg-conninfo", required=True)
    ap.add_argument("--pg-query", required=True)
    ap.add_argument("--duckdb", action="store_true")
    ap.add_argument(
        "--multiset",
        action="store_true",
        help="rows have no key (REPLICA IDENTITY FULL without one): compare as multisets",
    )
    args = ap.parse_args()
    pk = args.pk.split(",")

    table = open_catalog(args).load_table(args.table)
    uuids = uuid_columns(table.schema())
    rows = [canon_row(r, uuids) for r in table.scan().to_arrow().to_pylist()]
    contents = {}
    snap = table.current_snapshot()
    if snap is not None:
        for m in snap.manifests(table.io):
            for e in m.fetch_manifest_entry(table.io, discard_deleted=True):
                c = int(e.data_file.content)
                contents[c] = contents.get(c, 0) + 1

    import psycopg

    with psycopg.connect(args.pg_conninfo) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        cur = conn.execute(args.pg_query)
        cols = [d.name for d in cur.description]
        pg_rows = [canon_row(dict(zip(cols, r)), set()) for r in cur.fetchall()]
    if args.multiset:
        # Every column is the key and equal rows may repeat: count each row.
        pk = ["_row", "_copy"]
        pg_rows = counted(pg_rows, cols)
        rows = counted(rows, cols)
    pg, _ = by_key(pg_rows, pk, cols)
    ice, dup = by_key(rows, pk, cols)
    out = {
        "rows": len(rows),
        "pg_rows": len(pg),
        "duplicate_keys": dup,
        "equal": pg == ice and dup == 0,
        "data_files": contents.get(0, 0),
        "position_delete_files": contents.get(1, 0),
        "equality_delete_files": contents.get(2, 0),
        "identifier_fields": sorted(
            table.schema().find_column_name(i) for i in table.schema().identifier_field_ids
        ),
        "columns": [f.name for f in table.schema().fields],
    }
    if pg != ice:
        out["diff"] = diff(pg, ice)
    if args.duckdb:
        drows = read_duckdb(args, uuids)
        if args.multiset:
            drows = counted(drows, cols)
        d, ddup = by_key(drows, pk, cols)
        out["duckdb_rows"] = len(drows)
        out["duckdb_equal"] = pg == d and ddup == 0
        if pg != d:
            out["duckdb_diff"] = diff(pg, d)
    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
