"""Runs the named tests of the vendored MQTT 3.1.1 suite (paho/client_test.py) against one server, after the set-up
the suite's own ``__main__`` block does, so tests/test_mqtt_interop.py can split that suite into shards running side
by side (its keep-alive test alone sleeps 15 s). The test functions are the suite's, called unmodified and in the
suite's order; this file replaces only its option parsing and its list of tests.

    python run_client_test.py PORT TEST [TEST...]        (cwd and PYTHONPATH: tests/interop/paho)

Prints what the suite prints ("<name> test succeeded" / "... failed", then "test suite succeeded" / "failed").
"""

from __future__ import annotations

import logging
import sys

import client_test as suite  # the vendored module: importing it does not run its __main__ block
import mqtt.client

# client_test.py's own order (its `tests` list, then the optional tests it appends, as run with -z -s -d).
SUITE_ORDER = ("basic_test", "retained_message_test", "offline_message_queueing_test", "will_message_test",
               "overlapping_subscriptions_test", "keepalive_test", "redelivery_on_reconnect_test",
               "zero_length_clientid_test", "subscribe_failure_test", "dollar_topics_test")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or not set(argv[1:]) <= set(SUITE_ORDER):
        print(f"usage: run_client_test.py PORT TEST [TEST...]; tests: {' '.join(SUITE_ORDER)}", file=sys.stderr)
        return 2
    port, names = int(argv[0]), set(argv[1:])
    # The module globals the suite's __main__ block sets and its tests read.
    suite.host, suite.port = "localhost", port
    suite.topics = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
    suite.wildtopics = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
    suite.nosubscribe_topics = ("nosubscribe",)
    logging.getLogger().setLevel(logging.ERROR)
    print("hostname", suite.host, "port", port)
    suite.cleanup()
    suite.callback = suite.Callbacks()
    suite.callback2 = suite.Callbacks()
    suite.bclient = mqtt.client.Client(b"myclientid2")
    suite.bclient.registerCallback(suite.callback2)
    if "basic_test" not in names:
        # basic_test creates the `aclient` every later test reuses; a shard without it gets the same client here.
        suite.aclient = mqtt.client.Client(b"myclientid")
        suite.aclient.registerCallback(suite.callback)
    results = [getattr(suite, name)() for name in SUITE_ORDER if name in names]
    print("test suite", "succeeded" if False not in results else "failed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
