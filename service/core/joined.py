"""The joined topic's messages: the only place they are built and read.

A message packs consecutive joined interactions of one loop (the message key) as lines of
"<position> <1|0> <DSJSON line>": the interaction's gap-free position in the loop's joined
stream, whether it trains the model, and the line VW learns from.
"""

from __future__ import annotations

# Joined rows per joined-topic message: kafka-python decodes record batches in Python, about
# 25 us a record, as much as VW's own learning; packing amortises that.
PACK_ROWS = 64
PACK_BYTES = 512 << 10  # under the broker's default 1 MB message limit


def joined_message(rows: list[tuple[int, bool, str]]) -> bytes:
    """A joined-topic message: lines of "<pos> <1|0> <DSJSON line>", consecutive positions of
    one loop (the key). Learners read it without decoding any JSON; VW parses the lines."""
    return b"\n".join(b"%d %d " % (pos, learn) + line.encode() for pos, learn, line in rows)


def read_joined(value: bytes) -> list[tuple[int, bool, str]]:
    out = []
    for item in value.split(b"\n"):
        pos, learn, line = item.split(b" ", 2)
        out.append((int(pos), learn == b"1", line.decode()))
    return out
