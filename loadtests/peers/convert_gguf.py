"""Runs llama.cpp's `convert_hf_to_gguf.py`, naming the BPE pre-tokenizer where the converter cannot recognize it.

The converter names a tokenizer's pre-tokenization by hashing how it encodes a test text, and stops on a hash it
does not know. The dummy models (`loadtests.dummy_models`) give every architecture SmolLM2's vocabulary, and
transformers 5 loads a Qwen2 model's tokenizer with Qwen2's own pre-tokenizer (its split pattern, whatever
tokenizer.json says): a pairing no published model has, so no hash matches. `--pre NAME` (a pre-tokenizer llama.cpp
implements, such as `qwen2`, the pattern transformers applies there) is taken then, and only then: a recognized
hash keeps its own name.

    python -m loadtests.peers.convert_gguf CONVERTER [--pre NAME] -- CONVERTER_ARGS...
"""

from __future__ import annotations

import argparse
import logging
import runpy
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--pre", default=None, help="the pre-tokenizer's name where the converter knows none")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, rest = parser.parse_args(argv[:split]), argv[split + 1 :]  # after --: the converter's own arguments
    sys.path.insert(0, str(args.converter.parent))
    if args.pre:
        from conversion import base  # the converter's own package: the module object it will use

        recognize = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
            try:
                name: str = recognize(self, tokenizer)
            except NotImplementedError:
                logging.getLogger("convert_gguf").warning("pre-tokenizer not recognized: taking %r", args.pre)
                return str(args.pre)
            return name

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre  # type: ignore[method-assign]
    sys.argv = [str(args.converter), *rest]
    runpy.run_path(str(args.converter), run_name="__main__")


if __name__ == "__main__":
    main()
