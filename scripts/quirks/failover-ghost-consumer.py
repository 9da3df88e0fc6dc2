#!/usr/bin/env python3
"""pulsar-lite keeps a dead Failover consumer as the active one when its connection ends in a reset.

The raw client alone, no relay and no aerostream: the official Python client consumes a backlog on
a Failover subscription and is SIGKILLed mid-stream, again and again; each successor must receive
a message. A process killed with bytes unread in its socket ends the connection with a TCP reset,
and pulsar-lite then logs "Connection error ... Connection reset by peer" without removing the
connection's consumers ("Failover active consumer ... closed; rewound" never comes): it goes on
dispatching to the dead consumer, and every later consumer waits as a standby, for good.

    scripts/quirks/failover-ghost-consumer.py [ROUNDS]

Prints one line per round and exits 1 at the first successor that receives nothing in 8 s
(2026-12-02: at round 6 of the first run). The test relay closes its broker connections in order
for this reason (tests/support/relay.rs, close_broker_side).
"""
import os, signal, socket, subprocess, sys, tempfile, time

CONSUMER = r"""
import sys, pulsar
url, topic, skip = sys.argv[1:4]
client = pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
# pulsar-lite keys consumers by id across connections and this client numbers them from 0 in
# every process: take ids nobody else holds first.
held = [client.subscribe(topic + "-ids", f"ids-{skip}-{i}") for i in range(int(skip))]
consumer = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Failover,
                            initial_position=pulsar.InitialPosition.Earliest)
first = True
while True:
    message = consumer.receive()
    if first:
        print("received", flush=True)
        first = False
    consumer.acknowledge(message)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    import pulsar
    import pulsar_lite.binary_finder as finder

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    work = tempfile.mkdtemp(prefix="ghost-consumer-")
    with open(os.path.join(work, "pulsar-lite.toml"), "w") as config:
        config.write("default_partitions = 0\n[metrics]\nenabled = false\n")
    port = free_port()
    url = f"pulsar://127.0.0.1:{port}"
    log = open(os.path.join(work, "broker.log"), "w")
    broker = subprocess.Popen(
        [finder.find_pulsar_lite_binary(), "--config", os.path.join(work, "pulsar-lite.toml"),
         "--addr", f"127.0.0.1:{port}", "--db-path", os.path.join(work, "db")],
        stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "info"})
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or broker.poll() is not None:
                    raise SystemExit(f"pulsar-lite did not start; see {work}/broker.log")
                time.sleep(0.05)
        client = pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
        producer = client.create_producer("persistent://public/default/ghost", batching_enabled=False)
        for i in range(200_000):
            producer.send_async(b"x" * 200, None)
        producer.flush()
        for round in range(rounds):
            consumer = subprocess.Popen(
                [sys.executable, "-c", CONSUMER, url, "persistent://public/default/ghost", str(round)],
                stdout=subprocess.PIPE)
            os.set_blocking(consumer.stdout.fileno(), False)
            deadline, heard = time.time() + 8, b""
            while time.time() < deadline and b"received" not in heard:
                heard += consumer.stdout.read() or b""
                time.sleep(0.01)
            if b"received" not in heard:
                consumer.kill()
                print(f"round {round}: the successor received nothing in 8 s; broker log: {work}/broker.log")
                return 1
            time.sleep(0.05 + (round % 7) * 0.08)
            consumer.send_signal(signal.SIGKILL)
            consumer.wait()
            print(f"round {round}: received, then killed", flush=True)
        print(f"no stall in {rounds} rounds")
        return 0
    finally:
        broker.kill()


if __name__ == "__main__":
    sys.exit(main())
