"""`abuse-detector evaluate` and `bootstrap`: files in; metrics, per-event scores, a chart
or a warm-start model out. No Kafka."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import orjson

from detectors.evaluation import SCORED, Evaluation, evaluate
from detectors.events import decode_label
from schemas import ContractViolation

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str) -> int:
    """'7d', '12h', '30m', '45s' -> milliseconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"duration {text!r}: use a number and one of s, m, h, d (e.g. 7d)")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


def load_labels(path: Path) -> dict[str, dict[str, Any]]:
    labels: dict[str, dict[str, Any]] = {}
    bad = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                label = decode_label(line, 1 << 20)
            except ContractViolation as exc:
                bad += 1
                if bad <= 5:
                    print(f"skipping bad label line: {exc}", file=sys.stderr)
                continue
            labels[label["event_id"]] = label  # a later line for the same event (an appeal) wins
    if bad:
        print(f"{bad} label lines did not honour the label contract and were skipped", file=sys.stderr)
    return labels


def _progress(f: BinaryIO, total: int) -> Iterator[bytes]:
    started = last = time.monotonic()
    for n, line in enumerate(f, 1):
        yield line
        now = time.monotonic()
        if now - last >= 1.0 or f.tell() >= total:
            last = now
            done = f.tell() / total if total else 1.0
            rate = n / max(1e-9, now - started)
            eta = (now - started) * (1 - done) / done if done else 0
            print(f"\r  {done:6.1%}  {n:,} events  {rate:,.0f} events/s  ETA {eta:,.0f}s   ", end="", file=sys.stderr)
    print(file=sys.stderr)


def plot(result: Evaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    y = np.asarray(result.truth)
    fig, (pr, hist) = plt.subplots(1, 2, figsize=(12, 5))
    for name in SCORED:
        s = np.asarray(result.scores[name])
        if 0 < y.sum() < y.size:
            precision, recall, _ = precision_recall_curve(y, s)
            pr.plot(recall, precision, label=name, linewidth=2.5 if name == "fused" else 1.2)
    pr.set(xlabel="recall", ylabel="precision", title="Precision-recall by detector", xlim=(0, 1), ylim=(0, 1.02))
    pr.legend()
    fused = np.asarray(result.scores["fused"])
    bins = np.linspace(0, 1, 41)
    hist.hist(fused[~y], bins=bins, alpha=0.6, label="benign", log=True)
    hist.hist(fused[y], bins=bins, alpha=0.6, label="abusive", log=True)
    hist.set(xlabel="fused risk score", ylabel="events (log)", title="Score distribution by class")
    hist.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_evaluate(events: Path, labels: Path, label_delay: str, scores_out: Path | None, plot_out: Path | None) -> int:
    try:
        delay_ms = parse_duration(label_delay)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    known = load_labels(labels)
    print(f"{len(known):,} labels loaded; label delay {label_delay}", file=sys.stderr)
    out = open(scores_out, "wb") if scores_out else None

    def write(score: dict[str, Any], is_abuse: bool | None, alerted: bool) -> None:
        if out is not None:
            out.write(orjson.dumps({"event_id": score["event_id"], "ts": score["ts"], "score": score["score"],
                                    **{k: v for k, v in score["detectors"].items()}, "alert": alerted,
                                    "label": None if is_abuse is None else ("abuse" if is_abuse else "benign")}) + b"\n")

    try:
        with open(events, "rb") as f:
            result = evaluate(_progress(f, events.stat().st_size), known, delay_ms, on_score_record=write)
    finally:
        if out is not None:
            out.close()
    report = result.report()
    if plot_out is not None and result.truth:
        plot(result, plot_out)
        report["chart"] = str(plot_out)
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


def run_bootstrap(events: Path, labels: Path, out: Path, holdout: float, min_labels_per_class: int) -> int:
    from detectors.bootstrap import BootstrapError, bootstrap

    if not 0.05 <= holdout <= 0.5:
        print("error: --holdout is a share of the labelled events between 0.05 and 0.5", file=sys.stderr)
        return 2
    known = load_labels(labels)
    print(f"{len(known):,} labels loaded; each is revealed at its own timestamp", file=sys.stderr)
    try:
        with open(events, "rb") as f:
            models, report = bootstrap(_progress(f, events.stat().st_size), known, holdout, min_labels_per_class)
    except BootstrapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(models.to_bytes())
    report["model_file"] = str(out)
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0
