#!/usr/bin/env python3
"""Independent check of a Philotes changelog table.

Reads the Iceberg table with PyIceberg (SqlCatalog) and, optionally, with DuckDB's
iceberg_scan, folds the changelog to current state by primary key and compares it with a
query run against PostgreSQL. Prints one JSON object; the Rust tests assert on it.
Nothing here uses Philotes code: it is the outside reader the tests need.
"""
import argparse
import datetime as dt
import decimal
import json
import os
import sqlite3
import sys
import uuid


def canon(v):
    """A JSON-comparable form of a Python value from PyIceberg, DuckDB or psycopg."""
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, dt.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(dt.timezone.utc).replace(tzinfo=None)
            return v.isoformat() + "Z"
        return v.isoformat()
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return [canon(x) for x in v]
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def uuid_columns(schema):
    from pyiceberg.types import UUIDType

    return {f.name for f in schema.fields if isinstance(f.field_type, UUIDType)}


def canon_row(row, uuids):
    out = {}
    for k, v in row.items():
        if k in uuids and isinstance(v, (bytes, bytearray)) and len(v) == 16:
            v = uuid.UUID(bytes=bytes(v))
        out[k] = canon(v)
    return out


def add_catalog_args(ap):
    """The arguments `open_catalog` reads, and `--table`."""
    ap.add_argument("--catalog-db", default="")
    ap.add_argument("--warehouse", default="")
    ap.add_argument("--catalog-props", help="JSON object of extra catalog/FileIO properties")
    ap.add_argument("--sql-uri", help="SQLAlchemy URI of the SQL catalog (default: --catalog-db)")
    ap.add_argument("--rest-uri", help="read through an Iceberg REST catalog instead of SQLite")
    ap.add_argument("--catalog-name", default="philotes")
    ap.add_argument("--table", required=True)


def open_catalog(args):
    props = json.loads(args.catalog_props) if args.catalog_props else {}
    if args.rest_uri:
        from pyiceberg.catalog.rest import RestCatalog

        return RestCatalog(args.catalog_name, uri=args.rest_uri, auth={"type": "noop"}, **props)
    from pyiceberg.catalog.sql import SqlCatalog

    warehouse = args.warehouse
    if "://" not in warehouse:
        warehouse = f"file://{os.path.abspath(warehouse)}"
    return SqlCatalog(
        args.catalog_name,
        uri=args.sql_uri or f"sqlite:///{os.path.abspath(args.catalog_db)}",
        warehouse=warehouse,
        **props,
    )


def read_pyiceberg(args):
    cat = open_catalog(args)
    table = cat.load_table(args.table)
    uuids = uuid_columns(table.schema())
    rows = [canon_row(r, uuids) for r in table.scan().to_arrow().to_pylist()]
    snaps = table.metadata.snapshots
    lsns = [s.summary.additional_properties.get("philotes.lsn") for s in snaps if s.summary]
    return rows, uuids, len(snaps), [l for l in lsns if l is not None]


def metadata_location(args):
    """The table's current metadata file, asked of its catalog directly (not through PyIceberg):
    the SQL catalog's `iceberg_tables` row, or the REST catalog's load-table answer."""
    ns, name = args.table.split(".", 1)
    if args.rest_uri:
        import urllib.parse
        import urllib.request

        base = args.rest_uri.rstrip("/")
        with urllib.request.urlopen(f"{base}/v1/config") as r:
            config = json.load(r)
        prefix = {**config.get("defaults", {}), **config.get("overrides", {})}.get("prefix", "")
        prefix = f"{prefix.strip('/')}/" if prefix else ""
        q = urllib.parse.quote
        with urllib.request.urlopen(f"{base}/v1/{prefix}namespaces/{q(ns)}/tables/{q(name)}") as r:
            return json.load(r)["metadata-location"]
    db = sqlite3.connect(args.catalog_db)
    (loc,) = db.execute(
        "SELECT metadata_location FROM iceberg_tables WHERE catalog_name=? AND table_namespace=? AND table_name=?",
        (args.catalog_name, ns, name),
    ).fetchone()
    return loc


def read_duckdb(args, uuids):
    import duckdb

    loc = metadata_location(args)
    con = duckdb.connect()
    con.execute("SET autoinstall_known_extensions=false")
    con.execute("SET autoload_known_extensions=false")
    import glob

    import duckdb_extension_avro
    import duckdb_extension_iceberg

    exts = [(duckdb_extension_avro, "avro"), (duckdb_extension_iceberg, "iceberg")]
    if loc.startswith("s3://"):
        import duckdb_extension_httpfs

        exts.insert(0, (duckdb_extension_httpfs, "httpfs"))
    # The wheels ship the extension binaries; load them by path (no network; iceberg last).
    for ext, name in exts:
        found = glob.glob(os.path.join(ext.__path__[0], "extensions", "*", f"{name}.duckdb_extension"))
        if not found:
            raise SystemExit(f"duckdb extension {name} not found in {ext.__path__[0]}")
        con.execute(f"LOAD '{found[0]}'")
    if loc.startswith("s3://"):
        # The same S3 endpoint and credentials the PyIceberg reader is given.
        props = json.loads(args.catalog_props) if args.catalog_props else {}
        endpoint = props.get("s3.endpoint", "")
        scheme, _, host = endpoint.rpartition("://")
        path_style = str(props.get("s3.path-style-access", "false")).lower() == "true"

        def lit(v):
            return "'" + str(v).replace("'", "''") + "'"

        con.execute(
            "CREATE SECRET s3 (TYPE s3, "
            f"KEY_ID {lit(props.get('s3.access-key-id', ''))}, "
            f"SECRET {lit(props.get('s3.secret-access-key', ''))}, "
            f"REGION {lit(props.get('s3.region', 'us-east-1'))}, "
            f"ENDPOINT {lit(host or endpoint)}, "
            f"URL_STYLE {lit('path' if path_style else 'vhost')}, "
            f"USE_SSL {'true' if scheme == 'https' else 'false'})"
        )
    con.execute("SET TimeZone='UTC'")
    cur = con.execute(f"SELECT * FROM iceberg_scan('{loc}')")
    cols = [d[0] for d in cur.description]
    rows = [canon_row(dict(zip(cols, r)), uuids) for r in cur.fetchall()]
    return rows


