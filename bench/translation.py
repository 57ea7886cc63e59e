"""CPU of the stream translations in isolation: the bench's 20-chunk chat stream read as a chat
stream (bytes forwarded, usage read), translated to Anthropic Messages events and to Responses
events, each fed the upstream's chunks one by one as the relay does.

``python -m bench.translation [--streams N] [--chunks 20]`` prints microseconds of CPU per stream
for each, and what each translation adds over the chat stream.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyaos.settings")
django.setup()

from bench.fake_upstream import stream_events  # noqa: E402
from routing.protocols import anthropic, openai, responses  # noqa: E402

BODY = {
    "model": "bench-model",
    "max_tokens": 64,
    "stream": True,
    "messages": [{"role": "user", "content": "Say hello to the benchmark in a few words."}],
}
RESPONSES_BODY = {"model": "bench-model", "input": "Say hello.", "stream": True}


def cpu_us_per_stream(front, body: dict, events: list[bytes], streams: int) -> float:
    raw = json.dumps(body).encode()
    begun = time.process_time()
    for _ in range(streams):
        request = front.parse(raw)  # what the relay's translator needs, built once per request
        reader = front.stream_translator(request)
        for event in events:
            reader.feed(event)
        reader.close()
    return (time.process_time() - begun) / streams * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args(argv)
    events = stream_events(chunks=args.chunks)
    cases = {
        "chat (pass-through)": (openai.CHAT, BODY),
        "anthropic messages": (anthropic.MESSAGES, BODY),
        "openai responses": (responses.RESPONSES, RESPONSES_BODY),
    }
    for front, body in cases.values():  # warm up
        cpu_us_per_stream(front, body, events, 50)
    results = {
        name: cpu_us_per_stream(f, b, events, args.streams) for name, (f, b) in cases.items()
    }
    chat = results["chat (pass-through)"]
    print(f"{args.chunks}-chunk stream, {args.streams} streams each, CPU per stream:")
    for name, us in results.items():
        extra = "" if us is chat else f"  (+{(us - chat) / 1000:.3f} ms over chat)"
        print(f"  {name:<22} {us:8.1f} us{extra}")


if __name__ == "__main__":
    main()
