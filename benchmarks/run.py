"""`make bench`: serving speed of `dloop up` under wrk, and how fast each policy learns.

Serving figures are ratios to floors measured in the same run: the same server's bare /healthz
throughput, and raw in-process VW parse+predict on the same example.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    from learners.policy import with_exploration
    from learners.vw import predict_scores, workspace

    ws = workspace(with_exploration(DEFAULT_POLICY, 0.2) + " --json")
    text = context_json(CONTEXT, [(a["id"], a["features"]) for a in ACTIONS]).decode()
    start = time.perf_counter()
    for _ in range(n):
        predict_scores(ws, text)
    return (time.perf_counter() - start) / n * 1e6


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    data: Path

    def stop(self) -> float:
        """Stop it (SIGINT, as Ctrl-C) and return how long it took to exit."""
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        took = time.perf_counter() - started
        shutil.rmtree(self.data, ignore_errors=True)
        return took

    def rss_mb(self) -> float:
        """Resident memory of the server and every process under it (the forkserver and the
        ranking and learning processes it forked)."""
        total = 0
        for pid in process_tree(self.proc.pid):
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            total += next((int(x.split()[1]) for x in lines if x.startswith("VmRSS")), 0)
        return total / 1024


def proc_stats() -> dict[int, list[str]]:
    """Every process's /proc/<pid>/stat fields after its command name (1: its parent, 11 and
    12: its user and system CPU time in clock ticks)."""
    out: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            out[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
    return out


def process_tree(root: int, stats: dict[int, list[str]] | None = None) -> set[int]:
    """`root` and every process under it."""
    parents = {pid: int(f[1]) for pid, f in (stats or proc_stats()).items()}
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def start_server(port: int, fill: Any = None, **env: str) -> Server:
    """`dloop up` on a new data directory (`fill(data)` prepares it first, if given)."""
    data = Path(tempfile.mkdtemp(prefix="dloop-bench-"))
    if fill is not None:
        fill(data)
    # The limiter stays on (its cost is part of every request) but never limits the bench.
    env = {**os.environ, "DLOOP_API_KEY": KEY, "DLOOP_LIMITS__RATE_PER_KEY": "1e9", **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "up", "--port", str(port), "--data-dir", str(data)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Server(proc, healthy(proc, port, "dloop up"), data)


def healthy(proc: subprocess.Popen[bytes], port: int, what: str) -> str:
    """The base address of the server `proc` started on `port`, once its /healthz answers."""
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            sys.exit(f"{what} did not start")
        time.sleep(0.2)


def start_lean(port: int, model: Path) -> Server:
    """The lean Starlette + VW floor (benchmarks/lean.py) on `model`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.lean", "--port", str(port), "--model", str(model)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = healthy(proc, port, "the lean floor server")
    return Server(proc, base, Path(tempfile.mkdtemp(prefix="dloop-bench-floor-")))


PEER = ROOT / ".venv-peer" / "bin" / "python"