def fold(rows, pk, fill=False):
    """Current state: the latest change per key wins; deletes remove; truncates clear.

    With `fill`, the values a row lists in `_cdc_unchanged` (unchanged TOAST, not sent) are
    taken as docs/querying.md says a reader takes them: from the key's previous row, or, for
    an update that moved its key (a `D` of the old key right before it: same `_cdc_lsn`,
    `_cdc_seq` one less), from the old key's row."""
    state = {}
    deleted = None
    for r in sorted(rows, key=lambda r: (r["_cdc_lsn"], r["_cdc_seq"])):
        op = r["_cdc_op"]
        moved_from, deleted = deleted, None
        if op == "T":
            state.clear()
            continue
        key = tuple(r[k] for k in pk)
        if op == "D":
            deleted = (r["_cdc_lsn"], r["_cdc_seq"], state.pop(key, None))
        else:
            row = {k: v for k, v in r.items() if not k.startswith("_cdc_")}
            unchanged = r.get("_cdc_unchanged") or []
            if fill and unchanged:
                before = state.get(key)
                if before is None and moved_from and moved_from[:2] == (r["_cdc_lsn"], r["_cdc_seq"] - 1):
                    before = moved_from[2]
                for c in unchanged:
                    row[c] = (before or {}).get(c)
            state[key] = row
    return state


def main():
    ap = argparse.ArgumentParser()
    add_catalog_args(ap)
    ap.add_argument("--pk", default="id")
    ap.add_argument("--pg-conninfo")
    ap.add_argument("--pg-query")
    ap.add_argument("--duckdb", action="store_true")
    ap.add_argument("--rows", action="store_true", help="include all rows in the output")
    ap.add_argument("--fill-unchanged", action="store_true", help="fold with unchanged TOAST values filled in")
    args = ap.parse_args()
    pk = args.pk.split(",")

    rows, uuids, snapshots, lsns = read_pyiceberg(args)
    ordered = sorted(rows, key=lambda r: (r["_cdc_lsn"], r["_cdc_seq"]))
    keys = [(r["_cdc_lsn"], r["_cdc_seq"]) for r in ordered]
    ops = {}
    for r in ordered:
        ops[r["_cdc_op"]] = ops.get(r["_cdc_op"], 0) + 1
    out = {
        "rows": len(rows),
        "unique": len(set(keys)) == len(keys),
        "duplicates": len(keys) - len(set(keys)),
        "ops": ops,
        "op_sequence": "".join(r["_cdc_op"] for r in ordered),
        "snapshots": snapshots,
        "lsn_properties": lsns,
        "max_lsn": max((k[0] for k in keys), default=0),
        "lsns": sorted(set(k[0] for k in keys)),
    }
    snap_keys = [tuple(r.get(k) for k in pk) for r in ordered if r["_cdc_op"] == "R"]
    out["snapshot_duplicate_keys"] = len(snap_keys) - len(set(snap_keys))
    if args.rows:
        out["all_rows"] = ordered
    if args.duckdb:
        drows = read_duckdb(args, uuids)
        key = lambda r: (r["_cdc_lsn"], r["_cdc_seq"])  # noqa: E731
        a = sorted(rows, key=key)
        b = sorted(drows, key=key)
        out["duckdb_rows"] = len(drows)
        out["duckdb_equal"] = a == b
        if a != b:
            diff = [(x, y) for x, y in zip(a, b) if x != y][:3]
            out["duckdb_diff"] = diff
    if args.pg_conninfo and args.pg_query:
        import psycopg

        with psycopg.connect(args.pg_conninfo) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            cur = conn.execute(args.pg_query)
            cols = [d.name for d in cur.description]
            pg_rows = [canon_row(dict(zip(cols, r)), set()) for r in cur.fetchall()]
        pg_state = {tuple(r[k] for k in pk): r for r in pg_rows}
        ice_state = fold(rows, pk, args.fill_unchanged)
        # Compare only the columns the query selected.
        ice_state = {k: {c: v.get(c) for c in cols} for k, v in ice_state.items()}
        out["pg_rows"] = len(pg_state)
        out["state_rows"] = len(ice_state)
        out["state_equal"] = pg_state == ice_state
        if pg_state != ice_state:
            missing = [k for k in pg_state if k not in ice_state][:3]
            extra = [k for k in ice_state if k not in pg_state][:3]
            differ = [
                {"pg": pg_state[k], "iceberg": ice_state[k]}
                for k in pg_state
                if k in ice_state and pg_state[k] != ice_state[k]
            ][:3]
            out["state_diff"] = {"missing": missing, "extra": extra, "differ": differ}
    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
