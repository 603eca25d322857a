"""Execution of templates parsed by gotemplate.py (Go's text/template `exec`), with Go's
variable scoping, missingkey=zero map access, typed function arguments and the
short-circuit `and`/`or` of Go 1.18+."""

from __future__ import annotations

from gofuncs import MISSING, GoStruct, TemplateError, go_print_value, truth
from gotemplate import Command, Control, Node, Parser, Pipe, lex


# ---------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------


class Template:
    """A set of parsed files sharing one namespace of `define`d templates."""

    def __init__(self, funcs: dict):
        self.funcs = funcs
        self.defines: dict = {}
        self.files: dict = {}
        funcs.setdefault("include", None)  # bound per execution below

    def add(self, name: str, src: str):
        self.files[name] = Parser(lex(src, name), name, self.funcs, self.defines).parse_top()

    def execute_file(self, name: str, data) -> str:
        return Exec(self, data).run(self.files[name])

    def execute_named(self, name: str, data, depth: int = 0) -> str:
        if name not in self.defines:
            raise TemplateError(f"no template {name!r} associated with template")
        if depth > 100:
            raise TemplateError(f"exceeded maximum template depth calling {name!r}")
        return Exec(self, data, depth).run(self.defines[name][0])


class Exec:
    """One execution (Go's `state`): a variable stack and an output buffer."""

    def __init__(self, tmpl: Template, data, depth: int = 0):
        self.t, self.depth = tmpl, depth
        self.vars = [["$", data]]
        self.out: list = []

    def run(self, body: list) -> str:
        self.walk(self.vars[0][1], body)
        return "".join(self.out)

    def walk(self, dot, body: list):
        for n in body:
            k = n.kind
            if k == "text":
                self.out.append(n.text)
            elif k == "action":
                v = self.eval_pipe(dot, n.pipe, n.where)
                if not n.pipe.decl:
                    self.out.append(go_print_value(v, n.where))
            elif k in ("if", "with"):
                mark = len(self.vars)
                v = self.eval_pipe(dot, n.pipe, n.where)
                if truth(v):
                    self.walk(v if k == "with" else dot, n.body)
                elif n.orelse is not None:
                    self.walk(dot, n.orelse)
                del self.vars[mark:]
            elif k == "range":
                self.walk_range(dot, n)
            elif k == "template":
                d = self.eval_pipe(dot, n.pipe, n.where) if n.pipe else None
                self.out.append(self.t.execute_named(n.name, d, self.depth + 1))
            else:  # pragma: no cover - parser produces only the kinds above
                raise TemplateError(f"internal: node {k}")

    def walk_range(self, dot, n: Control):
        mark = len(self.vars)
        v = self.eval_pipe(dot, n.pipe, n.where)
        if v is None:
            pairs = []
        elif isinstance(v, list):
            pairs = list(enumerate(v))
        elif isinstance(v, dict) and not isinstance(v, GoStruct):
            pairs = [(key, v[key]) for key in sorted(v)]
        else:
            raise TemplateError(f"{n.where}: range can't iterate over {go_type(v)}")
        for idx, elem in pairs:
            if n.pipe.decl:
                self.vars[-1][1] = elem
            if len(n.pipe.decl) > 1:
                self.vars[-2][1] = idx
            inner = len(self.vars)
            self.walk(elem, n.body)
            del self.vars[inner:]
        if not pairs and n.orelse is not None:
            self.walk(dot, n.orelse)
        del self.vars[mark:]

    def lookup(self, name: str, where: str):
        for k, v in reversed(self.vars):
            if k == name:
                return v
        raise TemplateError(f"{where}: undefined variable: {name}")

    def eval_pipe(self, dot, pipe: Pipe, where: str):
        value = MISSING
        for cmd in pipe.cmds:
            value = self.eval_cmd(dot, cmd, value, where)
        for name in pipe.decl:
            if pipe.assign:
                for slot in reversed(self.vars):
                    if slot[0] == name:
                        slot[1] = value
                        break
            else:
                self.vars.append([name, value])
        return value

    def eval_cmd(self, dot, cmd: Command, final, where: str):
        first = cmd.args[0]
        if first.kind == "ident":
            return self.call(dot, first.val, cmd.args[1:], final, where)
        if first.kind == "field":
            return self.eval_chain(dot, dot, first.chain, cmd.args[1:], final, where)
        if first.kind in ("var", "pipe") and first.chain:
            return self.eval_chain(dot, self.eval_node(dot, Node(first.kind, first.val), where), first.chain,
                                   cmd.args[1:], final, where)
        if len(cmd.args) > 1 or final is not MISSING:
            raise TemplateError(f"{where}: can't give argument to non-function {describe(first)}")
        return self.eval_node(dot, first, where)

    def eval_node(self, dot, n: Node, where: str):
        """An operand's value; numbers become Go's ideal constants for interface{} uses."""
        k = n.kind
        if k == "dot":
            return dot
        if k == "string":
            return n.val
        if k == "bool":
            return n.val == "true"
        if k == "nil":
            raise TemplateError(f"{where}: nil is not a command")
        if k == "number":
            return number_value(n.val, where)
        if k == "var":
            base = self.lookup(n.val, where)
            return self.eval_chain(dot, base, n.chain, [], MISSING, where) if n.chain else base
        if k == "field":
            return self.eval_chain(dot, dot, n.chain, [], MISSING, where)
        if k == "pipe":
            base = self.eval_pipe(dot, n.val, where)
            return self.eval_chain(dot, base, n.chain, [], MISSING, where) if n.chain else base
        if k == "ident":
            return self.call(dot, n.val, [], MISSING, where)
        raise TemplateError(f"{where}: internal: operand {k}")

    def eval_chain(self, dot, recv, chain: list, args: list, final, where: str):
        for i, name in enumerate(chain):
            last = i == len(chain) - 1
            has_args = last and (args or final is not MISSING)
            if recv is None:
                raise TemplateError(f"{where}: nil pointer evaluating interface {{}}.{name}")
            if isinstance(recv, GoStruct):
                if name not in recv:
                    raise TemplateError(f"{where}: can't evaluate field {name} in type {recv.go_name}")
                v = recv[name]
                if callable(v):
                    vals = [self.eval_node(dot, a, where) for a in (args if last else [])]
                    if last and final is not MISSING:
                        vals.append(final)
                    recv = v(*vals)
                    continue
                if has_args:
                    raise TemplateError(f"{where}: {name} has arguments but cannot be invoked as function")
                recv = v
            elif isinstance(recv, dict):
                if has_args:
                    raise TemplateError(f"{where}: {name} is not a method but has arguments")
                recv = recv.get(name)  # missingkey=zero: a nil interface
            else:
                raise TemplateError(f"{where}: can't evaluate field {name} in type {go_type(recv)}")
        return recv

    def call(self, dot, name: str, arg_nodes: list, final, where: str):
        fn = self.t.funcs[name]
        if name in ("and", "or"):
            # Go 1.18+: short-circuit, returning the deciding argument itself.
            nodes = list(arg_nodes)
            if not nodes and final is MISSING:
                raise TemplateError(f"{where}: wrong number of args for {name}: want at least 1 got 0")
            v = None
            for j in range(len(nodes) + (final is not MISSING)):
                v = final if j == len(nodes) else self.eval_node(dot, nodes[j], where)
                if truth(v) == (name == "or"):
                    return v
            return v
        if name == "include":
            fn = lambda tname, data: self.t.execute_named(tname, data, self.depth + 1)  # noqa: E731
            spec = ("string", "any")
        else:
            fn, spec = fn
        vals = []
        nargs = len(arg_nodes) + (final is not MISSING)
        variadic = spec and spec[-1].endswith("...")
        fixed = spec[:-1] if variadic else spec
        if (not variadic and nargs != len(fixed)) or (variadic and nargs < len(fixed)):
            want = f"at least {len(fixed)}" if variadic else str(len(fixed))
            raise TemplateError(f"{where}: wrong number of args for {name}: want {want} got {nargs}")
        for j in range(nargs):
            typ = fixed[j] if j < len(fixed) else spec[-1][:-3]
            if j < len(arg_nodes):
                vals.append(self.typed_arg(dot, arg_nodes[j], typ, name, where))
            else:
                vals.append(check_type(final, typ, name, where))
        try:
            return fn(*vals)
        except TemplateError as e:
            raise TemplateError(f"{where}: error calling {name}: {e}") from None

    def typed_arg(self, dot, n: Node, typ: str, fname: str, where: str):
        # Constants convert to the parameter type the way Go's evalArg does.
        if n.kind == "number" and not n.chain:
            if typ == "int":
                return int_constant(n.val, where)
            if typ == "any":
                return number_value(n.val, where)
            raise TemplateError(f"{where}: expected {typ}; found {n.val}")
        if n.kind == "string" and typ not in ("string", "any"):
            raise TemplateError(f"{where}: expected {typ}; found {n.val!r}")
        if n.kind == "bool" and typ not in ("bool", "any"):
            raise TemplateError(f"{where}: expected {typ}; found {n.val}")
        if n.kind == "nil":
            if typ in ("any", "map", "list"):
                return None
            raise TemplateError(f"{where}: cannot assign nil to {typ}")
        return check_type(self.eval_node(dot, n, where), typ, fname, where)


