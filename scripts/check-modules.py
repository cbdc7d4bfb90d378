#!/usr/bin/env python3
"""Checks the workspace's layering: no import circle between the top-level modules of a crate
(test code included), and no service crate depending on another service crate (the `meshgate`
binary, which composes all six, excepted). Dev-dependencies may name a service: a test that needs
a neighbour boots the real one rather than a mock of it.

A module of a crate is a file or folder directly under its `src/`; a reference of module A to B is
`crate::B` (also inside `crate::{...}` groups), a `super::` path that climbs to the crate root, or
a name the crate root re-exports from B. Prints each circle with the files that close it.

Usage: scripts/check-modules.py [ROOT]   (ROOT defaults to the repository)
"""

import os
import re
import sys
import tomllib

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The binary that composes the services; every other service stands on shared crates only.
COMPOSER = "meshgate"


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def top_modules(src):
    modules = set()
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if name.endswith(".rs") and name not in ("lib.rs", "main.rs"):
            modules.add(name[:-3])
        elif os.path.isdir(path) and name != "bin":
            modules.add(name)
    return modules


def module_path(src, path):
    """`src/a/b.rs` → ['a', 'b']; `src/a/mod.rs` → ['a']."""
    parts = os.path.relpath(path, src)[:-3].split(os.sep)
    return parts[:-1] if parts[-1] == "mod" else parts


def group_items(text, start):
    """The top-level items of the `{...}` group whose body starts at `start`."""
    depth, end = 1, start
    while depth and end < len(text):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        end += 1
    items, depth, current = [], 0, ""
    for ch in text[start : end - 1]:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [m.group(1) for item in items if (m := re.match(r"\s*(\w+)", item))]


def references(text, own_path):
    refs = set(re.findall(r"\bcrate::(\w+)", text))
    for m in re.finditer(r"\bcrate::\{", text):
        refs.update(group_items(text, m.end()))
    for m in re.finditer(r"\b((?:super::)+)(\w+)", text):
        if m.group(1).count("super::") >= len(own_path):
            refs.add(m.group(2))
    return refs


def reexports(src, modules):
    names = {}
    for root_file in ("lib.rs", "main.rs"):
        path = os.path.join(src, root_file)
        if not os.path.exists(path):
            continue
        text = strip_comments(open(path, encoding="utf-8").read())
        for m in re.finditer(r"pub(?:\([^)]*\))?\s+use\s+(?:self::|crate::)?(\w+)::([^;]+);", text):
            if m.group(1) in modules:
                for name in re.findall(r"\b([A-Za-z_]\w*)\b", m.group(2)):
                    if name not in ("self", "as", "crate"):
                        names.setdefault(name, m.group(1))
    return names


def strongly_connected(nodes, edges):
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            found.append(component)

    sys.setrecursionlimit(10_000)
    for v in nodes:
        if v not in index:
            visit(v)
    return [c for c in found if len(c) > 1]


def crate_circles(src):
    modules = top_modules(src)
    exported = reexports(src, modules)
    edges, evidence = {m: set() for m in modules}, {}
    for folder, _, files in os.walk(src):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".rs"):
                continue
            own = module_path(src, path)
            if not own or own[0] in ("lib", "main") or own[0] == "bin":
                continue
            text = strip_comments(open(path, encoding="utf-8").read())
            for ref in references(text, own):
                target = ref if ref in modules else exported.get(ref)
                if target and target != own[0]:
                    edges[own[0]].add(target)
                    evidence.setdefault((own[0], target), set()).add(os.path.relpath(path, ROOT))
    return [
        [(a, b, sorted(evidence[(a, b)])) for a in sorted(c) for b in sorted(edges[a]) if b in c]
        for c in strongly_connected(sorted(modules), edges)
    ]


def service_dependencies():
    services = os.path.join(ROOT, "services")
    names = {}
    for crate in os.listdir(services):
        manifest = os.path.join(services, crate, "Cargo.toml")
        if os.path.exists(manifest):
            names[tomllib.load(open(manifest, "rb"))["package"]["name"]] = crate
    wrong = []
    for name, crate in sorted(names.items()):
        if crate == COMPOSER:
            continue
        manifest = tomllib.load(open(os.path.join(services, crate, "Cargo.toml"), "rb"))
        for section in ("dependencies", "build-dependencies"):
            for dep in manifest.get(section, {}):
                if dep in names and dep != name:
                    wrong.append(f"{name} depends on the service crate {dep} ({section})")
    return wrong


def main():
    problems = 0
    for group in ("services", "shared"):
        for crate in sorted(os.listdir(os.path.join(ROOT, group))):
            src = os.path.join(ROOT, group, crate, "src")
            if not os.path.isdir(src):
                continue
            for circle in crate_circles(src):
                problems += 1
                print(f"{group}/{crate}: import circle between its modules:")
                for a, b, files in circle:
                    print(f"  {a} -> {b}  ({', '.join(files)})")
    for line in service_dependencies():
        problems += 1
        print(line)
    if problems:
        print(f"check-modules: {problems} problem(s)")
        return 1
    print("check-modules: no import circle inside a crate; services depend on shared crates only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
