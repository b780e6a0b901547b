#!/usr/bin/env python3
"""Writes malformed, oversized, unknown, forged and tombstone records onto a Shiva cluster's
topics with an independent Kafka client (confluent-kafka), for the bad-input e2e test.

usage: forge.py BOOTSTRAP CLUSTER LIVE_NODE NEXT_EPOCH TASK
"""
import json
import sys
import uuid

from confluent_kafka import Producer

bootstrap, cluster, live_node, next_epoch, task = sys.argv[1:6]
next_epoch = int(next_epoch)
topic = lambda suffix: f"shiva.{cluster}.{suffix}"
producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 4_000_000})
failures = []


def envelope(kind, sender, body, v=1):
    return json.dumps({"v": v, "kind": kind, "sender": sender, "incarnation": str(uuid.uuid4()),
                       "sent_at_ms": 0, "body": body}).encode()


def send(suffix, key, value):
    def report(err, msg):
        if err is not None:
            failures.append(f"{suffix} {key!r}: {err}")
    producer.produce(topic(suffix), key=key, value=value, partition=0, on_delivery=report)


# Junk bytes on every topic, under plausible keys.
send("commands", b"task/junk", b"\x00\x01 not json")
send("control", b"node/ghost", b"{not json")
send("assignments", f"task/{task}".encode(), b"\xff\xfe")
send("status", f"task/{task}".encode(), b"[]")
send("control", None, b"no key at all")
# Oversized (1.5 MB) and unknown kind and newer version.
send("commands", b"task/big", b'{"v":1,"kind":"task","sender":"x","body":{"id":"big","command":"' + b"a" * 1_500_000 + b'"}}')
send("control", b"node/ghost", envelope("wormhole", "ghost", {}))
send("control", b"node/ghost", envelope("heartbeat", "ghost", {}, v=99))
# Claims from a non-node: a huge epoch (refused) and the next one (wins, then times out).
send("assignments", b"claim/999999999/ghost/" + uuid.uuid4().hex.encode(), envelope("claim", "ghost", {"epoch": 999999999}))
send("assignments", f"claim/{next_epoch}/ghost/{uuid.uuid4().hex}".encode(), envelope("claim", "ghost", {"epoch": next_epoch}))
# A forged assignment from a non-leader, moving a task to the ghost.
spec = {"id": task, "command": "sleep", "args": ["1"]}
send("assignments", f"task/{task}".encode(), envelope("assignment", "ghost", {
    "epoch": next_epoch, "task": task, "generation": 999, "spec_revision": 0, "state": "assigned",
    "node": "ghost", "spec": spec}))
# A tombstone of a live node's heartbeat.
send("control", f"node/{live_node}".encode(), None)

producer.flush(10)
if failures:
    print("\n".join(failures), file=sys.stderr)
print(f"forged records written ({len(failures)} refused by the broker)")
