#!/usr/bin/env python3
"""Regenerates the key tables of docs/config.md from include/emt/core/config.h (the visit() lists are the truth).

Usage: scripts/gen_config_doc.py > docs/config.md   (a test checks that every key is documented)
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "include/emt/core/config.h"
text = SRC.read_text()

structs = {}
for m in re.finditer(r"struct (\w+) \{(.*?)\n\};", text, re.S):
    name, body = m.group(1), m.group(2)
    members = {}
    for d in re.finditer(r"^\s+([\w:<>, ]+?)\s+(\w+)(?:\s*=\s*([^;]*))?;", body, re.M):
        typ, field, default = d.group(1).strip(), d.group(2), (d.group(3) or "").strip()
        members[field] = (typ, default)
    # the doc may be adjacent string literals over several lines ("..." "...")
    fields = [(f, var, "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', doc)))
              for f, var, doc in re.findall(r'v\("(\w+)",\s*(\w+),\s*((?:"(?:[^"\\]|\\.)*"\s*)+)\);', body)]
    structs[name] = (members, fields)


def default_of(typ, default):
    if default:
        d = default.replace("{{", "{").replace("}}", "}")
        return d
    if typ.startswith("std::vector") or typ.startswith("std::map"):
        return "[]" if typ.startswith("std::vector") else "{}"
    if typ == "std::string":
        return '""'
    return ""


rows = []


def walk(struct, prefix):
    members, fields = structs[struct]
    for key, member, doc in fields:
        typ, default = members.get(member, ("", ""))
        inner = re.match(r"std::map<std::string, (\w+)>", typ)
        if typ in structs:
            rows.append((prefix + key, "section", "", doc, True))
            walk(typ, prefix + key + ".")
        elif inner and inner.group(1) in structs:
            rows.append((prefix + key, "map of sections", "{}", doc, False))
            walk(inner.group(1), prefix + key + ".<name>.")
        else:
            short = typ.replace("std::", "").replace("int64_t", "int").replace("string", "str")
            rows.append((prefix + key, short, default_of(typ, default), doc, False))


walk("RunConfig", "")
out = sys.stdout
out.write(open(Path(__file__).resolve().parent / "config_doc_intro.md").read())
for key, typ, default, doc, is_section in rows:
    if is_section:
        out.write(f"\n### `{key}`\n\n{doc}.\n\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n")
    else:
        d = default.replace("|", "\\|")
        out.write(f"| `{key}` | {typ} | `{d}` | {doc.replace(chr(124), chr(92) + chr(124))} |\n")
