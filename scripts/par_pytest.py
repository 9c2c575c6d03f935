"""Run a pytest selection in N parallel processes (the GPU run: kernel compiles are CPU-bound).

    python scripts/par_pytest.py -n 6 [--log-dir D] -- <pytest args: files, -k, -m ...>

Collects the selected test ids once, deals them round-robin to N pytest processes sharing one GPU,
waits, and prints every FAILED/ERROR line plus the summed counts. Exit status 0 only if every
process passed.
"""
import argparse
import os
import re
import signal
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    extra = [a for a in args.pytest_args if a != "--"]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *extra],
                               capture_output=True, text=True)
    ids = [ln for ln in collected.stdout.splitlines() if "::" in ln]
    if not ids:
        print(collected.stdout[-3000:], collected.stderr[-3000:])
        return 1
    opts = [a for i, a in enumerate(extra) if a.startswith("-") or (i > 0 and extra[i - 1] in ("-m", "-k"))]
    opts = [a for i, a in enumerate(opts) if not (a == "-k" or (i > 0 and opts[i - 1] == "-k"))]  # ids already chosen
    n = max(1, min(args.n, len(ids)))
    chunks = [ids[i::n] for i in range(n)]
    os.makedirs(args.log_dir, exist_ok=True)
    procs = []
    for i, chunk in enumerate(chunks):
        log = open(os.path.join(args.log_dir, f"pytest_part{i}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                                        *opts, *chunk], stdout=log, stderr=subprocess.STDOUT), log))
    def stop(signum, frame):  # a stage time limit: take the workers down too
        for p, _ in procs:
            p.kill()
        sys.exit(124)

    signal.signal(signal.SIGTERM, stop)
    counts, bad, rc = {}, [], 0
    for i, (p, log) in enumerate(procs):
        rc |= p.wait()
        log.close()
        text = open(log.name).read()
        bad += [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        tail = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
        for num, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail[-1] if tail else ""):
            counts[what] = counts.get(what, 0) + int(num)
        if not tail:
            bad.append(f"part {i}: no summary line (crashed?); see {log.name}")
    print(f"{len(ids)} tests in {n} processes: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for ln in bad:
        print(ln)
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
