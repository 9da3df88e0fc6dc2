#!/usr/bin/env python3
"""Recomputes the checksum_datos of CampanaEstadoCompleto messages from the messages alone.

checksum_datos is the SHA-256 (lowercase hex) of the Avro binary encoding of the message's `data`
record without its `checksum_datos` field: every other field of `data`, in the order of the schema
the message was written with (README, "Campaign snapshots and recovery").

Usage: verify.py SCHEMA.avsc PAYLOAD...
Each PAYLOAD is a file holding one message's body (Avro binary, written with SCHEMA). Prints one
JSON line per payload and exits 1 when any checksum differs.
"""

import copy
import hashlib
import io
import json
import sys

import fastavro


def checksum_schema(message_schema):
    """The `data` record's schema without its `checksum_datos` field."""
    data = next(f for f in message_schema["fields"] if f["name"] == "data")["type"]
    fields = [f for f in data["fields"] if f["name"] != "checksum_datos"]
    return fastavro.parse_schema({**copy.deepcopy(data), "fields": copy.deepcopy(fields)})


def main(schema_path, payload_paths):
    with open(schema_path) as f:
        message_schema = json.load(f)
    reader = fastavro.parse_schema(copy.deepcopy(message_schema))
    covered = checksum_schema(message_schema)
    failed = False
    for path in payload_paths:
        with open(path, "rb") as f:
            data = fastavro.schemaless_reader(f, reader)["data"]
        canonical = io.BytesIO()
        fastavro.schemaless_writer(canonical, covered, data)
        recomputed = hashlib.sha256(canonical.getvalue()).hexdigest()
        ok = recomputed == data["checksum_datos"]
        failed |= not ok
        print(json.dumps({
            "payload": path,
            "id_campana": data["id_campana"],
            "estado": data["estado"],
            "version": data["version"],
            "checksum_datos": data["checksum_datos"],
            "recomputed": recomputed,
            "ok": ok,
        }))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
