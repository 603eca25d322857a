"""Go value model and the function map (text/template builtins, the Sprig and Helm
functions the chart uses) for gotemplate.py.

Go values are modelled as: str (string), bool, int (Go int), GoInt64 (Sprig's int64
results), float (float64: Helm reads every number in values files as float64), list
([]interface{}), dict (map[string]interface{}), GoStruct (Helm's .Release/.Chart/…
structs), None (a nil interface). Where Go would print a value in an unusual way, these
functions raise TemplateError rather than guess.
"""

from __future__ import annotations

import math
from decimal import Decimal

import yaml


class TemplateError(Exception):
    """A parse or execution error (Helm would fail the same template)."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()  # "no final (piped) argument", distinct from nil


class GoInt64(int):
    """An int64 (Sprig's add/sub return these; Go will not pass one to an `int` parameter)."""


class GoStruct(dict):
    """A Go struct: a missing field is an error, unlike a map key."""

    def __init__(self, go_name: str, fields: dict):
        super().__init__(fields)
        self.go_name = go_name


def go_type_name(v) -> str:
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, GoInt64):
        return "int64"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "[]interface {}"
    if isinstance(v, GoStruct):
        return v.go_name
    if isinstance(v, dict):
        return "map[string]interface {}"
    return type(v).__name__


def truth(v) -> bool:
    """Go template truth: false, 0, nil and empty string/list/map are false."""
    if v is None or v is MISSING:
        return False
    if isinstance(v, GoStruct):
        return True
    if isinstance(v, (bool, int, float, str, list, dict)):
        return bool(v)
    return True


def go_float(f: float) -> str:
    """fmt's %v for a float64 (strconv 'g' with the shortest digits, exponent from 1e+06)."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    sign, digits, exp = Decimal(repr(f)).normalize().as_tuple()
    ds = "".join(map(str, digits))
    nd = len(ds)
    dp = nd + exp  # position of the decimal point relative to the digits
    neg = "-" if sign else ""
    x = dp - 1
    if x < -4 or x >= 6:
        mant = ds[0] + ("." + ds[1:] if nd > 1 else "")
        return f"{neg}{mant}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if dp <= 0:
        return f"{neg}0.{'0' * -dp}{ds}"
    if dp >= nd:
        return f"{neg}{ds}{'0' * (dp - nd)}"
    return f"{neg}{ds[:dp]}.{ds[dp:]}"


def fmt_v(v, where: str = "") -> str:
    """fmt's %v for scalars; composite values are outside the subset."""
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(int(v))
    if isinstance(v, float):
        return go_float(v)
    if isinstance(v, str):
        return v
    raise TemplateError(f"{where}: printing a {go_type_name(v)} is outside the supported subset (use toYaml)")


def go_print_value(v, where: str) -> str:
    """What an action prints; nil is "<no value>", which Helm then deletes."""
    if v is None:
        return "<no value>"
    return fmt_v(v, where)


def go_quote(s: str) -> str:
    """strconv.Quote."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}[ch])
        elif ch.isprintable():
            out.append(ch)
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


def strval(v) -> str:
    """Sprig's strval: strings as they are, everything else through %v."""
    return v if isinstance(v, str) else fmt_v(v)


def to_int64(v) -> int:
    """spf13/cast ToInt64 as Sprig uses it (errors become 0)."""
    if v is None:
        return 0
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return int(v)  # truncation toward zero, like Go's conversion
    if isinstance(v, str):
        s = v.strip()
        if "." in s and s.rstrip("0").endswith("."):
            s = s.split(".")[0]  # cast trims a zero decimal part ("8.00" -> "8")
        try:
            return int(s, 0)
        except ValueError:
            return 0
    return 0


def _kind(v, where: str) -> str:
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    raise TemplateError(f"{where}invalid type for comparison")


def go_eq(a, *bs) -> bool:
    if not bs:
        raise TemplateError("missing argument for comparison")
    ka = _kind(a, "")
    for b in bs:
        kb = _kind(b, "")
        if ka == "nil" and kb == "nil":
            raise TemplateError("comparing nil with nil is outside the supported subset")
        if ka != kb:
            if ka != "nil" and kb != "nil":
                raise TemplateError("incompatible types for comparison")
            continue
        if a == b:
            return True
    return False


