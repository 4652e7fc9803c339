"""Encoding speed on one core: HF `encode_batch` over ~1 KB chunks vs our PieceEncoder, same text.

    python benchmarks/encode_speed.py --clean data/clean --tokenizer models/tokenizer/tokenizer.json

Reads up to --mb megabytes of cleaned documents, encodes them in batches of about 1 M characters (as a
tokenize worker does), checks that all methods give identical ids, and prints MB/s and ratios. One
thread (RAYON_NUM_THREADS=1), as in each tokenize worker process; the stage runs one worker per core.
"""

import argparse
import os
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # before the tokenizer's thread pool starts

from llm.documents import iter_documents  # noqa: E402
from llm.encoder import PieceEncoder, split_text  # noqa: E402
from llm.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", type=Path, default=Path("data/clean"))
    parser.add_argument("--tokenizer", type=Path, default=Path("models/tokenizer/tokenizer.json"))
    parser.add_argument("--mb", type=float, default=50)
    args = parser.parse_args()

    texts, nbytes = [], 0
    for _, text in iter_documents(args.clean):
        texts.append(text)
        nbytes += len(text.encode())
        if nbytes >= args.mb * 1e6:
            break
    tokenizer = load_tokenizer(args.tokenizer)
    mb = nbytes / 1e6

    batches, batch, size = [], [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= 1_000_000:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)

    def timed(encode) -> tuple[list[int], float]:
        start = time.perf_counter()
        ids = [i for batch in batches for i in encode(batch)]
        return ids, time.perf_counter() - start

    def chunked(method):
        def encode(batch):
            chunks = [chunk for text in batch for chunk in split_text(text, 1024)]
            return [i for encoding in method(chunks, add_special_tokens=False) for i in encoding.ids]
        return encode

    baseline, hf_seconds = timed(chunked(tokenizer.encode_batch))
    fast, fast_seconds = timed(chunked(tokenizer.encode_batch_fast))
    encoder = PieceEncoder(tokenizer)
    ids, piece_seconds = timed(lambda batch: encoder.encode(batch)[0].tolist())

    assert ids == baseline == fast, "ids differ"
    print(f"{mb:.1f} MB, {len(ids):,} tokens, ids identical, one thread")
    print(f"encode_batch, 1 KB chunks      {mb / hf_seconds:6.1f} MB/s")
    print(f"encode_batch_fast, 1 KB chunks {mb / fast_seconds:6.1f} MB/s")
    ratio = hf_seconds / piece_seconds
    print(f"PieceEncoder                   {mb / piece_seconds:6.1f} MB/s  ({ratio:.1f}x encode_batch)")


if __name__ == "__main__":
    main()
