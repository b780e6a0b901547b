#!/usr/bin/env python3
"""Writes records straight to a Shiva topic with an independent Kafka client (confluent-kafka),
bypassing shiva-ctl's checks, and deletes and recreates topics, for the untrusted-input e2e tests.

usage:
  raw_record.py BOOTSTRAP produce TOPIC KEY FILE
      one record on partition 0 with KEY and the bytes of FILE as its value
  raw_record.py BOOTSTRAP recreate TOPIC
      deletes TOPIC and creates it again empty (1 partition, compacted)
"""
import sys
import time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

bootstrap, command = sys.argv[1], sys.argv[2]
args = sys.argv[3:]

if command == "produce":
    topic, key, path = args
    with open(path, "rb") as f:
        value = f.read()
    failures = []
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 10_000_000})

    def report(err, msg):
        if err is not None:
            failures.append(str(err))

    producer.produce(topic, key=key.encode(), value=value, partition=0, on_delivery=report)
    producer.flush(10)
    if failures:
        sys.exit(f"not written: {failures}")
elif command == "recreate":
    (topic,) = args
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics([topic]).values():
        future.result()
    for attempt in range(100):
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=1, config={"cleanup.policy": "compact"})]
        )
        try:
            for future in futures.values():
                future.result()
            break
        except Exception as err:  # the deletion may still be under way
            if "already exists" not in str(err).lower() and "TOPIC_ALREADY_EXISTS" not in str(err):
                raise
            time.sleep(0.1)
    else:
        sys.exit(f"could not recreate {topic}")
else:
    sys.exit(f"unknown command {command}")
