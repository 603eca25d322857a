"""The renderer against Go text/template + Sprig + Helm behaviour.

Each expected output is what Go (Helm 3) produces for the same template and data; the
error cases are templates Helm rejects too (or, marked "subset", ones this renderer
refuses because Go would print something no chart wants).
"""

import pytest
import yaml

from gofuncs import FUNCS, GoStruct, TemplateError, go_float
from goexec import Template
from helmlite import _go_values


def render(src, data=None, defines=""):
    t = Template(dict(FUNCS))
    t.add("defs", defines)
    t.add("t", src)
    # Helm removes "<no value>" from every rendered file.
    return t.execute_file("t", {} if data is None else data).replace("<no value>", "")


@pytest.mark.parametrize(
    "src,data,want",
    [
        ("a  {{- 1 -}}  b", None, "a1b"),
        ("a {{1}} b", None, "a 1 b"),
        ("a\n  {{- 1 }}\n  b", None, "a1\n  b"),
        ("x \n{{- /* comment */ -}}\n y", None, "xy"),
        ("x{{/* a\nmulti-line comment */}}y", None, "xy"),
        ("{{-3}}", None, "-3"),
        ('{{ "a\\tb\\"c" }}', None, 'a\tb"c'),
        ("{{ `a\\n` }}", None, "a\\n"),
        ("{{ if .a }}A{{ else if .b }}B{{ else }}C{{ end }}", {"b": True}, "B"),
        ("{{ if .a }}A{{ else if .b }}B{{ else }}C{{ end }}", {"a": "", "b": 0.0}, "C"),
        ("{{ range $k, $v := .m }}{{ $k }}={{ $v }};{{ end }}", {"m": {"b": 2.0, "a": 1.0}}, "a=1;b=2;"),
        ("{{ range $i, $v := .l }}{{ $i }}:{{ $v }} {{ end }}", {"l": ["a", "b"]}, "0:a 1:b "),
        ("{{ range $v := .l }}{{ $v }}{{ end }}", {"l": ["a", "b"]}, "ab"),
        ("{{ range .l }}x{{ else }}empty{{ end }}", {"l": []}, "empty"),
        ("{{ range .l }}x{{ else }}empty{{ end }}", {}, "empty"),
        ("{{ range .l }}{{ . }}{{ $.n }}{{ end }}", {"l": ["a", "b"], "n": "!"}, "a!b!"),
        ("{{ $x := 1 }}{{ if true }}{{ $x := 2 }}{{ $x }}{{ end }}{{ $x }}", None, "21"),
        ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", None, "2"),
        ("{{ $l := list }}{{ range until 3 }}{{ $l = append $l . }}{{ end }}{{ join \",\" $l }}", None, "0,1,2"),
        ("{{ with .a }}{{ .b }}{{ end }}", {"a": {"b": "x"}}, "x"),
        ("{{ with .a }}{{ .b }}{{ else }}none{{ end }}", {"a": {}}, "none"),
        ("{{ with $v := .a }}{{ $v }}{{ end }}", {"a": "q"}, "q"),
        # Helm reads values numbers as float64, printed with fmt's %v.
        ("{{ .n }}", {"n": 1000000.0}, "1e+06"),
        ("{{ .n }}", {"n": 123456.0}, "123456"),
        ("{{ .n }}", {"n": 1234567.0}, "1.234567e+06"),
        ("{{ .n }}", {"n": 0.5}, "0.5"),
        ("{{ .n }}", {"n": 0.0001}, "0.0001"),
        ("{{ .n }}", {"n": 0.00001}, "1e-05"),
        ("{{ int .n }}", {"n": 1000000.0}, "1000000"),
        ("{{ int .n | quote }}", {"n": 1048576.0}, '"1048576"'),
        ("{{ .n | quote }}", {"n": 1.0}, '"1"'),
        ("[{{ .missing }}]", {}, "[]"),
        ("[{{ .missing | quote }}]", {}, "[]"),
        ('{{ eq .missing "x" }}', {}, "false"),
        ("{{ eq (int .n) 1 }}", {"n": 1.0}, "true"),
        ('{{ eq .s "a" "b" }}', {"s": "b"}, "true"),
        ("{{ ne (len .l) (sub 3 1) }}", {"l": [1.0, 2.0]}, "false"),
        ("{{ gt (int .n) 0 }}", {"n": 2.0}, "true"),
        ('{{ "a" | printf "%s-%s" "b" }}', None, "b-a"),
        ('{{ printf "%s:%d:%v:%q" "a" 3 .f "x" }}', {"f": 2.0}, 'a:3:2:"x"'),
        ('{{ print "a" 1 2 "b" }}', None, "a1 2b"),
        ('k:{{ include "x" . | nindent 2 }}', {}, "k:\n  a: 1\n  b: 2"),
        ('{{ include "x" . | indent 4 }}', {}, "    a: 1\n    b: 2"),
        ('{{ template "y" .v }}', {"v": "V"}, "<V>"),
        ('{{ (dict "a" "b").a }}', None, "b"),
        ('{{ quote .s }}', {"s": 'a"b\\c'}, '"a\\"b\\\\c"'),
        ('{{ default "d" .x }}', {"x": ""}, "d"),
        ('{{ default "d" .x }}', {"x": 0.0}, "d"),
        ('{{ default "d" .x }}', {"x": False}, "d"),
        ('{{ default "d" .x }}', {"x": "v"}, "v"),
        ('{{ .x | default "d" }}', {}, "d"),
        ('{{ required "need x" .x }}', {"x": 0.0}, "0"),
        ("{{ and .a .a.b }}", {}, ""),
        ('{{ or .a "z" }}', {}, "z"),
        ('{{ not .a }}', {"a": []}, "true"),
        ('{{ "abc-def" | trunc 4 | trimSuffix "-" }}', None, "abc"),
        ('{{ trunc -3 "abcdef" }}', None, "def"),
        ('{{ replace "+" "_" "1.0+x" }}', None, "1.0_x"),
        ('{{ contains "ab" "xaby" }}', None, "true"),
        ("{{ len .l }}/{{ len .s }}", {"l": [1.0, 2.0], "s": "héllo"}, "2/6"),
        ('{{ index .m "k" }}', {"m": {"k": "v"}}, "v"),
        ('{{ hasKey .m "k" }}', {"m": {"k": None}}, "true"),
        ('{{ join "," .l }}', {"l": [3.0, 5.0, "x"]}, "3,5,x"),
        ("{{ .Chart.Name }}", {"Chart": GoStruct("*chart.Metadata", {"Name": "c"})}, "c"),
        ("{{ .Release.Missing }}", {"Release": {"Name": "r"}}, ""),
    ],
)
def test_matches_go(src, data, want):
    defines = '{{- define "x" -}}\na: 1\nb: 2\n{{- end }}{{ define "y" }}<{{ . }}>{{ end }}'
    assert render(src, data, defines) == want


