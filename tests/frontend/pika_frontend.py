#!/usr/bin/env python3
"""A front-end written with another language's AMQP client (pika): it declares its own reply
queue, sends a job with message_id/reply_to/correlation_id, polls GET /jobs/{id} until it has
seen `running` and then `succeeded`, and consumes the reply. Exit 0 when all of that held."""
import argparse, json, sys, time, urllib.error, urllib.request, uuid

import pika


def job_status(http, message_id):
    try:
        with urllib.request.urlopen(f"http://{http}/jobs/{message_id}", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--http", required=True)
    p.add_argument("--timeout", type=float, default=30)
    a = p.parse_args()

    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    reply_q = ch.queue_declare("", exclusive=True).method.queue
    message_id, cid = f"job-{uuid.uuid4()}", str(uuid.uuid4())
    ch.confirm_delivery()
    ch.basic_publish("", a.queue, json.dumps({"text": "hello"}), pika.BasicProperties(
        content_type="application/json", delivery_mode=2, message_id=message_id,
        reply_to=reply_q, correlation_id=cid, timestamp=int(time.time())))

    seen, deadline = [], time.time() + a.timeout
    while time.time() < deadline:
        job = job_status(a.http, message_id)
        if job and (not seen or seen[-1] != job["status"]):
            seen.append(job["status"])
            print("status:", job["status"], flush=True)
        if job and job["status"] == "succeeded":
            assert job["result"] == {"text": "HELLO"}, job
            break
        time.sleep(0.05)
    assert seen[:1] == ["running"] and seen[-1] == "succeeded", seen

    for method, props, body in ch.consume(reply_q, auto_ack=True, inactivity_timeout=a.timeout):
        assert method is not None, "no reply"
        assert props.correlation_id == cid, (props.correlation_id, cid)
        assert props.headers["x-status"] == "ok", props.headers
        assert json.loads(body) == {"text": "HELLO"}, body
        print("reply:", body.decode(), flush=True)
        break
    conn.close()


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("FAILED:", e, file=sys.stderr)
        sys.exit(1)
