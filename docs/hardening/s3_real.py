"""Issue 22's S3 on the real SmolLM2 (default settings: chunks of 256 prompt tokens): a client that leaves during
the scoring of 16 x 2,000-token prompts, then a SIGTERM during the same scoring (grace period 5 s)."""
import contextlib
import os
import subprocess
import sys
import threading
import time

import httpx

ROOT = "/work/wt-harden"
PORT = 18801
URL = f"http://127.0.0.1:{PORT}"
env = {k: v for k, v in os.environ.items() if not k.startswith("ONEJUMP_")} | {"PYTHONPATH": ROOT}
def serve(*flags):
    p = subprocess.Popen([sys.executable, "-m", "service", "--port", str(PORT), "--log-level", "warning", *flags],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            if httpx.get(URL + "/ready").status_code == 200:
                return p
        except httpx.TransportError:
            pass
        time.sleep(0.5)
def cancelled():
    return sum(float(line.split()[-1]) for line in httpx.get(URL + "/metrics").text.splitlines()
               if line.startswith("onejump_request_failure_total") and 'reason="cancelled"' in line)
BODY = {"prompt": [[(7 * i + k) % 40000 + 100 for i in range(2000)] for k in range(16)], "echo": True,
        "logprobs": 5, "max_tokens": 0}
p = serve("--shutdown-timeout-s", "5")
try:
    t0 = time.monotonic()
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(URL + "/v1/completions", json=BODY, timeout=httpx.Timeout(60, read=5))
    left = time.monotonic()
    while cancelled() < 1:
        time.sleep(0.02)
    stopped = time.monotonic()
    r = httpx.post(URL + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 1}, timeout=120)
    served = time.monotonic()
    print(f"client left after {left - t0:.1f}s; scoring counted cancelled {stopped - left:.2f}s later; "
          f"a 1-token request sent then was answered {served - stopped:.2f}s later ({r.status_code})")
    out = []
    th = threading.Thread(target=lambda: out.append(httpx.post(URL + "/v1/completions", json=BODY, timeout=300)))
    th.start()
    time.sleep(3)
    t1 = time.monotonic()
    p.terminate()
    p.wait(120)
    t2 = time.monotonic()
    th.join()
    print(f"SIGTERM during scoring (grace period 5 s): exited {t2 - t1:.2f}s later; the client got "
          f"{out[0].status_code} {out[0].text[:160]}")
finally:
    p.kill()
