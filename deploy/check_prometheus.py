#!/usr/bin/env python3
"""Checks dashboards and rules, statically and against a live Prometheus that scrapes npsflow.

Static checks (also alone with --lint, no Prometheus needed):
- every dashboard can be imported into any Grafana: an `__inputs` block with DS_PROMETHEUS, a
  `datasource` variable (type datasource, query prometheus, defaulting to the provisioned uid
  `prometheus`), and no hard-coded data source uid anywhere (every reference is
  `${datasource}`, except Grafana's built-in annotation source);
- `job` and `namespace` variables (multi-value, with All; namespace's All is `.*`, which also
  matches series without a namespace label), and every metric selector in every panel query
  and variable query carries `job=~"$job"` and `namespace=~"$namespace"`;
- every panel has a unit;
- every alerting rule has a summary, a description and a runbook_url pointing at
  docs/runbooks/<AlertName>.md in the repository, and that file exists; no rule names a job.

Live checks: every query of every panel (a query of a series that only an optional input
feeds, see NEEDS_INPUT, is named with that input when empty, and may be empty for an input
declared with --pending-input) (with template variables set to job and namespace
`.*`, segment "all", window "1h"), every variable query and every recording rule must return
at least one series, and every rule must evaluate without error. Waits (bounded) for data to
arrive first.
"""
import argparse
import json
import os
import re
import sys
import time
import urllib.parse
import urllib.request