def _ordered(a, b):
    ka, kb = _kind(a, ""), _kind(b, "")
    if ka in ("nil", "bool") or kb in ("nil", "bool"):
        raise TemplateError("invalid type for comparison")
    if ka != kb:
        raise TemplateError("incompatible types for comparison")
    return a, b


def go_len(v) -> int:
    if v is None:
        raise TemplateError("len of nil pointer")
    if isinstance(v, str):
        return len(v.encode())
    if isinstance(v, (list, dict)) and not isinstance(v, GoStruct):
        return len(v)
    raise TemplateError(f"len of type {go_type_name(v)}")


def go_index(item, *keys):
    for k in keys:
        if item is None:
            raise TemplateError("index of untyped nil")
        if isinstance(item, dict) and not isinstance(item, GoStruct):
            if not isinstance(k, str):
                raise TemplateError(f"value has type {go_type_name(k)}; should be string")
            item = item.get(k)
        elif isinstance(item, list):
            if not isinstance(k, int) or isinstance(k, bool):
                raise TemplateError(f"cannot index slice/array with type {go_type_name(k)}")
            if not 0 <= k < len(item):
                raise TemplateError(f"index out of range: {k}")
            item = item[k]
        else:
            raise TemplateError(f"can't index item of type {go_type_name(item)}")
    return item


def go_sprint(*args) -> str:
    out = []
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(fmt_v(a))
    return "".join(out)