def describe(n: Node) -> str:
    return str(n.val) if n.val is not None else "." + ".".join(n.chain)


def go_type(v) -> str:
    from gofuncs import go_type_name

    return go_type_name(v)


def number_value(text: str, where: str):
    """Go's ideal number constant used as interface{}: int unless written as a float."""
    t = text.replace("_", "")
    if t.lower().startswith(("0x", "-0x", "+0x")):
        return int(t, 16)
    if any(c in t for c in ".eE"):
        return float(t)
    if len(t.lstrip("+-")) > 1 and t.lstrip("+-").startswith("0"):
        return int(t.lstrip("+-"), 8) * (-1 if t.startswith("-") else 1)
    return int(t)


def int_constant(text: str, where: str) -> int:
    v = number_value(text, where)
    if isinstance(v, float):
        if v != int(v):
            raise TemplateError(f"{where}: expected integer; found {text}")
        return int(v)
    return v


def check_type(v, typ: str, fname: str, where: str):
    """Go's validateType for a function parameter (interface{} takes anything)."""
    from gofuncs import GoInt64

    if typ == "any":
        return v
    if v is None:
        raise TemplateError(f"{where}: error calling {fname}: invalid value; expected {go_param(typ)}")
    ok = {
        "string": isinstance(v, str),
        "int": isinstance(v, int) and not isinstance(v, (bool, GoInt64)),
        "bool": isinstance(v, bool),
        "map": isinstance(v, dict) and not isinstance(v, GoStruct),
        "list": isinstance(v, list),
    }[typ]
    if not ok:
        raise TemplateError(f"{where}: wrong type for value; expected {go_param(typ)}; got {go_type(v)}")
    return v


def go_param(typ: str) -> str:
    return {"map": "map[string]interface {}", "list": "[]interface {}"}.get(typ, typ)
