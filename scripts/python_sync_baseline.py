#!/usr/bin/env python3
"""Python's multiprocessing (fork) on the sync workloads of issue 16, as JSON lines in
the format of ../shared/bench/python_baseline.py (which has no such rows):

- sem_roundtrip: a child acquires and releases a multiprocessing.Semaphore, 20 batches
  of 10,000; the median over batches of one acquire + release, in microseconds.
- value_incr_2p: 2 processes each add 1 to one multiprocessing.Value N times under its
  lock (`with v.get_lock(): v.value += 1`); increments per second over both.
- dict_insert_get: a child inserts a key into a Manager().dict() and reads it back, N
  times; pairs per second.

Standard library only.  python3 scripts/python_sync_baseline.py [--only a,b]
"""
import json
import multiprocessing as mp
import statistics
import sys
import time

ctx = mp.get_context("fork")


def emit(workload, metric, value, unit):
    print(json.dumps({"system": "py-mp-fork", "workload": workload, "metric": metric,
                      "value": value, "unit": unit}), flush=True)


def sem_child(s, n, out):
    # Batches of n: a timer read per round trip would cost as much as the round trip.
    lat = []
    for _ in range(20):
        t = time.perf_counter()
        for _ in range(n):
            s.acquire()
            s.release()
        lat.append((time.perf_counter() - t) * 1e6 / n)
    out.put(lat)


def incr(v, n, go):
    go.wait()
    for _ in range(n):
        with v.get_lock():
            v.value += 1


def dict_child(d, n, out):
    t = time.perf_counter()
    for i in range(n):
        d[i] = i
        assert d[i] == i
    out.put(n / (time.perf_counter() - t))


def main():
    only = None
    if "--only" in sys.argv:
        only = set(sys.argv[sys.argv.index("--only") + 1].split(","))
    want = lambda w: only is None or w in only
    if want("sem_roundtrip"):
        s, out = ctx.Semaphore(1), ctx.Queue()
        p = ctx.Process(target=sem_child, args=(s, 10_000, out))
        p.start()
        lat = out.get()
        p.join()
        emit("sem_roundtrip", "median", statistics.median(lat), "us")
    if want("value_incr_2p"):
        n = 200_000
        v, go = ctx.Value("q", 0), ctx.Event()
        ps = [ctx.Process(target=incr, args=(v, n, go)) for _ in range(2)]
        for p in ps:
            p.start()
        t = time.perf_counter()
        go.set()
        for p in ps:
            p.join()
        dt = time.perf_counter() - t
        assert v.value == 2 * n
        emit("value_incr_2p", "throughput", 2 * n / dt, "items/s")
    if want("dict_insert_get"):
        with ctx.Manager() as m:
            d, out = m.dict(), ctx.Queue()
            p = ctx.Process(target=dict_child, args=(d, 20_000, out))
            p.start()
            rate = out.get()
            p.join()
        emit("dict_insert_get", "throughput", rate, "items/s")


if __name__ == "__main__":
    main()
