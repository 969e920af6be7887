#!/usr/bin/env python3
"""A plain AMQP (pika) client for the demo's `thumbnails` queue: sends one request with
reply_to + correlation_id and prints every reply (progress, then ok/error).

    python3 scripts/thumbnail_client.py [IMAGE_FILE] [--max-side N] [--garbage]
"""
import argparse, base64, json, os, sys, uuid, zlib, struct

import pika


def tiny_png(w=120, h=60):
    rows = b"".join(b"\x00" + b"".join(bytes([x % 256, y % 256, 80]) for x in range(w)) for y in range(h))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("image", nargs="?")
    p.add_argument("--max-side", type=int, default=64)
    p.add_argument("--garbage", action="store_true", help="send bytes that are not an image")
    p.add_argument("--url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    p.add_argument("--timeout", type=float, default=30)
    a = p.parse_args()
    if a.garbage:
        data = b"this is not an image"
    elif a.image:
        data = open(a.image, "rb").read()
    else:
        data = tiny_png()
    conn = pika.BlockingConnection(pika.URLParameters(a.url.split(",")[0]))
    ch = conn.channel()
    reply_q = ch.queue_declare("", exclusive=True).method.queue
    cid = str(uuid.uuid4())
    body = json.dumps({"image": base64.b64encode(data).decode(), "max_side": a.max_side})
    ch.basic_publish("", "thumbnails", body, pika.BasicProperties(
        content_type="application/json", reply_to=reply_q, correlation_id=cid, delivery_mode=2))
    for method, props, reply in ch.consume(reply_q, auto_ack=True, inactivity_timeout=a.timeout):
        if method is None:
            print("timeout", file=sys.stderr)
            sys.exit(2)
        status = (props.headers or {}).get("x-status")
        assert props.correlation_id == cid, (props.correlation_id, cid)
        print(json.dumps({"x-status": status, "body": json.loads(reply)}))
        if status in ("ok", "error"):
            sys.exit(0 if status == "ok" else 1)


if __name__ == "__main__":
    main()