@pytest.mark.parametrize(
    "src,data,err",
    [
        ("{{ .missing.x }}", {}, "nil pointer evaluating interface {}.x"),
        ("{{ .Chart.Nope }}", {"Chart": GoStruct("*chart.Metadata", {"Name": "c"})}, "can't evaluate field Nope"),
        ("{{ .s.x }}", {"s": "str"}, "can't evaluate field x in type string"),
        ("{{ eq .n 1 }}", {"n": 1.0}, "incompatible types for comparison"),
        ("{{ lt .n 1 }}", {"n": 1.0}, "incompatible types for comparison"),
        ("{{ nope 1 }}", None, 'function "nope" not defined'),
        ("{{ if true }}{{ $y := 1 }}{{ end }}{{ $y }}", None, "undefined variable"),
        ("{{ $z = 1 }}", None, "undefined variable"),
        ("{{ if true }}x", None, "unexpected EOF"),
        ("x{{ end }}", None, "unexpected {{end}}"),
        ("{{/* c */ }}", None, "comment ends before closing delimiter"),
        ('{{ "x" "y" }}', None, "can't give argument to non-function"),
        ('{{ required "need x" .x }}', {}, "need x"),
        ('{{ required "need x" .x }}', {"x": ""}, "need x"),
        ('{{ fail "stop here" }}', None, "stop here"),
        ('{{ trunc .n "abc" }}', {"n": 2.0}, "expected int; got float64"),
        ("{{ until .n }}", {"n": 2.0}, "expected int; got float64"),
        ("{{ until (sub 3 1) }}", None, "expected int; got int64"),
        ('{{ trimSuffix "-" .missing }}', {}, "invalid value; expected string"),
        ("{{ trunc 3 }}", None, "wrong number of args for trunc: want 2 got 1"),
        ('{{ include "nope" . }}', None, "no template 'nope'"),
        ('{{ printf "%d" .f }}', {"f": 2.0}, "printf %d of a float64"),
        ("{{ .m }}", {"m": {"a": 1.0}}, "outside the supported subset"),
        ("{{ 'a' }}", None, "character constants"),
    ],
)
def test_errors_like_go(src, data, err):
    with pytest.raises(TemplateError) as e:
        render(src, data)
    assert err in str(e.value)


def test_to_yaml_is_block_style_sorted_and_round_trips():
    value = {"b": [1.0, 2.0], "a": {"c": "1", "d": True}, "e": {}, "f": 0.5, "g": "x: y"}
    out = render("{{ toYaml .v }}", {"v": value})
    # sigs.k8s.io/yaml: keys sorted, sequences not indented under their key, no trailing
    # newline, whole-number float64 as integers.
    assert out.startswith("a:\n  c: ")
    assert "\nb:\n- 1\n- 2\n" in out
    assert "\ne: {}\n" in out
    assert not out.endswith("\n")
    assert yaml.safe_load(out) == {"a": {"c": "1", "d": True}, "b": [1, 2], "e": {}, "f": 0.5, "g": "x: y"}
    assert render("{{ toYaml .v }}", {"v": "plain"}) == "plain"


@pytest.mark.parametrize(
    "f,want",
    [(1.0, "1"), (-2.5, "-2.5"), (1e21, "1e+21"), (100000.0, "100000"), (1e6, "1e+06"), (1.5e-7, "1.5e-07")],
)
def test_go_float_format(f, want):
    assert go_float(f) == want


def test_values_numbers_become_float64_like_helm():
    vals = _go_values(yaml.safe_load("a: 1\nb: [2, x]\n3: true\nc: null\n"))
    assert vals == {"a": 1.0, "b": [2.0, "x"], "3": True, "c": None}
    assert isinstance(vals["a"], float)
