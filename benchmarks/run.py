"""`make bench`: serving speed of `dloop up` under wrk, and how fast each policy learns.

Serving figures are ratios to floors measured in the same run: the same server's bare /healthz
throughput, and raw in-process VW parse+predict on the same example.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-admin-key-0123456789abcdefghij"

CONTEXT = [{"user": {"country": "fr", "device": "mobile", "visits": 12}, "time": "evening"}]
ACTIONS = [
    {
        "id": f"article-{i}",
        "features": [{"topic": f"t{i % 4}", "length": i + 1, "fresh": i % 2 == 0}],
    }
    for i in range(10)
]

# A static request, as cheap for wrk to send as GET /healthz: without an eventId every call is a
# new decision (the server generates the id), so the idempotency cache never answers for it.
RANK_LUA = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Ocp-Apim-Subscription-Key"] = "%s"
"""


def lua_string(s: str) -> str:
    return "[==[" + s + "]==]"


def wrk(url: str, *, conns: int, seconds: int, script: Path | None = None) -> dict[str, float]:
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
        return float(m.group(1)) * scale

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


def vw_predict_us(n: int = 20000) -> float:
    from learners.cb import DEFAULT_POLICY
    from learners.features import context_json
    from learners.vw import predict_scores, with_exploration, workspace

    ws = workspace(with_exploration(DEFAULT_POLICY, 0.2) + " --json")
    text = context_json(CONTEXT, [(a["id"], a["features"]) for a in ACTIONS]).decode()
    start = time.perf_counter()
    for _ in range(n):
        predict_scores(ws, text)
    return (time.perf_counter() - start) / n * 1e6


def serving(seconds: int, conns: int) -> list[tuple[str, str]]:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    port = 18000 + os.getpid() % 1000
    data = Path(tempfile.mkdtemp(prefix="dloop-bench-"))
    env = {**os.environ, "DLOOP_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "up", "--port", str(port), "--data-dir", str(data)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                sys.exit("dloop up did not start")
            time.sleep(0.2)
        headers = {"Ocp-Apim-Subscription-Key": KEY}
        # The same traffic on a second loop that explains every decision.
        httpx.put(f"{base}/loops/explained", json={"kind": "cb"}, headers=headers)
        for prefix, explain in (("", False), ("/loops/explained", True)):
            train(f"{base}{prefix}/personalizer/v1.0", headers, explain=explain)
        time.sleep(2.5)
        for prefix in ("", "/loops/explained"):
            props = httpx.get(
                f"{base}{prefix}/personalizer/v1.0/model/properties", headers=headers
            ).json()
            assert props["creationTime"] != props["lastModifiedTime"], "no model was published"

        body = json.dumps({"contextFeatures": CONTEXT, "actions": ACTIONS})
        script = data / "rank.lua"
        script.write_text(RANK_LUA % (lua_string(body), KEY))
        rank_url = f"{base}/personalizer/v1.0/rank"
        explained_url = f"{base}/loops/explained/personalizer/v1.0/rank"
        wrk(f"{base}/healthz", conns=conns, seconds=2)  # warm up every endpoint
        wrk(rank_url, conns=conns, seconds=2, script=script)
        wrk(explained_url, conns=conns, seconds=2, script=script)
        # Interleaved rounds: the machine's own drift hits every endpoint alike.
        rounds = []
        explained = []
        for _ in range(3):
            health = wrk(f"{base}/healthz", conns=conns, seconds=seconds)
            rank = wrk(rank_url, conns=conns, seconds=seconds, script=script)
            explained.append(wrk(explained_url, conns=conns, seconds=seconds, script=script))
            rounds.append((health, rank))
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)
    vw_us = vw_predict_us()
    ratios = sorted(r["rps"] / h["rps"] for h, r in rounds)
    health, rank = sorted(rounds, key=lambda hr: hr[1]["rps"] / hr[0]["rps"])[1]
    cost = sorted(e["rps"] / r["rps"] for (_, r), e in zip(rounds, explained, strict=True))
    slow = sorted(explained, key=lambda e: e["rps"])[1]
    return [
        ("connections", f"{conns}"),
        ("/healthz throughput (req/s)", f"{health['rps']:.0f}"),
        ("rank throughput (req/s)", f"{rank['rps']:.0f}"),
        (
            "rank / healthz throughput",
            f"{ratios[1]:.2f}  (median of {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.50)",
        ),
        ("rank p50 / p99 (ms)", f"{rank['p50']:.2f} / {rank['p99']:.2f}  (target p99 <= 20)"),
        ("rank p99, worst round (ms)", f"{max(r['p99'] for _, r in rounds):.2f}"),
        ("/healthz p50 / p99 (ms)", f"{health['p50']:.2f} / {health['p99']:.2f}"),
        ("rank non-2xx responses", f"{rank['errors']:.0f}"),
        ("raw VW parse+predict (us)", f"{vw_us:.1f}"),
        ("rank p50 / raw VW predict", f"{rank['p50'] * 1000 / vw_us:.0f}x"),
        (
            "rank with explanations / rank throughput",
            f"{cost[1]:.2f}  (median of {', '.join(f'{c:.2f}' for c in cost)})",
        ),
        ("rank with explanations p50 / p99 (ms)", f"{slow['p50']:.2f} / {slow['p99']:.2f}"),
    ]