VARIABLES = {
    "$segment": "all",
    "$window": "1h",
    "$job": ".*",
    "$namespace": ".*",
    "$__rate_interval": "1m",
    "$__interval": "15s",
}
DATASOURCE_REF = "${datasource}"
RUNBOOK_BASE = "https://github.com/npsflow/npsflow/blob/main/"
SCOPE = ('job=~"$job"', 'namespace=~"$namespace"')
# Metric and recording-rule names in our queries, with their selector if any.
# Series that exist only with an optional input's data: a query of these that returns nothing
# is reported with the input it needs (and tolerated with --pending-input INPUT, e.g. while a
# demo does not produce that input yet). Every other panel must have data.
NEEDS_INPUT = {
    "npsflow_segment_invitations": "survey.invitations",
    "npsflow_segment_response_rate": "survey.invitations",
}
SELECTOR = re.compile(r"\b(npsflow_[a-z0-9_]+|npsflow:[a-z0-9_:]+|up)\b(\{[^}]*\})?")


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def query(prom, expr):
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = get(url)
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def substitute(expr):
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def walk(node, path=""):
    """Every (path, key, value) in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def variable_query(variable):
    q = variable.get("query")
    return q.get("query", "") if isinstance(q, dict) else (q or "")


def unscoped_selectors(expr):
    """The metric selectors in `expr` that lack the job or namespace matcher."""
    bad = []
    for match in SELECTOR.finditer(expr):
        selector = match.group(2) or ""
        if not all(m in selector for m in SCOPE):
            bad.append(match.group(0))
    return bad


def lint_dashboard(path, dashboard):
    problems = []
    title = dashboard.get("title", path)
    inputs = dashboard.get("__inputs", [])
    if not any(
        i.get("name") == "DS_PROMETHEUS" and i.get("type") == "datasource" and i.get("pluginId") == "prometheus"
        for i in inputs
    ):
        problems.append("no __inputs entry DS_PROMETHEUS (type datasource, pluginId prometheus)")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no datasource variable (type datasource, query prometheus)")
    elif ds.get("current", {}).get("value") != "prometheus":
        problems.append("the datasource variable does not default to the provisioned uid 'prometheus'")
    for name in ("job", "namespace"):
        v = variables.get(name)
        if not v or v.get("type") != "query" or not v.get("multi") or not v.get("includeAll"):
            problems.append(f"no {name} variable (query, multi-value, with All)")
    if variables.get("namespace", {}).get("allValue") != ".*":
        problems.append("the namespace variable's All value is not .* (series without a namespace label would vanish)")
    for name, v in variables.items():
        if v.get("type") == "query":
            q = variable_query(v)
            if name not in ("job", "namespace") and unscoped_selectors(q):
                problems.append(f"variable {name}: selector without job/namespace: {unscoped_selectors(q)}")
    # No hard-coded data source anywhere.
    for where, key, value in walk(dashboard):
        if key != "datasource":
            continue
        uid = value.get("uid") if isinstance(value, dict) else value
        if uid in (DATASOURCE_REF, "$datasource"):
            continue
        if isinstance(value, dict) and value.get("type") == "grafana" and uid == "-- Grafana --":
            continue
        problems.append(f"hard-coded data source {value!r} at {where}")
    for panel in dashboard.get("panels", []):
        name = panel.get("title", panel.get("id"))
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if not unit:
            problems.append(f"panel {name!r} has no unit (fieldConfig.defaults.unit)")
        for target in panel.get("targets", []):
            bad = unscoped_selectors(target.get("expr", ""))
            if bad:
                problems.append(f"panel {name!r}: selector without job/namespace matchers: {bad}")
    return [f"{title}: {p}" for p in problems]


def load_dashboards(paths):
    dashboards = []
    for path in paths:
        with open(path) as f:
            dashboards.append((path, json.load(f)))
    return dashboards


def dashboard_queries(dashboards):
    for path, dashboard in dashboards:
        for variable in dashboard.get("templating", {}).get("list", []):
            q = variable_query(variable)
            m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*", q)
            if variable.get("type") == "query" and m:
                yield f"{dashboard['title']} / variable {variable['name']}", substitute(m.group(1))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = substitute(target["expr"])
                if "$" in expr:
                    raise RuntimeError(f"unknown variable in {path}: {expr}")
                yield f"{dashboard['title']} / {panel['title']}", expr


def rules_from_file(path):
    """(type, name, query, annotations) of every rule in a rules file, or None without PyYAML
    (the live check reads the same rules from Prometheus' API instead)."""
    try:
        import yaml
    except ImportError:
        return None
    with open(path) as f:
        groups = yaml.safe_load(f)["groups"]
    return [
        (
            "alerting" if "alert" in r else "recording",
            r.get("alert") or r.get("record"),
            str(r["expr"]),
            r.get("annotations", {}),
        )
        for g in groups
        for r in g["rules"]
    ]


def rules_from_api(groups):
    return [(r["type"], r["name"], r["query"], r.get("annotations", {})) for g in groups for r in g["rules"]]


def lint_rules(rules, repo):
    problems = []
    for kind, name, expr, annotations in rules:
        if re.search(r'\bjob\s*=~?\s*"', expr):
            problems.append(f"{name}: names a job in its query (scrape job names are the user's choice)")
        if kind != "alerting":
            continue
        for key in ("summary", "description", "runbook_url"):
            if not annotations.get(key):
                problems.append(f"{name}: no {key} annotation")
        url = annotations.get("runbook_url", "")
        expected = f"{RUNBOOK_BASE}docs/runbooks/{name}.md"
        if url and url != expected:
            problems.append(f"{name}: runbook_url is {url}, expected {expected}")
        if not os.path.isfile(os.path.join(repo, "docs", "runbooks", f"{name}.md")):
            problems.append(f"{name}: no runbook docs/runbooks/{name}.md")
    return problems


def recording_rules(rules):
    return [(f"recording rule {name}", name) for kind, name, _, _ in rules if kind == "recording"]


def report_lint(problems):
    for p in problems:
        print("LINT    " + p)
    return not problems


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("prometheus", nargs="?", help="Prometheus base URL (not with --lint)")
    parser.add_argument("app", nargs="?", help="npsflow base URL (not with --lint)")
    parser.add_argument("--dashboards", nargs="+", required=True)
    parser.add_argument("--rules", required=True)
    parser.add_argument("--lint", action="store_true", help="static checks only")
    parser.add_argument("--wait", type=float, default=120)
    parser.add_argument(
        "--pending-input",
        action="append",
        default=[],
        help="an optional input the demo does not produce yet: panels that need only it may be empty",
    )
    args = parser.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    dashboards = load_dashboards(args.dashboards)
    lint = [p for path, d in dashboards for p in lint_dashboard(path, d)]
    if args.lint:
        rules = rules_from_file(args.rules)
        if rules is None:
            print(f"no PyYAML: {args.rules} is checked in the live run only")
        else:
            lint += lint_rules(rules, repo)
        ok = report_lint(lint)
        if not ok:
            print(f"{len(lint)} lint problems", file=sys.stderr)
            sys.exit(1)
        print(f"lint: {len(dashboards)} dashboards and {args.rules}: ok")
        return
    if not args.prometheus:
        parser.error("the Prometheus URL is required without --lint")

    # Wait for the rules to be loaded, then for data.
    deadline = time.time() + args.wait
    groups = []
    while time.time() < deadline:
        try:
            groups = get(args.prometheus + "/api/v1/rules")["data"]["groups"]
        except OSError:
            groups = []
        if groups:
            break
        time.sleep(1)
    rules = rules_from_api(groups)
    lint += lint_rules(rules, repo)

    checks = list(dashboard_queries(dashboards)) + recording_rules(rules)
    missing = checks
    while True:
        try:
            missing = [(name, expr) for name, expr in checks if not query(args.prometheus, expr)]
        except OSError:
            missing = checks
        if not missing or time.time() > deadline:
            break
        time.sleep(2)
    def needs(expr):
        inputs = {NEEDS_INPUT[m.group(1)] for m in SELECTOR.finditer(expr) if m.group(1) in NEEDS_INPUT}
        return sorted(inputs)

    pending = [(n, e) for n, e in missing if needs(e) and set(needs(e)) <= set(args.pending_input)]
    for name, expr in checks:
        if (name, expr) in pending:
            print(f"PENDING {name} (needs {', '.join(needs(expr))}, declared pending)")
        elif (name, expr) in missing:
            note = f" (needs data on {', '.join(needs(expr))})" if needs(expr) else ""
            print(f"MISSING {name}{note}")
        else:
            print("ok      " + name)
    missing = [c for c in missing if c not in pending]
    groups = get(args.prometheus + "/api/v1/rules")["data"]["groups"]
    unhealthy = [r["name"] for g in groups for r in g["rules"] if r.get("health") != "ok"]
    loaded = sum(len(g["rules"]) for g in groups)
    print(f"{loaded} rules loaded; unhealthy: {unhealthy or 'none'}")
    lint_ok = report_lint(lint)
    if missing or unhealthy or loaded == 0 or not lint_ok:
        print(f"{len(missing)} queries returned no data; {len(lint)} lint problems", file=sys.stderr)
        sys.exit(1)
    print(f"{len(checks)} queries returned data")


if __name__ == "__main__":
    main()
