"""The demo's terminal output: a live status block (plain ANSI) when stdout is a terminal,
plain lines otherwise (CI logs, pipes): events always, a status line now and then."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO

BAR_WIDTH = 32
SPINNER = "|/-\\"
PLAIN_STATUS_EVERY_S = 15.0


def progress_bar(fraction: float | None, width: int = BAR_WIDTH, tick: int = 0) -> str:
    """`[#####.....]  42%`; None gives a moving marker (work of unknown length)."""
    if fraction is None:
        pos = tick % width
        cells = ["·"] * width
        for i in range(3):
            cells[(pos + i) % width] = "█"
        return "[" + "".join(cells) + "]  ...."
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return "[" + "█" * filled + "·" * (width - filled) + f"] {fraction * 100:4.0f}%"


class Display:
    """Events scroll above; the status block is redrawn in place (TTY) or printed as one
    line every 15 s (not a TTY). `color` and `live` default to stdout being a terminal
    (and NO_COLOR unset)."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None,
                 color: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.live = is_tty if live is None else live
        self.color = (is_tty and "NO_COLOR" not in os.environ) if color is None else color
        self._drawn = 0
        self._tick = 0
        self._last_plain = 0.0
        self._last_plain_text = ""
        self._broken = False  # the terminal went away: keep running (and cleaning up) silently

    def _out(self, text: str) -> None:
        if self._broken:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self._broken = True

    # ------------------------------------------------------------------ styling
    def style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def bold(self, text: str) -> str:
        return self.style(text, "1")

    def dim(self, text: str) -> str:
        return self.style(text, "2")

    def good(self, text: str) -> str:
        return self.style(text, "32")

    def bad(self, text: str) -> str:
        return self.style(text, "31")

    def note(self, text: str) -> str:
        return self.style(text, "36")

    # ------------------------------------------------------------------ output
    def _clear_block(self) -> None:
        if self.live and self._drawn:
            self._out(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def event(self, elapsed: float, text: str) -> None:
        """One line that stays (a stage change, a model decision, a release)."""
        self._clear_block()
        self._out(f"{self.dim(_clock(elapsed))} {text}\n")

    def status(self, lines: list[str], fraction: float | None, elapsed: float) -> None:
        """The status block: `lines[0]` is the stage, then the bar, then the rest."""
        self._tick += 1
        bar = progress_bar(fraction, tick=self._tick)
        if self.live:
            width = max(40, shutil.get_terminal_size((100, 20)).columns - 1)
            block = [f"{self.bold(lines[0])}", f"  {self.note(bar)}  {self.dim(_clock(elapsed))}",
                     *[f"  {line}" for line in lines[1:]]]
            self._clear_block()
            self._out("".join(_clip(line, width, self.color) + "\n" for line in block))
            self._drawn = len(block)
            return
        text = f"{lines[0]} {bar}"
        now = time.monotonic()
        if text != self._last_plain_text and now - self._last_plain >= PLAIN_STATUS_EVERY_S:
            self._out(f"{_clock(elapsed)}   ... {lines[0]}: {bar.strip()}; "
                      f"{'; '.join(lines[1:2])}\n")
            self._last_plain, self._last_plain_text = now, text

    def finish(self) -> None:
        self._clear_block()

    def write(self, text: str = "") -> None:
        self._clear_block()
        self._out(text + "\n")


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"[{seconds // 60:02d}:{seconds % 60:02d}]"


def _clip(line: str, width: int, color: bool) -> str:
    """Cut a line to the terminal width (escape codes do not count) so redraws stay aligned."""
    if color:
        visible = 0
        out: list[str] = []
        in_escape = False
        for ch in line:
            if ch == "\x1b":
                in_escape = True
            if in_escape:
                out.append(ch)
                if ch == "m":
                    in_escape = False
                continue
            if visible >= width:
                continue
            out.append(ch)
            visible += 1
        return "".join(out) + "\x1b[0m"
    return line[:width]