def train(url: str, headers: dict[str, str], *, explain: bool) -> None:
    """Give a loop a trained model so rank runs the real VW path, not the uniform shortcut."""
    cfg = httpx.get(f"{url}/configurations/service", headers=headers).json()
    cfg["modelExportFrequency"] = "PT1S"
    cfg["isInferenceExplainabilityEnabled"] = explain
    httpx.put(f"{url}/configurations/service", json=cfg, headers=headers)
    for i in range(200):
        body = {"contextFeatures": CONTEXT, "actions": ACTIONS, "eventId": f"warm-{i}"}
        r = httpx.post(f"{url}/rank", json=body, headers=headers)
        httpx.post(
            f"{url}/events/warm-{i}/reward",
            json={"value": 1.0 if r.json()["rewardActionId"] == "article-3" else 0.0},
            headers=headers,
        )


def learning(n: int, seeds: int) -> list[tuple[str, str]]:
    from learners.cb import NAMED_POLICIES
    from learners.reference import run_reference
    from learners.vw import with_exploration

    rows = []
    for name, args in NAMED_POLICIES.items():
        progress = [
            run_reference(with_exploration(args, 0.2), n=n, max_delay=40, seed=s).progress()
            for s in range(seeds)
        ]
        mean = sum(progress) / len(progress)
        rows.append((f"{name}: {args}", f"{mean:.2f}  ({', '.join(f'{p:.2f}' for p in progress)})"))
    return rows


def table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n" + "-" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run; 3 rounds each")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--decisions", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pages", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--page-seeds", type=int, default=10)
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--pipeline-events", type=int, default=20000)
    args = parser.parse_args()
    if not args.skip_serving:
        table(
            "Serving (dloop up, wrk on the same machine)", serving(args.seconds, args.connections)
        )
    if not args.skip_pipeline:
        from benchmarks import pipeline

        table(
            "Production path throughput (Tansu + Postgres, in-process workers)",
            pipeline.throughput(args.pipeline_events),
        )
        table(
            "Freshness through dloop serve + join + learn (modelExportFrequency PT1S)",
            pipeline.freshness(40),
        )
    from benchmarks import multislot

    table(
        f"Multi-slot learning: greedy slate's share of the way from random slates (0) to the "
        f"best (1) on a 3-slot page, mean of {args.page_seeds} seeds, explorationPercentage 0.2",
        multislot.learning(args.pages, args.page_seeds),
    )
    table(
        f"Learning: share of the way from uniform random (0) to the oracle (1), last third of "
        f"{args.decisions} decisions, rewards 0-40 decisions late, explorationPercentage 0.2",
        learning(args.decisions, args.seeds),
    )


if __name__ == "__main__":
    main()
