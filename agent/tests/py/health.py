#!/usr/bin/env python3
"""Independent health check of an Iceberg table written by Philotes (PyIceberg only).

Prints one JSON object: snapshot count and operations, data files in the current snapshot,
every file the metadata references (manifest lists, manifests, data files of every retained
snapshot, the metadata log) and whether it exists, the metadata files on disk, and the row
count of each retained snapshot read by time travel, and the schemas the metadata holds.
"""
import argparse
import json
import os

from pyiceberg.catalog.sql import SqlCatalog


def local(path):
    return path[len("file://"):] if path.startswith("file://") else path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog-db", required=True)
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--time-travel", action="store_true")
    args = ap.parse_args()
    cat = SqlCatalog(
        "philotes",
        uri=f"sqlite:///{os.path.abspath(args.catalog_db)}",
        warehouse=f"file://{os.path.abspath(args.warehouse)}",
    )
    t = cat.load_table(args.table)
    io = t.io
    referenced = set()
    missing = []
    snaps = t.metadata.snapshots
    for s in snaps:
        referenced.add(s.manifest_list)
        for m in s.manifests(io):
            referenced.add(m.manifest_path)
            for e in m.fetch_manifest_entry(io, discard_deleted=True):
                referenced.add(e.data_file.file_path)
    referenced.add(t.metadata_location)
    for entry in t.metadata.metadata_log:
        referenced.add(entry.metadata_file)
    for p in sorted(referenced):
        if not os.path.exists(local(p)):
            missing.append(p)
    current = t.current_snapshot()
    data_files = 0
    partitions = {}
    if current is not None:
        for m in current.manifests(io):
            for e in m.fetch_manifest_entry(io, discard_deleted=True):
                data_files += 1
                key = str(e.data_file.partition)
                partitions[key] = partitions.get(key, 0) + 1
    metadata_dir = os.path.join(local(t.metadata.location), "metadata")
    on_disk = [f for f in os.listdir(metadata_dir) if f.endswith(".metadata.json")]
    out = {
        "snapshots": len(snaps),
        "operations": [s.summary.operation.value if s.summary else None for s in snaps],
        "data_files": data_files,
        "max_files_per_partition": max(partitions.values(), default=0),
        "referenced": len(referenced),
        "missing": missing,
        "metadata_files_on_disk": len(on_disk),
        "metadata_json_bytes": os.path.getsize(local(t.metadata_location)),
        "rows": t.scan().to_arrow().num_rows,
        "schemas": len(t.metadata.schemas),
        # Snapshots whose schema is no longer in the metadata (time travel to them fails).
        "snapshots_without_schema": [
            s.snapshot_id
            for s in snaps
            if s.schema_id is not None and s.schema_id not in {x.schema_id for x in t.metadata.schemas}
        ],
    }
    if args.time_travel:
        out["time_travel_rows"] = {
            str(s.snapshot_id): t.scan(snapshot_id=s.snapshot_id).to_arrow().num_rows
            for s in snaps
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
