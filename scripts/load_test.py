"""Load test for wick-serve on loopback: concurrent clients sending batch-1
ResNet18 inference requests (Open Inference Protocol, binary tensors), with
and without dynamic batching. Prints per run: images/s, latency p50/p90/p99,
status counts, the server's peak RSS (sampled from /proc every 20 ms) and
the slowest `/v2/health/live` answer (probed every 100 ms throughout).
Standard library only; not run by CI.

    cargo build --release -p wick-serve
    python3 scripts/load_test.py [--clients 1 8 32 64] [--seconds 10] [--server target/release/wick-serve]

Each configuration gets a fresh server process, its batch sizes compiled
at start (--batch-sizes) so no compile falls inside the measurement:
"b8 d2ms" is --max-batch 8 --max-delay-ms 2 --batch-sizes 1,2,4,8 (the
defaults plus the allow-list; others with --batching 16:5 ...); "no
batching" is --max-batch 1 --batch-sizes 1. Clients wait as a 503's
Retry-After says (--impatient: 10 ms). Idle RSS is read after start and a few warm-up requests.
"""

import argparse
import http.client
import json
import statistics
import struct
import subprocess
import threading
import time


def start(server, extra):
    proc = subprocess.Popen([server, "--addr", "127.0.0.1:0", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    host, port = line.removeprefix("listening on http://").rsplit(":", 1)
    return proc, host, int(port)


def request_body(seed):
    values = [((i * 2654435761 + seed) % 2001) / 1000.0 - 1.0 for i in range(3 * 224 * 224)]
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 4 * len(values)}}]}).encode()
    return header, header + struct.pack(f"<{len(values)}f", *values)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(server, extra, clients, seconds, impatient):
    proc, host, port = start(server, extra)
    header, body = request_body(1)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    # Warm up (the batch sizes were compiled at start).
    warm = http.client.HTTPConnection(host, port, timeout=120)
    for _ in range(3):
        warm.request("POST", "/v2/models/resnet18/infer", body, headers)
        warm.getresponse().read()
    idle_rss = rss_mib(proc.pid)
    stop = time.monotonic() + seconds
    latencies, statuses, lock = [], {}, threading.Lock()
    peak = [idle_rss]
    live_worst = [0.0]

    def client():
        conn = http.client.HTTPConnection(host, port, timeout=120)
        while time.monotonic() < stop:
            start_t = time.monotonic()
            try:
                conn.request("POST", "/v2/models/resnet18/infer", body, headers)
                response = conn.getresponse()
                response.read()
                status = response.status
                retry_after = float(response.getheader("Retry-After") or 0)
            except (ConnectionError, http.client.HTTPException):
                conn = http.client.HTTPConnection(host, port, timeout=120)
                status, retry_after = 0, 0.0
            elapsed = time.monotonic() - start_t
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(elapsed)
            if status == 503:
                # A well-behaved client waits as told (1 s), or 10 ms
                # with --impatient.
                time.sleep(0.01 if impatient else retry_after)

    def sampler():
        while time.monotonic() < stop:
            peak[0] = max(peak[0], rss_mib(proc.pid))
            time.sleep(0.02)

    def prober():
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while time.monotonic() < stop:
            t = time.monotonic()
            conn.request("GET", "/v2/health/live")
            conn.getresponse().read()
            live_worst[0] = max(live_worst[0], time.monotonic() - t)
            time.sleep(0.1)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    threads += [threading.Thread(target=sampler), threading.Thread(target=prober)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proc.terminate()
    proc.wait(timeout=30)
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "images_per_s": len(latencies) / seconds,
        "p50_ms": q[49] * 1e3, "p90_ms": q[89] * 1e3, "p99_ms": q[98] * 1e3,
        "statuses": statuses, "idle_rss_mib": idle_rss, "peak_rss_mib": peak[0],
        "live_worst_ms": live_worst[0] * 1e3,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="target/release/wick-serve")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--batching", nargs="+", default=["8:2"],
                        help="batching configurations MAX_BATCH:DELAY_MS (batch sizes: powers of two below MAX_BATCH, and it)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-batching configuration")
    parser.add_argument("--impatient", action="store_true", help="retry a 503 after 10 ms, not after its Retry-After")
    parser.add_argument("--server-args", nargs="*", default=[], help="more wick-serve flags, for both configurations")
    args = parser.parse_args()
    print(f"{'config':<12} {'clients':>7} {'img/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'idle MiB':>8} {'peak MiB':>8} {'live max ms':>11}  statuses", flush=True)
    configs = [] if args.no_baseline else [("no batching", ["--max-batch", "1", "--batch-sizes", "1"])]
    for spec in args.batching:
        max_batch, delay = spec.split(":")
        largest = int(max_batch)
        sizes = ",".join(str(n) for n in sorted({1 << i for i in range(largest.bit_length()) if 1 << i < largest} | {largest}))
        configs.append((f"b{max_batch} d{delay}ms", ["--max-batch", max_batch, "--max-delay-ms", delay, "--batch-sizes", sizes]))
    for name, extra in configs:
        for clients in args.clients:
            r = run(args.server, extra + args.server_args, clients, args.seconds, args.impatient)
            print(f"{name:<12} {clients:>7} {r['images_per_s']:>7.1f} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} "
                  f"{r['p99_ms']:>8.1f} {r['idle_rss_mib']:>8.0f} {r['peak_rss_mib']:>8.0f} {r['live_worst_ms']:>11.1f}  "
                  f"{dict(sorted(r['statuses'].items()))}", flush=True)


if __name__ == "__main__":
    main()
