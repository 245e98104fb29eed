"""The server on a GPU (started by scripts/gpu_check.sh's serve stage): wait for /ready, one chat request per
exit mode, /v1/models and the onejump_* metrics; writes them as JSON to argv[1]."""

import json
import sys
import time

import httpx

BASE = "http://127.0.0.1:8765"
PROMPT = ("Repeat exactly: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.")


def main(path: str) -> int:
    out: dict = {}
    for _ in range(480):
        try:
            if httpx.get(f"{BASE}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    out["models"] = httpx.get(f"{BASE}/v1/models", timeout=10).json()
    for mode in ("off", "approximate", "exact"):
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32, "early_exit": {"mode": mode}}
        r = httpx.post(f"{BASE}/v1/chat/completions", json=body, timeout=120)
        out[mode] = {"status": r.status_code, "body": r.json()}
    metrics = httpx.get(f"{BASE}/metrics", timeout=10).text
    out["metrics"] = [line for line in metrics.splitlines() if line.startswith("onejump_") and "bucket" not in line]
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    status = {m: out[m]["status"] for m in ("off", "approximate", "exact")}
    print(json.dumps(status))
    return 0 if set(status.values()) == {200} else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
