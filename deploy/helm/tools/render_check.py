#!/usr/bin/env python3
"""Render the IndexRelay chart like `helm template` (no helm binary needed).

    python3 deploy/helm/tools/render_check.py [-f values.yaml ...] [--release NAME]
        [--namespace NS] [--kube-version 1.31.0] [--notes]

Prints the manifests (with `# Source:` headers) to stdout; errors go to stderr with exit
status 1. The tests in deploy/helm/tools/tests validate the output; see docs/deploy.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helmlite import Chart, ChartError  # noqa: E402

CHART = Path(__file__).resolve().parent.parent / "indexrelay"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    ap.add_argument("--chart", default=str(CHART))
    ap.add_argument("--release", default="indexrelay")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--kube-version", default="1.31.0")
    ap.add_argument("--notes", action="store_true", help="print NOTES.txt instead of the manifests")
    a = ap.parse_args(argv)
    try:
        r = Chart(Path(a.chart)).render(a.values, a.release, a.namespace, a.kube_version)
    except ChartError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(r.notes if a.notes else r.as_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
