#!/usr/bin/env python3
"""Checks dashboards and rules against a live Prometheus that scrapes npsflow.

Every query of every panel in the given Grafana dashboards (with template variables set to
segment "all", window "1h") and every recording rule must return at least one series, and
every rule must evaluate without error. Waits (bounded) for data to arrive first.
"""
import argparse
import json
import re
import sys
import time
import urllib.parse
import urllib.request

VARIABLES = {"$segment": "all", "$window": "1h", "$__rate_interval": "1m", "$__interval": "15s"}


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def query(prom, expr):
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = get(url)
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def dashboard_queries(paths):
    for path in paths:
        with open(path) as f:
            dashboard = json.load(f)
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in VARIABLES.items():
                    expr = expr.replace(name, value)
                if "$" in expr:
                    raise RuntimeError(f"unknown variable in {path}: {expr}")
                yield f"{dashboard['title']} / {panel['title']}", expr


def recording_rules(path):
    names = re.findall(r"^\s*- record:\s*(\S+)", open(path).read(), re.M)
    return [(f"recording rule {n}", n) for n in names]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("prometheus")
    parser.add_argument("app")
    parser.add_argument("dashboards", nargs="+")
    parser.add_argument("--rules", required=True)
    parser.add_argument("--wait", type=float, default=120)
    args = parser.parse_args()

    checks = list(dashboard_queries(args.dashboards)) + recording_rules(args.rules)
    deadline = time.time() + args.wait
    missing = checks
    while True:
        try:
            missing = [(name, expr) for name, expr in checks if not query(args.prometheus, expr)]
        except OSError:
            missing = checks
        if not missing or time.time() > deadline:
            break
        time.sleep(2)
    for name, expr in checks:
        print(("MISSING " if (name, expr) in missing else "ok      ") + name)
    rules = get(args.prometheus + "/api/v1/rules")["data"]["groups"]
    unhealthy = [r["name"] for g in rules for r in g["rules"] if r.get("health") != "ok"]
    loaded = sum(len(g["rules"]) for g in rules)
    print(f"{loaded} rules loaded; unhealthy: {unhealthy or 'none'}")
    if missing or unhealthy or loaded == 0:
        print(f"{len(missing)} queries returned no data", file=sys.stderr)
        sys.exit(1)
    print(f"{len(checks)} queries returned data")


if __name__ == "__main__":
    main()
