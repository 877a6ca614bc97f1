"""scripts/testbed.py's pure parts, without starting anything."""
from __future__ import annotations

import uuid

from redis_cluster_bed import load_bed_script


def test_kafka_cluster_ids_never_start_with_a_dash(tmp_path, monkeypatch) -> None:
    """An id starting with "-" is read by kafka-storage's parser as a missing --cluster-id, and
    the bed failed to start (a clean-clone rehearsal, 2026-11-28): such draws are drawn again."""
    bed = load_bed_script(str(tmp_path))
    dash = uuid.UUID(bytes=b"\xf8" + bytes(15))          # URL-safe base64 "-AAAAAAAAAAAAAAAAAAAAA"
    ok = uuid.UUID(bytes=b"\x10" + bytes(15))
    draws = iter([dash, dash, ok])
    monkeypatch.setattr(bed.uuid, "uuid4", lambda: next(draws))
    assert bed.kafka_cluster_id() == "EAAAAAAAAAAAAAAAAAAAAA"
    monkeypatch.undo()
    ids = [bed.kafka_cluster_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(len(i) == 22 and not i.startswith("-") for i in ids)
