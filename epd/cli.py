"""The `epd` command: one entry point, one subcommand per role or tool.

    epd tiny-model ARCH OUT_DIR [--preset tiny|3b|7b] [--seed N] [--device cpu|cuda]
    epd bench ...            (the benchmark harness, see bench/README.md)
    epd serve | router | encoder | prefill | decode ...   (when those roles are installed)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module exposing main(argv) ; imported lazily so `epd tiny-model` stays fast
_DELEGATES = {
    "bench": "bench.cli",
    "serve": "deploy.serve",
    "router": "router.main",
    "encoder": "encoder_node.main",
    "prefill": "prefill_node.main",
    "decode": "decode_node.main",
}


def _tiny_model(argv: list[str]) -> int:
    from epd.tiny_model import ARCHS, write_tiny_model

    ap = argparse.ArgumentParser(prog="epd tiny-model", description="write a random checkpoint of a real architecture")
    ap.add_argument("arch", choices=ARCHS)
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "3b", "7b"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where to draw the random weights (cuda is faster for 7b)")
    args = ap.parse_args(argv)
    path = write_tiny_model(args.arch, args.out_dir, args.preset, args.seed, args.device)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["tiny-model", *_DELEGATES]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "tiny-model":
        return _tiny_model(rest)
    if cmd in _DELEGATES:
        try:
            module = importlib.import_module(_DELEGATES[cmd])
        except ModuleNotFoundError as e:
            print(f"epd {cmd}: not available in this installation ({e})", file=sys.stderr)
            return 2
        return int(module.main(rest) or 0)
    print(f"epd: unknown command {cmd!r}; expected one of {', '.join(commands)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
