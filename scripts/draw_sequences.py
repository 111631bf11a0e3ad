"""Draw the sequence diagrams of docs/transports.md as SVG files.

    python scripts/draw_sequences.py      # rewrites docs/img/seq-*.svg

Plain SVG, no JavaScript and nothing fetched: the site shows them offline
and at their drawn size in the page's 688 px text column at 1,280 px.
Each step is a row of its own, top to bottom in causal order; a box sits on
the lifeline of the process that does it, an arrow is a frame on the socket.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

WIDTH = 680
SENDER_X, SENDER_W = 150, 280
RECEIVER_X, RECEIVER_W = 500, 340
LINE = 16
PAD = 8
GAP = 10
MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace"
SANS = "-apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Arial, sans-serif"

# A row: ("S" | "R", lines) is a box on one lifeline; ("S>R" | "R>S", label)
# an arrow; ("both", lines_s, lines_r) a box on each; ("note", text) a line
# across the diagram.  In a box, a line starting with "~ " is a comment.

PIDFD: list[tuple[object, ...]] = [
    (
        "S",
        [
            'send(b"x", fds=[w])',
            "d = dup(w)",
            "~ kept until acknowledged",
            "~ first time: lease L, a sealed memfd",
            "~ holding a random token T",
        ],
    ),
    ("S>R", "frame: pid, L, seq=1, T, sock, [d]"),
    (
        "R",
        [
            "recv()",
            "~ first time: prove pid holds the other end",
            "pidfd = SO_PEERPIDFD",
            "~ (AF_UNIX, pid = SO_PEERCRED's)",
            "~ else: pidfd_open(pid), then",
            "~ pidfd_getfd(pidfd, sock) must be the",
            "~ other end of this connection",
            "~ no: raise UnverifiedSender",
        ],
    ),
    ("R", ["lease = pidfd_getfd(pidfd, L)", "~ token == T ?"]),
    ("R", ["fd = pidfd_getfd(pidfd, d)", "~ close-on-exec"]),
    (
        "R",
        [
            "~ is L still the lease?",
            "kcmp(pid, self, KCMP_FILE, L, lease)",
            "~ no:  close fd, raise FdsWithdrawn",
            "~ yes: return Message(fds=[fd])",
        ],
    ),
    ("R>S", "control frame: ack seq=1"),
    ("S", ["~ at the next send/recv/close:", "close(d)"]),
    ("note", "close(): close(L) first, then every unacknowledged d, then the socket"),
]

WINDUP: list[tuple[object, ...]] = [
    ("both", ["Channel(...)"], ["Channel(...)"]),
    ("S>R", "hello(pid_s)"),
    ("R>S", "hello(pid_r)"),
    (
        "S",
        [
            'send(b"x", fds=[f, sock])',
            "h = _get_osfhandle(f)",
            "~ refuse 0, -1, pseudo-handles",
            "d = DuplicateHandle(self, h, self)",
            "~ kept until acknowledged",
            "blob = sock.share(pid_r)",
            "~ a dup of sock kept until acknowledged",
            "~ first time: section L holding token T",
        ],
    ),
    ("S>R", "frame: pid_s, L, seq, T, [(1, d), (2, 0)], blob"),
    (
        "R",
        [
            "recv()",
            "~ first time:",
            "P = OpenProcess(PROCESS_DUP_HANDLE, pid_s)",
            "lease = DuplicateHandle(P, L, self)",
            "~ token == T ?",
        ],
    ),
    ("R", ["h2 = DuplicateHandle(P, d, self)", "fd = _open_osfhandle(h2)", "s = socket.fromshare(blob)"]),
    (
        "R",
        [
            "~ is L still the lease?",
            "CompareObjectHandles(",
            "    DuplicateHandle(P, L, self), lease)",
            "~ no: close everything pulled,",
            "~     raise FdsWithdrawn",
        ],
    ),
    ("R>S", "control frame: ack seq"),
    ("S", ["~ at the next send/recv/close:", "CloseHandle(d)", "~ and close the dup of sock"]),
]


def _box(out: list[str], cx: int, width: int, y: int, lines: list[str]) -> int:
    height = len(lines) * LINE + 2 * PAD
    x = cx - width // 2
    out.append(f'<rect x="{x}" y="{y}" width="{width}" height="{height}" rx="4" class="box"/>')
    for i, line in enumerate(lines):
        ty = y + PAD + (i + 1) * LINE - 4
        if line.startswith("~ "):
            out.append(f'<text x="{x + 8}" y="{ty}" class="note">{escape(line[2:])}</text>')
        else:
            out.append(f'<text x="{x + 8}" y="{ty}" class="code">{escape(line)}</text>')
    return height


def draw(title: str, rows: list[tuple[object, ...]]) -> str:
    body: list[str] = []
    y = 52
    for row in rows:
        kind = row[0]
        if kind in ("S", "R"):
            lines = row[1]
            assert isinstance(lines, list)
            cx, w = (SENDER_X, SENDER_W) if kind == "S" else (RECEIVER_X, RECEIVER_W)
            y += _box(body, cx, w, y, lines) + GAP
        elif kind == "both":
            left, right = row[1], row[2]
            assert isinstance(left, list)
            assert isinstance(right, list)
            h = max(_box(body, SENDER_X, SENDER_W, y, left), _box(body, RECEIVER_X, RECEIVER_W, y, right))
            y += h + GAP
        elif kind in ("S>R", "R>S"):
            label = row[1]
            assert isinstance(label, str)
            x1, x2 = (SENDER_X, RECEIVER_X) if kind == "S>R" else (RECEIVER_X, SENDER_X)
            body.append(
                f'<text x="{(SENDER_X + RECEIVER_X) // 2}" y="{y + 14}" class="label">{escape(label)}</text>'
            )
            arrow = f'x1="{x1}" y1="{y + 22}" x2="{x2}" y2="{y + 22}"'
            body.append(f'<line {arrow} class="msg" marker-end="url(#arrow)"/>')
            y += 30 + GAP
        elif kind == "note":
            text = row[1]
            assert isinstance(text, str)
            body.append(f'<text x="{WIDTH // 2}" y="{y + 14}" class="label">{escape(text)}</text>')
            y += 22 + GAP
    height = y + 6
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-labelledby="title">',
        f'<title id="title">{escape(title)}</title>',
        "<style>",
        f"  .code {{ font: 12px {MONO}; fill: #1a1a1a; white-space: pre; }}",
        f"  .note {{ font: italic 12px {SANS}; fill: #555; }}",
        f"  .label {{ font: 12px {MONO}; fill: #1a1a1a; text-anchor: middle; }}",
        f"  .head {{ font: bold 13px {SANS}; fill: #1a1a1a; text-anchor: middle; }}",
        "  .box { fill: #f3f5fc; stroke: #7986cb; }",
        "  .life { stroke: #9e9e9e; stroke-dasharray: 4 4; }",
        "  .msg { stroke: #3949ab; stroke-width: 1.5; }",
        "</style>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#3949ab"/></marker></defs>',
        f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>',
        f'<line x1="{SENDER_X}" y1="38" x2="{SENDER_X}" y2="{height}" class="life"/>',
        f'<line x1="{RECEIVER_X}" y1="38" x2="{RECEIVER_X}" y2="{height}" class="life"/>',
        f'<rect x="{SENDER_X - 70}" y="8" width="140" height="28" rx="4" class="box"/>',
        f'<text x="{SENDER_X}" y="27" class="head">sender process</text>',
        f'<rect x="{RECEIVER_X - 70}" y="8" width="140" height="28" rx="4" class="box"/>',
        f'<text x="{RECEIVER_X}" y="27" class="head">receiver process</text>',
    ]
    return "\n".join([*head, *body, "</svg>", ""])


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "docs" / "img"
    out.mkdir(exist_ok=True)
    (out / "seq-pidfdgetfd.svg").write_text(draw("Sequence: PidfdGetfd", PIDFD), encoding="utf-8")
    (out / "seq-winduplicate.svg").write_text(draw("Sequence: WinDuplicate", WINDUP), encoding="utf-8")


if __name__ == "__main__":
    main()
