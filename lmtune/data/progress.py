"""A long job's progress on the console: a bar on a terminal, a line every 30 s in a log."""

from __future__ import annotations

import sys
import time


class Progress:
    """Tokens, MB/s and, with a token budget, an ETA: a bar on a terminal, a line every 30 s in a log."""

    def __init__(self, total: int, done: int, stream=sys.stderr):
        self.total, self.stream, self.t0 = total, stream, time.monotonic()
        self.bytes = 0
        self.tokens = done
        self.last = self.t0
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, initial=done, unit="tok", unit_scale=True, desc="prepare",
                            file=stream, dynamic_ncols=True)

    def update(self, tokens: int, nbytes: int) -> None:
        self.tokens += tokens
        self.bytes += nbytes
        now = time.monotonic()
        mb_s = self.bytes / 1e6 / max(now - self.t0, 1e-9)  # characters of text: bytes for most of it
        if self.bar is not None:
            self.bar.update(tokens)
            self.bar.set_postfix_str(f"{mb_s:.1f} MB/s of text", refresh=False)
        elif now - self.last >= 30:
            self.last = now
            eta = ""
            if self.total:
                rate = (self.tokens) / max(now - self.t0, 1e-9)
                eta = f", ETA {max(0, self.total - self.tokens) / max(rate, 1e-9):.0f} s"
            print(f"prepare: {self.tokens:,} training tokens, {mb_s:.1f} M characters/s{eta}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
