#!/usr/bin/env python3
"""An independent Kafka client (confluent-kafka) for the archiver's e2e tests.

usage:
  kafka_tool.py BOOTSTRAP create TOPIC PARTITIONS [RETENTION_MS|compact]
      (with a retention, cleanup.policy=delete and retention.ms=RETENTION_MS; with compact,
      cleanup.policy=compact)
  kafka_tool.py BOOTSTRAP produce TOPIC PARTITIONS FROM TO
      record i goes to partition i % PARTITIONS with key "k<i>", a header, and value
      "record <i>" (every 97th value is binary: b"\\xff\\x00<i>\\n")
  kafka_tool.py BOOTSTRAP delete TOPIC PARTITION BEFORE_OFFSET
  kafka_tool.py BOOTSTRAP produce-keys TOPIC FROM TO KEYS
      to partition 0, record i with key "k<KEYS>-<i % KEYS>" and value "record <i>" (compactable)
  kafka_tool.py BOOTSTRAP produce-lines TOPIC PARTITIONS COUNT
      COUNT synthetic access-log lines of about 135 bytes, keyless, no headers, round robin
  kafka_tool.py BOOTSTRAP dump TOPIC PARTITIONS COUNT
      the naive archiver a user writes by hand: a plain consume loop printing each value and a
      newline to stdout until COUNT records (pipe it into `zstd -1`)
  kafka_tool.py BOOTSTRAP produce-file TOPIC KEY FILE
      one record to partition 0 with key KEY and the bytes of FILE as its value
  kafka_tool.py BOOTSTRAP consume TOPIC PARTITIONS COUNT
      reads COUNT records (0: up to the end of each partition) from the start of the
      partitions and prints one JSON object per
      record: partition, offset, key, value (base64) and headers (name, text)
"""
import base64
import json
import os
import sys

import confluent_kafka
import confluent_kafka.admin
from confluent_kafka import TopicPartition
from confluent_kafka.admin import NewTopic

# KAFKA_TOOL_CONFIG: a JSON object of librdkafka settings every client of this run gets, last
# (a compression codec, TLS or SASL settings).
EXTRA = json.loads(os.environ.get("KAFKA_TOOL_CONFIG") or "{}")


def Producer(config):
    return confluent_kafka.Producer({**config, **EXTRA})


def Consumer(config):
    return confluent_kafka.Consumer({**config, **EXTRA})


def AdminClient(config):
    return confluent_kafka.admin.AdminClient({**config, **EXTRA})

bootstrap, command = sys.argv[1], sys.argv[2]
args = sys.argv[3:]


def value(i):
    return b"\xff\x00" + str(i).encode() + b"\n" if i % 97 == 0 else f"record {i}".encode()


if command == "create":
    topic, partitions = args[0], int(args[1])
    if len(args) > 2 and args[2] == "compact":
        config = {"cleanup.policy": "compact"}
    elif len(args) > 2:
        config = {"cleanup.policy": "delete", "retention.ms": args[2]}
    else:
        config = {}
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1, config=config)]).values():
        future.result(30)
elif command == "produce-file":
    topic, key, path = args[0], args[1], args[2]
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 4_000_000})
    failures = []

    def report(err, msg):
        if err is not None:
            failures.append(str(err))

    with open(path, "rb") as file:
        producer.produce(topic, key=key.encode(), value=file.read(), partition=0, on_delivery=report)
    producer.flush(30)
    if failures:
        sys.exit(f"delivery failed: {failures}")
