#!/usr/bin/env python3
"""Writes records straight to a Shiva topic with an independent Kafka client (confluent-kafka),
bypassing shiva-ctl's checks, for the untrusted-input e2e tests.

usage:
  raw_record.py BOOTSTRAP produce TOPIC KEY FILE
      one record on partition 0 with KEY and the bytes of FILE as its value
"""
import sys

from confluent_kafka import Producer

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
else:
    sys.exit(f"unknown command {command}")
