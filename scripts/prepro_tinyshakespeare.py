"""Download and tokenize tinyshakespeare into llm.c token shards.

    python scripts/prepro_tinyshakespeare.py [--input PATH] [--out-dir DIR]

writes DIR/tiny_shakespeare_{val,train}.bin (32,768 + 305,260 tokens). The
same as `llmcu prepare tinyshakespeare`; runs from the repo root uninstalled.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmcu.data import DatasetError, default_paths, prepare_tinyshakespeare  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None,
                        help="local copy of input.txt (default: download it into --out-dir)")
    parser.add_argument("--out-dir", default=default_paths("tinyshakespeare")["dir"],
                        help="where the .bin files go (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        prepare_tinyshakespeare(out_dir=args.out_dir, input_path=args.input)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
