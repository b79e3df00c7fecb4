"""The floor `make bench` measures dloop's HTTP path against (benchmark-only, not product code):
the leanest server a team might write by hand, Starlette + VW in one process, doing only what
a rank must (parse the request, let VW predict, draw an action, answer) and none of dloop's
other work (keys, validation, retry cache, log, learning). `/healthz` is the bare app's floor.

    python -m benchmarks.lean --port 18100 --model model.vw
"""

from __future__ import annotations

import argparse
import random
import uuid
from collections.abc import Callable

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from vowpalwabbit import pyvw


def ranker(model: str) -> Callable[[bytes], bytes]:
    """A rank body in, the answer out: parse, VW predict, draw (also the Ray Serve peer's,
    benchmarks/ray_peer.py)."""
    ws = pyvw.Workspace(f"--json --quiet -i {model}")

    def rank(raw: bytes) -> bytes:
        body = orjson.loads(raw)
        actions = body["actions"]
        text = orjson.dumps(
            {
                "FromUrl": body.get("contextFeatures") or [],
                "_multi": [{"_tag": a["id"], "j": a.get("features") or []} for a in actions],
            }
        ).decode()
        examples = ws.parse(text)
        try:
            probs = ws.predict(examples)  # --cb_explore_adf: the probability of each action
        finally:
            ws.finish_example(examples)
        chosen = random.choices(range(len(actions)), weights=probs)[0]
        ranking = [{"id": actions[i]["id"], "probability": probs[i]} for i in range(len(actions))]
        ranking.insert(0, ranking.pop(chosen))
        event = body.get("eventId") or uuid.uuid4().hex
        return orjson.dumps(
            {"ranking": ranking, "eventId": event, "rewardActionId": actions[chosen]["id"]}
        )

    return rank


def app(model: str) -> Starlette:
    decide = ranker(model)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def rank(request: Request) -> Response:
        answer = decide(await request.body())
        return Response(answer, status_code=201, media_type="application/json")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/personalizer/v1.0/rank", rank, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="a VW --cb_explore_adf model file")
    args = parser.parse_args()
    uvicorn.run(app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
