#!/usr/bin/env python3
"""Full scans of a mirror table for the throughput benchmark: PyIceberg (`scan().to_arrow()`)
and DuckDB (`iceberg_scan`, count and a sum over every column kind), each the best of `--reps`
runs, and the files the current snapshot holds. Both readers apply the delete files
themselves; nothing here uses Philotes code. Prints one JSON object."""
import argparse
import glob
import json
import os
import sqlite3
import sys
import time

from pyiceberg.catalog.sql import SqlCatalog


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog-db", required=True)
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cat = SqlCatalog(
        "philotes",
        uri=f"sqlite:///{os.path.abspath(args.catalog_db)}",
        warehouse=f"file://{os.path.abspath(args.warehouse)}",
    )
    table = cat.load_table(args.table)
    files = {0: 0, 1: 0, 2: 0}
    snap = table.current_snapshot()
    for m in snap.manifests(table.io):
        for e in m.fetch_manifest_entry(table.io, discard_deleted=True):
            files[int(e.data_file.content)] += 1

    py_best, rows = None, None
    for _ in range(args.reps):
        t = time.perf_counter()
        rows = table.scan().to_arrow().num_rows
        s = time.perf_counter() - t
        py_best = s if py_best is None else min(py_best, s)

    import duckdb
    import duckdb_extension_avro
    import duckdb_extension_iceberg

    ns, name = args.table.split(".", 1)
    (loc,) = sqlite3.connect(args.catalog_db).execute(
        "SELECT metadata_location FROM iceberg_tables WHERE table_namespace=? AND table_name=?",
        (ns, name),
    ).fetchone()
    con = duckdb.connect()
    con.execute("SET autoinstall_known_extensions=false")
    con.execute("SET autoload_known_extensions=false")
    for ext, n in ((duckdb_extension_avro, "avro"), (duckdb_extension_iceberg, "iceberg")):
        found = glob.glob(os.path.join(ext.__path__[0], "extensions", "*", f"{n}.duckdb_extension"))
        con.execute(f"LOAD '{found[0]}'")
    duck_best, duck_rows = None, None
    for _ in range(args.reps):
        t = time.perf_counter()
        duck_rows, _ = con.execute(
            f"SELECT count(*), sum(n + d + length(s)) FROM iceberg_scan('{loc}')"
        ).fetchone()
        s = time.perf_counter() - t
        duck_best = s if duck_best is None else min(duck_best, s)
    json.dump(
        {
            "rows": rows,
            "duckdb_rows": duck_rows,
            "pyiceberg_s": py_best,
            "duckdb_s": duck_best,
            "data_files": files[0],
            "delete_files": files[1] + files[2],
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
