"""README's tables of job-config keys, generated from the schema's field descriptions (tgdpo_ray/config/job.py).

    python scripts/config_keys.py            print the tables
    python scripts/config_keys.py --check    exit 1 when README's tables are not current
    python scripts/config_keys.py --write    rewrite README's tables in place

README holds each table between `<!-- config-keys: NAME -->` and `<!-- end config-keys -->`: NAME `eval` is
every key under eval., NAME `pairs` every key under pairs., NAME `job` every other key. tests/test_config.py
fails when a table is stale or a key has no description.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere: the package of this checkout

from tgdpo_ray.config.job import JobConfig  # noqa: E402

README = REPO / "README.md"
TABLE = re.compile(r"(<!-- config-keys: (\w+) -->\n).*?(<!-- end config-keys -->)", re.DOTALL)
SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any value"}


def section_of(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The section a field holds, if any, and how its keys continue: `.` for a section, `[].` for a list of
    sections."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "."
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        section, _ = section_of(item)
        return section, "[]."
    if is_union(annotation):
        for member in get_args(annotation):
            section, joiner = section_of(member)
            if section is not None:
                return section, joiner
    return None, ""


def is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every dotted key of a section, depth first, in the schema's order; a section's own key comes first."""
    for name, field in model.model_fields.items():
        key = prefix + name
        yield key, field
        section, joiner = section_of(field.annotation)
        if section is not None:
            yield from keys(section, key + joiner)


def type_name(annotation: Any) -> str:
    if annotation in SCALARS:
        return SCALARS[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " / ".join(str(arg) for arg in args)
    if is_union(annotation):
        members = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(members + (["null"] if type(None) in args else []))
    if origin is tuple:
        return "[" + ", ".join(type_name(arg) for arg in args) + "]"
    if origin is list:
        item = type_name(args[0])
        return "list of sections" if item == "section" else f"list of {item}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    raise ValueError(f"no name for the type {annotation!r}: add it to scripts/config_keys.py")


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if isinstance(field.default, BaseModel):
        return ""  # a section: its keys follow
    text = yaml.safe_dump(field.default, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return f"`{text.removesuffix('...').strip()}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the cell


def prose(text: str) -> str:
    return cell(text).replace("<", "\\<")  # `<name>` outside a code span would be read as an HTML tag


SECTION_TABLES = ("eval", "pairs")  # the sections with a table of their own; `job` holds every other key


def table_of(key: str) -> str:
    section = key.split(".")[0]
    return section if section in SECTION_TABLES and "." in key else "job"


def table(name: str) -> str:
    """The markdown table `name` (job: every key outside eval and pairs; eval, pairs: the keys under them)."""
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for key, field in keys(JobConfig):
        if table_of(key) == name:
            lines.append(f"| `{key}` | {cell(type_name(field.annotation))} | {cell(default_text(field))} | "
                         f"{prose(field.description or '')} |")
    return "\n".join(lines) + "\n"


def undescribed_keys() -> list[str]:
    return [key for key, field in keys(JobConfig) if not field.description]


def with_tables(readme: str) -> str:
    """README's text with every table between markers generated afresh."""
    return TABLE.sub(lambda match: match.group(1) + table(match.group(2)) + match.group(3), readme)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="exit 1 when README's tables are not current")
    action.add_argument("--write", action="store_true", help="rewrite README's tables in place")
    args = parser.parse_args()
    if undescribed_keys():
        print(f"keys without a description (Field(description=...)): {', '.join(undescribed_keys())}",
              file=sys.stderr)
        return 1
    current = README.read_text()
    if args.write:
        README.write_text(with_tables(current))
    elif args.check:
        if with_tables(current) != current:
            print("README's tables of config keys are not current: run python scripts/config_keys.py --write",
                  file=sys.stderr)
            return 1
    else:
        print("\n".join(table(name) for name in ("job",) + SECTION_TABLES), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
