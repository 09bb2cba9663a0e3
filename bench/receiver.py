"""A fast Qualtrics stand-in for the benchmark: it responds and counts, nothing more.

The project's stand-in (`integrations.standin`) parses and records every
request, which is what tests need but costs CPU that the benchmark's
co-located pipeline would otherwise have. This one responds to every POST with
200 and the JSON `meta` block Qualtrics sends, counts requests and body
bytes, and keeps the arrival time of the first and the last. It speaks
HTTP/1.1 with keep-alive and Content-Length bodies only (what `requests`
sends); chunked bodies are not supported.

`GET /stats` returns the counts as JSON, and `GET /reset` zeroes them.

    python -m bench.receiver --port 19082
"""

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass

OK_BODY = b'{"meta":{"httpStatus":"200 - OK","requestId":"bench"},"result":{}}'
OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(OK_BODY)).encode()
    + b"\r\n\r\n"
    + OK_BODY
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


@dataclass
class Counts:
    """Counts of the requests received since the last reset, with `time.time()` seconds of the first and last."""

    requests: int = 0
    body_bytes: int = 0
    first_at: float | None = None
    last_at: float | None = None

    def reset(self) -> None:
        self.requests, self.body_bytes, self.first_at, self.last_at = 0, 0, None, None

    def record(self, body_bytes: int) -> None:
        now = time.time()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.requests += 1
        self.body_bytes += body_bytes


class ReceiverProtocol(asyncio.Protocol):
    """One client connection; requests may arrive in pieces or several in one read."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self._answer_one():
            pass

    def _answer_one(self) -> bool:
        """Respond to the first complete request in the buffer; return False when none is complete."""
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        head = bytes(self.buffer[:head_end]).lower()
        length = _content_length(head)
        end = head_end + 4 + length
        if len(self.buffer) < end:
            return False
        del self.buffer[:end]

        assert self.transport is not None
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0]
        if method == b"post":
            self.counts.record(length)
            self.transport.write(OK_RESPONSE)
        else:
            self.transport.write(self._control(path))
        if b"\r\nconnection: close" in head:
            self.transport.close()
        return True

    def _control(self, path: bytes) -> bytes:
        if path == b"/reset":
            self.counts.reset()
        elif path != b"/stats":
            return NOT_FOUND
        body = json.dumps(asdict(self.counts)).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )


def _content_length(head: bytes) -> int:
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    value = head[start + len(b"\r\ncontent-length:") :].split(b"\r\n", 1)[0]
    return int(value.strip())


async def serve(host: str, port: int) -> None:
    counts = Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ReceiverProtocol(counts), host, port, backlog=1024)
    print(f"listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=19082)
    options = parser.parse_args()
    asyncio.run(serve(options.host, options.port))


if __name__ == "__main__":
    main()
