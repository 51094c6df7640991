"""A WebSocket client that spec/chaos_spec.lua stops and resumes with
kill -STOP / -CONT (or kills): /usr/bin/python3 ws_reader.py URL
Prints "open", then for each envelope message "ID N" (N: the number the
data starts with; "end N" for the last),
and at the end "closed CODE" (1006: the connection dropped without a close)."""
import asyncio
import json
import sys

import websockets


async def main(url):
    async with websockets.connect(url, max_size=None, ping_interval=None) as ws:
        print("open", flush=True)
        try:
            async for msg in ws:
                m = json.loads(msg)
                words = m["data"].split(" ")
                print(m["id"], " ".join(words[:2] if words[0] == "end" else words[:1]), flush=True)
        except websockets.ConnectionClosed:
            pass
        print("closed", ws.close_code, flush=True)


asyncio.run(main(sys.argv[1]))
