"""Vowpal Wabbit out of process: parsing, prediction and learning on untrusted input run in
child processes, so a crash in VW's C++ (VW 9.11.9's JSON parser segfaults on a feature key
`__aid`; the next bug will be a segfault too) takes down a child, never the server.

Children are forked by multiprocessing's forkserver with VW already imported (a restart costs
about 20 ms) and talk to their parent over a socketpair in frames of a JSON header and a binary
blob (example text, model bytes). Never pickle: a child that VW's input managed to subvert can
send its parent nothing but data.

- `RankerPool` (asyncio, serving): a few long-lived children that parse, predict, fill
  multi-slot pages and explain, and run the operations their owner adds (`ops`: the server's
  whole rank, service.core.ranks). Each keeps the models of the loops it served recently (LRU),
  loaded from the files the serving process writes when a model is published. Every call has a
  deadline; a child that crashes or overruns is killed and replaced (backing off when it keeps
  dying) and the input that did it is remembered and refused at once if it comes again.
- `Child` (blocking): one long-lived child for a learner thread; trainers live in it
  (`TrainerHost`), a batch of lines per call.
- `run_once`: a fresh child for one call (model and policy checks, the parser fuzzer).

What a call can raise: `RemoteError` (VW or dloop raised a Python exception in the child; the
child lives on), `NativeCrash` (the child died: a segfault or an abort), `SandboxTimeout` (it
overran its deadline and was killed), `SandboxBusy` (no child free in time).
"""

from __future__ import annotations

from learners.sandbox.process import (
    Child,
    blank_model,
    check_model,
    check_policy,
    process_context,
    run_once,
)
from learners.sandbox.protocol import (
    NativeCrash,
    RemoteError,
    SandboxBusy,
    SandboxError,
    SandboxTimeout,
)
from learners.sandbox.rankers import (
    NO_MODEL,
    InlineRankers,
    ModelRef,
    PoolStats,
    RankerPool,
    write_model,
)
from learners.sandbox.trainers import (
    Learned,
    RemoteTrainer,
    TrainerHost,
    TrainerLost,
    learn_in_turn,
)

__all__ = [
    "NO_MODEL",
    "Child",
    "InlineRankers",
    "Learned",
    "ModelRef",
    "NativeCrash",
    "PoolStats",
    "RankerPool",
    "RemoteError",
    "RemoteTrainer",
    "SandboxBusy",
    "SandboxError",
    "SandboxTimeout",
    "TrainerHost",
    "TrainerLost",
    "blank_model",
    "check_model",
    "check_policy",
    "learn_in_turn",
    "process_context",
    "run_once",
    "write_model",
]