def start_peer(port: int, model: Path) -> Server | None:
    """Ray Serve + VW (benchmarks/ray_peer.py) on `model`, in its own virtualenv (`make bench`
    makes it); None if it is not installed or does not start."""
    if not PEER.exists():
        print("Ray Serve is not installed (.venv-peer): no peer in this run", file=sys.stderr)
        return None
    data = Path(tempfile.mkdtemp(prefix="dloop-bench-peer-"))
    proc = subprocess.Popen(
        [str(PEER), "-m", "benchmarks.ray_peer", "--port", str(port), "--model", str(model)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(data / "peer.log").open("wb"),
        start_new_session=True,  # Ray's own processes stop with its group
    )
    base = f"http://127.0.0.1:{port}"
    body = {"contextFeatures": CONTEXT, "actions": ACTIONS}
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.post(f"{base}/personalizer/v1.0/rank", json=body).status_code == 201:
                return PeerServer(proc, base, data)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    print(f"Ray Serve did not start (see {data / 'peer.log'}): no peer", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return None


class PeerServer(Server):
    def stop(self) -> float:
        started = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        subprocess.run(
            [str(PEER.parent / "ray"), "stop", "--force"], check=False, capture_output=True
        )
        return time.perf_counter() - started


def peer_row(rounds: list[dict[str, dict[str, float]]]) -> tuple[str, str]:
    name = "Ray Serve + VW (HAProxy, 2 replicas) / the floor's rank throughput"
    if "peer rank" not in rounds[0]:
        return name, "not measured (Ray Serve not installed or did not start)"
    values = sorted(r["peer rank"]["rps"] / r["floor rank"]["rps"] for r in rounds)
    dloop = sorted(r["rank"]["rps"] / r["peer rank"]["rps"] for r in rounds)
    return (
        name,
        f"{values[1]:.2f}  (median of {', '.join(f'{v:.2f}' for v in values)}); "
        f"dloop / Ray Serve {dloop[1]:.2f}",
    )


def serving(seconds: int, conns: int) -> list[tuple[str, str]]:
    """Rank throughput against the same server's /healthz, with VW in its sandbox processes
    (the default) and, as the floor the isolation is measured against, in the serving process
    (DLOOP_SANDBOX__RANKERS=0), both servers up at once and measured in interleaved rounds."""
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    port = 18000 + os.getpid() % 1000
    sandboxed = start_server(port)
    inline = start_server(port + 1, DLOOP_SANDBOX__RANKERS="0")
    headers = {"Ocp-Apim-Subscription-Key": KEY}
    try:
        for server in (sandboxed, inline):
            base = server.base
            # The same traffic on a second loop that explains every decision.
            httpx.put(f"{base}/loops/explained", json={"kind": "cb"}, headers=headers)
            for prefix, explain in (("", False), ("/loops/explained", True)):
                train(f"{base}{prefix}/personalizer/v1.0", headers, explain=explain)
        time.sleep(2.5)
        for server in (sandboxed, inline):
            for prefix in ("", "/loops/explained"):
                props = httpx.get(
                    f"{server.base}{prefix}/personalizer/v1.0/model/properties", headers=headers
                ).json()
                assert props["creationTime"] != props["lastModifiedTime"], "no model published"

        body = json.dumps({"contextFeatures": CONTEXT, "actions": ACTIONS})
        script = sandboxed.data / "rank.lua"
        script.write_text(RANK_LUA % (lua_string(body), KEY))
        # The lean floor serves the same model bytes as dloop's default loop.
        model = sandboxed.data / "floor-model.vw"
        model.write_bytes(
            httpx.get(f"{sandboxed.base}/personalizer/v1.0/model", headers=headers).content
        )
        floor = start_lean(port + 2, model)
        peer = start_peer(port + 3, model)

        def run(server: Server | str, what: str, secs: int) -> dict[str, float]:
            base = server if isinstance(server, str) else server.base
            if what == "health":
                return wrk(f"{base}/healthz", conns=conns, seconds=secs)
            prefix = "/loops/explained" if what == "explained" else ""
            url = f"{base}{prefix}/personalizer/v1.0/rank"
            return wrk(url, conns=conns, seconds=secs, script=script)

        for server in (sandboxed, inline):  # warm up every endpoint
            for what in ("health", "rank", "explained"):
                run(server, what, 2)
        run(floor.base, "rank", 2)
        if peer is not None:
            run(peer.base, "rank", 2)
        # Interleaved rounds: the machine's own drift hits every endpoint alike.
        learner = learner_pid(sandboxed)
        learner_cpu = tree_cpu(learner)
        rounds: list[dict[str, dict[str, float]]] = []
        for _ in range(3):
            rounds.append(
                {
                    "health": run(sandboxed, "health", seconds),
                    "rank": run(sandboxed, "rank", seconds),
                    "explained": run(sandboxed, "explained", seconds),
                    "inline health": run(inline, "health", seconds),
                    "inline rank": run(inline, "rank", seconds),
                    "floor rank": run(floor.base, "rank", seconds),
                    "floor health": run(floor.base, "health", seconds),
                }
            )
            if peer is not None:
                rounds[-1]["peer rank"] = run(peer.base, "rank", seconds)
            # With dashboards open, between two runs of rank alone (its floor: their mean), so
            # the server's drift over the round does not count as the dashboards' cost.
            rounds[-1]["rank before"] = run(sandboxed, "rank", seconds)
            for n in DASHBOARDS:
                with dashboards_open(sandboxed.base, headers, n):
                    rounds[-1][f"rank, {n} dashboards"] = run(sandboxed, "rank", seconds)
            rounds[-1]["rank again"] = run(sandboxed, "rank", seconds)
        # The learner yields to serving (nice 10) but must keep up: its backlog when the
        # rounds end, how long it takes to learn it, and its CPU per decision served.
        backlog = httpx.get(f"{sandboxed.base}/readyz").json()["logBacklogBytes"]
        drained = time.monotonic()
        while httpx.get(f"{sandboxed.base}/readyz").json()["logBacklogBytes"] > 0:
            time.sleep(0.1)
        drained = time.monotonic() - drained
        ranked = sum(
            v["rps"] * seconds
            for r in rounds
            for k, v in r.items()
            if k.startswith("rank") or k == "explained"  # the sandboxed server's decisions
        )
        learner_cpu = (tree_cpu(learner) - learner_cpu) / ranked
    finally:
        sandboxed.stop()
        inline.stop()
        with contextlib.suppress(NameError):
            floor.stop()
        with contextlib.suppress(NameError, AttributeError):
            peer.stop()  # type: ignore[union-attr]
    vw_us = vw_predict_us()

    def median(f: Any) -> tuple[float, str]:
        values = sorted(f(r) for r in rounds)
        return values[1], ", ".join(f"{v:.2f}" for v in values)

    ratio, ratios = median(lambda r: r["rank"]["rps"] / r["health"]["rps"])
    inline_ratio, inline_ratios = median(
        lambda r: r["inline rank"]["rps"] / r["inline health"]["rps"]
    )
    isolation, isolations = median(lambda r: r["rank"]["rps"] / r["inline rank"]["rps"])
    cost, costs = median(lambda r: r["explained"]["rps"] / r["rank"]["rps"])
    watched = {
        n: median(
            lambda r, n=n: (
                r[f"rank, {n} dashboards"]["rps"]
                / ((r["rank before"]["rps"] + r["rank again"]["rps"]) / 2)
            )
        )
        for n in DASHBOARDS
    }
    lean, leans = median(lambda r: r["rank"]["rps"] / r["floor rank"]["rps"])
    bare, bares = median(lambda r: r["health"]["rps"] / r["floor health"]["rps"])
    mid = sorted(rounds, key=lambda r: r["rank"]["rps"] / r["health"]["rps"])[1]
    health, rank, slow, fast = mid["health"], mid["rank"], mid["explained"], mid["inline rank"]
    return [
        ("connections", f"{conns}"),
        (
            "rank / lean Starlette+VW floor's rank throughput",
            f"{lean:.2f}  (median of {leans}; target >= 0.70)",
        ),
        ("  the floor's rank throughput (req/s)", f"{mid['floor rank']['rps']:.0f}"),
        peer_row(rounds),
        (
            "/healthz / bare Starlette app's /healthz throughput",
            f"{bare:.2f}  (median of {bares}; target >= 0.90)",
        ),
        ("/healthz throughput (req/s)", f"{health['rps']:.0f}"),
        ("rank throughput (req/s)", f"{rank['rps']:.0f}"),
        ("rank / healthz throughput", f"{ratio:.2f}  (median of {ratios})"),
        ("rank p50 / p99 (ms)", f"{rank['p50']:.2f} / {rank['p99']:.2f}  (target p99 <= 10)"),
        ("rank p99, worst round (ms)", f"{max(r['rank']['p99'] for r in rounds):.2f}"),
        ("/healthz p50 / p99 (ms)", f"{health['p50']:.2f} / {health['p99']:.2f}"),
        ("rank non-2xx responses", f"{rank['errors']:.0f}"),
        (
            "VW in the serving process (no isolation): rank / healthz",
            f"{inline_ratio:.2f}  (median of {inline_ratios})",
        ),
        ("  its rank p50 / p99 (ms)", f"{fast['p50']:.2f} / {fast['p99']:.2f}"),
        (
            "isolation: sandboxed / in-process rank throughput",
            f"{isolation:.2f}  (median of {isolations})",
        ),
        (
            "learner backlog when the rounds end (MB), drained in (s)",
            f"{backlog / 1e6:.1f}, {drained:.1f}",
        ),
        ("learner CPU per decision ranked (ms, its process and VW's)", f"{learner_cpu * 1e3:.3f}"),
        ("raw VW parse+predict (us)", f"{vw_us:.1f}"),
        ("rank p50 / raw VW predict", f"{rank['p50'] * 1000 / vw_us:.0f}x"),
        ("rank with explanations / rank throughput", f"{cost:.2f}  (median of {costs})"),
        ("rank with explanations p50 / p99 (ms)", f"{slow['p50']:.2f} / {slow['p99']:.2f}"),
        *(
            (
                f"rank with {n} dashboard(s) open / rank throughput",
                f"{watched[n][0]:.2f}  (median of {watched[n][1]})",
            )
            for n in DASHBOARDS
        ),
    ]


def learner_pid(server: Server) -> int:
    """The server's learner process (multiprocessing's spawn child, not its helpers)."""
    for pid, fields in proc_stats().items():
        if int(fields[1]) == server.proc.pid:
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
    raise RuntimeError("the server has no learner process")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and every process under it."""
    stats = proc_stats()
    ticks = sum(int(stats[p][11]) + int(stats[p][12]) for p in process_tree(pid, stats))
    return ticks / os.sysconf("SC_CLK_TCK")


DASHBOARDS = (1, 20)  # open dashboards, each refreshing its loop page every 10 s


@contextlib.contextmanager
def dashboards_open(base: str, headers: dict[str, str], n: int) -> Iterator[None]:
    """What `n` open dashboards ask of the server while they refresh: the overview, and the
    loop page's statistics and holdout, each every 10 s (one of them every 10/n s), in a thread
    beside the load."""
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            while not stop.is_set():
                for path in ("/overview", "/loops/default/stats", "/loops/default/holdout"):
                    client.get(path).raise_for_status()
                stop.wait(10 / n)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def many_loops(n: int) -> list[tuple[str, str]]:
    """`dloop up` with `n` loops: what an idle loop costs in memory, whether creating one stays
    O(1) as loops pile up, and how long a shutdown takes."""
    from concurrent.futures import ThreadPoolExecutor

    server = start_server(18000 + os.getpid() % 1000 + 2)
    headers = {"Ocp-Apim-Subscription-Key": KEY}
    client = httpx.Client(headers=headers, timeout=30)
    try:
        before = server.rss_mb()
        block = max(1, n // 10)
        per_block: list[float] = []

        def create(i: int) -> float:
            started = time.perf_counter()
            r = client.put(f"{server.base}/loops/l{i:05d}", json={"kind": "cb"})
            assert r.status_code == 201, r.text
            return time.perf_counter() - started

        with ThreadPoolExecutor(4) as pool:
            for start in range(0, n, block):
                times = sorted(pool.map(create, range(start, min(n, start + block))))
                per_block.append(times[len(times) // 2] * 1000)
                print(f"  {start + len(times)} loops", file=sys.stderr)
        after = server.rss_mb()
        body = {"contextFeatures": CONTEXT, "actions": ACTIONS}
        for i in range(0, n, max(1, n // 20)):
            r = client.post(f"{server.base}/loops/l{i:05d}/personalizer/v1.0/rank", json=body)
            assert r.status_code == 201, r.text
        listed = client.get(f"{server.base}/loops").json()["value"]
        assert len(listed) == n + 1
    finally:
        client.close()
        took = server.stop()
    per_loop_kb = (after - before) * 1024 / n
    return [
        ("loops", f"{n}"),
        ("RSS before / after (MiB, server + its VW processes)", f"{before:.0f} / {after:.0f}"),
        ("an idle loop costs (KB)", f"{per_loop_kb:.0f}  (target < 200)"),
        (
            "loop creation, median ms per tenth of the loops",
            ", ".join(f"{t:.1f}" for t in per_block),
        ),
        ("last tenth / first tenth", f"{per_block[-1] / per_block[0]:.2f}  (O(1): about 1)"),
        ("shutdown (SIGINT to exit, s)", f"{took:.1f}"),
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
    from learners.policy import with_exploration
    from learners.sim.reference import run_reference

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
    parser.add_argument("--skip-stats", action="store_true")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--ship-decisions", type=int, default=30000)
    parser.add_argument("--stats-decisions", type=int, default=1_000_000)
    parser.add_argument("--pipeline-events", type=int, default=20000)
    parser.add_argument("--loops", type=int, default=10000, help="for the many-loops table")
    parser.add_argument("--rl-seeds", type=int, default=10, help="per RL world and learner")
    parser.add_argument("--skip-rl", action="store_true")
    args = parser.parse_args()
    if not args.skip_serving:
        table(
            "Serving (dloop up, wrk on the same machine)", serving(args.seconds, args.connections)
        )
        table(f"Many loops in one dloop up ({args.loops})", many_loops(args.loops))
    if not args.skip_local:
        from benchmarks import local

        table(
            "In-process ranking (service.local.LocalRanker) beside raw VW and HTTP rank, "
            "against dloop up",
            local.run(
                18000 + os.getpid() % 1000 + 3,
                n=20000,
                rounds=5,
                decisions=args.ship_decisions,
                samples=40,
            ),
        )
    if not args.skip_stats:
        from benchmarks import stats

        table(
            f"Statistics at scale: GET /loops/default/stats on {args.stats_decisions:,} joined "
            "decisions (dloop up, SQLite)",
            stats.stats_at_scale(args.stats_decisions),
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
    if not args.skip_rl:
        from benchmarks import rl

        rows, results, optima = rl.benchmark(list(rl.WORLDS), args.rl_seeds)
        rl.plot(results, optima, rl.PLOT)
        table(
            "RL learning quality: dloop's default rl policy (explorationPercentage 0.2) and "
            f"tabular Q-learning on each world, {args.rl_seeds} seeds (plot: {rl.PLOT})",
            rows,
        )


if __name__ == "__main__":
    main()
