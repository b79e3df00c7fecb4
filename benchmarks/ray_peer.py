"""The peer `make bench` sets beside dloop (benchmark-only): Ray Serve with VW, the way a team
would serve a VW model with it, two replicas behind Ray Serve's HAProxy ingress, each doing
what the lean floor does (benchmarks/lean.py: parse, predict, draw). It runs in a virtualenv of
its own (`.venv-peer`, made by `make bench`), since Ray is not a dependency of dloop.

    .venv-peer/bin/python -m benchmarks.ray_peer --port 18200 --model model.vw
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    # Read by Ray Serve's controller when it starts: HAProxy in front of the replicas.
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    from benchmarks.lean import ranker

    @serve.deployment(num_replicas=args.replicas, ray_actor_options={"num_cpus": 0})
    class Rank:
        def __init__(self, model: str) -> None:
            self.decide = ranker(model)

        async def __call__(self, request: Request) -> Response:
            answer = self.decide(await request.body())
            return Response(answer, status_code=201, media_type="application/json")

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Rank.bind(os.path.abspath(args.model)), route_prefix="/personalizer/v1.0/rank")
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
