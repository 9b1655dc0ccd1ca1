"""`abuse-detector`: the one command-line entry point.

Settings come from ``ABUSE_*`` environment variables (see streams/config.py);
flags override them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streams.config import add_settings_arguments, load_settings

KAFKA_FLAGS = ["home", "kafka_port", "kafka_controller_port"]
CONNECTION_FLAGS = ["bootstrap_servers", "partitions", "events_topic", "labels_topic", "scores_topic",
                    "alerts_topic", "dead_letter_topic", "examples_topic", "checkpoint_topic"]
WORKER_FLAGS = ["app_id", "data_dir", "web_port", "log_level", "rules_file", "warm_start", "min_labels_per_class",
                "max_event_bytes", "label_ttl_s", "label_join_write_mb_s", "state_memtable_mb", "sweep_every_events", "batch_max_events",
                "batch_wait_s", "batch_interval_s", "state_write_interval_s", "fetch_bytes", "fetch_wait_ms", "checkpoint_interval_s",
                "heap_keep_mb"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abuse-detector", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    kafka = sub.add_parser("kafka", help="run a local Apache Kafka (KRaft, single node) for development")
    kafka.add_argument("action", choices=["up", "down", "status", "wipe"])
    add_settings_arguments(kafka, KAFKA_FLAGS)

    topics = sub.add_parser("topics", help="manage the input/output topics")
    topics.add_argument("action", choices=["create"])
    topics.add_argument("--recreate", action="store_true", help="delete and create them again (drops their data)")
    add_settings_arguments(topics, CONNECTION_FLAGS + ["kafka_port"])

    worker = sub.add_parser("worker", help="run a Faust worker (consume events and labels, emit scores and alerts)")
    add_settings_arguments(worker, CONNECTION_FLAGS + WORKER_FLAGS + ["kafka_port"])

    simulate = sub.add_parser("simulate", help="produce seeded synthetic traffic with abuse campaigns and labels")
    simulate.add_argument("--seed", type=int, default=7)
    simulate.add_argument("--users", type=int, default=3000)
    simulate.add_argument("--days", type=float, default=1.5, help="simulated event-time span")
    simulate.add_argument("--rate", type=float, default=0.0, help="records per second (0 = as fast as possible)")
    simulate.add_argument("--out-dir", type=Path, help="also write events.jsonl, labels.jsonl, truth.jsonl here")
    simulate.add_argument("--no-kafka", action="store_true", help="only write files, do not produce")
    simulate.add_argument("--labels-after-end", action="store_true",
                          help="also emit labels due after the last event (a history export, e.g. for bootstrap)")
    add_settings_arguments(simulate, CONNECTION_FLAGS + ["kafka_port"])

    features = sub.add_parser("features", help="print the feature catalogue, or explain one entity's live state")
    features.add_argument("action", nargs="?", choices=["explain"], help="explain ENTITY from a running worker")
    features.add_argument("entity", nargs="?", help="<entity-type>:<id>, e.g. ip:203.0.113.7 or user:u000042")
    features.add_argument("--url", help="worker web server (default http://127.0.0.1:<web-port>)")
    add_settings_arguments(features, ["web_port"])

    demo = sub.add_parser("demo", help="local Kafka + topics + worker + a minute of traffic + summary")
    demo.add_argument("--seconds", type=float, default=60.0, help="about how long to produce traffic")
    demo.add_argument("--rate", type=float, default=800.0, help="records per second offered")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--history-days", type=float, default=1.0,
                      help="labelled history to bootstrap the models from (0 = start cold)")
    add_settings_arguments(demo, KAFKA_FLAGS + ["partitions", "rules_file", "min_labels_per_class", "log_level"])

    evaluate = sub.add_parser("evaluate", help="prequential evaluation of the live detector code over JSONL files")
    evaluate.add_argument("--events", type=Path, required=True, help="events JSONL in event-time order")
    evaluate.add_argument("--labels", type=Path, required=True, help="labels JSONL (label contract)")
    evaluate.add_argument("--label-delay", default="7d", help="a label is revealed this long after its event (e.g. 7d, 12h)")
    evaluate.add_argument("--scores-out", type=Path, help="write one JSONL line per event: scores, alert, label")
    evaluate.add_argument("--plot", type=Path, help="write a PNG of precision-recall curves and score distributions")

    bootstrap = sub.add_parser("bootstrap", help="fit a warm-start model with scikit-learn on a labelled JSONL history")
    bootstrap.add_argument("--events", type=Path, required=True, help="history events JSONL in event-time order")
    bootstrap.add_argument("--labels", type=Path, required=True, help="labels JSONL; each is revealed at its own ts")
    bootstrap.add_argument("--out", type=Path, required=True, help="model file for the worker's --warm-start")
    bootstrap.add_argument("--holdout", type=float, default=0.2, help="newest share of labelled events held out")
    add_settings_arguments(bootstrap, ["min_labels_per_class"])

    bench = sub.add_parser("bench", help="throughput, latency, plain-loop ceiling and two workers on the local broker")
    bench.add_argument("--events", type=int, default=40_000, help="simulated records preloaded per measurement")
    bench.add_argument("--rate", type=float, default=5000.0, help="offered load for the latency measurement")
    bench.add_argument("--latency-seconds", type=float, default=None,
                       help="how long (b) and (b') each offer their load (default: 30)")
    add_settings_arguments(bench, KAFKA_FLAGS + ["partitions"])

    soak = sub.add_parser("soak", help="one worker under a steady load for minutes, with labels, window by window")
    soak.add_argument("--rate", type=float, default=5000.0, help="events/s offered")
    soak.add_argument("--seconds", type=float, default=300.0, help="how long the load lasts")
    soak.add_argument("--window", type=float, default=10.0, help="seconds per reported window")
    soak.add_argument("--no-labels", action="store_true", help="offer the events only (the bench's (b))")
    add_settings_arguments(soak, KAFKA_FLAGS + ["partitions"])

    replay = sub.add_parser("replay", help="re-run a topic range in isolation; compare it with live; clean it up",
                            description="replay --topic T --from F --to T --run-id ID: writes only to "
                                        "<scores>.replay.ID and <alerts>.replay.ID. "
                                        "replay compare --run-id ID; replay clean --run-id ID.")
    replay.add_argument("action", nargs="?", choices=["run", "compare", "clean"], default="run")
    replay.add_argument("--run-id", required=True, help="names the run's topics, consumer group and state")
    replay.add_argument("--topic", help="topic to replay (default: the events topic)")
    replay.add_argument("--from", dest="start", help="first offset (digits) or time (ISO 8601, Kafka record time)")
    replay.add_argument("--to", dest="end", help="end offset or time, exclusive")
    replay.add_argument("--model", type=Path, help="model file (bootstrap or saved checkpoint); default: the live checkpoint")
    replay.add_argument("--rules", type=Path, help="rules TOML; default: the built-in rules")
    replay.add_argument("--chart", type=Path, help="compare: where to write the PNG (default in the run's folder)")
    add_settings_arguments(replay, CONNECTION_FLAGS + ["app_id", "home", "kafka_port"])

    model = sub.add_parser("model", help="champion/challenger status, promotion and rollback")
    model.add_argument("action", choices=["status", "promote", "rollback"])
    model.add_argument("--url", help="worker web server for status (default http://127.0.0.1:<web-port>)")
    add_settings_arguments(model, ["bootstrap_servers", "examples_topic", "web_port", "kafka_port"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = load_settings(**vars(args))

    if args.command == "kafka":
        from streams.kafka.local import LocalKafka, LocalKafkaError

        kafka = LocalKafka(settings.home_path, settings.kafka_port, settings.kafka_controller_port)
        try:
            if args.action == "up":
                status = kafka.up()
                print(f"{status.detail} on {status.bootstrap}\nlog: {status.log_file}")
            elif args.action == "down":
                print("stopped" if kafka.down() else "not running")
            elif args.action == "wipe":
                kafka.wipe()
                print(f"removed {kafka.run_dir}")
            else:
                status = kafka.status()
                print(f"{status.detail}; bootstrap {status.bootstrap}; log: {status.log_file}")
                return 0 if status.running else 3
        except LocalKafkaError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0

    if args.command == "topics":
        from streams.kafka.io import create_topics

        created = create_topics(settings, recreate=args.recreate)
        print(f"created: {', '.join(created) or 'none (all exist)'}")
        return 0

    if args.command == "worker":
        from streams.app import run_worker

        sys.argv = [sys.argv[0]]  # Faust's own command line must not see our flags
        run_worker(settings)
        return 0

    if args.command == "simulate":
        from streams.kafka.io import make_producer
        from streams.simulator import SimulationConfig, run_simulation

        config = SimulationConfig(seed=args.seed, users=args.users, days=args.days, labels_after_end=args.labels_after_end)
        producer = None if args.no_kafka else make_producer(settings)
        if producer is None and args.out_dir is None:
            print("error: --no-kafka needs --out-dir", file=sys.stderr)
            return 2
        report = run_simulation(config, producer=producer, events_topic=settings.events_topic,
                                labels_topic=settings.labels_topic, rate=args.rate, out_dir=args.out_dir)
        print(f"events={report.events} abusive={report.abusive_events} labels={report.labels} "
              f"malformed={report.malformed}")
        return 0

    if args.command == "features":
        from streams.explain import explain_entity, print_catalogue

        if args.action is None:
            print_catalogue()
            return 0
        if not args.entity or ":" not in args.entity:
            print("error: give the entity as <entity-type>:<id>, e.g. ip:203.0.113.7", file=sys.stderr)
            return 2
        return explain_entity(args.entity, args.url or f"http://127.0.0.1:{settings.web_port}")

    if args.command == "evaluate":
        from streams.offline import run_evaluate

        return run_evaluate(args.events, args.labels, args.label_delay, args.scores_out, args.plot)

    if args.command == "bootstrap":
        from streams.offline import run_bootstrap

        return run_bootstrap(args.events, args.labels, args.out, args.holdout, settings.min_labels_per_class)

    if args.command == "bench":
        from streams.bench import run_bench

        timing = {} if args.latency_seconds is None else {"latency_seconds": args.latency_seconds}
        run_bench(settings, events=args.events, rate=args.rate, **timing)
        return 0

    if args.command == "soak":
        from streams.soak import run_soak

        if min(args.rate, args.seconds, args.window) <= 0:
            print("error: --rate, --seconds and --window must be above 0", file=sys.stderr)
            return 2
        run_soak(settings, args.rate, args.seconds, args.window, labels=not args.no_labels)
        return 0

    if args.command == "replay":
        return _replay_command(args, settings)

    if args.command == "model":
        return _model_command(args.action, settings, args.url)

    if args.command == "demo":
        from streams.demo import run_demo

        from streams.kafka.local import LocalKafkaError

        try:
            summary = run_demo(settings, seconds=args.seconds, rate=args.rate, seed=args.seed,
                               history_days=args.history_days)
        except LocalKafkaError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; everything the demo started was stopped", file=sys.stderr)
            return 130
        return 0 if summary.alerts > 0 else 1
    return 2


def _replay_command(args: argparse.Namespace, settings) -> int:
    import orjson

    from streams.replay import ReplayError, clean_replay, compare_replay, print_comparison, run_replay, state_dir

    try:
        if args.action == "clean":
            removed = clean_replay(settings, args.run_id)
            print("removed: " + (", ".join(removed) or "nothing (no such run)"))
        elif args.action == "compare":
            chart = args.chart or state_dir(settings, args.run_id) / "compare.png"
            print_comparison(compare_replay(settings, args.run_id, chart))
        else:
            if args.start is None or args.end is None:
                print("error: a replay needs --from and --to (offsets or ISO 8601 times)", file=sys.stderr)
                return 2
            summary = run_replay(settings, args.topic or settings.events_topic, args.start, args.end, args.run_id,
                                 model_file=args.model, rules_file=args.rules)
            print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _model_command(action: str, settings, url: str | None) -> int:
    import getpass
    import urllib.request

    import orjson

    if action == "status":
        base = url or f"http://127.0.0.1:{settings.web_port}"
        try:
            report = orjson.loads(urllib.request.urlopen(f"{base}/models/", timeout=10).read())
        except OSError as exc:
            print(f"error: no worker answered at {base} ({exc})", file=sys.stderr)
            return 1
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    from streams.kafka.io import make_producer
    from streams.learning import control_record

    # On the training-example feed: every worker swaps at the same point of its history.
    producer = make_producer(settings)
    producer.produce(settings.examples_topic, key=b"control", value=control_record(action, getpass.getuser()), partition=0)
    if producer.flush(30):
        print("error: Kafka did not acknowledge the control record", file=sys.stderr)
        return 1
    print(f"{action} recorded on {settings.examples_topic}; workers apply it within a second "
          "(check with `abuse-detector model status`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
