"""Prune a KubeRay CRD's OpenAPI schema down to what our manifests use, as a JSON schema for the tests.

    python tests/data/kuberay/prune.py CRD.yaml OUT.json MANIFEST.yaml [MANIFEST.yaml ...] [--keep PATH ...]

Takes the `v1` version's `schema.openAPIV3Schema` of CRD.yaml and the documents of the manifests whose `kind` is the
CRD's kind (RayCluster, RayJob, ...). Every schema node that the manifests' values reach is kept, with all of its
keywords except `description` (type, required, enum, items, additionalProperties, anyOf/oneOf, format, pattern,
x-kubernetes-preserve-unknown-fields, x-kubernetes-int-or-string, ...). An object node keeps its full set of
`properties` names, but a property that no manifest sets gets the empty schema `{}`: validation still passes, and a
walk for unknown fields still knows every legal key at each level the manifests reach.

--keep PATH (repeatable) keeps the full subschema at PATH even where the manifests do not reach it yet. PATH is dotted
from the document root, `[]` stands for an array's items: `spec.workerGroupSpecs[].template.spec.tolerations[]`.
A PATH that the CRD does not have is an error.

Needs only pyyaml and the standard library.
"""

import argparse
import json
import sys

import yaml

FULL = object()  # keep-trie marker: keep the whole subschema here


def parse_path(path: str) -> list[str]:
    """'spec.workerGroupSpecs[].labels' -> ['spec', 'workerGroupSpecs', '[]', 'labels']."""
    steps = []
    for part in path.split("."):
        name, brackets = part, 0
        while name.endswith("[]"):
            name, brackets = name[:-2], brackets + 1
        if not name:
            raise SystemExit(f"--keep {path}: empty name in the path")
        steps += [name] + ["[]"] * brackets
    return steps


def keep_trie(paths: list[str]) -> dict:
    trie: dict = {}
    for path in paths:
        node = trie
        for step in parse_path(path):
            node = node.setdefault(step, {})
        node[FULL] = True
    return trie


def check_keep(schema: dict, trie: dict, where: str = "") -> None:
    """Fail loudly on a --keep path the schema does not have (a typo would otherwise keep nothing)."""
    for step, sub in trie.items():
        if step is FULL:
            continue
        if step == "[]":
            child = schema.get("items")
            here = where + "[]"
        else:
            child = schema.get("properties", {}).get(step)
            here = f"{where}.{step}" if where else step
        if not isinstance(child, dict):
            raise SystemExit(f"--keep: the schema has no {here}")
        check_keep(child, sub, here)


def strip(schema):
    """The whole subschema, without `description` anywhere."""
    if isinstance(schema, dict):
        return {key: strip(value) for key, value in schema.items() if key != "description"}
    if isinstance(schema, list):
        return [strip(value) for value in schema]
    return schema


def prune(schema: dict, values: list, keep: dict) -> dict:
    """The schema node for `values` (the manifests' values at this place), pruned as the module says."""
    if keep.get(FULL):
        return strip(schema)
    out = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key == "properties":
            objects = [v for v in values if isinstance(v, dict)]
            out[key] = {}
            for name, sub in value.items():
                reached = [o[name] for o in objects if name in o]
                out[key][name] = prune(sub, reached, keep.get(name, {})) if reached or name in keep else {}
        elif key == "items" and isinstance(value, dict):
            items = [item for v in values if isinstance(v, list) for item in v]
            out[key] = prune(value, items, keep.get("[]", {})) if items or "[]" in keep else {}
        elif key == "additionalProperties" and isinstance(value, dict):
            known = schema.get("properties", {})
            extra = [val for v in values if isinstance(v, dict) for name, val in v.items() if name not in known]
            out[key] = prune(value, extra, {})
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [prune(branch, values, keep) for branch in value]
        else:
            out[key] = strip(value)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", help="the CRD YAML, e.g. ray.io_rayclusters.yaml")
    parser.add_argument("out", help="where to write the pruned JSON schema")
    parser.add_argument("manifests", nargs="+", help="manifest YAML files (multi-document)")
    parser.add_argument("--keep", action="append", default=[], metavar="PATH",
                        help="keep the full subschema at this dotted path ([] = array items); repeatable")
    args = parser.parse_args(argv)

    with open(args.crd) as f:
        crd = yaml.safe_load(f)
    kind = crd["spec"]["names"]["kind"]
    versions = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    if not versions:
        raise SystemExit(f"{args.crd}: no v1 version")
    schema = versions[0]["schema"]["openAPIV3Schema"]

    documents = []
    for path in args.manifests:
        with open(path) as f:
            documents += [doc for doc in yaml.safe_load_all(f) if isinstance(doc, dict) and doc.get("kind") == kind]
    if not documents:
        raise SystemExit(f"no {kind} document in {', '.join(args.manifests)}")

    trie = keep_trie(args.keep)
    check_keep(schema, trie)
    pruned = prune(schema, documents, trie)
    pruned = {"$comment": f"{kind} v1 openAPIV3Schema of {crd['metadata']['name']}, pruned by "
                          f"tests/data/kuberay/prune.py against {', '.join(args.manifests)}"
                          + (f" keeping {', '.join(args.keep)}" if args.keep else "")
                          + "; see tests/data/kuberay/SOURCE.md", **pruned}
    with open(args.out, "w") as f:
        json.dump(pruned, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{args.out}: {kind}, {len(documents)} document(s), {len(json.dumps(pruned))} bytes compact", file=sys.stderr)


if __name__ == "__main__":
    main()
