"""Python `tokenizers` batch-encoding throughput on the file the Rust bench tokenizes.

Usage (after `cargo bench -p zamba-data --bench throughput` created the input):
  /root/.venvs/tok/bin/python data-pipeline/scripts/bench_python_tokenizers.py \
      target/zamba-data-bench/raw/web/train/part-00000.parquet data-pipeline/tests/fixtures/bpe-1000.json
Set RAYON_NUM_THREADS=1 for the single-thread number.
"""
import sys
import time

import pyarrow.parquet as pq
from tokenizers import Tokenizer


def main() -> None:
    path, tokenizer_path = sys.argv[1], sys.argv[2]
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    tok = Tokenizer.from_file(tokenizer_path)
    text_bytes = sum(len(t.encode()) for t in texts)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 4096):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 4096], add_special_tokens=False))
    secs = time.perf_counter() - start
    print(f"python tokenizers encode_batch: {text_bytes / secs / 1e6:.1f} MB/s of text, {tokens / secs / 1e6:.2f} M tokens/s ({len(texts)} docs, {tokens} tokens, {secs:.2f}s)")


if __name__ == "__main__":
    main()
