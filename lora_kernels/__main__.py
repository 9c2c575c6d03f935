"""`python -m lora_kernels bench|info`: the benchmark report and what this machine can run."""
from __future__ import annotations

import argparse
import json
import sys


def _info() -> dict:
    import torch

    from . import _backend

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # reported, not fatal
        info["triton"] = f"unavailable ({e})"
    for mod in ("transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = "not installed"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    info["backend on cuda"] = _backend.choose(torch.device("cuda"))[1] if torch.cuda.is_available() else "n/a"
    info["backend on cpu"] = _backend.choose(torch.device("cpu"))[1]
    if torch.cuda.is_available():
        from .ops import replay

        info["eager replay"] = ("on (C++ replays an eager call's launches from the third call of its shapes on)" if replay.available()
                                else "off (the CUDA extension is not built: LORA_KERNELS_REPLAY=1 builds it on first use)")
    return info


def _print_table(rows) -> None:
    if not rows:
        return
    head = ("bench", "case", "impl", "ms", "x base", "note")
    cells = [(r.bench, r.case, r.impl, "-" if r.ms is None else f"{r.ms:.4f}",
              "-" if r.ratio is None else f"{r.ratio:.2f}", r.note) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*head))
    print(fmt.format(*("-" * w for w in widths)))
    for c in cells:
        print(fmt.format(*c))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time fused LoRA against naive PyTorch and PEFT (GPU)")
    b.add_argument("--quick", action="store_true", help="the headline shapes only")
    b.add_argument("--only", default="", help="comma-separated reports: linear,multi,e2e")
    b.add_argument("--json", default="", help="also write all rows to this JSON file (rewritten after each case)")
    b.add_argument("--shard", default="", metavar="I/N",
                   help="linear report: only cases I, I+N, I+2N, ... of its grid (split a long run over calls)")
    b.add_argument("--match", default="", metavar="REGEX",
                   help="linear report: only the grid cases whose name matches, e.g. '^2048x.* r64 '")
    b.add_argument("--graphs", action="store_true",
                   help="linear report: also time the whole grid from CUDA graphs (the quick set always is)")
    sub.add_parser("info", help="versions, device and which backend each device gets")
    args = parser.parse_args(argv)

    import torch

    from . import _bench

    info = _info()
    if args.cmd == "info":
        for k, v in info.items():
            print(f"{k}: {v}")
        return 0
    shard = _parse_shard(parser, args.shard) if args.shard else None
    try:
        _bench.load("linear").match_cases([], args.match)  # a bad --match fails here, before any timing
    except ValueError as e:
        parser.error(str(e))
    print("  ".join(f"{k}={v}" for k, v in info.items()))
    names = [n for n in (args.only.split(",") if args.only else _bench.available()) if n]
    rows = []

    def save(new_rows=()):  # after each case, so a run cut short keeps what it measured
        rows.extend(new_rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([r.__dict__ for r in rows], f, indent=1)

    for name in names:
        try:
            mod = _bench.load(name)
        except ModuleNotFoundError:
            print(f"[{name}] not available in this build")
            continue
        print(f"[{name}] running{' (quick)' if args.quick else ''} ...", flush=True)
        if name == "linear":
            mod.run(quick=args.quick, shard=shard, graphs=args.graphs or None, on_rows=save, match=args.match)
        else:
            save(mod.run(quick=args.quick))
    if not torch.cuda.is_available():
        print("\nNo CUDA device: GPU timings were not measured. Checked instead: each report's "
              "correctness probe on the CPU (rows below). Run on an NVIDIA GPU for the figures.")
    _print_table(rows)
    if "linear" in names and torch.cuda.is_available():
        _print_versus_naive(_bench.load("linear").versus_naive(rows))
    save()
    return 0


def _parse_shard(parser, text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        parser.error(f"--shard takes I/N, e.g. 1/3; got {text!r}")
    if not 1 <= i <= n:
        parser.error(f"--shard I/N needs 1 <= I <= N; got {text!r}")
    return i, n


def _print_versus_naive(found: dict) -> None:
    """The issue's "never slower than naive" check over the linear rows just measured."""
    print()
    for mode, (slower, count) in found.items():
        if not count:
            continue
        print(f"fused vs naive, {mode}: slower at {len(slower)} of {count} cases"
              + (":" if slower else ""))
        for case, fq, nq in slower:
            print(f"  {case}: fused {fq:.3f}x, naive {nq:.3f}x base")


if __name__ == "__main__":
    sys.exit(main())
