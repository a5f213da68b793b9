#!/usr/bin/env python3
"""Fail if the files of a crate import each other in a cycle.

Each `crate::a::b::Name` or `super::Name` path in a file's code (comments and `#[cfg(test)]`
modules left out) is resolved to the file that defines `Name` (following `pub use`
re-exports), giving a file-to-file graph; any cycle in it is printed and fails the check.
A `mod.rs` declaring or using its own children (`mod x;`, `self::x::Y`) is not counted: the
children are part of it. A child naming its parent's items (`super::Y`) is.

    python3 scripts/check-imports.py tower-degrade/src
"""
import os
import re
import sys

DEF = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+fn|async\s+fn|unsafe\s+fn|fn|struct|enum|trait|type|const|static|mod|macro_rules!)\s+(\w+)", re.M)
REEXPORT = re.compile(r"^\s*pub(?:\([^)]*\))?\s+use\s+([^;]+);", re.M)
PATH = re.compile(r"\b(crate|super)((?:::\w+)+)")
GROUP = re.compile(r"\b(crate|super)((?:::\w+)*)::\{([^}]*)\}")


def code(text):
    text = text.split("#[cfg(test)]")[0]
    return "\n".join(l for l in text.splitlines() if not l.strip().startswith("//"))


def module_of(root, path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib"):
        rel = rel[:-1]
    return tuple(rel)


def main(root):
    files = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(d, n)
                files[module_of(root, p)] = (p, code(open(p).read()))
    defs = {}  # (module, name) -> module of the defining file
    for m, (_, text) in files.items():
        for name in DEF.findall(text):
            defs.setdefault((m, name), m)

    def expand(use):
        """The paths a `use` tree names: `a::{b, c::D}` gives a::b and a::c::D."""
        use = " ".join(use.split())
        m = re.match(r"(.*?)::\{(.*)\}$", use)
        if not m:
            return [use.split(" as ")[0].split("::")]
        head = m.group(1).split("::")
        return [head + i.strip().split(" as ")[0].split("::") for i in m.group(2).split(",") if i.strip()]

    def absolute(module, path):
        """`path` as written in `module`'s file, from the crate root."""
        kind, rest = path[0], path[1:]
        if kind == "crate":
            return list(rest)
        if kind == "self":
            return list(module) + list(rest)
        if kind == "super":
            return list(module[:-1]) + list(rest)
        return None  # another crate

    def resolve(parts, seen=frozenset()):
        """The module of the file that defines the item at `parts` (a crate-root path)."""
        base = ()
        while parts and base + (parts[0],) in files:
            base += (parts[0],)
            parts = parts[1:]
        if not parts:
            return base
        name = parts[0]
        if (base, name) in defs:
            return defs[(base, name)]
        if (base, name) not in seen:
            for tree in REEXPORT.findall(files[base][1]):
                for path in expand(tree):
                    if path[-1] == name:
                        target = absolute(base, path)
                        if target is not None:
                            return resolve(target, seen | {(base, name)})
        return base

    graph = {m: set() for m in files}
    for m, (_, text) in files.items():
        paths = []
        for kw, head, items in GROUP.findall(text):
            for item in items.split(","):
                item = item.strip().split(" as ")[0]
                if item and item != "self":
                    paths.append((kw, head.split("::")[1:] + item.split("::")))
        for m_ in PATH.finditer(text):
            if text[m_.end():].lstrip().startswith("::{"):
                continue  # the head of a group, counted item by item above
            paths.append((m_.group(1), m_.group(2).split("::")[1:]))
        for kw, parts in paths:
            target = absolute(m, [kw] + [p for p in parts if p])
            target = resolve(target)
            if target != m:
                graph[m].add(target)
    # Children declared by a mod.rs are not imports; a child naming its parent's own items is.
    cycles = set()

    def dfs(node, stack, on_stack, done):
        on_stack.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                cyc = stack[stack.index(nxt):]
                k = min(range(len(cyc)), key=lambda i: cyc[i])
                cycles.add(tuple(cyc[k:] + cyc[:k]))
            elif nxt not in done:
                dfs(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done = set()
    for n in sorted(graph):
        if n not in done:
            dfs(n, [], set(), done)
    name = lambda m: os.path.relpath(files[m][0], root)
    for c in sorted(cycles):
        print("import cycle: " + " -> ".join(name(m) for m in c + (c[0],)))
    if cycles:
        return 1
    print(f"no import cycle among the {len(files)} files of {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "src"))