def go_sprintf(fmt: str, *args) -> str:
    """fmt.Sprintf for %s %d %v %q %% without flags; anything Go would mangle raises."""
    out, i, n = [], 0, 0
    while i < len(fmt):
        c = fmt[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        verb = fmt[i + 1] if i + 1 < len(fmt) else ""
        i += 2
        if verb == "%":
            out.append("%")
            continue
        if verb not in "sdvq" or not verb:
            raise TemplateError(f"printf verb %{verb} is outside the supported subset")
        if n >= len(args):
            raise TemplateError(f"printf %{verb}: missing argument")
        a = args[n]
        n += 1
        if verb == "s" and isinstance(a, str):
            out.append(a)
        elif verb == "d" and isinstance(a, int) and not isinstance(a, bool):
            out.append(str(int(a)))
        elif verb == "v":
            out.append(fmt_v(a))
        elif verb == "q" and isinstance(a, str):
            out.append(go_quote(a))
        else:
            raise TemplateError(f"printf %{verb} of a {go_type_name(a)} (Go prints %!{verb}(…))")
    if n != len(args):
        raise TemplateError("printf: extra arguments (Go prints %!(EXTRA …))")
    return "".join(out)


def _to_jsonable(v):
    """The value json.Marshal would see; float64 that are whole numbers print as integers."""
    if isinstance(v, GoStruct):
        raise TemplateError("toYaml of a Helm built-in object is outside the supported subset")
    if isinstance(v, dict):
        return {str(k): _to_jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
        return int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return int(v)
    return v


def to_yaml(v) -> str:
    """Helm's toYaml: sigs.k8s.io/yaml (sorted keys, block style), trailing newline cut."""
    s = yaml.dump(_to_jsonable(v), default_flow_style=False, sort_keys=True, allow_unicode=True)
    if s.endswith("\n...\n"):
        s = s[: -len("...\n")]
    return s[:-1] if s.endswith("\n") else s


def required(msg: str, v):
    if v is None or (isinstance(v, str) and v == ""):
        raise TemplateError(msg)
    return v


def fail(msg: str):
    raise TemplateError(msg)


def dflt(d, *given):
    if not given or not truth(given[0]):
        return d
    return given[0]


def trunc(c: int, s: str) -> str:
    b = s.encode()
    if c < 0 and len(b) + c > 0:
        return b[len(b) + c :].decode(errors="replace")
    if c >= 0 and len(b) > c:
        return b[:c].decode(errors="replace")
    return s


def indent(n: int, s: str) -> str:
    pad = " " * n
    return pad + s.replace("\n", "\n" + pad)


def until(n: int) -> list:
    return list(range(0, n, 1 if n >= 0 else -1))


def dict_(*kv) -> dict:
    d = {}
    for i in range(0, len(kv), 2):
        d[strval(kv[i])] = kv[i + 1] if i + 1 < len(kv) else ""
    return d


def join(sep: str, v) -> str:
    if v is None:
        return ""
    items = v if isinstance(v, list) else [v]
    return sep.join(strval(x) for x in items if x is not None)


def _trim_suffix(suffix: str, s: str) -> str:
    return s[: -len(suffix)] if suffix and s.endswith(suffix) else s


def _trim_prefix(prefix: str, s: str) -> str:
    return s[len(prefix) :] if prefix and s.startswith(prefix) else s


def _append(lst, v) -> list:
    if not isinstance(lst, list):
        raise TemplateError(f"cannot push on type {go_type_name(lst)}")
    return [*lst, v]


def _replace(old: str, new: str, s: str) -> str:
    if not old:
        raise TemplateError("replace with an empty search string is outside the supported subset")
    return s.replace(old, new)


# name -> (function, parameter types); "T..." is variadic; "any" is interface{}.
FUNCS = {
    # text/template builtins
    "and": (None, ("any...",)),
    "or": (None, ("any...",)),
    "not": (lambda v: not truth(v), ("any",)),
    "eq": (go_eq, ("any", "any...")),
    "ne": (lambda a, b: not go_eq(a, b), ("any", "any")),
    "lt": (lambda a, b: (lambda x, y: x < y)(*_ordered(a, b)), ("any", "any")),
    "le": (lambda a, b: (lambda x, y: x <= y)(*_ordered(a, b)), ("any", "any")),
    "gt": (lambda a, b: (lambda x, y: x > y)(*_ordered(a, b)), ("any", "any")),
    "ge": (lambda a, b: (lambda x, y: x >= y)(*_ordered(a, b)), ("any", "any")),
    "len": (go_len, ("any",)),
    "index": (go_index, ("any", "any...")),
    "print": (go_sprint, ("any...",)),
    "printf": (go_sprintf, ("string", "any...")),
    # Helm
    "include": (None, ("string", "any")),
    "required": (required, ("string", "any")),
    "toYaml": (to_yaml, ("any",)),
    # Sprig
    "fail": (fail, ("string",)),
    "default": (dflt, ("any", "any...")),
    "empty": (lambda v: not truth(v), ("any",)),
    "quote": (lambda *a: " ".join(go_quote(strval(x)) for x in a if x is not None), ("any...",)),
    "squote": (lambda *a: " ".join(f"'{strval(x)}'" for x in a if x is not None), ("any...",)),
    "toString": (strval, ("any",)),
    "indent": (indent, ("int", "string")),
    "nindent": (lambda n, s: "\n" + indent(n, s), ("int", "string")),
    "trunc": (trunc, ("int", "string")),
    "trimSuffix": (_trim_suffix, ("string", "string")),
    "trimPrefix": (_trim_prefix, ("string", "string")),
    "replace": (_replace, ("string", "string", "string")),
    "lower": (str.lower, ("string",)),
    "trim": (lambda s: s.strip(), ("string",)),
    "contains": (lambda sub, s: sub in s, ("string", "string")),
    "hasKey": (lambda d, k: k in d, ("map", "string")),
    "int": (lambda v: to_int64(v), ("any",)),
    "int64": (lambda v: GoInt64(to_int64(v)), ("any",)),
    "add": (lambda *a: GoInt64(sum(to_int64(x) for x in a)), ("any...",)),
    "sub": (lambda a, b: GoInt64(to_int64(a) - to_int64(b)), ("any", "any")),
    "until": (until, ("int",)),
    "list": (lambda *a: list(a), ("any...",)),
    "append": (_append, ("any", "any")),
    "dict": (dict_, ("any...",)),
    "join": (join, ("string", "any")),
}
