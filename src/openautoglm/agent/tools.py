"""Agent tools as plugins: a name, a JSON schema of parameters, and a call.

Register your own with the decorator::

    from openautoglm.agent import tool

    @tool("word_count", "Count the words of a text.", {"type": "object", "properties": {
        "text": {"type": "string"}}, "required": ["text"]})
    def word_count(text: str) -> str:
        return str(len(text.split()))

or from a package, with an entry point in the group ``openautoglm.agent_tools`` naming a :class:`Tool` (or a
function decorated as above). The built-in tools: ``python`` (the sandbox), ``sql`` (SQLite, read-only unless
opted in, statement timeout, row cap) and ``search`` (BM25 over a directory of text and markdown files).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InvalidParameterError


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    call: Callable[..., str]

    def spec(self) -> dict:
        """The OpenAI ``tools`` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


REGISTRY: dict[str, Tool] = {}


def tool(name: str, description: str, parameters: dict):
    """Decorator: register ``fn(**arguments) -> str`` as a tool."""
    def wrap(fn):
        REGISTRY[name] = Tool(name, description, parameters, fn)
        return fn
    return wrap


def load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="openautoglm.agent_tools"):
        obj = ep.load()
        if isinstance(obj, Tool):
            REGISTRY[obj.name] = obj


# ---- python --------------------------------------------------------------------------------------------
def python_tool(timeout_s: float = 10.0, memory_mb: int = 512, unsafe: bool = False, files=()) -> Tool:
    from .sandbox import PythonSandbox

    sb = PythonSandbox(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb, unsafe=unsafe,
                       files=files)
    have = "".join(f" The file {Path(f).name!r} is in the working directory." for f in files)
    return Tool("python", "Run Python 3 code in a sandbox (standard library only, no network, no files outside "
                "its own temporary directory) and return what it prints; the value of a last bare expression "
                "is printed too." + have,
                {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"],
                 "additionalProperties": False},
                lambda code: sb.run(code).observation())


# ---- sql -----------------------------------------------------------------------------------------------
_SAFE_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "foreign_key_list"}


def _authorize(action, arg1, arg2, db_name, trigger):
    """No ATTACH / DETACH (one database, and no new files); PRAGMAs only to read the schema."""
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() not in _SAFE_PRAGMAS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class SQLTool:
    """SQLite: read-only (opened ``mode=ro`` and ``PRAGMA query_only``) unless ``writable``; no ATTACH and no
    PRAGMA but the schema readers (an authorizer); each statement is interrupted after ``timeout_s``; at most
    ``max_rows`` rows come back."""

    def __init__(self, path: str | Path, writable: bool = False, timeout_s: float = 5.0, max_rows: int = 50):
        path = Path(path)
        if not path.is_file():
            raise InvalidParameterError(f"no SQLite database at {path}")
        self.path, self.writable, self.timeout_s, self.max_rows = path, writable, timeout_s, max_rows
        uri = f"file:{path.resolve()}?mode={'rw' if writable else 'ro'}"
        self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        if not writable:
            self.db.execute("PRAGMA query_only = ON")
        self.db.set_authorizer(_authorize)

    def schema(self) -> str:
        rows = self.db.execute("SELECT sql FROM sqlite_master WHERE type='table' AND sql IS NOT NULL").fetchall()
        return "\n".join(r[0] for r in rows)

    def __call__(self, query: str) -> str:
        deadline = time.monotonic() + self.timeout_s
        self.db.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
        try:
            cur = self.db.execute(query)
            rows = cur.fetchmany(self.max_rows + 1)
            if not self.writable:
                self.db.rollback()
            else:
                self.db.commit()
        except sqlite3.OperationalError as e:
            if "interrupted" in str(e):
                return f"[error: the query ran past the {self.timeout_s:g} s limit]"
            if str(e).startswith(("no such column", "no such table")):  # the model guessed: show what there is
                return f"[error: {e}]\nThe tables are:\n{self.schema()}"
            return f"[error: {e}]"
        except sqlite3.Error as e:
            return f"[error: {e}]"
        finally:
            self.db.set_progress_handler(None, 0)
        cols = [d[0] for d in cur.description or []]
        more = len(rows) > self.max_rows
        out = {"columns": cols, "rows": [list(r) for r in rows[: self.max_rows]]}
        if more:
            out["truncated"] = f"only the first {self.max_rows} rows"
        return json.dumps(out, default=str)

    def tool(self) -> Tool:
        return Tool("sql", "Run one SQLite query on the database and return its rows as JSON. Tables:\n"
                    + self.schema(),
                    {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"],
                     "additionalProperties": False}, self)


# ---- search --------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")


def _terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class SearchTool:
    """BM25 (Okapi; k1 = 1.5, b = 0.75) over passages of the ``.txt`` / ``.md`` files under a directory:
    files are cut into passages of blank-line-separated paragraphs (up to ``passage_words`` words each)."""

    def __init__(self, root: str | Path, top_k: int = 3, passage_words: int = 120, k1: float = 1.5,
                 b: float = 0.75):
        root = Path(root)
        if not root.is_dir():
            raise InvalidParameterError(f"no directory of documents at {root}")
        self.top_k, self.k1, self.b = top_k, k1, b
        self.passages: list[tuple[str, str]] = []
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".md") and p.is_file()):
            buf: list[str] = []
            for para in re.split(r"\n\s*\n", f.read_text(errors="replace")):
                buf.append(para.strip())
                if sum(len(x.split()) for x in buf) >= passage_words:
                    self.passages.append((str(f.relative_to(root)), "\n\n".join(buf)))
                    buf = []
            if buf and any(buf):
                self.passages.append((str(f.relative_to(root)), "\n\n".join(buf)))
        self.tf = [Counter(_terms(t)) for _, t in self.passages]
        self.len = [sum(c.values()) for c in self.tf]
        self.avg = sum(self.len) / max(1, len(self.len))
        df = Counter(w for c in self.tf for w in c)
        n = len(self.passages)
        self.idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    def scores(self, query: str) -> list[float]:
        q = _terms(query)
        out = []
        for c, L in zip(self.tf, self.len):
            s = 0.0
            for w in q:
                f = c.get(w, 0)
                if f:
                    s += self.idf[w] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * L / self.avg))
            out.append(s)
        return out

    def __call__(self, query: str) -> str:
        sc = self.scores(query)
        best = sorted((i for i in range(len(sc)) if sc[i] > 0), key=lambda i: -sc[i])[: self.top_k]
        if not best:
            return "[no passage matches]"
        return json.dumps([{"file": self.passages[i][0], "score": round(sc[i], 3), "text": self.passages[i][1]}
                           for i in best])

    def tool(self) -> Tool:
        return Tool("search", "Search the documents (BM25 keyword search); returns the best passages with their "
                    "file names.", {"type": "object", "properties": {"query": {"type": "string"}},
                                    "required": ["query"], "additionalProperties": False}, self)
