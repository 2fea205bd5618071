#!/usr/bin/env python3
"""The house rules of src/ that the compiler does not check (ARCHITECTURE.md, "Layout"):

- no source file over 700 lines;
- no import circle between files: a `use crate::…` / `super::…` / child-module path from
  file A to file B and back, through any chain (re-exports are followed to the file that
  defines the item, so a folder's mod.rs listing its parts is not a circle);
- dependencies point down: registry, cache and image never import fs, mount, fuse or
  runtime; registry imports neither cache nor image; fs never imports fuse, mount or runtime.

Prints what it finds and exits 1 if a rule is broken. `--graph` prints every edge.
"""
import os
import re
import sys

MAX_LINES = 700
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
# module (first component under crate) -> modules it must never import
FORBIDDEN = {
    "registry": {"fs", "mount", "fuse", "runtime", "cache", "image"},
    "cache": {"fs", "mount", "fuse", "runtime", "image"},
    "image": {"fs", "mount", "fuse", "runtime"},
    "buf": {"fs", "mount", "fuse", "runtime", "cache", "image", "registry"},
    "fs": {"fuse", "mount", "runtime"},
    "fuse": {"mount", "runtime"},
}


def module_of(path):
    """src/a/b.rs -> ('a','b'); src/a/mod.rs -> ('a',); src/lib.rs -> ()."""
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def expand_use_tree(tree):
    """'a::{b, c::{d, e}}' -> ['a::b', 'a::c::d', 'a::c::e'] (aliases dropped)."""
    tree = re.sub(r"\s+", "", tree)
    out = []

    def walk(prefix, s):
        i = s.find("{")
        if i < 0:
            s = s.split("as")[0] if re.search(r"\bas\b", s) else s
            out.append(prefix + s)
            return
        head = s[:i]
        body = s[i + 1 : s.rfind("}")]
        depth, start = 0, 0
        parts = []
        for j, ch in enumerate(body):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(body[start:j])
                start = j + 1
        parts.append(body[start:])
        for p in parts:
            if p:
                walk(prefix + head, p)

    walk("", tree)
    return [re.sub(r"as[A-Za-z_0-9]+$", "", p) for p in out]


def main():
    files = {}
    for root, _, names in os.walk(SRC):
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(root, n)
                files[module_of(p)] = p
    if ("",) in files:
        del files[("",)]
    texts = {m: strip_comments(open(p).read()) for m, p in files.items()}
    children = {m: set() for m in files}
    for m in files:
        if m:
            children.setdefault(m[:-1], set()).add(m[-1])

    # `pub use x::Y` in a module: Y -> full path, to follow re-exports.
    reexports = {}
    for m, t in texts.items():
        for tree in re.findall(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", t):
            for p in expand_use_tree(tree):
                segs = p.split("::")
                reexports.setdefault(m, {})[segs[-1]] = absolute(m, segs, children)

    def resolve(segs, seen=0):
        """Longest module prefix that is a file; follow a re-export of the next name."""
        if segs is None:
            return None
        for k in range(len(segs), -1, -1):
            mod = tuple(segs[:k])
            if mod in files:
                rest = segs[k:]
                target = reexports.get(mod, {}).get(rest[0]) if rest else None
                if target and seen < 8 and list(target) != list(mod) + rest[:1]:
                    return resolve(list(target) + rest[1:], seen + 1)
                return mod
        return None

    edges = {m: set() for m in files}
    for m, t in texts.items():
        # An inline module (`mod tests { use super::*; }`) speaks for its file: its
        # `super` is the file itself.
        for base, block in split_inline_modules(m, t):
            paths = []
            for tree in re.findall(r"\buse\s+([^;]+);", block):
                paths += [p.split("::") for p in expand_use_tree(tree)]
            paths += [p.split("::") for p in re.findall(r"\b((?:crate|super)(?:::\w+)+)", block)]
            for segs in paths:
                target = resolve(absolute(base, segs, children))
                if target is not None and target != m and target != ():
                    edges[m].add(target)

    problems = []
    for m, p in sorted(files.items()):
        n = sum(1 for _ in open(p))
        if n > MAX_LINES:
            problems.append(f"{os.path.relpath(p, SRC + '/..')}: {n} lines (most {MAX_LINES})")
    for m, targets in sorted(edges.items()):
        for t in sorted(targets):
            if m and t and t[0] in FORBIDDEN.get(m[0], ()):
                problems.append(f"layer: {name(m)} imports {name(t)}")
    for scc in strongly_connected(edges):
        if len(scc) > 1:
            problems.append("circle: " + " <-> ".join(sorted(name(x) for x in scc)))

    if "--graph" in sys.argv:
        for m in sorted(edges):
            for t in sorted(edges[m]):
                print(f"{name(m)} -> {name(t)}")
    for p in problems:
        print(p)
    big = sorted(((sum(1 for _ in open(p)), p) for p in files.values()), reverse=True)[:5]
    print("largest files: " + ", ".join(f"{os.path.relpath(p, SRC)} {n}" for n, p in big))
    print(f"{len(files)} files, {sum(len(e) for e in edges.values())} import edges, "
          f"{sum(1 for s in strongly_connected(edges) if len(s) > 1)} circles")
    sys.exit(1 if problems else 0)


def absolute(m, segs, children):
    segs = [s for s in segs if s]
    if not segs:
        return None
    if segs[0] == "crate":
        return segs[1:]
    if segs[0] == "self":
        return list(m) + segs[1:]
    if segs[0] == "super":
        base = list(m)
        while segs and segs[0] == "super":
            base = base[:-1]
            segs = segs[1:]
        return base + segs
    if segs[0] in children.get(m, ()):  # a child module used by its bare name
        return list(m) + segs
    return None  # another crate or std


def split_inline_modules(m, text):
    """[(module path, text)]: the file outside inline `mod x { … }` blocks, and each block
    with the path m + (x,), so that its `super::` names the file."""
    out, rest, pos = [], [], 0
    for match in re.finditer(r"\bmod\s+(\w+)\s*\{", text):
        if match.start() < pos:
            continue
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        rest.append(text[pos : match.start()])
        out.append((m + (match.group(1),), text[match.end() : i - 1]))
        pos = i
    rest.append(text[pos:])
    return [(m, "".join(rest))] + out


def name(m):
    return "::".join(m) or "crate"


def strongly_connected(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            out.append(scc)

    for v in edges:
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    main()
