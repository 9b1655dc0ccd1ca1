"""`abuse-detector features`: the catalogue, and one entity's live state from a worker."""

from __future__ import annotations

import sys
import urllib.error
import urllib.parse
import urllib.request

import orjson

from detectors.catalog import ENTITIES, FEATURE_BY_NAME, catalogue_rows
from detectors.sketches import EXACT_LIMIT, HLL_RELATIVE_ERROR


def print_catalogue() -> None:
    rows = catalogue_rows()
    widths = {col: max(len(col), *(len(r[col]) for r in rows)) for col in ("name", "entity", "window", "aggregation")}
    header = "  ".join(col.ljust(widths[col]) for col in widths) + "  description"
    print(header)
    print("-" * len(header))
    for row in rows:
        print("  ".join(row[col].ljust(widths[col]) for col in widths) + "  " + row["description"])
    print()
    print(f"{len(rows)} features over entities {', '.join(ENTITIES)}. Windows run on event time at bucket "
          f"resolution; distinct counts are exact up to {EXACT_LIMIT} values, then a sliding HyperLogLog "
          f"(relative standard error {HLL_RELATIVE_ERROR:.1%}).")


def explain_entity(entity: str, base_url: str, timeout: float = 10.0) -> int:
    kind, _, key = entity.partition(":")
    if kind not in ENTITIES:
        print(f"error: unknown entity type {kind!r}; one of {', '.join(ENTITIES)}", file=sys.stderr)
        return 2
    url = f"{base_url.rstrip('/')}/entities/{kind}/{urllib.parse.quote(key, safe='')}/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            answer = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"error: {orjson.loads(exc.read()).get('error', exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: no worker answered at {base_url} ({exc}); start one with `abuse-detector worker` "
              "or pass --url / --web-port", file=sys.stderr)
        return 1
    print(f"{answer['entity']}: {answer['shards']} shard(s), {answer['state_bytes']} bytes of state, "
          f"watermark {answer['watermark_ms']} (event time, ms)")
    for name, value in answer["features"].items():
        print(f"  {name:40s} {value:>12g}   {FEATURE_BY_NAME[name].describe()}")
    return 0
