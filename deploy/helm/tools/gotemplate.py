"""A subset of Go's text/template, faithful to Go for what it accepts: lexing and parsing
(execution is in goexec.py).

Implemented: text and actions with `{{-`/`-}}` trim markers, comments, `define`,
`template`, `if`/`else if`/`else`, `range` (lists and maps, with `$i, $v :=`, `else`),
`with`/`else`, variables (`$`, `:=`, `=` with Go's block scoping), pipelines, parenthesised
pipelines, field chains on maps and structs, and string/number/bool/nil constants.

Principle: for any template it accepts, the output equals Go's (with Helm's options:
missingkey=zero and "<no value>" removed by the caller). Where Go would print something
unusual (a map, `%!d(float64=1)`), or where this subset stops (`block`, `break`, char
constants), it raises TemplateError instead, so a chart that renders here renders the same
under real Helm. Functions live in gofuncs.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gofuncs import TemplateError


# ---------------------------------------------------------------------------------------
# Lexing
# ---------------------------------------------------------------------------------------

SPACE = " \t\r\n"
KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}


@dataclass
class Tok:
    """One token inside an action."""

    kind: str  # space ident keyword field var dot string number bool nil ( ) | , := =
    val: str
    line: int


@dataclass
class Action:
    """`{{ ... }}` with its tokens (comments produce no Action)."""

    toks: list
    line: int
    name: str


_NUM = re.compile(r"[+-]?(0[xX][0-9a-fA-F_]+|(\d[\d_]*(\.\d*)?|\.\d+)([eE][+-]?\d+)?)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _unquote(body: str, where: str) -> str:
    """Go interpreted string literal body (between quotes) to its value."""
    out, i = [], 0
    simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1] if i + 1 < len(body) else ""
        if e in simple:
            out.append(simple[e])
            i += 2
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            h = body[i + 2 : i + 2 + n]
            if len(h) != n or not all(ch in "0123456789abcdefABCDEF" for ch in h):
                raise TemplateError(f"{where}: malformed escape \\{e}{h}")
            out.append(chr(int(h, 16)))
            i += 2 + n
        else:
            raise TemplateError(f"{where}: unsupported escape \\{e} in string")
    return "".join(out)


def lex(src: str, name: str) -> list:
    """Splits `src` into text strings and Actions, applying trim markers."""
    items: list = []
    pos, line = 0, 1
    trim_next = False
    while True:
        i = src.find("{{", pos)
        text = src[pos:] if i < 0 else src[pos:i]
        if trim_next:
            stripped = text.lstrip(SPACE)
            line += text[: len(text) - len(stripped)].count("\n")
            text = stripped
        if i < 0:
            items.append(text)
            return items
        trim_left = src.startswith("{{-", i) and i + 3 < len(src) and src[i + 3] in SPACE
        if trim_left:
            text = text.rstrip(SPACE)
        items.append(text)
        line += src[pos:i].count("\n")
        p = i + (4 if trim_left else 2)
        if src.startswith("/*", p):
            end = src.find("*/", p + 2)
            if end < 0:
                raise TemplateError(f"{name}:{line}: unclosed comment")
            q = end + 2
            if src.startswith("}}", q):
                trim_next, pos = False, q + 2
            elif q + 1 < len(src) and src[q] in SPACE and src.startswith("-}}", q + 1):
                trim_next, pos = True, q + 4
            else:
                raise TemplateError(f"{name}:{line}: comment ends before closing delimiter")
            line += src[i:pos].count("\n")
            continue
        toks, pos, trim_next, nl = _lex_action(src, p, name, line)
        items.append(Action(toks, line, name))
        line += nl + src[i:p].count("\n")


def _lex_action(src: str, p: int, name: str, line: int):
    toks: list = []
    start = p
    while True:
        if p >= len(src):
            raise TemplateError(f"{name}:{line}: unclosed action")
        if src.startswith("}}", p):
            return toks, p + 2, False, src[start:p].count("\n")
        c = src[p]
        if c in SPACE:
            if src.startswith("-}}", p + 1):
                return toks, p + 4, True, src[start:p].count("\n")
            if not toks or toks[-1].kind != "space":
                toks.append(Tok("space", " ", line))
            p += 1
            continue
        if c == '"':
            j = p + 1
            while j < len(src) and src[j] != '"':
                if src[j] == "\n":
                    raise TemplateError(f"{name}:{line}: unterminated quoted string")
                j += 2 if src[j] == "\\" else 1
            if j >= len(src):
                raise TemplateError(f"{name}:{line}: unterminated quoted string")
            toks.append(Tok("string", _unquote(src[p + 1 : j], f"{name}:{line}"), line))
            p = j + 1
        elif c == "`":
            j = src.find("`", p + 1)
            if j < 0:
                raise TemplateError(f"{name}:{line}: unterminated raw quoted string")
            toks.append(Tok("string", src[p + 1 : j], line))
            p = j + 1
        elif c == "$":
            m = _IDENT.match(src, p + 1)
            v = "$" + (m.group(0) if m else "")
            toks.append(Tok("var", v, line))
            p += len(v)
            p = _lex_fields(src, p, toks, line)
        elif c == "." and p + 1 < len(src) and (src[p + 1].isalpha() or src[p + 1] == "_"):
            p = _lex_fields(src, p, toks, line)
        elif c == "." and not (p + 1 < len(src) and src[p + 1].isdigit()):
            toks.append(Tok("dot", ".", line))
            p += 1
        elif c.isdigit() or c == "." or (c in "+-" and p + 1 < len(src) and (src[p + 1].isdigit() or src[p + 1] == ".")):
            m = _NUM.match(src, p)
            if not m or (m.end() < len(src) and (src[m.end()].isalnum() or src[m.end()] == "_")):
                raise TemplateError(f"{name}:{line}: bad number syntax near {src[p:p + 10]!r}")
            toks.append(Tok("number", m.group(0), line))
            p = m.end()
        elif c.isalpha() or c == "_":
            m = _IDENT.match(src, p)
            w = m.group(0)
            kind = "keyword" if w in KEYWORDS else "bool" if w in ("true", "false") else "nil" if w == "nil" else "ident"
            toks.append(Tok(kind, w, line))
            p = m.end()
            if kind == "ident" and p < len(src) and src[p] == ".":
                raise TemplateError(f"{name}:{line}: field access on a function ({w}.…) is not supported")
        elif src.startswith(":=", p):
            toks.append(Tok(":=", ":=", line))
            p += 2
        elif c in "()|,=":
            toks.append(Tok(c, c, line))
            p += 1
            if c == ")":
                p = _lex_fields(src, p, toks, line)
        elif c == "'":
            raise TemplateError(f"{name}:{line}: character constants are outside the supported subset")
        else:
            raise TemplateError(f"{name}:{line}: unexpected {c!r} in action")
        if src[p - 1] == "\n":
            line += 1


def _lex_fields(src: str, p: int, toks: list, line: int) -> int:
    """Field tokens directly attached to the previous term (`.a.b`, `$x.a`, `(…).a`)."""
    while p < len(src) and src[p] == "." and p + 1 < len(src) and (src[p + 1].isalpha() or src[p + 1] == "_"):
        m = _IDENT.match(src, p + 1)
        toks.append(Tok("field", m.group(0), line))
        p = m.end()
    return p


# ---------------------------------------------------------------------------------------
# Parse tree
# ---------------------------------------------------------------------------------------


@dataclass
class Node:
    kind: str  # field var dot ident string number bool nil pipe chain
    val: object = None
    chain: list = field(default_factory=list)
    line: int = 0


@dataclass
class Command:
    args: list


@dataclass
class Pipe:
    decl: list
    assign: bool
    cmds: list
    line: int


@dataclass
class Control:
    kind: str  # action if range with template text
    pipe: Pipe | None = None
    body: list = field(default_factory=list)
    orelse: list | None = None
    name: str = ""
    text: str = ""
    where: str = ""


class Parser:
    """Parses one file's items into a body list plus `define`d templates."""

    def __init__(self, items: list, name: str, funcs: dict, defines: dict):
        self.items, self.i, self.name = items, 0, name
        self.funcs, self.defines = funcs, defines
        self.vars: list = ["$"]

    def where(self, line: int) -> str:
        return f"{self.name}:{line}"

    def parse_top(self) -> list:
        body, stop = self.parse_list(top=True)
        if stop is not None:
            raise TemplateError(f"{self.where(stop[1].line)}: unexpected {{{{{stop[0]}}}}}")
        return body

    def parse_list(self, top: bool = False):
        """Nodes until `end`/`else` (returned as (keyword, action, rest tokens)) or EOF."""
        out: list = []
        while self.i < len(self.items):
            it = self.items[self.i]
            self.i += 1
            if isinstance(it, str):
                if it:
                    out.append(Control("text", text=it))
                continue
            toks = [t for t in it.toks]
            while toks and toks[0].kind == "space":
                toks.pop(0)
            if not toks:
                raise TemplateError(f"{self.where(it.line)}: missing value for command")
            head = toks[0]
            if head.kind == "keyword":
                kw = head.val
                rest = toks[1:]
                if kw in ("end", "else"):
                    return out, (kw, it, rest)
                if kw == "define":
                    if not top:
                        raise TemplateError(f"{self.where(it.line)}: define must be at the top level")
                    self.parse_define(it, rest)
                    continue
                out.append(self.parse_keyword(kw, it, rest))
                continue
            pipe = self.parse_pipe(toks, it, allow_decl=True)
            out.append(Control("action", pipe=pipe, where=self.where(it.line)))
        if not top:
            raise TemplateError(f"{self.name}: unexpected EOF (missing {{{{end}}}})")
        return out, None

    def parse_define(self, it: Action, rest: list):
        rest = [t for t in rest if t.kind != "space"]
        if len(rest) != 1 or rest[0].kind != "string":
            raise TemplateError(f"{self.where(it.line)}: define needs one quoted template name")
        name = rest[0].val
        if name in self.defines:
            raise TemplateError(f"{self.where(it.line)}: template {name!r} defined twice (Helm keeps one silently)")
        saved = self.vars
        self.vars = ["$"]
        body, stop = self.parse_list()
        self.vars = saved
        if stop[0] != "end" or any(t.kind != "space" for t in stop[2]):
            raise TemplateError(f"{self.where(stop[1].line)}: unexpected {{{{{stop[0]}}}}} in define")
        self.defines[name] = (body, self.name)

    def parse_keyword(self, kw: str, it: Action, rest: list) -> Control:
        where = self.where(it.line)
        if kw in ("if", "range", "with"):
            mark = len(self.vars)
            pipe = self.parse_pipe(rest, it, allow_decl=True, is_range=kw == "range")
            body, stop = self.parse_list()
            node = Control(kw, pipe=pipe, body=body, where=where)
            if stop[0] == "else":
                tail = [t for t in stop[2] if t.kind != "space"]
                if tail and tail[0].kind == "keyword" and tail[0].val == "if" and kw == "if":
                    # `else if` is `else` + a nested `if` that shares this `end`.
                    node.orelse = [self.parse_keyword("if", stop[1], stop[2][stop[2].index(tail[0]) + 1 :])]
                    del self.vars[mark:]
                    return node
                if tail:
                    raise TemplateError(f"{self.where(stop[1].line)}: unsupported {{{{else {tail[0].val} …}}}}")
                node.orelse, stop = self.parse_list()
            if stop[0] != "end" or any(t.kind != "space" for t in stop[2]):
                raise TemplateError(f"{self.where(stop[1].line)}: expected {{{{end}}}} for {kw} at {where}")
            del self.vars[mark:]
            return node
        if kw == "template":
            toks = [t for t in rest if t.kind != "space"]
            if not toks or toks[0].kind != "string":
                raise TemplateError(f"{where}: template needs a quoted name")
            idx = rest.index(toks[0])
            pipe = self.parse_pipe(rest[idx + 1 :], it, allow_decl=False) if len(toks) > 1 else None
            return Control("template", pipe=pipe, name=toks[0].val, where=where)
        raise TemplateError(f"{where}: {{{{{kw}}}}} is outside the supported subset")

    def parse_pipe(self, toks: list, it: Action, allow_decl: bool, is_range: bool = False) -> Pipe:
        toks = list(toks)
        while toks and toks[-1].kind == "space":
            toks.pop()
        where = self.where(it.line)
        decl, assign = [], False
        nonspace = [t for t in toks if t.kind != "space"]
        if allow_decl and nonspace and nonspace[0].kind == "var":
            # `$x :=`, `$x =`, or (range only) `$i, $v :=`.
            k = toks.index(nonspace[0])
            following = [t for t in toks[k + 1 :] if t.kind != "space"]
            if following and following[0].kind in (":=", "="):
                decl, assign = [nonspace[0]], following[0].kind == "="
                toks = toks[toks.index(following[0]) + 1 :]
            elif following and following[0].kind == "," and is_range:
                # (Go also allows `range $i, $v = …`; this subset does not.)
                if len(following) < 3 or following[1].kind != "var" or following[2].kind not in (":=", "="):
                    raise TemplateError(f"{where}: bad range declaration")
                if following[2].kind == "=":
                    raise TemplateError(f"{where}: range with assignment is outside the supported subset")
                decl = [nonspace[0], following[1]]
                toks = toks[toks.index(following[2]) + 1 :]
            if assign and is_range:
                raise TemplateError(f"{where}: range with assignment is outside the supported subset")
            for d in decl:
                if d.val == "$":
                    raise TemplateError(f"{where}: cannot declare $")
                if assign:
                    if d.val not in self.vars:
                        raise TemplateError(f"{where}: undefined variable {d.val}")
                else:
                    self.vars.append(d.val)
        cmds = self.parse_cmds(toks, where)
        if not cmds:
            raise TemplateError(f"{where}: missing value for command")
        return Pipe([d.val for d in decl], assign, cmds, it.line)

    def parse_cmds(self, toks: list, where: str) -> list:
        cmds, cur, depth, buf = [], [], 0, []
        # Split on top-level `|`, keeping parenthesised groups whole.
        for t in toks:
            if t.kind == "(":
                depth += 1
            elif t.kind == ")":
                depth -= 1
                if depth < 0:
                    raise TemplateError(f"{where}: unexpected right paren")
            if t.kind == "|" and depth == 0:
                buf.append(cur)
                cur = []
            else:
                cur.append(t)
        if depth:
            raise TemplateError(f"{where}: unclosed left paren")
        buf.append(cur)
        for part in buf:
            args = self.parse_operands(part, where)
            if not args:
                raise TemplateError(f"{where}: missing command in pipeline")
            if args[0].kind == "nil":
                raise TemplateError(f"{where}: nil is not a command")
            cmds.append(Command(args))
        return cmds

    def parse_operands(self, toks: list, where: str) -> list:
        args, i = [], 0
        while i < len(toks):
            t = toks[i]
            if t.kind == "space":
                i += 1
                continue
            if args and toks[i - 1].kind != "space" and t.kind != "field":
                raise TemplateError(f"{where}: unexpected {t.val!r} in operand")
            node, i = self.parse_term(toks, i, where)
            args.append(node)
        return args

    def parse_term(self, toks: list, i: int, where: str):
        t = toks[i]
        if t.kind == "(":
            depth, j = 0, i
            while True:
                if toks[j].kind == "(":
                    depth += 1
                elif toks[j].kind == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            inner = self.parse_cmds(toks[i + 1 : j], where)
            node = Node("pipe", Pipe([], False, inner, t.line), line=t.line)
            i = j + 1
        elif t.kind == "ident":
            if t.val not in self.funcs:
                raise TemplateError(f'{where}: function "{t.val}" not defined')
            node, i = Node("ident", t.val, line=t.line), i + 1
        elif t.kind == "var":
            if t.val not in self.vars:
                raise TemplateError(f"{where}: undefined variable {t.val!r}")
            node, i = Node("var", t.val, line=t.line), i + 1
        elif t.kind == "field":
            # A leading field chain (`.a.b`) is relative to dot.
            node = Node("field", None, line=t.line)
            while i < len(toks) and toks[i].kind == "field":
                node.chain.append(toks[i].val)
                i += 1
            return node, i
        elif t.kind in ("dot", "string", "number", "bool", "nil"):
            node, i = Node(t.kind, t.val, line=t.line), i + 1
        else:
            raise TemplateError(f"{where}: unexpected {t.val!r} in operand")
        while i < len(toks) and toks[i].kind == "field":
            if node.kind in ("string", "number", "bool", "nil", "dot", "ident"):
                raise TemplateError(f"{where}: unexpected . after term {node.val!r}")
            node.chain.append(toks[i].val)
            i += 1
        return node, i
