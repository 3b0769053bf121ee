"""Rewrite the shared conventions block of every tool from tools/conventions.py.

Usage::

    python tools/sync_conventions.py           # rewrite the copies (make sync-conventions)
    python tools/sync_conventions.py --check   # exit 1 naming the copies that differ
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("faust_imaging", "clover", "autospec", "racs_pipeline", "ir_blobs")
BLOCK = re.compile(r"# >>> shared conventions >>>\n.*?# <<< shared conventions <<<\n", re.S)


def source_block():
    """The block (markers included) from tools/conventions.py."""
    match = BLOCK.search((ROOT / "tools" / "conventions.py").read_text())
    if not match:
        raise SystemExit("tools/conventions.py lacks the shared conventions markers")
    return match.group(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report copies that differ")
    args = parser.parse_args(argv)
    block, differing = source_block(), []
    for name in TOOLS:
        path = ROOT / f"{name}.py"
        text = path.read_text()
        match = BLOCK.search(text)
        if not match:
            raise SystemExit(f"{path} lacks the shared conventions markers")
        if match.group(0) != block:
            differing.append(path.name)
            if not args.check:
                path.write_text(text[:match.start()] + block + text[match.end():])
    if args.check and differing:
        print("shared conventions block differs from tools/conventions.py in: " + ", ".join(differing))
        return 1
    for name in differing:
        print("rewrote the shared block of", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
