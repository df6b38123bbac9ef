#!/usr/bin/env python3
"""The schema side of npsflow's contract check (run by scripts/schemas.sh).

1. Every schema in deploy/schemas is a valid draft 2020-12 schema, and the timestamp patterns
   repeated in several schemas are the same everywhere.
2. Every sample in deploy/schemas/samples/<format>.jsonl gets the verdict it states from a real
   JSON Schema validator (`schema_valid` if the line has it, else `valid`, the decoder's
   verdict, which the Rust test tests/schemas.rs checks against npsflow's decoder; for records
   npsflow reads back itself, `decodes` is its reader's verdict where that differs).
3. With --outputs DIR (written by tests/schemas.rs): every message npsflow produced there
   (<schema>.<source>.jsonl: one JSON document per line) validates against its schema, and the
   timestamp corpus (rfc3339.jsonl: the decoder's verdict on many timestamps) agrees with the
   schemas' timestamp pattern.
4. With --npsflow BIN as well: `npsflow validate` run on the samples' raw messages (written by
   the Rust test) prints the decoder's verdict and reason for every line, and exits 0/1.
5. With --api URL: every case served by a running npsflow at URL validates against the case
   schema (with the API's extra fields).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

HERE = pathlib.Path(__file__).resolve().parent
SAMPLES = HERE / "samples"
# Samples whose decoder is npsflow's input decoder; the others describe npsflow's outputs.
INPUTS = {"survey-response", "followup-outcome", "survey-invitation"}
# Outputs that tests/schemas.rs must have written (from the core or the pipeline).
OUTPUTS = ("detractor-alert", "case", "escalation", "dead-letter-headers", "api-case",
           "segment-view", "account-view", "segment-delta", "account-delta", "segment-snapshot",
           "account-snapshot")

failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}", file=sys.stderr)


def load_schemas():
    schemas = {}
    for path in sorted(HERE.glob("*.schema.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        Draft202012Validator.check_schema(schema)
        name = path.name[: -len(".schema.json")]
        expected_id = f"https://example.invalid/npsflow/schemas/{path.name}"
        if schema.get("$id") != expected_id:
            fail(f"{path.name}: $id is {schema.get('$id')!r}, expected {expected_id!r}")
        schemas[name] = schema
    return schemas


def check_shared_definitions(schemas):
    for definition in ("rfc3339", "utcMillis", "segments", "segment", "severityOfScore", "id",
                       "optionalId"):
        found = {
            name: json.dumps(s["$defs"][definition], sort_keys=True)
            for name, s in schemas.items()
            if definition in s.get("$defs", {})
        }
        patterns = {
            name: json.loads(text).get("pattern") for name, text in found.items()
        }
        # Descriptions may differ; what validates must not.
        stripped = {
            name: json.dumps(
                {k: v for k, v in json.loads(text).items() if k != "description"},
                sort_keys=True,
            )
            for name, text in found.items()
        }
        if len(set(stripped.values())) > 1:
            fail(f"$defs/{definition} differs between schemas: {sorted(found)} {patterns}")


def validator(schema):
    return Draft202012Validator(schema, format_checker=FormatChecker())


def instance_of(sample):
    """The message as a JSON Schema instance, or None if it is not a JSON document."""
    if "message" in sample:
        return True, sample["message"]
    if "text" in sample:
        raw = sample["text"].encode("utf-8")
    else:
        raw = bytes.fromhex(sample["hex"])
    try:
        return True, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False, None


def check_samples(schemas):
    counted = 0
    for path in sorted(SAMPLES.glob("*.jsonl")):
        name = path.name[: -len(".jsonl")]
        if name not in schemas:
            fail(f"{path.name}: no schema {name}.schema.json")
            continue
        check = validator(schemas[name])
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.name}:{number}"
            sample = json.loads(line)
            keys = set(sample) - {"valid", "reason", "schema_valid", "decodes", "note"}
            if len(keys) != 1 or not keys <= {"message", "text", "hex"}:
                fail(f"{where}: a sample has exactly one of message, text, hex ({sorted(keys)})")
                continue
            if "schema_valid" in sample and not sample.get("note"):
                fail(f"{where}: a sample where schema and decoder differ says why in `note`")
            expected = sample.get("schema_valid", sample["valid"])
            is_json, instance = instance_of(sample)
            errors = sorted(check.iter_errors(instance), key=str) if is_json else ["not JSON"]
            verdict = not errors
            if verdict != expected:
                detail = "" if verdict else f": {getattr(errors[0], 'message', errors[0])}"
                fail(
                    f"{where} ({sample.get('note')}): schema says "
                    f"{'valid' if verdict else 'invalid'}, sample says "
                    f"{'valid' if expected else 'invalid'}{detail}"
                )
            counted += 1
    print(f"samples: {counted} checked against their schemas")


def check_outputs(schemas, outputs):
    files = sorted(outputs.glob("*.jsonl"))
    seen = set()
    for path in files:
        stem = path.name[: -len(".jsonl")]
        if stem == "rfc3339" or stem.endswith(".messages"):
            continue
        name = stem.split(".")[0]
        if name == "api-case":
            check = api_case_validator(schemas)
        elif name in schemas:
            check = validator(schemas[name])
        else:
            fail(f"{path}: no schema {name}.schema.json")
            continue
        count = 0
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            document = json.loads(line)
            for error in check.iter_errors(document):
                fail(f"{path.name}:{number}: {error.message} at {list(error.absolute_path)}")
            count += 1
        if count == 0:
            fail(f"{path.name}: no messages")
        seen.add(name)
        print(f"outputs: {count} messages in {path.name} valid")
    for name in OUTPUTS:
        if name not in seen:
            fail(f"no outputs of {name} in {outputs}")
    corpus = outputs / "rfc3339.jsonl"
    if not corpus.exists():
        fail(f"no timestamp corpus {corpus}")
        return
    patterns = {
        "survey-response": validator(schemas["survey-response"]["$defs"]["rfc3339"]),
        "followup-outcome": validator(schemas["followup-outcome"]["properties"]["occurred_at"]
                                      | {"$defs": schemas["followup-outcome"]["$defs"]}),
    }
    count = 0
    for line in corpus.read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        for name, check in patterns.items():
            expected = case[name.replace("-", "_")]
            if check.is_valid(case["text"]) != expected:
                fail(f"timestamp {case['text']!r}: the decoder says {expected} for {name}, "
                     "the schema does not")
        count += 1
    print(f"timestamps: {count} agree between the decoder and the schemas")


def check_validate_command(npsflow, outputs):
    for name, option in (("survey-response", []), ("followup-outcome", ["--format", "outcome"])):
        messages = outputs / f"{name}.messages"
        samples = [
            json.loads(line)
            for line in (SAMPLES / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        result = subprocess.run(
            [npsflow, "validate", *option, str(messages)], capture_output=True, check=False
        )
        lines = result.stdout.decode("utf-8").splitlines()
        if len(lines) != len(samples):
            fail(f"npsflow validate {name}: {len(lines)} lines of output for {len(samples)} messages")
            continue
        for number, (out, sample) in enumerate(zip(lines, samples), 1):
            fields = out.split("\t")
            expected = [str(number), "valid"] if sample["valid"] else [
                str(number), "invalid", sample["reason"]]
            if fields[: len(expected)] != expected or (not sample["valid"] and len(fields) != 4):
                want_text = "\t".join(expected)
                fail(f"npsflow validate {name} line {number}: printed {out!r}, "
                     f"expected {want_text!r}... ({sample['note']})")
        want = 0 if all(s["valid"] for s in samples) else 1
        if result.returncode != want:
            fail(f"npsflow validate {name}: exit code {result.returncode}, expected {want}")
        print(f"npsflow validate: {len(samples)} {name} lines as the samples say")
    valid_only = outputs / "survey-response.valid.messages"
    result = subprocess.run([npsflow, "validate", str(valid_only)], capture_output=True, check=False)
    if result.returncode != 0:
        fail(f"npsflow validate on valid messages only: exit code {result.returncode}")
    for arguments, code in ((["validate", str(outputs / "does-not-exist")], 66),
                            (["validate"], 64),
                            (["validate", "--format", "xml", str(valid_only)], 64),
                            (["validate", str(valid_only), str(valid_only)], 64)):
        result = subprocess.run([npsflow, *arguments], capture_output=True, check=False)
        if result.returncode != code:
            fail(f"npsflow {' '.join(arguments)}: exit code {result.returncode}, expected {code}")
    stdin = subprocess.run([npsflow, "validate", "-"], input=b'{"response_id":"r","score":7,'
                           b'"responded_at":"2026-11-22T12:00:00Z","customer_id":"c"}\n[]\n',
                           capture_output=True, check=False)
    if stdin.returncode != 1 or stdin.stdout.decode().splitlines() != [
            "1\tvalid", "2\tinvalid\tnot_object\tmessage is JSON but not an object"]:
        fail(f"npsflow validate -: {stdin.returncode} {stdin.stdout!r}")
    print("npsflow validate: exit codes 0, 1, 64, 66 and stdin as documented")


def api_case_validator(schemas):
    """A case as the API serves it: the record of schemas/case.schema.json plus `overdue`
    (and `as_of` for one case), as deploy/openapi.yaml says."""
    registry = Registry().with_resource(
        schemas["case"]["$id"], Resource.from_contents(schemas["case"])
    )
    api_case = {
        "$ref": schemas["case"]["$id"] + "#/$defs/record",
        "properties": {"overdue": {"type": "boolean"}, "as_of": {"type": "object"}},
        "required": ["overdue"],
        "unevaluatedProperties": False,
    }
    return Draft202012Validator(api_case, registry=registry, format_checker=FormatChecker())


def check_api(schemas, url):
    check = api_case_validator(schemas)
    with urllib.request.urlopen(f"{url}/v1/cases?limit=10000", timeout=30) as response:
        listing = json.load(response)
    for case in listing["cases"]:
        for error in check.iter_errors(case):
            fail(f"GET /v1/cases: case {case.get('case_id')}: {error.message} "
                 f"at {list(error.absolute_path)}")
    if not listing["cases"]:
        fail("GET /v1/cases: no cases to check")
    print(f"api: {len(listing['cases'])} cases from GET /v1/cases valid")
    # Requests schemathesis does not make (it sends valid UTF-8): every error is JSON.
    for path, status in (("/v1/cases/%FF", 400), ("/v1/segments/%FF", 400),
                         ("/v1/segments?window=%FF", 400), ("/v1/cases?limit=0", 400),
                         ("/v1/cases?state=%00", 400), ("/v1/cases/%2E%2E", 404)):
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=30) as response:
                got, body, kind = response.status, response.read(), response.headers.get_content_type()
        except urllib.error.HTTPError as error:
            got, body, kind = error.code, error.read(), error.headers.get_content_type()
        try:
            message = json.loads(body).get("error") if kind == "application/json" else None
        except ValueError:
            message = None
        if got != status or not isinstance(message, str):
            fail(f"GET {path}: {got} {kind} {body[:80]!r}, expected {status} with a JSON error")
    print("api: malformed requests get JSON errors")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=pathlib.Path, help="messages written by tests/schemas.rs")
    parser.add_argument("--npsflow", help="the npsflow binary, to check `npsflow validate`")
    parser.add_argument("--api", help="base URL of a running npsflow, to check its cases")
    args = parser.parse_args()
    schemas = load_schemas()
    check_shared_definitions(schemas)
    check_samples(schemas)
    if args.outputs:
        check_outputs(schemas, args.outputs)
        if args.npsflow:
            check_validate_command(args.npsflow, args.outputs)
    if args.api:
        check_api(schemas, args.api)
    if failures:
        print(f"schemas: {len(failures)} failures", file=sys.stderr)
        return 1
    print("schemas: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
