#!/usr/bin/env python3
"""Validates p2pvmm's OpenAPI document with a standard validator (openapi-spec-validator), then
each live answer against the schema the document gives it.

usage: check-openapi.py DOC.json [SCHEMA=BODY.json ...]
  e.g. check-openapi.py openapi.json VmInfoResponse=info.json VmmPingResponse=ping.json
Prints one line per check; exits non-zero on the first failure."""
import json
import sys

from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        doc = json.load(f)
    validate(doc)
    print(f"OPENAPI-DOC valid openapi={doc['openapi']} paths={len(doc['paths'])}")
    registry = Registry().with_resource(
        "urn:p2pvmm", Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    for arg in argv[2:]:
        name, _, path = arg.partition("=")
        if name not in doc["components"]["schemas"]:
            print(f"OPENAPI-BODY {name}: no such schema in the document")
            return 1
        with open(path) as f:
            body = json.load(f)
        schema = {"$ref": f"urn:p2pvmm#/components/schemas/{name}"}
        OAS31Validator(schema, registry=registry).validate(body)
        print(f"OPENAPI-BODY {name} valid")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