elif command == "produce":
    topic, partitions, start, end = args[0], int(args[1]), int(args[2]), int(args[3])
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": False})
    failures = []

    def report(err, msg):
        if err is not None:
            failures.append(str(err))

    for i in range(start, end):
        while True:
            try:
                producer.produce(topic, key=f"k{i}".encode(), value=value(i), partition=i % partitions,
                                 headers=[("n", str(i).encode())], on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(60)
    if left or failures:
        sys.exit(f"produce: {left} undelivered, failures: {failures[:3]}")
elif command == "produce-dated":
    # Text records "record <i> token<i>" (one word each of its own), stamped <age_ms> ago.
    import time
    topic, partitions, start, end, age_ms = args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4])
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": False})
    failures = []

    def report(err, msg):
        if err is not None:
            failures.append(str(err))

    stamp = int(time.time() * 1000) - age_ms
    for i in range(start, end):
        producer.produce(topic, key=f"k{i}".encode(), value=f"record {i} token{i}".encode(),
                         partition=i % partitions, timestamp=stamp, on_delivery=report)
        producer.poll(0)
    left = producer.flush(60)
    if left or failures:
        sys.exit(f"produce-dated: {left} undelivered, failures: {failures[:3]}")
elif command == "delete":
    topic, partition, before = args[0], int(args[1]), int(args[2])
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_records([TopicPartition(topic, partition, before)]).values():
        future.result(30)
elif command == "produce-keys":
    topic, start, end, keys = args[0], int(args[1]), int(args[2]), int(args[3])
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": False})
    for i in range(start, end):
        producer.produce(topic, key=f"k{keys}-{i % keys}".encode(), value=f"record {i}".encode(), partition=0)
        producer.poll(0)
    if producer.flush(60):
        sys.exit("produce-keys: records left undelivered")
elif command == "produce-lines":
    import random
    topic, partitions, count = args[0], int(args[1]), int(args[2])
    rng = random.Random(42)
    paths = ["/api/v1/orders", "/api/v1/users/42/profile", "/static/app.js", "/health", "/api/v2/search?q=shiva"]
    agents = ["curl/8.5.0", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0", "okhttp/4.12.0"]
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "enable.idempotence": False})
    for i in range(count):
        line = (f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)} - - "
                f"[01/Dec/2026:15:{i // 60 % 60:02}:{i % 60:02} +0000] \"GET {rng.choice(paths)} HTTP/1.1\" "
                f"{rng.choice([200, 200, 200, 304, 404, 500])} {rng.randrange(100000)} \"-\" "
                f"\"{rng.choice(agents)}\" rt={rng.randrange(3)}.{rng.randrange(1000):03}")
        while True:
            try:
                producer.produce(topic, value=line.encode(), partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120):
        sys.exit("produce-lines: records left undelivered")
elif command == "dump":
    topic, partitions, count = args[0], int(args[1]), int(args[2])
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "naive-dump",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out = sys.stdout.buffer
    seen = 0
    while seen < count:
        message = consumer.poll(1.0)
        if message is None or message.error():
            continue
        out.write(message.value() or b"")
        out.write(b"\n")
        seen += 1
    out.flush()
    consumer.close()
elif command == "consume":
    topic, partitions, count = args[0], int(args[1]), int(args[2])
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "kafka-tool",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), 30)[1] for p in range(partitions)}
    positions = {p: 0 for p in range(partitions)}
    seen = 0
    idle = 0

    def more():
        if count:
            return seen < count
        return any(positions[p] < ends[p] for p in range(partitions))

    while more() and idle < 300:
        message = consumer.poll(0.1)
        if message is None:
            idle += 1
            continue
        if message.error():
            sys.exit(f"consume: {message.error()}")
        idle = 0
        seen += 1
        positions[message.partition()] = message.offset() + 1
        headers = [[k, v.decode("utf-8", "replace") if v is not None else None]
                   for k, v in (message.headers() or [])]
        print(json.dumps({"partition": message.partition(), "offset": message.offset(),
                          "key": message.key().decode() if message.key() is not None else None,
                          "value": base64.b64encode(message.value() or b"").decode(),
                          "headers": headers}))
    consumer.close()
    if more():
        sys.exit(f"consume: only {seen} of {count} records within 30 s of silence")
else:
    sys.exit(f"unknown command {command}")
