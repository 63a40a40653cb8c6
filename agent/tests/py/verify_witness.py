#!/usr/bin/env python3
"""Independent check of Philotes changelog tables against PostgreSQL's own decoding.

A `test_decoding` slot (the witness), created before the workload, lists every committed
transaction with its changes per table. This script reads it (without consuming it) and the
changelog tables (PyIceberg), groups both by transaction (the changelog by `_cdc_lsn`, in
commit order) and compares them transaction by transaction: the changes of each table, by
kind. The documented shape of the changelog is applied: an UPDATE that carries its old row or
old key (a key change, `REPLICA IDENTITY FULL`) is a `D` of the old row and a `U` of the new
one; copied rows (`R`) are not in the stream and are left out. Prints one JSON object; the
Rust tests assert on it. Nothing here uses Philotes code.
"""
import argparse
import collections
import json
import re

import psycopg

from verify import add_catalog_args, open_catalog

CHANGE = re.compile(r"table public\.(\w+): (INSERT|UPDATE|DELETE|TRUNCATE):")


def witness(conninfo, slot, tables):
    txns = []
    current = None
    with psycopg.connect(conninfo, autocommit=True) as pg:
        rows = pg.execute(
            "SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL)", (slot,)
        ).fetchall()
    for (data,) in rows:
        if data.startswith("BEGIN"):
            current = collections.Counter()
        elif data.startswith("COMMIT"):
            if current:
                txns.append(current)
            current = None
        elif current is not None:
            m = CHANGE.match(data)
            if not m:
                continue
            table, kind = m.groups()
            if kind == "TRUNCATE":
                # One line names every table of the statement.
                for t in re.findall(r"public\.(\w+)", data):
                    if t in tables:
                        current[f"{t}:T"] += 1
            elif table in tables:
                current[f"{table}:{kind[0]}"] += 1
                if kind == "UPDATE" and "old-key:" in data:
                    current[f"{table}:D"] += 1
    return txns


def main():
    ap = argparse.ArgumentParser()
    add_catalog_args(ap)
    ap.add_argument("--pg-conninfo", required=True)
    ap.add_argument("--slot", required=True)
    args = ap.parse_args()
    # --table names the changelogs to judge, each after its source table:
    # a=ns.a_changelog,b=ns.b_changelog
    pairs = dict(p.split("=", 1) for p in args.table.split(","))
    want = witness(args.pg_conninfo, args.slot, set(pairs))
    catalog = open_catalog(args)
    by_lsn = collections.defaultdict(collections.Counter)
    duplicates = 0
    copied = 0
    for source, name in pairs.items():
        arrow = catalog.load_table(name).scan(selected_fields=("_cdc_op", "_cdc_lsn", "_cdc_seq")).to_arrow()
        seen = collections.Counter(zip(arrow["_cdc_lsn"].to_pylist(), arrow["_cdc_seq"].to_pylist()))
        duplicates += sum(n - 1 for n in seen.values() if n > 1)
        for op, lsn in zip(arrow["_cdc_op"].to_pylist(), arrow["_cdc_lsn"].to_pylist()):
            if op == "R":
                copied += 1
            else:
                by_lsn[lsn][f"{source}:{op}"] += 1
    got = [c for _, c in sorted(by_lsn.items())]
    mismatched = [
        {"txn": i, "witness": dict(w), "changelog": dict(g)}
        for i, (w, g) in enumerate(zip(want, got))
        if w != g
    ]
    totals_w, totals_g = collections.Counter(), collections.Counter()
    for c in want:
        totals_w.update(c)
    for c in got:
        totals_g.update(c)
    print(
        json.dumps(
            {
                "witness_txns": len(want),
                "changelog_txns": len(got),
                "mismatched": len(mismatched),
                "first_mismatches": mismatched[:3],
                "duplicate_positions": duplicates,
                "copied_rows": copied,
                "witness_totals": dict(sorted(totals_w.items())),
                "changelog_totals": dict(sorted(totals_g.items())),
            }
        )
    )


if __name__ == "__main__":
    main()
