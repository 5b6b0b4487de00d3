"""Seconds to parse the embedded SmolLM2 GGUF with lowrax's parser and with `gguf.GGUFReader`:

    .venv-test/bin/python scripts/gguf_parse_time.py
"""

import time

import gguf

from lowrax.io.gguf_reader import GgufFile
from lowrax.models.pretrained import resolve_model_path

if __name__ == "__main__":
    path = str(resolve_model_path(None))
    for name, parse in (("lowrax GgufFile", GgufFile), ("gguf.GGUFReader", gguf.GGUFReader)):
        start = time.perf_counter()
        parse(path)
        print(f"{name}: {time.perf_counter() - start:.2f} s")
