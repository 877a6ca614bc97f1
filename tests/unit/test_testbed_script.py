"""scripts/testbed.py's parts that need no server: the cluster id, the start-up error's text and
the second start (with `sleep` processes standing in for a part)."""
from __future__ import annotations

import uuid

import pytest
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


def test_a_start_up_error_shows_the_parts_own_log(tmp_path, monkeypatch) -> None:
    """Kafka's stdout holds little more than its start line, and a "kafka not ready" in a
    rehearsal could not say why (2026-11-28): the error shows the tail of its server.log too."""
    bed = load_bed_script(str(tmp_path))
    server_log = tmp_path / "kafka" / "server.log"
    server_log.parent.mkdir(parents=True)
    server_log.write_text("[t] INFO starting (kafka.server.KafkaRaftServer)\n"
                          "[t] ERROR Exiting Kafka due to fatal exception (kafka.Kafka)\n")
    part = bed.Part("kafka", [], lambda: [], lambda: False, own_log=lambda: server_log)
    part.logfile.parent.mkdir(parents=True)
    part.logfile.write_text("==== start java ... kafka.Kafka\n")
    monkeypatch.setattr(bed, "READY_TIMEOUT", 0.2)
    with pytest.raises(bed.TestbedError) as e:
        bed.wait_ready(part, None)
    text = str(e.value)
    assert "kafka not ready after" in text
    assert "==== start java" in text and "Exiting Kafka due to fatal exception" in text
    plain = bed.Part("redis", [], lambda: [], lambda: False)
    plain.logfile.write_text("redis log line\n")
    assert "redis log line" in plain.last_lines() and "server.log" not in plain.last_lines()


def test_a_part_that_does_not_get_ready_is_started_once_more_only_if_it_may(tmp_path, monkeypatch, capsys) -> None:
    """Kafka (restart_once) gets a second start after the first one's error is printed whole;
    any other part fails at once. Every process started is in `started`, for `up` to stop."""
    bed = load_bed_script(str(tmp_path))
    monkeypatch.setattr(bed, "READY_TIMEOUT", 0.3)
    starts: list[int] = []

    def prepare() -> list[str]:
        starts.append(1)
        return ["sleep", "30"]

    kafka = bed.Part("kafka", [], prepare, lambda: len(starts) >= 2, restart_once=True)
    started: list = []
    try:
        bed.start_and_wait(kafka, started)
        assert len(starts) == 2 and len(started) == 1          # the first process was stopped
        first_error = capsys.readouterr().err
        assert "kafka not ready after" in first_error and "event=restarting part=kafka" in first_error
        starts.clear()
        etcd = bed.Part("etcd", [], prepare, lambda: len(starts) >= 2)
        with pytest.raises(bed.TestbedError, match="etcd not ready after"):   # no second start
            bed.start_and_wait(etcd, started)
        assert len(starts) == 1 and [p.name for p, _ in started] == ["kafka", "etcd"]
    finally:
        for part, pid in started:
            bed.stop_pid(pid, part.name, timeout=5)
